//! Section 8 of docs/reliability.md. `/ready` and `agent_storage_up` follow
//! Redis without traffic.

use crate::common::*;
use crate::support::*;

#[test]
fn ready_follows_redis_without_traffic() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let up = [("backend", "redis")];
    let agent = start(redis_options(&redis));
    assert_eq!(agent.http_get("/ready").status, 200);
    assert_eq!(value(&agent.scrape(), "agent_storage_up", &up), 1.0);

    redis.stop();
    let (noticed, body) = wait_ready_status(&agent, 503);
    assert!(body.starts_with("Redis unreachable: "), "{body:?}");
    assert_eq!(value(&agent.scrape(), "agent_storage_up", &up), 0.0);
    assert_eq!(agent.http_get("/health").status, 200);
    // An agent started meanwhile is not ready from the start.
    let late = start(redis_options(&redis));
    assert_eq!(late.http_get("/ready").status, 503);
    assert_eq!(value(&late.scrape(), "agent_storage_up", &up), 0.0);

    redis.restart();
    let (back, _) = wait_ready_status(&agent, 200);
    wait_ready_status(&late, 200);
    assert_eq!(value(&agent.scrape(), "agent_storage_up", &up), 1.0);
    assert_eq!(value(&late.scrape(), "agent_storage_up", &up), 1.0);
    assert_logged(&agent, "storage is not usable", 1);
    assert_logged(&agent, "storage is usable again", 1);
    println!(
        "[ready] Redis killed: /ready 503 after {:.0} ms; restarted: /ready 200 after {:.0} ms \
         (no peer traffic; PING every 1 s)",
        ms(noticed),
        ms(back)
    );
    assert_no_panic(&agent);
}
