mod common;
use common::*;

#[test]
fn put_get_over_tcp() {
    let agent = Agent::start();
    let mut peer = agent.connect();
    assert_eq!(peer.request(r#"{"id":1,"op":"put","key":"a","value":"x"}"#), r#"{"id":1,"ok":true}"#);
    assert_eq!(peer.get("a")["value"], "x");
    let text = agent.scrape();
    assert_eq!(sample(&text, "messages_received_total", &[]), Some(2.0));
}
