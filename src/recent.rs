//! The newest part of the event log, in memory, so that a resume with a
//! recent cursor is answered without PostgreSQL: no replay turn, no query,
//! no 1013.
//!
//! Why: after a restart or a deploy every socket reconnects at once, most
//! of them only seconds behind. Read from the log, each resume takes one of
//! the pool's few replay turns (`replays`) and pages through PostgreSQL: a
//! storm of 10,000 such resumes queued for 46 s, and thousands were told
//! 1013 (BENCHMARKS.md, "Resume cost"). Those events are the ones the hub
//! has just handed out; keeping them costs at most `--replay-memory`
//! (32 MiB by default).
//!
//! What is kept: every event the hub publishes, in id order, with its frame
//! (the hub's `Delivery`, whose bytes are shared with the sockets' rings:
//! nothing is serialised again; [`Kept`] is what this module needs of it,
//! so that it does not import the hub that holds it) and its audiences (the
//! router's [`Targets`], computed once by the listener), which put it in
//! the lanes of exactly the clients live delivery sent it to, without
//! routing again. An event nobody may see is not kept; it only moves the
//! range.
//!
//! Invariant: [`Recent`] holds the range `(from, to]` of the log: every
//! event with `from < id <= to` that anyone may see is here, in id order,
//! exactly as the log has it (the log is append-only in id order: ids are
//! assigned at commit under a lock, and the listener hands them on in that
//! order). `to` is never below the hub's `last_id`: the hub appends here
//! before it moves `last_id`, so a socket's replay up to the `last_id` it
//! subscribed at is always inside `to`. A cursor at or above `from` (and not
//! above `to`) is therefore answered exactly from memory; anything else goes
//! to the log (`db::LogReader`), including a cursor beyond the head (reset).
//!
//! Bounded: by bytes (`--replay-memory`, in MiB; 0 turns it off), the
//! oldest entries dropped first, which moves `from` up. Appending is O(1)
//! amortised per audience under one short lock; readers copy out a page of
//! entry pointers under the same lock and send outside it, so a reader
//! never holds up the publisher for more than a page's copy.
//!
//! Indexed by audience: every entry is also in one lane per audience it
//! has (the dashboard, each user, each stream key), in id order, and a
//! replay walks only its client's lane ([`Audience`]). So a replay costs
//! what it sends, plus a binary search: a client reconnecting in a loop
//! with an old cursor cannot make pgrelay scan the whole memory for a few
//! events of its own at every connect (without the lanes, up to about
//! 100,000 entries a connect at the default budget).
//!
//! Priming: at start, the newest events up to the head the listener starts
//! from, read newest first in pages of [`PRIME_PAGE`] rows or
//! `db::PAGE_BYTES` (each under the statement timeout; fewer rows after a
//! page its bytes ended: `db::Page::next_limit`), until the budget is
//! full, `REPLAY_WINDOW` ids or [`PRIME_ROWS`] rows are read, so a storm
//! right after a restart finds the events written while pgrelay was down.
//! What priming holds beyond the budget is one page at most (the oldest are
//! dropped as they are pushed).
//! A page that fails after the first ends priming with what was read.
//! Both meet at that head: no gap, no duplicate.
//!
//! Resets: when the log went back (restore, failover, reinstall: a new
//! epoch), the hub's `restart` empties it before any socket can subscribe
//! at the new head; a reader that started before sees its generation gone
//! and goes on from the log, where the epoch is checked. Retention is the
//! log's: an event still here after retention deleted its row is served
//! (nothing is missing from the range), where the log would answer
//! `cursor_expired`.
//!
//! Not here: the replay loop and its frames (`session`), the read
//! (`db::Db::newest`).

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::mem::size_of;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::db::{Db, DbError, REPLAY_WINDOW};
use crate::parse::Event;
use crate::route::{Routes, Targets};
use crate::wire::Endpoint;

