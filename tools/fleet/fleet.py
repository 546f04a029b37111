#!/usr/bin/env python3
"""Helper of tools/fleet/run.sh: free ports, the load generator, snapshots
of /proc and of Prometheus, and the results table. Standard library only.

  fleet.py ports N                      N distinct free loopback ports
  fleet.py loadgen PORTS_FILE RATE SECONDS OUT_JSON
  fleet.py meta MODE AGENTS RATE INTERVAL PROM_URL PROM_PID OUT_JSON
  fleet.py snapshot MODE PROM_URL PROM_PID AGENT_PIDS_FILE LOADGEN_PID OUT_JSON
  fleet.py scrape-sizes PORTS_FILE OUT_JSON
  fleet.py summarize MODE META_JSON SNAP0 SNAP1 LOADGEN_JSON OUT_JSON [SCRAPE_SIZES_JSON]
  fleet.py report OUT_MD RESULT_JSON...  (also writes OUT_MD with .json)

Every network call goes to 127.0.0.1 and has a timeout; every loop is
bounded in count or time.
"""

import asyncio
import gzip
import json
import os
import socket
import sys
import time
import urllib.parse
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- ports


def ports(n):
    """Binds n sockets at once, so the ports are distinct, then frees them."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        print(" ".join(str(s.getsockname()[1]) for s in socks))
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------- load


async def one_agent(port, rate, deadline, stats, index):
    """One connection to one agent; `rate` requests a second on a fixed
    timetable (a late reply does not shift the next send): per 10 requests,
    1 put and 9 gets over 100 keys. Reconnects at most 20 times."""
    period = 1.0 / rate
    reconnects = 0
    n = 0
    loop = asyncio.get_running_loop()
    next_at = loop.time() + (index % 50) * period / 50  # spread the agents
    while loop.time() < deadline and reconnects <= 20:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 5)
        except (OSError, asyncio.TimeoutError):
            reconnects += 1
            stats["connect_errors"] += 1
            await asyncio.sleep(0.5)
            continue
        try:
            while loop.time() < deadline:
                key = f"k{n % 100}"
                if n % 10 == 0:
                    req = {"id": n, "op": "put", "key": key, "value": f"v{n}"}
                else:
                    req = {"id": n, "op": "get", "key": key}
                t0 = loop.time()
                writer.write((json.dumps(req) + "\n").encode())
                line = await asyncio.wait_for(reader.readline(), 5)
                if not line:
                    raise ConnectionError("EOF")
                stats["latency_sum"] += loop.time() - t0
                reply = json.loads(line)
                stats["sent"] += 1
                if reply.get("ok") is True:
                    stats["ok"] += 1
                else:
                    stats["not_ok"] += 1
                n += 1
                next_at += period
                delay = next_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -1:  # more than a second behind: count, catch up
                    stats["late"] += 1
                    next_at = loop.time()
        except (OSError, ConnectionError, asyncio.TimeoutError, ValueError):
            stats["errors"] += 1
            reconnects += 1
        finally:
            writer.close()


async def loadgen_main(agent_ports, rate, seconds, out):
    stats = {k: 0 for k in ("sent", "ok", "not_ok", "errors", "connect_errors", "late")}
    stats["latency_sum"] = 0.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + seconds
    tasks = [asyncio.create_task(one_agent(p, rate, deadline, stats, i))
             for i, p in enumerate(agent_ports)]
    await asyncio.wait_for(asyncio.gather(*tasks), seconds + 30)
    stats["seconds"] = loop.time() - start
    stats["agents"] = len(agent_ports)
    stats["rate_per_agent"] = rate
    stats["achieved_per_second"] = stats["sent"] / stats["seconds"]
    stats["mean_latency_ms"] = 1000 * stats["latency_sum"] / max(stats["sent"], 1)
    with open(out, "w") as f:
        json.dump(stats, f, indent=1)


# ---------------------------------------------------------------- snapshots


def proc(pid):
    """CPU seconds (user + system) and RSS bytes of one process; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/statm") as f:
            rss_pages = int(f.read().split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    # After "pid (comm)": fields[0] is state (field 3); utime and stime are 14, 15.
    return {"cpu": (int(fields[11]) + int(fields[12])) / CLK_TCK, "rss": rss_pages * PAGE}


def host_cpu():
    """Busy and total jiffies of the whole host, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return {"busy": (sum(v[:8]) - idle) / CLK_TCK, "total": sum(v[:8]) / CLK_TCK}


def http(url, timeout=10, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read(), r.headers


def prom_self(prom_url):
    """Prometheus's own /metrics, read directly (it does not scrape itself,
    so its own series do not count in the head)."""
    body, _ = http(prom_url + "/metrics")
    want = {
        "prometheus_tsdb_head_samples_appended_total": 0.0,
        "prometheus_tsdb_head_series": 0.0,
        "process_cpu_seconds_total": 0.0,
        "process_resident_memory_bytes": 0.0,
        "go_memstats_heap_inuse_bytes": 0.0,
        "prometheus_tsdb_head_chunks": 0.0,
    }
    for line in body.decode().splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in want:
            want[name] += float(line.rsplit(" ", 1)[1])
    return want


def query(prom_url, expr, at=None):
    """One instant query; the sum of the result's values (0 if empty)."""
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    body, _ = http(prom_url + "/api/v1/query?" + urllib.parse.urlencode(params))
    res = json.loads(body)["data"]["result"]
    return sum(float(r["value"][1]) for r in res)


