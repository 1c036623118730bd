//! JSON objects read the way Go's `encoding/json` fills a struct, because the
//! documents we read (`<prefix>/config`, leases) are written for flanneld:
//! keys match field names case-insensitively, when several keys match the
//! last one in the document wins, unknown keys are ignored, and `null` leaves
//! a plain field at its default.
//!
//! serde_json's `Value` keeps objects in a sorted map, which loses document
//! order, so objects are kept here as ordered key/value lists.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

/// A JSON value whose objects keep their keys in document order.
#[derive(Clone, Debug, PartialEq)]
pub enum GoValue {
    Object(GoObject),
    /// Anything that is not an object (arrays keep serde_json's form: no
    /// document we read has objects inside arrays that matter).
    Other(Value),
}

/// An object's entries in document order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GoObject(pub Vec<(String, GoValue)>);

/// What a field lookup found, after Go's rules.
#[derive(Debug, PartialEq)]
pub enum Field<'a> {
    /// No key matched, or the last match was `null`: the field keeps its default.
    Absent,
    Present(&'a GoValue),
}

impl GoObject {
    /// Parse a document that must be a JSON object.
    pub fn parse(text: &[u8]) -> Result<GoObject, ParseError> {
        match serde_json::from_slice::<GoValue>(text).map_err(ParseError::Json)? {
            GoValue::Object(o) => Ok(o),
            GoValue::Other(v) => Err(ParseError::NotAnObject(kind(&v))),
        }
    }

    /// The value for `name` as Go would assign it: the last key equal to
    /// `name` ignoring ASCII case. (Go also folds the Kelvin sign and the long
    /// s; no field name here contains a k or an s that a document could
    /// plausibly spell that way.)
    pub fn field(&self, name: &str) -> Field<'_> {
        match self
            .0
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            None | Some((_, GoValue::Other(Value::Null))) => Field::Absent,
            Some((_, v)) => Field::Present(v),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("expected a JSON object, found {0}")]
    NotAnObject(&'static str),
}

/// A short name for the JSON type of a value, for error messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl GoValue {
    pub fn kind(&self) -> &'static str {
        match self {
            GoValue::Object(_) => "an object",
            GoValue::Other(v) => kind(v),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GoValue::Other(Value::String(s)) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            GoValue::Other(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }
    /// An integer as Go's `strconv` would accept it for an int field: no
    /// fraction, no exponent.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            GoValue::Other(Value::Number(n)) => n.as_i64(),
            _ => None,
        }
    }
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            GoValue::Other(Value::Number(n)) => n.as_u64(),
            _ => None,
        }
    }
    /// The value as compact JSON text (for error messages).
    pub fn to_json(&self) -> String {
        match self {
            GoValue::Other(v) => v.to_string(),
            GoValue::Object(o) => {
                let inner: Vec<String> =
                    o.0.iter()
                        .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), v.to_json()))
                        .collect();
                format!("{{{}}}", inner.join(","))
            }
        }
    }
}

impl<'de> Deserialize<'de> for GoValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(GoValueVisitor)
    }
}

struct GoValueVisitor;

impl<'de> Visitor<'de> for GoValueVisitor {
    type Value = GoValue;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<GoValue, E> {
        Ok(GoValue::Other(Value::Bool(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<GoValue, E> {
        Ok(GoValue::Other(Value::Number(v.into())))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<GoValue, E> {
        Ok(GoValue::Other(Value::Number(v.into())))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<GoValue, E> {
        Ok(GoValue::Other(
            Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<GoValue, E> {
        Ok(GoValue::Other(Value::String(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<GoValue, E> {
        Ok(GoValue::Other(Value::String(v)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<GoValue, E> {
        Ok(GoValue::Other(Value::Null))
    }
    fn visit_none<E: de::Error>(self) -> Result<GoValue, E> {
        Ok(GoValue::Other(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<GoValue, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<Value>()? {
            out.push(v);
        }
        Ok(GoValue::Other(Value::Array(out)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<GoValue, A::Error> {
        let mut out = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, GoValue>()? {
            out.push((k, v));
        }
        Ok(GoValue::Object(GoObject(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fold_case_and_last_wins_in_document_order() {
        let o = GoObject::parse(br#"{"network":"a","NETWORK":"b","Other":1}"#).unwrap();
        assert_eq!(
            o.field("Network"),
            Field::Present(&GoValue::Other("b".into()))
        );
        let o = GoObject::parse(br#"{"NETWORK":"b","network":"a"}"#).unwrap();
        assert_eq!(
            o.field("Network"),
            Field::Present(&GoValue::Other("a".into()))
        );
        assert_eq!(o.field("Missing"), Field::Absent);
    }

    #[test]
    fn null_means_absent_and_nested_objects_keep_order() {
        let o = GoObject::parse(br#"{"SubnetLen":null,"Backend":{"vni":1,"VNI":2}}"#).unwrap();
        assert_eq!(o.field("SubnetLen"), Field::Absent);
        let Field::Present(GoValue::Object(b)) = o.field("backend") else {
            panic!("backend is an object")
        };
        assert_eq!(b.field("Vni").unwrap_present().as_i64(), Some(2));
        assert_eq!(b.0.len(), 2);
    }

    #[test]
    fn rejects_non_objects_and_bad_json() {
        assert!(matches!(
            GoObject::parse(b"[1]"),
            Err(ParseError::NotAnObject("an array"))
        ));
        assert!(matches!(
            GoObject::parse(b"{\"a\":"),
            Err(ParseError::Json(_))
        ));
    }

    impl<'a> Field<'a> {
        fn unwrap_present(self) -> &'a GoValue {
            match self {
                Field::Present(v) => v,
                Field::Absent => panic!("absent"),
            }
        }
    }
}
