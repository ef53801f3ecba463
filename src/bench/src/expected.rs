//! The correctness check, independent of pgrelay's own code: the bench
//! reads `pgrelay.events` for the run's id range, routes each row with the
//! default routes (`business_events=dashboard,user:owner_id`,
//! `reservation_events=dashboard,user:business_owner_id,user:customer_id`)
//! and the default stream (`businesses=business_events:id,
//! reservation_events:business_id`), and compares, per client, what it got
//! with what it should have got. The ideal scenario has no log: it says
//! what its clients should get itself ([`Expected::of`]).

use std::collections::{BTreeMap, HashMap};

use crate::client::ClientReport;
use crate::error::{BenchError, Result};

/// What a client's endpoint receives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Audience {
    /// `/ws/dashboard/`: every routed event.
    Dashboard,
    /// `/ws/notifications/` of this user.
    User(String),
    /// `/ws/businesses/KEY/`: this business's own rows and its reservations.
    Business(String),
}

/// The payload fields the default routes and stream read, in this order.
const FIELDS: [&str; 5] = [
    "owner_id",
    "business_owner_id",
    "customer_id",
    "id",
    "business_id",
];

/// Where the default routes and stream send an event on `channel` whose
/// payload has `fields` (as [`FIELDS`] names them, as text): nowhere for
/// another channel. A user named twice gets it once.
fn route(channel: &str, fields: [Option<&str>; 5]) -> Vec<Audience> {
    let [owner, business_owner, customer, id, business] = fields;
    let (users, key) = match channel {
        "business_events" => (vec![owner], id),
        "reservation_events" => (vec![business_owner, customer], business),
        _ => return Vec::new(),
    };
    let mut audiences = vec![Audience::Dashboard];
    for user in users.into_iter().flatten() {
        let user = Audience::User(user.to_owned());
        if !audiences.contains(&user) {
            audiences.push(user);
        }
    }
    audiences.extend(key.map(|k| Audience::Business(k.to_owned())));
    audiences
}

/// The deliveries the log says should happen, routed with the default
/// routes and stream: each audience's ids, ascending.
pub(crate) struct Expected(HashMap<Audience, Vec<i64>>);

impl Expected {
    pub(crate) async fn load(
        db: &tokio_postgres::Client,
        after: i64,
        upto: i64,
    ) -> Result<Expected> {
        let fields = FIELDS.map(|f| format!("payload->>'{f}'")).join(", ");
        let rows = db
            .query(
                &format!(
                    "SELECT id, channel, {fields} FROM pgrelay.events \
                     WHERE id > $1 AND id <= $2 ORDER BY id"
                ),
                &[&after.min(upto), &upto],
            )
            .await
            .map_err(BenchError::sql("reading pgrelay.events"))?;
        let mut expected = Expected(HashMap::new());
        for row in rows {
            let id: i64 = row.get(0);
            let fields: [Option<&str>; 5] = std::array::from_fn(|i| row.get(i + 2));
            for audience in route(row.get(1), fields) {
                expected.0.entry(audience).or_default().push(id);
            }
        }
        Ok(expected)
    }

    /// `ids` (ascending) for `audience`, nothing for any other.
    pub(crate) fn of(audience: Audience, ids: Vec<i64>) -> Expected {
        Expected(HashMap::from([(audience, ids)]))
    }

    /// The newest id in the log (0 for an empty one).
    pub(crate) async fn head(db: &tokio_postgres::Client) -> Result<i64> {
        Ok(db
            .query_one("SELECT coalesce(max(id), 0) FROM pgrelay.events", &[])
            .await
            .map_err(BenchError::db("reading pgrelay.events"))?
            .get(0))
    }

    pub(crate) fn ids(&self, audience: &Audience) -> &[i64] {
        self.0.get(audience).map_or(&[], Vec::as_slice)
    }

    /// A user's notifications.
    pub(crate) fn user_ids(&self, user: &str) -> &[i64] {
        self.ids(&Audience::User(user.to_owned()))
    }

    /// The ids a client should get: routed to it and above its `hello`.
    pub(crate) fn slice(&self, audience: &Audience, hello: i64) -> &[i64] {
        let ids = self.ids(audience);
        &ids[ids.partition_point(|&id| id <= hello)..]
    }

    pub(crate) fn for_client(&self, r: &ClientReport) -> &[i64] {
        if !r.connected {
            return &[];
        }
        self.slice(&r.audience, r.hello_last_id)
    }