AGENT_QUERIES = {
    "rw_bytes": 'sum(agent_remote_write_request_bytes_total)',
    "rw_requests_success": 'sum(agent_remote_write_requests_total{result="success"})',
    "rw_requests_all": 'sum(agent_remote_write_requests_total)',
    "rw_samples_sent": 'sum(agent_remote_write_samples_sent_total)',
    "rw_samples_dropped": 'sum(agent_remote_write_samples_dropped_total)',
    "rw_samples_failed": 'sum(agent_remote_write_samples_failed_total)',
    "agents_seen": 'count(count by (instance) ({job="agent"}))',
    "series_job_agent": 'count({job="agent"})',
    "scrape_samples": 'sum(scrape_samples_scraped{job="agent"})',
    "up": 'sum(up{job="agent"})',
}


def snapshot(mode, prom_url, prom_pid, pids_file, loadgen_pid, out):
    try:
        take_snapshot(mode, prom_url, prom_pid, pids_file, loadgen_pid, out)
    except OSError as e:  # URLError and timeouts included
        sys.exit(f"Prometheus at {prom_url} did not answer ({e}). Every agent keeps one "
                 "connection open to it: with more agents than --web.max-connections "
                 "(default 512) none is left; pass --prometheus-flags "
                 "--web.max-connections=N")


def take_snapshot(mode, prom_url, prom_pid, pids_file, loadgen_pid, out):
    with open(pids_file) as f:
        agent_pids = [int(x) for x in f.read().split()]
    t = time.time()
    snap = {
        "mode": mode,
        "time": t,
        "host": host_cpu(),
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "prometheus": proc(prom_pid),
        "loadgen": proc(loadgen_pid) if int(loadgen_pid) > 0 else None,
        "agents": {str(p): proc(p) for p in agent_pids},
        "prom_self": prom_self(prom_url),
        "agent_metrics": {k: query(prom_url, q, t) for k, q in AGENT_QUERIES.items()},
    }
    with open(out, "w") as f:
        json.dump(snap, f, indent=1)


def meta(mode, agents, rate, interval, prom_url, prom_pid, out):
    """The run's settings, and the empty Prometheus's memory (the baseline
    memory per series is computed against)."""
    p = proc(prom_pid)
    own = prom_self(prom_url)
    with open(out, "w") as f:
        json.dump({"mode": mode, "agents": int(agents), "rate": float(rate),
                   "interval_s": float(interval),
                   "prometheus_rss_baseline": p["rss"],
                   "prometheus_heap_baseline": own["go_memstats_heap_inuse_bytes"]}, f)


def scrape_sizes(ports_file, out, n=5):
    """Bytes of one agent scrape, plain and gzip, for the first n agents
    (scrape mode; the metrics port is open)."""
    with open(ports_file) as f:
        agent_ports = [int(x) for x in f.read().split()][:n]
    plain, gz = [], []
    for p in agent_ports:
        body, _ = http(f"http://127.0.0.1:{p}/metrics")
        plain.append(len(body))
        body, headers = http(f"http://127.0.0.1:{p}/metrics",
                             headers={"Accept-Encoding": "gzip"})
        if headers.get("Content-Encoding") != "gzip":
            body = gzip.compress(body)
        gz.append(len(body))
    with open(out, "w") as f:
        json.dump({"plain": sum(plain) / len(plain), "gzip": sum(gz) / len(gz),
                   "agents_measured": len(agent_ports)}, f)


# ---------------------------------------------------------------- results


