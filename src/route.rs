//! Event -> audiences: which streams an event goes to.
//!
//! Pure: no I/O. A route is `CHANNEL=AUDIENCE[,AUDIENCE...]`, an audience is
//! `dashboard` or `user:FIELD`, FIELD a top-level key of the row payload whose
//! value names a user by [`user_id`]'s rule: a non-empty string, or an integer
//! exactly as written; compared as text, so `42` and `"42"` are the same user,
//! and `2.50` names nobody. The same [`Routes::route`] decides live
//! delivery and replay, so a resumed socket sees exactly what a live one would.
//!
//! A configured [`Stream`] (`NAME=CHANNEL:FIELD[,CHANNEL:FIELD...]`) is a
//! keyed audience of the same kind as a user: an event on CHANNEL goes to
//! the stream's key that FIELD names, by the same rule (so `/ws/businesses/42/`
//! gets the business rows whose `id` is 42 and the reservations whose
//! `business_id` is 42). Who may open a key is `admission`'s question.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::parse::Event;

/// Who an event is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Audience {
    Dashboard,
    /// The user whose id is in this payload field.
    User(String),
}

/// Channel -> audiences, from `--route` flags or the defaults, and the
/// configured streams (`--stream`).
#[derive(Debug, Clone, PartialEq)]
pub struct Routes {
    by_channel: BTreeMap<String, Vec<Audience>>,
    streams: Vec<Stream>,
    /// Per channel, what [`Routes::route`] reads and where it sends it.
    plans: BTreeMap<String, Plan>,
}

/// A configured stream: its name (the path segment in `/ws/NAME/KEY/`) and
/// the (channel, field) pairs whose field's value is the key.
#[derive(Debug, Clone, PartialEq)]
pub struct Stream {
    pub name: String,
    pub carries: Vec<(String, String)>,
}

/// One channel's routing, compiled: the payload fields to read, once, and
/// which audience takes which field.
#[derive(Debug, Clone, PartialEq, Default)]
struct Plan {
    dashboard: bool,
    fields: Vec<String>,
    /// Indexes into `fields`: each names a user.
    users: Vec<usize>,
    /// (stream index, index into `fields`): each names one of that stream's keys.
    streams: Vec<(usize, usize)>,
}

/// The filter of one keyed replay (a user's notifications or one key of a
/// stream), built by [`Routes::user_filter`] or [`Routes::stream_filter`].
#[derive(Debug, Clone, PartialEq)]
pub struct KeyFilter {
    /// Routed (channel, field) pairs, as two parallel lists.
    pub channels: Vec<String>,
    pub fields: Vec<String>,
    /// JSON objects a matching payload contains (for the payload index).
    pub patterns: Vec<String>,
    pub key: String,
    /// Whether `key` also matches JSON integers.
    pub integer: bool,
}

/// Where one event goes: the dashboard stream, these users, and these
/// (stream index, key) pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Targets {
    pub dashboard: bool,
    pub users: Vec<String>,
    pub streams: Vec<(usize, String)>,
}

impl Targets {
    /// Whether anyone at all is addressed.
    pub fn any(&self) -> bool {
        self.dashboard || !self.users.is_empty() || !self.streams.is_empty()
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error("route {0:?} is not CHANNEL=AUDIENCE[,AUDIENCE...]")]
    Syntax(String),
    #[error("route {route:?}: unknown audience {audience:?} (expected dashboard or user:FIELD)")]
    UnknownAudience { route: String, audience: String },
    #[error("route {0:?}: channel name must be 1 to 63 bytes")]
    ChannelLength(String),
    #[error("route {route:?}: {name:?} may hold only letters, digits and _ . - :")]
    BadName { route: String, name: String },
    #[error("channel {0:?} is routed twice")]
    Duplicate(String),
    #[error("stream {0:?} is not NAME=CHANNEL:FIELD[,CHANNEL:FIELD...]")]
    StreamSyntax(String),
    #[error("stream {0:?}: a name may hold only letters, digits, _ and -, and is not dashboard or notifications")]
    StreamName(String),
    #[error("stream {0:?} is defined twice")]
    StreamDuplicate(String),
    #[error("{0:?}: channel pgrelay_read is pgrelay's own (read state)")]
    Reserved(String),
}