/// Rows priming reads at most, whatever the budget: it bounds the start's
/// reads when events are small or seen by nobody.
const PRIME_ROWS: usize = 20_000;
/// Rows per priming read.
const PRIME_PAGE: usize = 1_000;

/// What memory keeps of an event: its frame, built once (the hub's
/// `Delivery`).
pub trait Kept: Clone {
    /// The frame of an event read from the log (priming).
    fn of(event: &Event) -> Self;
    fn id(&self) -> i64;
    /// The frame's own bytes, counted against the budget.
    fn bytes(&self) -> usize;
}

/// One event as a replay needs it, and what it costs the budget (worked
/// out once, before any lock).
#[derive(Debug)]
struct Entry<D> {
    delivery: D,
    targets: Targets,
    cost: usize,
}

/// What an entry costs besides its frame and its audiences: the entry, the
/// `Arc`'s counts, the deque's slot, and allocator rounding.
const fn overhead<D>() -> usize {
    size_of::<Entry<D>>() + 2 * size_of::<usize>() + size_of::<Arc<Entry<D>>>() + 32
}

/// What each audience of an entry costs besides its copy in `targets`: a
/// slot in its lane, counted twice for the deque's spare room, and, as if
/// the entry were its lane's only one, the lane itself (its key, its deque,
/// its map slot). Shared by many entries, a lane is counted many times:
/// memory then holds fewer entries than the budget would allow, never more.
const fn lane_slot<D>(key: usize) -> usize {
    2 * size_of::<Arc<Entry<D>>>()
        + size_of::<String>()
        + key
        + size_of::<Lane<D>>()
        + 2 * size_of::<usize>()
}

impl<D: Kept> Entry<D> {
    fn new(delivery: D, targets: Targets) -> Entry<D> {
        let mut entry = Entry {
            delivery,
            targets,
            cost: 0,
        };
        entry.cost = entry.measure();
        entry
    }

    /// Bytes counted against the budget.
    fn measure(&self) -> usize {
        let users: usize = (self.targets.users.iter())
            .map(|u| size_of::<String>() + u.len() + lane_slot::<D>(u.len()))
            .sum();
        let streams: usize = (self.targets.streams.iter())
            .map(|(_, key)| size_of::<(usize, String)>() + key.len() + lane_slot::<D>(key.len()))
            .sum();
        // One lane for every dashboard entry: its slot only.
        let dashboard = if self.targets.dashboard {
            2 * size_of::<Arc<Entry<D>>>()
        } else {
            0
        };
        overhead::<D>() + self.delivery.bytes() + users + streams + dashboard
    }
}

/// The newest events, bounded (see the module docs).
pub struct Recent<D> {
    state: Mutex<State<D>>,
    /// Bytes at most; 0: off.
    budget: usize,
}

/// Whose events a replay reads: one lane of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience<'a> {
    Dashboard,
    User(&'a str),
    Stream(usize, &'a str),
}

impl<'a> Audience<'a> {
    /// The events `endpoint`'s client, `user`, may see: the hub's ring its
    /// socket reads live (`bell::sees` says the same of events read from
    /// the log).
    pub fn of(endpoint: &'a Endpoint, user: &'a str) -> Audience<'a> {
        match endpoint {
            Endpoint::Dashboard => Audience::Dashboard,
            Endpoint::Notifications => Audience::User(user),
            Endpoint::Stream { index, key, .. } => Audience::Stream(*index, key),
        }
    }
}

type Lane<D> = VecDeque<Arc<Entry<D>>>;

struct State<D> {
    /// Every entry, oldest first: what the budget drops from.
    entries: Lane<D>,
    /// The same entries by audience (see the module docs). A lane is
    /// removed with its last entry.
    dashboard: Lane<D>,
    users: HashMap<String, Lane<D>>,
    /// Stream index -> key -> lane.
    streams: HashMap<usize, HashMap<String, Lane<D>>>,
    /// The newest id not held: every event above it, up to `to`, is.
    from: i64,
    /// The newest id published.
    to: i64,
    bytes: usize,
    /// Moves on every reset: a reader of an older one must stop.
    generation: u64,
}