def summarize(mode, meta_file, s0_file, s1_file, loadgen_file, out, sizes_file=None):
    meta = json.load(open(meta_file))
    s0, s1 = json.load(open(s0_file)), json.load(open(s1_file))
    lg = json.load(open(loadgen_file)) if os.path.exists(loadgen_file) else {}
    dt = s1["time"] - s0["time"]
    p0, p1 = s0["prom_self"], s1["prom_self"]
    m0, m1 = s0["agent_metrics"], s1["agent_metrics"]

    agent_cpu = []
    for pid, a1 in s1["agents"].items():
        a0 = s0["agents"].get(pid)
        if a0 and a1:
            agent_cpu.append(a1["cpu"] - a0["cpu"])
    agent_rss = [a["rss"] for a in s1["agents"].values() if a]
    alive = len(agent_rss)

    samples = p1["prometheus_tsdb_head_samples_appended_total"] - p0["prometheus_tsdb_head_samples_appended_total"]
    prom_cpu = s1["prometheus"]["cpu"] - s0["prometheus"]["cpu"]
    head_series = p1["prometheus_tsdb_head_series"]
    baseline_rss = meta.get("prometheus_rss_baseline", 0)
    d_req = m1["rw_requests_success"] - m0["rw_requests_success"]
    d_bytes = m1["rw_bytes"] - m0["rw_bytes"]
    d_sent = m1["rw_samples_sent"] - m0["rw_samples_sent"]
    host_busy = (s1["host"]["busy"] - s0["host"]["busy"]) / dt
    host_cpus = (s1["host"]["total"] - s0["host"]["total"]) / dt

    r = {
        "mode": mode,
        "agents_started": meta["agents"],
        "agents_alive_at_end": alive,
        "agents_seen_by_prometheus": m1["agents_seen"],
        "interval_s": meta["interval_s"],
        "load_msgs_per_s_per_agent": meta["rate"],
        "load_achieved_msgs_per_s": lg.get("achieved_per_second"),
        "load_errors": (lg.get("errors", 0) + lg.get("connect_errors", 0) + lg.get("not_ok", 0)) if lg else None,
        "load_mean_latency_ms": lg.get("mean_latency_ms"),
        "window_s": dt,
        "prometheus_cpu_s": prom_cpu,
        "prometheus_cpu_cores": prom_cpu / dt,
        "prometheus_rss_bytes": s1["prometheus"]["rss"],
        "prometheus_rss_baseline_bytes": baseline_rss,
        "prometheus_heap_inuse_bytes": p1["go_memstats_heap_inuse_bytes"],
        "prometheus_heap_inuse_baseline_bytes": meta.get("prometheus_heap_baseline", 0),
        "samples_per_s": samples / dt,
        "head_series": head_series,
        "series_per_agent": m1["series_job_agent"] / max(m1["agents_seen"], 1),
        "prometheus_cpu_us_per_sample": 1e6 * prom_cpu / samples if samples else None,
        "prometheus_rss_per_series_bytes": (s1["prometheus"]["rss"] - baseline_rss) / head_series if head_series else None,
        "prometheus_heap_per_series_bytes": (p1["go_memstats_heap_inuse_bytes"] - meta.get("prometheus_heap_baseline", 0)) / head_series if head_series else None,
        "agents_cpu_cores_sum": sum(agent_cpu) / dt,
        "agent_cpu_ms_per_s_mean": 1000 * sum(agent_cpu) / dt / max(len(agent_cpu), 1),
        "agent_cpu_ms_per_s_max": 1000 * max(agent_cpu, default=0) / dt,
        "agent_rss_bytes_mean": sum(agent_rss) / max(alive, 1),
        "agents_rss_bytes_sum": sum(agent_rss),
        "loadgen_cpu_cores": (s1["loadgen"]["cpu"] - s0["loadgen"]["cpu"]) / dt if s0.get("loadgen") and s1.get("loadgen") else None,
        "host_busy_cores": host_busy,
        "host_cores": host_cpus,
        "host_loadavg_end": s1["loadavg"],
    }
    if mode == "push":
        r.update({
            "pushes_per_s": d_req / dt,
            "bytes_per_push": d_bytes / d_req if d_req else None,
            "samples_per_push": d_sent / d_req if d_req else None,
            "push_bytes_per_s": d_bytes / dt,
            "push_requests_not_success": (m1["rw_requests_all"] - m0["rw_requests_all"]) - d_req,
            "samples_dropped_or_failed": m1["rw_samples_dropped"] + m1["rw_samples_failed"],
        })
    else:
        sizes = json.load(open(sizes_file)) if sizes_file and os.path.exists(sizes_file) else {}
        r.update({
            "targets_up": m1["up"],
            "samples_per_scrape": m1["scrape_samples"] / max(m1["up"], 1),
            "scrape_bytes_plain": sizes.get("plain"),
            "scrape_bytes_gzip": sizes.get("gzip"),
        })
    with open(out, "w") as f:
        json.dump(r, f, indent=1)