/// The channel read-state changes travel on through the log (see
/// `pgrelay.mark_read`): always routed to the user named in its `user_id`
/// field, framed as `read` (see `wire`), never shown as an event.
pub const READ_CHANNEL: &str = "pgrelay_read";

/// The demo domain's stream, used when neither `--route` nor `--stream` is
/// given: `/ws/businesses/{id}/` carries the business's own rows and its
/// reservations.
pub const DEFAULT_STREAMS: [&str; 1] =
    ["businesses=business_events:id,reservation_events:business_id"];

/// The routes of the demo domain, used when no `--route` is given.
pub const DEFAULT_ROUTES: [&str; 2] = [
    "business_events=dashboard,user:owner_id",
    "reservation_events=dashboard,user:business_owner_id,user:customer_id",
];

impl FromStr for Audience {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s.trim() {
            "dashboard" => Ok(Audience::Dashboard),
            other => match other.strip_prefix("user:") {
                Some(field) if is_name(field) => Ok(Audience::User(field.to_owned())),
                _ => Err(()),
            },
        }
    }
}

impl fmt::Display for Audience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Audience::Dashboard => f.write_str("dashboard"),
            Audience::User(field) => write!(f, "user:{field}"),
        }
    }
}

impl Routes {
    /// Parses `--route` values; an empty list means the default routes.
    pub fn parse<S: AsRef<str>>(specs: &[S]) -> Result<Routes, RouteError> {
        let defaults_in_use = specs.is_empty();
        let mut by_channel = BTreeMap::new();
        let defaults = DEFAULT_ROUTES.map(String::from);
        let specs: Vec<&str> = if specs.is_empty() {
            defaults.iter().map(String::as_str).collect()
        } else {
            specs.iter().map(AsRef::as_ref).collect()
        };
        for spec in specs {
            let (channel, audiences) = spec
                .split_once('=')
                .ok_or_else(|| RouteError::Syntax(spec.to_owned()))?;
            let channel = channel.trim();
            if channel.is_empty() || audiences.trim().is_empty() {
                return Err(RouteError::Syntax(spec.to_owned()));
            }
            // PostgreSQL truncates identifiers to 63 bytes: a longer channel
            // would LISTEN on a different name than the trigger notifies.
            if channel.len() > 63 {
                return Err(RouteError::ChannelLength(spec.to_owned()));
            }
            if !is_name(channel) {
                return Err(RouteError::BadName {
                    route: spec.to_owned(),
                    name: channel.to_owned(),
                });
            }
            if channel == READ_CHANNEL {
                return Err(RouteError::Reserved(spec.to_owned()));
            }
            let mut parsed: Vec<Audience> = Vec::new();
            for audience in audiences.split(',') {
                let a = audience.parse().map_err(|()| RouteError::UnknownAudience {
                    route: spec.to_owned(),
                    audience: audience.trim().to_owned(),
                })?;
                if !parsed.contains(&a) {
                    parsed.push(a);
                }
            }
            if by_channel.insert(channel.to_owned(), parsed).is_some() {
                return Err(RouteError::Duplicate(channel.to_owned()));
            }
        }
        let mut routes = Routes {
            by_channel,
            streams: Vec::new(),
            plans: BTreeMap::new(),
        };
        if defaults_in_use {
            routes = routes.with_streams(&DEFAULT_STREAMS)?;
        }
        routes.plan();
        Ok(routes)
    }

    /// These routes with exactly the streams `specs` define (`--stream`);
    /// an empty list keeps the streams there are (the demo's stream with
    /// the default routes, none otherwise).
    pub fn with_streams<S: AsRef<str>>(mut self, specs: &[S]) -> Result<Routes, RouteError> {
        if specs.is_empty() {
            return Ok(self);
        }
        let mut streams: Vec<Stream> = Vec::new();
        for spec in specs {
            let stream: Stream = spec.as_ref().parse()?;
            if streams.iter().any(|s| s.name == stream.name) {
                return Err(RouteError::StreamDuplicate(stream.name));
            }
            streams.push(stream);
        }
        self.streams = streams;
        self.plan();
        Ok(self)
    }

