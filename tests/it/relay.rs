//! The end-to-end path: a committed row reaches exactly the sockets it should.

use crate::harness::*;

#[tokio::test]
async fn business_insert_reaches_dashboard_and_owner_only() {
    let db = TestDb::demo("routing_business").await;
    let relay = TestRelay::start(&db).await;
    let mut dashboard = relay.dashboard().await;
    let mut owner = relay.notifications("2").await;
    let mut other = relay.notifications("4").await;

    let id = db.business(2, "Blue Door Cafe").await;
    let to_dashboard = dashboard.event().await;
    assert_eq!(to_dashboard["channel"], "business_events");
    assert_eq!(to_dashboard["table"], "businesses");
    assert_eq!(to_dashboard["op"], "INSERT");
    assert_eq!(to_dashboard["data"]["id"], id);
    assert_eq!(to_dashboard["data"]["owner_id"], 2);
    let to_owner = owner.event().await;
    assert_eq!(to_owner, to_dashboard);

    // User 4 owns the next business: the first thing they see must be it,
    // which proves they never got the first one.
    let theirs = db.business(4, "Other Place").await;
    assert_eq!(other.event().await["data"]["id"], theirs);
}