impl<D> State<D> {
    fn clear(&mut self) {
        self.entries.clear();
        self.dashboard.clear();
        self.users.clear();
        self.streams.clear();
        self.bytes = 0;
    }

    /// Appends `entry`, the newest, to the log's lane and its audiences'.
    fn append(&mut self, entry: Arc<Entry<D>>) {
        let targets = &entry.targets;
        if targets.dashboard {
            self.dashboard.push_back(Arc::clone(&entry));
        }
        for user in &targets.users {
            match self.users.get_mut(user) {
                Some(lane) => lane.push_back(Arc::clone(&entry)),
                None => {
                    self.users.insert(user.clone(), [Arc::clone(&entry)].into());
                }
            }
        }
        for (index, key) in &targets.streams {
            let keys = self.streams.entry(*index).or_default();
            match keys.get_mut(key) {
                Some(lane) => lane.push_back(Arc::clone(&entry)),
                None => {
                    keys.insert(key.clone(), [Arc::clone(&entry)].into());
                }
            }
        }
        self.entries.push_back(entry);
    }

    /// Drops the oldest entry from every lane: being the oldest of all, it
    /// is first in each of its audiences' lanes.
    fn drop_oldest(&mut self) -> Option<Arc<Entry<D>>> {
        let oldest = pop_front(&mut self.entries)?;
        let targets = &oldest.targets;
        if targets.dashboard {
            pop_front(&mut self.dashboard);
        }
        for user in &targets.users {
            pop_lane(&mut self.users, user.as_str());
        }
        for (index, key) in &targets.streams {
            if let Some(keys) = self.streams.get_mut(index) {
                pop_lane(keys, key.as_str());
                if keys.is_empty() {
                    self.streams.remove(index);
                }
            }
        }
        Some(oldest)
    }

    /// `audience`'s lane, if it has any entry.
    fn lane(&self, audience: Audience<'_>) -> Option<&Lane<D>> {
        match audience {
            Audience::Dashboard => Some(&self.dashboard),
            Audience::User(user) => self.users.get(user),
            Audience::Stream(index, key) => self.streams.get(&index)?.get(key),
        }
    }
}

/// Drops the front of a queue. A queue (a lane, the whole log) or a map of
/// lanes that was once long gives back its room once it is a quarter full:
/// a user's lane that once held most of memory, or the map of the 100,000
/// users a bulk update touched, must not keep that room for as long as it
/// holds a few entries, uncounted by the budget.
fn pop_front<T>(queue: &mut VecDeque<T>) -> Option<T> {
    let front = queue.pop_front();
    if sparse(queue.len(), queue.capacity()) {
        queue.shrink_to(queue.len() * 2);
    }
    front
}

/// Drops the front of `key`'s lane in `lanes`, and the lane with its last
/// entry (see [`pop_front`] for the room given back).
fn pop_lane<K, Q, D>(lanes: &mut HashMap<K, Lane<D>>, key: &Q)
where
    K: Borrow<Q> + Hash + Eq,
    Q: Hash + Eq + ?Sized,
{
    let Some(lane) = lanes.get_mut(key) else {
        return;
    };
    pop_front(lane);
    if lane.is_empty() {
        lanes.remove(key);
        if sparse(lanes.len(), lanes.capacity()) {
            lanes.shrink_to(lanes.len() * 2);
        }
    }
}

/// Whether a container of `capacity` holding `len` is worth shrinking.
fn sparse(len: usize, capacity: usize) -> bool {
    capacity > 64 && len < capacity / 4
}

/// Memory no longer holds the rest of a read (evicted, or the log went
/// back): the read must go on from the log after this id.
#[derive(Debug, PartialEq, Eq)]
pub struct Lost(pub i64);