    /// The configured streams, in order: a stream's index here is its id in
    /// [`Targets::streams`].
    pub fn streams(&self) -> &[Stream] {
        &self.streams
    }

    /// Compiles each channel's [`Plan`] from the routes and the streams.
    fn plan(&mut self) {
        let mut plans: BTreeMap<String, Plan> = BTreeMap::new();
        fn field(plan: &mut Plan, name: &str) -> usize {
            match plan.fields.iter().position(|f| f == name) {
                Some(i) => i,
                None => {
                    plan.fields.push(name.to_owned());
                    plan.fields.len() - 1
                }
            }
        }
        for (channel, audiences) in &self.by_channel {
            let plan = plans.entry(channel.clone()).or_default();
            for audience in audiences {
                match audience {
                    Audience::Dashboard => plan.dashboard = true,
                    Audience::User(name) => {
                        let i = field(plan, name);
                        plan.users.push(i);
                    }
                }
            }
        }
        // Built in: a user's read state follows them to every socket.
        let read = plans.entry(READ_CHANNEL.to_owned()).or_default();
        let i = field(read, "user_id");
        read.users.push(i);
        for (s, stream) in self.streams.iter().enumerate() {
            for (channel, name) in &stream.carries {
                let plan = plans.entry(channel.clone()).or_default();
                let i = field(plan, name);
                if !plan.streams.contains(&(s, i)) {
                    plan.streams.push((s, i));
                }
            }
        }
        self.plans = plans;
    }

    /// Every channel a route or a stream names: the listener LISTENs on each.
    pub fn channels(&self) -> Vec<String> {
        self.plans.keys().cloned().collect()
    }

    /// Channels routed to the dashboard, for its replay query.
    pub fn dashboard_channels(&self) -> Vec<String> {
        self.by_channel
            .iter()
            .filter(|(_, audiences)| audiences.contains(&Audience::Dashboard))
            .map(|(channel, _)| channel.clone())
            .collect()
    }

    /// Every `user:FIELD` audience as (channel, field) pairs, in two parallel
    /// lists: the replay of a user's stream filters on them in SQL.
    pub fn user_fields(&self) -> (Vec<String>, Vec<String>) {
        self.by_channel
            .iter()
            .flat_map(|(channel, audiences)| {
                audiences.iter().filter_map(move |a| match a {
                    Audience::User(field) => Some((channel.clone(), field.clone())),
                    Audience::Dashboard => None,
                })
            })
            .unzip()
    }

    /// What a replay of `user`'s notifications filters on: every
    /// `user:FIELD` (channel, field) pair.
    pub fn user_filter(&self, user: &str) -> KeyFilter {
        let (mut channels, mut fields) = self.user_fields();
        channels.push(READ_CHANNEL.to_owned());
        fields.push("user_id".to_owned());
        key_filter((channels, fields), user)
    }

    /// What a replay of one key of stream `index` filters on: the pairs it
    /// carries.
    pub fn stream_filter(&self, index: usize, key: &str) -> KeyFilter {
        let pairs = self
            .streams
            .get(index)
            .map(|s| s.carries.iter().cloned().unzip())
            .unwrap_or_default();
        key_filter(pairs, key)
    }

    /// The audiences of an event, or nothing for an unrouted channel.
    pub fn route(&self, event: &Event) -> Targets {
        let Some(plan) = self.plans.get(&event.channel) else {
            return Targets::default();
        };
        let mut targets = Targets {
            dashboard: plan.dashboard,
            ..Targets::default()
        };
        if plan.fields.is_empty() {
            return targets;
        }
        // The payload is read once, and only the planned fields are kept.
        let row = routed_fields(&event.data, &plan.fields);
        for &i in &plan.users {
            if let Some(user) = row[i].and_then(user_id) {
                if !targets.users.contains(&user) {
                    targets.users.push(user);
                }
            }
        }
        for &(stream, i) in &plan.streams {
            if let Some(key) = row[i].and_then(user_id) {
                let target = (stream, key);
                if !targets.streams.contains(&target) {
                    targets.streams.push(target);
                }
            }
        }
        targets
    }
}

