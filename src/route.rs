//! Event -> audiences: which streams an event goes to.
//!
//! Pure: no I/O. A route is `CHANNEL=AUDIENCE[,AUDIENCE...]`, an audience is
//! `dashboard` or `user:FIELD`, FIELD a top-level key of the row payload whose
//! value names a user by [`user_id`]'s rule: a non-empty string, or an integer
//! exactly as written; compared as text, so `42` and `"42"` are the same user,
//! and `2.50` names nobody. The same [`Routes::route`] decides live
//! delivery and replay, so a resumed socket sees exactly what a live one would.

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

/// Channel -> audiences, from `--route` flags or the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Routes {
    by_channel: BTreeMap<String, Vec<Audience>>,
}

/// The filter of one user's replay, built by [`Routes::user_filter`].
#[derive(Debug, Clone, PartialEq)]
pub struct UserFilter {
    /// Routed (channel, field) pairs, as two parallel lists.
    pub channels: Vec<String>,
    pub fields: Vec<String>,
    /// JSON objects a matching payload contains (for the payload index).
    pub patterns: Vec<String>,
    pub user: String,
    /// Whether `user` also matches JSON integers.
    pub integer: bool,
}

/// Where one event goes: the dashboard stream and/or these users.
#[derive(Debug, Default, PartialEq)]
pub struct Targets {
    pub dashboard: bool,
    pub users: Vec<String>,
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
}

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
        Ok(Routes { by_channel })
    }

    /// Every routed channel: the listener LISTENs on each.
    pub fn channels(&self) -> Vec<String> {
        self.by_channel.keys().cloned().collect()
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

    /// What a replay of `user`'s stream filters on (see
    /// `db::USER_EVENTS_BETWEEN`): every routed (channel, field) pair, and
    /// the containment patterns an index can answer, one per field and
    /// JSON type the rule of [`user_id`] lets name this user.
    pub fn user_filter(&self, user: &str) -> UserFilter {
        let (channels, fields) = self.user_fields();
        let integer = is_integer_id(user);
        let mut patterns: Vec<String> = Vec::new();
        for field in &fields {
            let key = serde_json::Value::from(field.as_str());
            let string = serde_json::Value::from(user);
            let mut candidates = vec![format!("{{{key}:{string}}}")];
            if integer {
                candidates.push(format!("{{{key}:{user}}}"));
            }
            for pattern in candidates {
                if !patterns.contains(&pattern) {
                    patterns.push(pattern);
                }
            }
        }
        UserFilter {
            channels,
            fields,
            patterns,
            user: user.to_owned(),
            integer,
        }
    }

    /// The audiences of an event, or nothing for an unrouted channel.
    pub fn route(&self, event: &Event) -> Targets {
        let Some(audiences) = self.by_channel.get(&event.channel) else {
            return Targets::default();
        };
        let mut targets = Targets::default();
        // Only the routed fields are kept; the payload is read once, and only
        // when some audience needs a field.
        let mut row: Option<Vec<Option<&RawValue>>> = None;
        for (i, audience) in audiences.iter().enumerate() {
            match audience {
                Audience::Dashboard => targets.dashboard = true,
                Audience::User(_) => {
                    let row = row.get_or_insert_with(|| routed_fields(&event.data, audiences));
                    if let Some(user) = row[i].and_then(user_id) {
                        if !targets.users.contains(&user) {
                            targets.users.push(user);
                        }
                    }
                }
            }
        }
        targets
    }
}

/// The raw values of the `user:FIELD` audiences' fields in a payload, one
/// slot per audience. Every other value is scanned past, neither decoded nor
/// copied, and keys are compared borrowed. A repeated key keeps its last value, and
/// a payload that is not a JSON object names nobody, as a parse into a map
/// would. Values are borrowed raw, so a number is read as written, never
/// through f64.
fn routed_fields<'a>(data: &'a RawValue, audiences: &[Audience]) -> Vec<Option<&'a RawValue>> {
    let mut de = serde_json::Deserializer::from_str(data.get());
    match (Fields(audiences).deserialize(&mut de), de.end()) {
        (Ok(values), Ok(())) => values,
        _ => vec![None; audiences.len()],
    }
}

struct Fields<'f>(&'f [Audience]);

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
            let wanted = |a: &Audience| matches!(a, Audience::User(f) if *f == *key);
            if self.0.iter().any(wanted) {
                let value: &'de RawValue = map.next_value()?;
                for (slot, _) in values.iter_mut().zip(self.0).filter(|(_, a)| wanted(a)) {
                    *slot = Some(value);
                }
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
        assert_eq!(routes.channels(), ["business_events", "reservation_events"]);
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
            ]
        );
        assert!(filter.integer);
        let filter = routes.user_filter("0\"1");
        assert!(!filter.integer);
        assert_eq!(filter.patterns[0], r#"{"owner_id":"0\"1"}"#);
        assert_eq!(filter.patterns.len(), 3);
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
