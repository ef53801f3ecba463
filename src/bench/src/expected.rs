//! The correctness check, independent of pgrelay's own code: the bench
//! reads `pgrelay.events` for the run's id range, routes each row with the
//! default routes (`business_events=dashboard,user:owner_id`,
//! `reservation_events=dashboard,user:business_owner_id,user:customer_id`)
//! and compares, per client, what it got with what it should have got.

use std::collections::{BTreeMap, HashMap};

use crate::client::ClientReport;
use crate::error::{BenchError, Result};

/// The deliveries the log says should happen, routed with the default routes.
pub(crate) struct Expected {
    dashboard: Vec<i64>,
    users: HashMap<String, Vec<i64>>,
}

impl Expected {
    pub(crate) async fn load(
        db: &tokio_postgres::Client,
        after: i64,
        upto: i64,
    ) -> Result<Expected> {
        let rows = db
            .query(
                "SELECT id, channel, payload->>'owner_id', payload->>'business_owner_id', \
                        payload->>'customer_id' \
                 FROM pgrelay.events WHERE id > $1 AND id <= $2 ORDER BY id",
                &[&after.min(upto), &upto],
            )
            .await
            .map_err(BenchError::sql("reading pgrelay.events"))?;
        let mut expected = Expected {
            dashboard: Vec::with_capacity(rows.len()),
            users: HashMap::new(),
        };
        for row in rows {
            let id: i64 = row.get(0);
            let channel: &str = row.get(1);
            let fields: &[usize] = match channel {
                "business_events" => &[2],
                "reservation_events" => &[3, 4],
                _ => continue,
            };
            expected.dashboard.push(id);
            let mut seen: Vec<String> = Vec::new();
            for &field in fields {
                if let Some(user) = row.get::<_, Option<String>>(field) {
                    if !seen.contains(&user) {
                        expected.users.entry(user.clone()).or_default().push(id);
                        seen.push(user);
                    }
                }
            }
        }
        Ok(expected)
    }

    /// The newest id in the log (0 for an empty one).
    pub(crate) async fn head(db: &tokio_postgres::Client) -> Result<i64> {
        Ok(db
            .query_one("SELECT coalesce(max(id), 0) FROM pgrelay.events", &[])
            .await
            .map_err(BenchError::db("reading pgrelay.events"))?
            .get(0))
    }

    pub(crate) fn ids(&self, dashboard: bool, user: &str) -> &[i64] {
        if dashboard {
            &self.dashboard
        } else {
            self.users.get(user).map_or(&[], Vec::as_slice)
        }
    }

    /// The ids a client should get: routed to it and above its `hello`.
    pub(crate) fn slice(&self, dashboard: bool, user: &str, hello: i64) -> &[i64] {
        let ids = self.ids(dashboard, user);
        &ids[ids.partition_point(|&id| id <= hello)..]
    }

    pub(crate) fn for_client(&self, r: &ClientReport) -> &[i64] {
        if !r.connected {
            return &[];
        }
        self.slice(r.dashboard, &r.user, r.hello_last_id)
    }

    pub(crate) fn total(&self, clients: &[(bool, String, i64)]) -> u64 {
        clients
            .iter()
            .map(|(dashboard, user, hello)| self.slice(*dashboard, user, *hello).len() as u64)
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
}