/// What a keyed replay filters on (see `db::KEYED_EVENTS_BETWEEN`): the
/// (channel, field) pairs, and the containment patterns an index can
/// answer, one per field and JSON type the rule of [`user_id`] lets name
/// this key.
fn key_filter((channels, fields): (Vec<String>, Vec<String>), key: &str) -> KeyFilter {
    let integer = is_integer_id(key);
    let mut patterns: Vec<String> = Vec::new();
    for field in &fields {
        let name = serde_json::Value::from(field.as_str());
        let string = serde_json::Value::from(key);
        let mut candidates = vec![format!("{{{name}:{string}}}")];
        if integer {
            candidates.push(format!("{{{name}:{key}}}"));
        }
        for pattern in candidates {
            if !patterns.contains(&pattern) {
                patterns.push(pattern);
            }
        }
    }
    KeyFilter {
        channels,
        fields,
        patterns,
        key: key.to_owned(),
        integer,
    }
}

impl FromStr for Stream {
    type Err = RouteError;

    /// `NAME=CHANNEL:FIELD[,CHANNEL:FIELD...]`.
    fn from_str(spec: &str) -> Result<Stream, RouteError> {
        let syntax = || RouteError::StreamSyntax(spec.to_owned());
        let (name, carries) = spec.split_once('=').ok_or_else(syntax)?;
        let name = name.trim();
        let reserved = matches!(name, "dashboard" | "notifications");
        let path_safe = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
        if reserved || !path_safe {
            return Err(RouteError::StreamName(spec.to_owned()));
        }
        let mut pairs: Vec<(String, String)> = Vec::new();
        for pair in carries.split(',') {
            let (channel, field) = pair.trim().split_once(':').ok_or_else(syntax)?;
            let (channel, field) = (channel.trim(), field.trim());
            if channel.len() > 63 || !is_name(channel) || !is_name(field) {
                return Err(syntax());
            }
            if channel == READ_CHANNEL {
                return Err(RouteError::Reserved(spec.to_owned()));
            }
            let pair = (channel.to_owned(), field.to_owned());
            if !pairs.contains(&pair) {
                pairs.push(pair);
            }
        }
        Ok(Stream {
            name: name.to_owned(),
            carries: pairs,
        })
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=", self.name)?;
        for (i, (channel, field)) in self.carries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{channel}:{field}")?;
        }
        Ok(())
    }
}

/// The raw values of `fields` in a payload, one slot per field. Every other
/// value is scanned past, neither decoded nor copied, and keys are compared
/// borrowed. A repeated key keeps its last value, and a payload that is not
/// a JSON object names nobody, as a parse into a map would. Values are
/// borrowed raw, so a number is read as written, never through f64.
fn routed_fields<'a>(data: &'a RawValue, fields: &[String]) -> Vec<Option<&'a RawValue>> {
    let mut de = serde_json::Deserializer::from_str(data.get());
    match (Fields(fields).deserialize(&mut de), de.end()) {
        (Ok(values), Ok(())) => values,
        _ => vec![None; fields.len()],
    }
}

struct Fields<'f>(&'f [String]);

impl<'de> DeserializeSeed<'de> for Fields<'_> {
    type Value = Vec<Option<&'de RawValue>>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Fields<'_> {
    type Value = Vec<Option<&'de RawValue>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut values = vec![None; self.0.len()];
        while let Some(Key(key)) = map.next_key()? {
            if let Some(slot) = self.0.iter().position(|f| *f == *key) {
                values[slot] = Some(map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(values)
    }
}

/// An object key: borrowed from the payload, copied only when it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        de.deserialize_str(KeyVisitor)
    }
}

impl fmt::Display for Routes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (channel, audiences)) in self.by_channel.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{channel}=")?;
            for (j, a) in audiences.iter().enumerate() {
                if j > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{a}")?;
            }
        }
        Ok(())
    }
}