ROWS = [
    ("agents alive / seen by Prometheus", lambda r: f'{r["agents_alive_at_end"]} / {r["agents_seen_by_prometheus"]:.0f}'),
    ("push / scrape interval", lambda r: f'{r["interval_s"]} s'),
    ("load (msg/s, all agents)", lambda r: f'{r["load_achieved_msgs_per_s"]:.0f} ({r["load_msgs_per_s_per_agent"]}/agent), {r["load_errors"]} errors' if r["load_achieved_msgs_per_s"] else "-"),
    ("measured window", lambda r: f'{r["window_s"]:.0f} s'),
    ("samples ingested/s", lambda r: f'{r["samples_per_s"]:.0f}'),
    ("head series", lambda r: f'{r["head_series"]:.0f}'),
    ("series per agent", lambda r: f'{r["series_per_agent"]:.0f}'),
    ("Prometheus CPU (cores)", lambda r: f'{r["prometheus_cpu_cores"]:.4f}'),
    ("Prometheus CPU per sample", lambda r: f'{r["prometheus_cpu_us_per_sample"]:.1f} µs' if r["prometheus_cpu_us_per_sample"] else "-"),
    ("Prometheus RSS", lambda r: f'{r["prometheus_rss_bytes"] / 2**20:.0f} MiB (empty: {r["prometheus_rss_baseline_bytes"] / 2**20:.0f} MiB)'),
    ("Prometheus RSS per head series", lambda r: f'{r["prometheus_rss_per_series_bytes"]:.0f} B' if r["prometheus_rss_per_series_bytes"] else "-"),
    ("Prometheus Go heap per head series", lambda r: f'{r["prometheus_heap_per_series_bytes"]:.0f} B' if r["prometheus_heap_per_series_bytes"] else "-"),
    ("agents' CPU, sum (cores)", lambda r: f'{r["agents_cpu_cores_sum"]:.3f}'),
    ("agent CPU, mean / max (ms per s)", lambda r: f'{r["agent_cpu_ms_per_s_mean"]:.2f} / {r["agent_cpu_ms_per_s_max"]:.2f}'),
    ("agent RSS, mean", lambda r: f'{r["agent_rss_bytes_mean"] / 2**20:.1f} MiB'),
    ("bytes per push (snappy)", lambda r: f'{r["bytes_per_push"]:.0f}' if r.get("bytes_per_push") else "-"),
    ("samples per push", lambda r: f'{r["samples_per_push"]:.0f}' if r.get("samples_per_push") else "-"),
    ("push bytes/s, all agents", lambda r: f'{r["push_bytes_per_s"]:.0f}' if r.get("push_bytes_per_s") else "-"),
    ("failed pushes / lost samples", lambda r: f'{r["push_requests_not_success"]:.0f} / {r["samples_dropped_or_failed"]:.0f}' if "push_requests_not_success" in r else "-"),
    ("samples per scrape", lambda r: f'{r["samples_per_scrape"]:.0f}' if r.get("samples_per_scrape") else "-"),
    ("bytes per scrape (plain / gzip)", lambda r: f'{r["scrape_bytes_plain"]:.0f} / {r["scrape_bytes_gzip"]:.0f}' if r.get("scrape_bytes_plain") else "-"),
    ("load generator CPU (cores)", lambda r: f'{r["loadgen_cpu_cores"]:.3f}' if r.get("loadgen_cpu_cores") is not None else "-"),
    ("host busy (cores of total)", lambda r: f'{r["host_busy_cores"]:.2f} of {r["host_cores"]:.0f}'),
]


def report(out_md, result_files):
    results = [json.load(open(f)) for f in result_files]
    names = {"push": "A: remote write", "scrape": "B: scrape"}
    header = "| | " + " | ".join(names.get(r["mode"], r["mode"]) for r in results) + " |"
    lines = [header, "|---" * (len(results) + 1) + "|"]
    for label, fmt in ROWS:
        cells = []
        for r in results:
            try:
                cells.append(fmt(r))
            except (KeyError, TypeError, ValueError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    with open(out_md, "w") as f:
        f.write(table + "\n")
    base = out_md[:-3] if out_md.endswith(".md") else out_md
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "ports":
        ports(int(args[0]))
    elif cmd == "loadgen":
        agent_ports = [int(x) for x in open(args[0]).read().split()]
        asyncio.run(loadgen_main(agent_ports, float(args[1]), float(args[2]), args[3]))
    elif cmd == "meta":
        meta(*args)
    elif cmd == "snapshot":
        snapshot(*args)
    elif cmd == "scrape-sizes":
        scrape_sizes(args[0], args[1])
    elif cmd == "summarize":
        summarize(*args)
    elif cmd == "report":
        report(args[0], args[1:])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