    pub(crate) fn total(&self, clients: &[(Audience, i64)]) -> u64 {
        clients
            .iter()
            .map(|(audience, hello)| self.slice(audience, *hello).len() as u64)
            .sum()
    }
}

/// (expected ids found in `ranges`, ids in `ranges` up to `end` that were
/// not expected).
fn compare(expected: &[i64], ranges: &[(i64, i64)], end: i64) -> (u64, u64) {
    let mut matched = 0u64;
    let mut received = 0u64;
    let mut e = 0;
    for &(lo, hi) in ranges {
        let hi = hi.min(end);
        if lo > hi {
            continue;
        }
        received += (hi - lo + 1) as u64;
        while e < expected.len() && expected[e] < lo {
            e += 1;
        }
        while e < expected.len() && expected[e] <= hi {
            matched += 1;
            e += 1;
        }
    }
    (matched, received - matched)
}

/// The clients' reports summed, each checked against the log up to `end`.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) received: u64,
    pub(crate) lost: u64,
    pub(crate) unexpected: u64,
    pub(crate) duplicates: u64,
    pub(crate) resets: u64,
    pub(crate) reconnects: u64,
    /// Close codes the server sent, counted.
    pub(crate) closes: BTreeMap<u16, u64>,
    /// Clients with an error, and the first error.
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
}

impl Tally {
    pub(crate) fn new<'a>(
        expected: &Expected,
        reports: impl IntoIterator<Item = &'a ClientReport>,
        end: i64,
    ) -> Tally {
        let mut tally = Tally::default();
        for r in reports {
            let want = expected.for_client(r);
            let (matched, unexpected) = compare(want, &r.ranges, end);
            tally.received += r.received;
            tally.lost += want.len() as u64 - matched;
            tally.unexpected += unexpected;
            tally.duplicates += r.duplicates;
            tally.resets += r.resets;
            tally.reconnects += r.reconnects;
            for &code in &r.closes {
                *tally.closes.entry(code).or_default() += 1;
            }
            if let Some(e) = &r.error {
                tally.errors += 1;
                tally.first_error.get_or_insert_with(|| e.clone());
            }
        }
        tally
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparing_ranges() {
        assert_eq!(compare(&[2, 3, 4, 5], &[(2, 5)], 10), (4, 0));
        assert_eq!(compare(&[2, 3, 4, 5], &[(2, 3), (5, 5)], 10), (3, 0));
        assert_eq!(compare(&[2, 4], &[(2, 4)], 10), (2, 1));
        assert_eq!(compare(&[2, 4], &[(2, 2), (4, 12)], 10), (2, 6));
        assert_eq!(compare(&[], &[], 10), (0, 0));
    }

    fn user(u: &str) -> Audience {
        Audience::User(u.into())
    }

    fn business(k: &str) -> Audience {
        Audience::Business(k.into())
    }

    #[test]
    fn routing_like_the_default_routes_and_stream() {
        // A business row: the dashboard, its owner, and its own key (`id`).
        assert_eq!(
            route("business_events", [Some("1"), None, None, Some("42"), None]),
            [Audience::Dashboard, user("1"), business("42")]
        );
        // A reservation: the business's owner, the customer, the business's key.
        assert_eq!(
            route(
                "reservation_events",
                [Some("9"), Some("1"), Some("2"), Some("7"), Some("42")]
            ),
            [Audience::Dashboard, user("1"), user("2"), business("42")]
        );
        // The owner booking their own business hears of it once.
        assert_eq!(
            route(
                "reservation_events",
                [None, Some("1"), Some("1"), Some("7"), Some("42")]
            ),
            [Audience::Dashboard, user("1"), business("42")]
        );
        assert_eq!(
            route("business_events", [None, None, None, None, None]),
            [Audience::Dashboard]
        );
        assert!(route("other_events", [Some("1"); 5]).is_empty());
    }

    #[test]
    fn slices_start_above_hello() {
        let mut e = Expected(HashMap::new());
        e.0.insert(business("42"), vec![3, 5, 8]);
        assert_eq!(e.slice(&business("42"), 4), [5, 8]);
        assert_eq!(e.slice(&business("43"), 0), [] as [i64; 0]);
        assert_eq!(e.total(&[(business("42"), 0), (business("42"), 5)]), 4);
    }
}