/// Channel and field names: printable, no separators, so that a route prints
/// back to itself and a channel means the same to LISTEN and to the trigger.
pub fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':'))
}

/// A user id as text, by the one rule that live routing, replay (SQL in
/// `db`) and token subjects share: a non-empty JSON string is its text; a
/// JSON integer is its digits exactly as written (so `42` and `"42"` are the
/// same user, and an integer past 2^64 is not rounded); anything else —
/// fractions (`2.50`), exponents, booleans, null, objects — names nobody.
pub fn user_id(value: &RawValue) -> Option<String> {
    let text = value.get();
    if text.starts_with('"') {
        let s: String = serde_json::from_str(text).ok()?;
        (!s.is_empty()).then_some(s)
    } else if is_integer_id(text) {
        Some(text.to_owned())
    } else {
        None
    }
}

/// `-?(0|[1-9][0-9]*)`: an integer in canonical form, as JSON writes one.
/// A text user id of this form also matches JSON numbers; `01`, `+1` or
/// ` 1` match only the string they are.
pub fn is_integer_id(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    match digits.as_bytes() {
        [] => false,
        [b'0'] => true,
        [b'0', ..] => false,
        bytes => bytes.iter().all(u8::is_ascii_digit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(channel: &str, data: &str) -> Event {
        Event {
            id: 1,
            channel: channel.into(),
            table: "t".into(),
            op: "INSERT".into(),
            at: "2026-11-25T00:00:00.000000Z".into(),
            data: RawValue::from_string(data.into()).expect("test data is JSON"),
        }
    }

    fn check(routes: &[&str], channel: &str, data: &str, dashboard: bool, users: &[&str]) {
        let routes = Routes::parse(routes).expect("routes parse");
        let got = routes.route(&event(channel, data));
        assert_eq!(got.dashboard, dashboard, "dashboard for {channel} {data}");
        assert_eq!(got.users, users, "users for {channel} {data}");
    }

    #[test]
    fn routing_matrix() {
        let d: &[&str] = &[];
        check(d, "business_events", r#"{"owner_id":42}"#, true, &["42"]);
        check(d, "business_events", r#"{"owner_id":"42"}"#, true, &["42"]);
        check(d, "business_events", r#"{"owner_id":null}"#, true, &[]);
        check(d, "business_events", r#"{"owner_id":true}"#, true, &[]);
        check(d, "business_events", r#"{"owner_id":""}"#, true, &[]);
        // One rule for ids, the same as replay's SQL: strings as they are,
        // integers exactly as written, nothing else.
        check(d, "business_events", r#"{"owner_id":2.50}"#, true, &[]);
        check(d, "business_events", r#"{"owner_id":1e3}"#, true, &[]);
        check(d, "business_events", r#"{"owner_id":-7}"#, true, &["-7"]);
        check(
            d,
            "business_events",
            r#"{"owner_id":18446744073709551616}"#,
            true,
            &["18446744073709551616"],
        );
        check(d, "business_events", r#"{"owner_id":"01"}"#, true, &["01"]);
        check(
            d,
            "business_events",
            r#"{"owner_id":"2.50"}"#,
            true,
            &["2.50"],
        );
        check(d, "other", r#"{"owner_id":42}"#, false, &[]);
        check(
            d,
            "reservation_events",
            r#"{"business_owner_id":1,"customer_id":2}"#,
            true,
            &["1", "2"],
        );
        // The owner booking their own business is notified once.
        check(
            d,
            "reservation_events",
            r#"{"business_owner_id":5,"customer_id":5}"#,
            true,
            &["5"],
        );
        check(&["c=user:u"], "c", r#"{"u":7}"#, false, &["7"]);
        // Only the routed fields are read, as a parse into a map would: keys
        // unescaped, the last of a repeated key, nested keys not top-level,
        // and nothing from a payload that is not one JSON object.
        check(&["c=user:u"], "c", r#"{"\u0075":7}"#, false, &["7"]);
        check(&["c=user:u"], "c", r#"{"u":7,"u":8}"#, false, &["8"]);
        check(
            &["c=user:u"],
            "c",
            r#"{"x":{"u":7},"y":[{"u":9}]}"#,
            false,
            &[],
        );
        check(&["c=user:u"], "c", r#"[{"u":7}]"#, false, &[]);
        check(
            &["c=user:u,user:v"],
            "c",
            r#"{"v":"a\"b","u":7}"#,
            false,
            &["7", "a\"b"],
        );
        check(&["c=dashboard"], "c", r#"{"u":7}"#, true, &[]);
    }

    #[test]
    fn streams_route_by_their_key_field() {
        let routes = Routes::parse::<&str>(&[]).expect("defaults");
        assert_eq!(
            routes.streams().len(),
            1,
            "the demo's stream comes with the default routes"
        );
        let business = routes.route(&event("business_events", r#"{"id":42,"owner_id":2}"#));
        assert_eq!(business.streams, [(0, "42".to_owned())]);
        assert_eq!(business.users, ["2"]);
        let booking = routes.route(&event(
            "reservation_events",
            r#"{"id":7,"business_id":"42","customer_id":3}"#,
        ));
        assert_eq!(booking.streams, [(0, "42".to_owned())]);
        let nobody = routes.route(&event("reservation_events", r#"{"business_id":4.2}"#));
        assert!(nobody.streams.is_empty());
        // A stream may carry a channel no route names: it is listened to.
        let routes = Routes::parse(&["a=dashboard"])
            .expect("routes")
            .with_streams(&["things=b:thing_id"])
            .expect("streams");
        assert_eq!(routes.channels(), ["a", "b", READ_CHANNEL]);
        let thing = routes.route(&event("b", r#"{"thing_id":"x"}"#));
        assert_eq!(
            thing,
            Targets {
                dashboard: false,
                users: vec![],
                streams: vec![(0, "x".into())]
            }
        );
        assert!(Routes::parse(&["a=dashboard"])
            .expect("routes")
            .streams()
            .is_empty());
        let filter = routes.stream_filter(0, "7");
        assert_eq!(
            (filter.channels, filter.fields),
            (vec!["b".into()], vec!["thing_id".into()])
        );
        assert_eq!(
            filter.patterns,
            [r#"{"thing_id":"7"}"#, r#"{"thing_id":7}"#]
        );
    }

    #[test]
    fn stream_specs() {
        let stream: Stream = "s=a:x, b:y".parse().expect("parses");
        assert_eq!(stream.to_string(), "s=a:x,b:y");
        for bad in [
            "s",
            "s=",
            "s=a",
            "s=a:",
            "=a:x",
            "dashboard=a:x",
            "notifications=a:x",
            "a/b=a:x",
            "s=a b:x",
        ] {
            assert!(bad.parse::<Stream>().is_err(), "{bad}");
        }
        let twice = Routes::parse(&["a=dashboard"])
            .expect("routes")
            .with_streams(&["s=a:x", "s=a:y"]);
        assert_eq!(twice, Err(RouteError::StreamDuplicate("s".into())));
    }

    #[test]
    fn parse_errors() {
        let cases: &[(&str, &str)] = &[
            ("nochannel", "not CHANNEL=AUDIENCE"),
            ("=dashboard", "not CHANNEL=AUDIENCE"),
            ("c=", "not CHANNEL=AUDIENCE"),
            ("c=admins", "unknown audience \"admins\""),
            ("c=user:", "unknown audience"),
            ("c=dashboard,,user:x", "unknown audience \"\""),
            ("a b=dashboard", "may hold only"),
            ("c\0=dashboard", "may hold only"),
            ("c=user:a b", "unknown audience"),
        ];
        for (spec, want) in cases {
            let err = Routes::parse(&[*spec]).expect_err(spec).to_string();
            assert!(err.contains(want), "{spec}: {err}");
        }
        let long = format!("{}=dashboard", "x".repeat(64));
        assert!(Routes::parse(&[long]).is_err());
        assert_eq!(
            Routes::parse(&["c=dashboard", "c=user:x"]),
            Err(RouteError::Duplicate("c".into()))
        );
    }

    #[test]
    fn defaults_and_display() {
        let routes = Routes::parse::<&str>(&[]).expect("defaults parse");
        assert_eq!(
            routes.to_string(),
            "business_events=dashboard,user:owner_id \
             reservation_events=dashboard,user:business_owner_id,user:customer_id"
        );
        assert_eq!(
            routes.channels(),
            ["business_events", READ_CHANNEL, "reservation_events"],
            "read-state changes are always listened to"
        );
        assert_eq!(routes.dashboard_channels().len(), 2);
        assert_eq!(
            routes.user_fields(),
            (
                vec![
                    "business_events".to_owned(),
                    "reservation_events".to_owned(),
                    "reservation_events".to_owned()
                ],
                vec![
                    "owner_id".to_owned(),
                    "business_owner_id".to_owned(),
                    "customer_id".to_owned()
                ]
            )
        );
        let filter = routes.user_filter("42");
        assert_eq!(
            filter.patterns,
            [
                r#"{"owner_id":"42"}"#,
                r#"{"owner_id":42}"#,
                r#"{"business_owner_id":"42"}"#,
                r#"{"business_owner_id":42}"#,
                r#"{"customer_id":"42"}"#,
                r#"{"customer_id":42}"#,
                r#"{"user_id":"42"}"#,
                r#"{"user_id":42}"#,
            ]
        );
        assert!(filter.integer);
        let filter = routes.user_filter("0\"1");
        assert!(!filter.integer);
        assert_eq!(filter.patterns[0], r#"{"owner_id":"0\"1"}"#);
        assert_eq!(filter.patterns.len(), 4);
        let routes = Routes::parse(&["a=dashboard", "b=user:x"]).expect("parse");
        assert_eq!(routes.dashboard_channels(), ["a"]);
        assert_eq!(
            routes.user_fields(),
            (vec!["b".to_owned()], vec!["x".to_owned()])
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;
    use std::collections::BTreeSet;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (0i64..6).prop_map(Value::from),
            "[0-5]{0,2}".prop_map(Value::String),
            Just(serde_json::json!({"nested": 1})),
        ]
    }

    proptest! {
        /// An event reaches exactly its audience: the dashboard only when its
        /// channel routes there, a user only when a routed field names them.
        #[test]
        fn an_event_reaches_exactly_its_audience(
            fields in proptest::collection::btree_map("[a-c]", value(), 0..4),
            user_fields in proptest::collection::btree_set("[a-c]", 0..3),
            dashboard in any::<bool>(),
            routed in any::<bool>(),
        ) {
            prop_assume!(dashboard || !user_fields.is_empty());
            let mut audiences: Vec<String> = user_fields.iter().map(|f| format!("user:{f}")).collect();
            if dashboard {
                audiences.push("dashboard".into());
            }
            let routes = Routes::parse(&[format!("c={}", audiences.join(","))]).expect("valid route");
            let data = serde_json::to_string(&fields).expect("json");
            let event = Event {
                id: 1,
                channel: if routed { "c".into() } else { "other".into() },
                table: "t".into(),
                op: "INSERT".into(),
                at: "x".into(),
                data: RawValue::from_string(data).expect("json"),
            };
            let targets = routes.route(&event);
            let expected: BTreeSet<String> = if routed {
                user_fields.iter().filter_map(|f| {
                    let raw = serde_json::value::to_raw_value(fields.get(f)?).ok()?;
                    user_id(&raw)
                }).collect()
            } else {
                BTreeSet::new()
            };
            let got: BTreeSet<String> = targets.users.iter().cloned().collect();
            prop_assert_eq!(got.len(), targets.users.len(), "no user twice");
            prop_assert_eq!(got, expected);
            prop_assert_eq!(targets.dashboard, routed && dashboard);
        }

        /// Route parsing never panics, and what parses prints back the same.
        #[test]
        fn route_parsing_round_trips(spec in "[a-z:=,_ ]{0,30}") {
            if let Ok(routes) = Routes::parse(&[spec.as_str()]) {
                let again = Routes::parse(&[routes.to_string()]).expect("printed routes parse");
                prop_assert_eq!(again, routes);
            }
        }
    }
}
