//! Section 7 of docs/reliability.md. Process CPU and memory metrics agree
//! with /proc under load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::*;

#[test]
fn process_metrics_match_proc_under_cpu_load() {
    const LOADERS: usize = 3;
    const INTERVALS: usize = 6;
    let agent = start(AgentOptions::default().env("AGENT_METRICS__PROCESS_INTERVAL", "1s"));
    let pid = agent.pid();
    let hz = clock_ticks_per_second();

    let stop = Arc::new(AtomicBool::new(false));
    let loaders: Vec<JoinHandle<()>> = (0..LOADERS)
        .map(|t| {
            let stop = Arc::clone(&stop);
            let mut peer = agent.connect();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let line = if n.is_multiple_of(2) {
                        format!(r#"{{"id":{n},"op":"ping"}}"#)
                    } else {
                        format!(r#"{{"id":{n},"op":"get","key":"cpu{t}"}}"#)
                    };
                    let reply = peer.request(&line);
                    assert!(
                        reply.starts_with(&format!(r#"{{"id":{n},"ok":true"#)),
                        "{reply}"
                    );
                    n += 1;
                }
            })
        })
        .collect();

    // Each time the gauge changes, a new sampling interval has ended: note
    // when, and the CPU ticks /proc reports at that moment.
    let cpu_gauge = || value(&agent.scrape(), "process_cpu_usage", &[]);
    let mut last = cpu_gauge();
    let mut edges: Vec<(Instant, u64, f64)> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while edges.len() <= INTERVALS {
        assert!(
            Instant::now() < deadline,
            "process_cpu_usage changed {} times",
            edges.len()
        );
        let (at, ticks) = (Instant::now(), cpu_ticks(pid));
        let v = cpu_gauge();
        if v != last {
            edges.push((at, ticks, v));
            last = v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Memory under the same load: the gauge against VmRSS read around it.
    let mut mem = (0.0, 0, 0);
    let mem_ok = wait_until(|| {
        let before = vm_rss_bytes(pid);
        let gauge = value(&agent.scrape(), "process_memory_bytes", &[]);
        let after = vm_rss_bytes(pid);
        mem = (gauge, before, after);
        [before, after]
            .iter()
            .all(|&rss| (gauge - rss as f64).abs() <= 0.10 * rss as f64)
    });
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().expect("load peer failed");
    }

    let (first, rest) = edges.split_first().unwrap();
    let end = rest.last().unwrap();
    let wall = end.0.duration_since(first.0).as_secs_f64();
    let truth = (end.1 - first.1) as f64 / hz / wall * 100.0;
    // Each later gauge value covers the interval since the previous edge.
    let mut weighted = 0.0;
    let mut prev = first.0;
    for (at, _, v) in rest {
        weighted += v * at.duration_since(prev).as_secs_f64();
        prev = *at;
    }
    let reported = weighted / wall;
    let error = (reported - truth).abs() / truth;
    let values: Vec<String> = rest.iter().map(|e| format!("{:.1}", e.2)).collect();
    println!(
        "[process] over {wall:.1} s ({} samples: {}): process_cpu_usage averages {reported:.1}%, \
         /proc utime+stime gives {truth:.1}% of one core: {:.1}% apart (bound 15%)",
        rest.len(),
        values.join(", "),
        error * 100.0
    );
    println!(
        "[process] process_memory_bytes {:.1} MiB, VmRSS {:.1}..{:.1} MiB (bound 10%)",
        mem.0 / 1048576.0,
        mem.1 as f64 / 1048576.0,
        mem.2 as f64 / 1048576.0
    );
    assert!(truth > 20.0, "the load only used {truth:.1}% CPU");
    assert!(
        error <= 0.15,
        "process_cpu_usage {reported:.1}% vs /proc {truth:.1}%"
    );
    assert!(mem_ok, "process_memory_bytes vs VmRSS: {mem:?}");
    assert_no_panic(&agent);
}