impl<D: Kept> Recent<D> {
    /// Empty, at id 0, holding at most `budget` bytes (0: nothing, ever).
    pub fn new(budget: usize) -> Recent<D> {
        Recent {
            state: Mutex::new(State {
                entries: VecDeque::new(),
                dashboard: VecDeque::new(),
                users: HashMap::new(),
                streams: HashMap::new(),
                from: 0,
                to: 0,
                bytes: 0,
                generation: 0,
            }),
            budget,
        }
    }

    fn state(&self) -> MutexGuard<'_, State<D>> {
        // A panic while holding this lock leaves plain data behind: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Empties it, at `at`: the range `(at, at]`. The log's head at start,
    /// or where the log went back to.
    pub fn reset(&self, at: i64) {
        let mut state = self.state();
        state.clear();
        state.from = at;
        state.to = at;
        state.generation += 1;
    }

    /// Appends the event `id` published next, with its frame when anyone may
    /// see it (`None`: nobody; only the range moves). Ids must come in
    /// increasing order; one not above the last is ignored.
    pub fn push(&self, id: i64, delivery: Option<&D>, targets: &Targets) {
        // Built and measured before the lock: the lock covers the lanes
        // and the byte count only.
        let entry = (self.budget > 0)
            .then_some(delivery)
            .flatten()
            .map(|d| Arc::new(Entry::new(d.clone(), targets.clone())));
        self.push_entry(id, entry);
    }

    /// [`Recent::push`], with the entry built.
    fn push_entry(&self, id: i64, entry: Option<Arc<Entry<D>>>) {
        let mut state = self.state();
        if id <= state.to {
            return;
        }
        state.to = id;
        match entry {
            Some(entry) => {
                state.bytes += entry.cost;
                state.append(entry);
            }
            // Off: the range stays empty.
            None if self.budget == 0 => state.from = id,
            None => {}
        }
        while state.bytes > self.budget {
            let Some(oldest) = state.drop_oldest() else {
                break;
            };
            state.bytes -= oldest.cost;
            state.from = oldest.delivery.id();
        }
    }

    /// Starts a read of `audience`'s events above `after` up to `upto`, or
    /// `None` when memory does not hold all of them (or `after` is above
    /// `upto`: a cursor beyond the head is the log's to judge).
    pub fn read<'a>(
        &'a self,
        audience: Audience<'a>,
        after: i64,
        upto: i64,
    ) -> Option<Reader<'a, D>> {
        if self.budget == 0 {
            return None;
        }
        let state = self.state();
        (state.from <= after && after <= upto && upto <= state.to).then(|| Reader {
            recent: self,
            audience,
            generation: state.generation,
            after,
            upto,
        })
    }

    /// The range held, `(from, to]`, and the entries in it.
    fn range(&self) -> (i64, i64, usize) {
        let state = self.state();
        (state.from, state.to, state.entries.len())
    }

    /// Fills it with the newest events of the log up to `head`, the id the
    /// listener starts from, newest first until the budget is full (see the
    /// module docs). On error it is left empty at `head`.
    pub async fn prime(&self, db: &Db, routes: &Routes, head: i64) -> Result<Primed, DbError> {
        self.reset(head);
        if self.budget == 0 {
            return Ok(Primed { rows: 0, kept: 0 });
        }
        let channels = routes.channels();
        let floor = head.saturating_sub(REPLAY_WINDOW);
        // The events someone may see, newest first (the others only move
        // the range, which the head's push below does), and the bytes
        // they cost.
        let mut read: Vec<Entry<D>> = Vec::new();
        let (mut rows, mut bytes, mut below, mut pruned_through) = (0, 0, head, 0);
        // Where the range held starts: below the oldest row read, or the
        // floor once every row above it is read.
        // Pages shrink after one its bytes ended (see `Page::next_limit`).
        let mut page_limit = PRIME_PAGE as i64;
        let oldest = loop {
            let limit = page_limit.min((PRIME_ROWS - rows) as i64);
            let (page, pruned) = match db.newest(&channels, below, floor, limit).await {
                Ok(read) => read,
                Err(e) if rows == 0 => return Err(e),
                // What the pages before held is whole down to `below`.
                Err(e) => {
                    tracing::warn!(error = %e, rows, "priming stopped early; keeping what it read");
                    break below;
                }
            };
            // Retention may have deleted rows up to `pruned` (read after
            // the page's rows): not held.
            pruned_through = pruned_through.max(pruned);
            page_limit = page.next_limit(limit, PRIME_PAGE as i64);
            rows += page.rows;
            for event in &page.events {
                let targets = routes.route(event);
                if targets.any() {
                    let entry = Entry::new(D::of(event), targets);
                    bytes += entry.cost;
                    read.push(entry);
                }
            }
            match page.last_id {
                // A page that ended at its row limit or its bytes left
                // older rows unread.
                Some(last) if page.more => {
                    below = last - 1;
                    if bytes >= self.budget || rows >= PRIME_ROWS {
                        break below;
                    }
                }
                _ => break floor,
            }
        };
        self.reset(oldest.max(pruned_through).min(head));
        for entry in read.into_iter().rev() {
            self.push_entry(entry.delivery.id(), Some(Arc::new(entry)));
        }
        self.push(head, None, &Targets::default());
        Ok(Primed {
            rows,
            kept: self.range().2,
        })
    }
}

/// What priming did: rows read from the log, events kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Primed {
    pub rows: usize,
    pub kept: usize,
}

/// A read of one audience's `(after, upto]` from memory, a page at a time.
pub struct Reader<'a, D> {
    recent: &'a Recent<D>,
    audience: Audience<'a>,
    generation: u64,
    after: i64,
    upto: i64,
}

impl<D: Kept> Reader<'_, D> {
    /// The frames of the next page of at most `max` of the audience's
    /// entries (at least 1), in id order, or `None` when the read is done;
    /// [`Lost`] when memory no longer holds the rest.
    pub fn next_page(&mut self, max: usize) -> Result<Option<Vec<D>>, Lost> {
        if self.after >= self.upto {
            return Ok(None);
        }
        let max = max.max(1);
        let state = self.recent.state();
        if state.generation != self.generation || state.from > self.after {
            return Err(Lost(self.after));
        }
        let page: Vec<D> = match state.lane(self.audience) {
            Some(lane) => {
                let start = lane.partition_point(|e| e.delivery.id() <= self.after);
                (lane.range(start..))
                    .take_while(|e| e.delivery.id() <= self.upto)
                    .take(max)
                    .map(|e| e.delivery.clone())
                    .collect()
            }
            None => Vec::new(),
        };
        drop(state);
        // A short page reached `upto`; a full one goes on after its last.
        self.after = match page.last() {
            Some(last) if page.len() == max => last.id(),
            _ => self.upto,
        };
        Ok(Some(page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of `.1` bytes.
    #[derive(Debug, Clone)]
    struct Frame(i64, usize);

    impl Kept for Frame {
        fn of(event: &Event) -> Frame {
            Frame(event.id, event.data.get().len())
        }
        fn id(&self) -> i64 {
            self.0
        }
        fn bytes(&self) -> usize {
            self.1
        }
    }

    /// The one user of most tests.
    const U: Audience<'static> = Audience::User("u");

    fn delivery(id: i64, bytes: usize) -> Frame {
        Frame(id, bytes)
    }

    fn to(user: &str) -> Targets {
        Targets {
            dashboard: false,
            users: vec![user.into()],
            streams: vec![],
        }
    }

    /// Pushes `(id, seen)` events of `bytes` each into memory of `budget`
    /// events of that size, starting at `start`.
    fn filled(budget: usize, start: i64, events: &[(i64, bool)]) -> Recent<Frame> {
        let size = Entry::new(delivery(0, 100), to("u")).cost;
        let recent = Recent::new(budget * size);
        recent.reset(start);
        for &(id, seen) in events {
            let d = delivery(id, 100);
            recent.push(id, seen.then_some(&d), &to("u"));
        }
        recent
    }

    /// Every page of a read of `(after, upto]`, as ids, or `None` when
    /// memory does not hold the range.
    fn pages(recent: &Recent<Frame>, after: i64, upto: i64, max: usize) -> Option<Vec<Vec<i64>>> {
        let mut reader = recent.read(Audience::User("u"), after, upto)?;
        let mut pages = Vec::new();
        while let Some(page) = reader.next_page(max).expect("held") {
            pages.push(page.iter().map(Kept::id).collect());
        }
        Some(pages)
    }

    #[test]
    fn a_read_is_answered_only_when_the_whole_range_is_held() {
        let events = [(11, true), (12, false), (13, true), (15, true), (16, true)];
        let recent = filled(10, 10, &events);
        assert_eq!(recent.range(), (10, 16, 4));
        // From the start, in pages; an event nobody sees is not kept.
        assert_eq!(
            pages(&recent, 10, 16, 2),
            Some(vec![vec![11, 13], vec![15, 16]])
        );
        assert_eq!(
            pages(&recent, 10, 16, 3),
            Some(vec![vec![11, 13, 15], vec![16]])
        );
        // Up to a `last_id` below the newest; from the middle.
        assert_eq!(pages(&recent, 12, 15, 500), Some(vec![vec![13, 15]]));
        assert_eq!(pages(&recent, 16, 16, 500), Some(Vec::new()));
        // Below `from`, beyond `to`, or a cursor beyond `upto`: the log's.
        assert_eq!(pages(&recent, 9, 16, 500), None);
        assert_eq!(pages(&recent, 10, 17, 500), None);
        assert_eq!(pages(&recent, 16, 15, 500), None);
        // Ids that do not move forward are ignored.
        recent.push(14, Some(&delivery(14, 1)), &to("u"));
        assert_eq!(recent.range(), (10, 16, 4));
    }

    #[test]
    fn the_bound_drops_the_oldest_first_and_moves_from() {
        let events: Vec<(i64, bool)> = (1..=10).map(|id| (id, true)).collect();
        let recent = filled(4, 0, &events);
        assert_eq!(recent.range(), (6, 10, 4));
        assert_eq!(pages(&recent, 5, 10, 500), None, "evicted");
        assert_eq!(pages(&recent, 6, 10, 500), Some(vec![vec![7, 8, 9, 10]]));
        // An entry larger than the whole budget is dropped at once.
        recent.push(11, Some(&delivery(11, 1 << 20)), &to("u"));
        assert_eq!(recent.range(), (11, 11, 0));
        // Off: nothing is kept and nothing is answered, not even an empty
        // range.
        let off = filled(0, 0, &events);
        assert_eq!(off.range(), (10, 10, 0));
        assert!(off.read(U, 10, 10).is_none());
    }

    #[test]
    fn a_reader_stops_where_eviction_or_a_reset_overtakes_it() {
        let events: Vec<(i64, bool)> = (1..=4).map(|id| (id, true)).collect();
        let recent = filled(4, 0, &events);
        let mut reader = recent.read(U, 0, 4).expect("held");
        let first = reader.next_page(2).expect("held").expect("a page");
        assert_eq!(first.len(), 2);
        // Two more events evict 1 and 2: the reader, after 2, still reads on.
        for id in 5..=6 {
            recent.push(id, Some(&delivery(id, 100)), &to("u"));
        }
        let second = reader.next_page(2).expect("held").expect("a page");
        assert_eq!(second.iter().map(Kept::id).collect::<Vec<_>>(), [3, 4]);
        assert!(reader.next_page(2).expect("done").is_none());
        // Evicted under a reader: it goes on from the log where it stood.
        let mut reader = recent.read(U, 2, 6).expect("held");
        reader.next_page(1).expect("held");
        for id in 7..=9 {
            recent.push(id, Some(&delivery(id, 100)), &to("u"));
        }
        assert_eq!(reader.next_page(1).err(), Some(Lost(3)));
        // A reset (the log went back) ends every read started before it,
        // even where the new range would cover it.
        let mut reader = recent.read(U, 8, 9).expect("held");
        recent.reset(8);
        recent.push(9, Some(&delivery(9, 100)), &to("u"));
        assert_eq!(reader.next_page(500).err(), Some(Lost(8)));
    }

    #[test]
    fn a_read_walks_only_its_audience_and_lanes_leave_with_their_last_entry() {
        let recent: Recent<Frame> = Recent::new(1 << 20);
        let targets = |dashboard: bool, users: &[&str], streams: &[(usize, &str)]| Targets {
            dashboard,
            users: users.iter().map(|u| u.to_string()).collect(),
            streams: streams.iter().map(|(i, k)| (*i, k.to_string())).collect(),
        };
        let events = [
            (1, targets(true, &["a"], &[(0, "42")])),
            (2, targets(false, &["b"], &[])),
            (3, targets(true, &["a", "b"], &[(0, "43")])),
            (4, targets(false, &[], &[(1, "42")])),
        ];
        for (id, targets) in &events {
            recent.push(*id, Some(&delivery(*id, 10)), targets);
        }
        let ids = |audience: Audience<'_>, after: i64| -> Vec<i64> {
            let mut reader = recent.read(audience, after, 4).expect("held");
            let mut ids = Vec::new();
            while let Some(page) = reader.next_page(1).expect("held") {
                ids.extend(page.iter().map(Kept::id));
            }
            ids
        };
        assert_eq!(ids(Audience::Dashboard, 0), [1, 3]);
        assert_eq!(ids(Audience::User("a"), 0), [1, 3]);
        assert_eq!(ids(Audience::User("b"), 0), [2, 3]);
        assert_eq!(ids(Audience::User("b"), 2), [3]);
        assert_eq!(ids(Audience::User("c"), 0), Vec::<i64>::new());
        assert_eq!(ids(Audience::Stream(0, "42"), 0), [1]);
        assert_eq!(ids(Audience::Stream(1, "42"), 0), [4]);
        assert_eq!(ids(Audience::Stream(0, "43"), 1), [3]);
        // Dropping the oldest three takes them out of every lane, and a
        // lane with nothing left goes with them.
        let mut state = recent.state();
        for _ in 0..3 {
            state.drop_oldest().expect("an entry");
        }
        assert!(state.dashboard.is_empty());
        assert!(state.users.is_empty(), "a's and b's lanes are gone");
        assert_eq!(state.streams.len(), 1, "only stream 1 is left");
        assert_eq!(state.streams[&1]["42"].len(), 1);
        drop(state);
        recent.reset(4);
        assert!(
            recent.state().streams.is_empty(),
            "a reset empties every lane"
        );
    }

    #[test]
    fn a_lane_that_was_long_gives_its_room_back() {
        let recent = filled(10_000, 0, &[]);
        for id in 1..=4_000 {
            recent.push(id, Some(&delivery(id, 100)), &to("busy"));
        }
        let mut state = recent.state();
        for _ in 0..3_990 {
            state.drop_oldest().expect("an entry");
        }
        let lane = &state.users["busy"];
        assert_eq!(lane.len(), 10);
        assert!(lane.capacity() <= 64, "kept room for {}", lane.capacity());
        assert!(state.entries.capacity() <= 64, "the log kept room");
    }

    #[test]
    fn the_map_of_many_users_gives_its_room_back() {
        // A bulk update: one event for each of 4,000 users, then all but
        // the newest ten evicted.
        let recent = filled(10_000, 0, &[]);
        for id in 1..=4_000 {
            recent.push(id, Some(&delivery(id, 100)), &to(&id.to_string()));
        }
        let mut state = recent.state();
        for _ in 0..3_990 {
            state.drop_oldest().expect("an entry");
        }
        assert_eq!(state.users.len(), 10);
        assert!(
            state.users.capacity() <= 64,
            "kept room for {} users",
            state.users.capacity()
        );
    }
}
