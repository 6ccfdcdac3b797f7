//! Input products ("specs") as a PIM sends them, and the parsing of a submission.
//!
//! A submission is one JSON object, a JSON array of objects, or JSONL (one object per line).
//! Each record is parsed and validated on its own: a bad record becomes a [`SpecError`] that
//! names the record (line or array index), the field and the problem, and the rest of the
//! submission goes on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::InputLimits;

/// A validated product spec. Fields are private to the module's parser; read them through the
/// accessors. Unknown input fields are kept in `extra` (and stored) but never used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductSpec {
    pub id: String,
    pub brand: Option<String>,
    pub category: Option<String>,
    /// Attribute name -> value, in input order.
    pub attributes: Vec<(String, AttrValue)>,
    pub title: Option<String>,
    pub description: Option<String>,
    pub locale: String,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, Value>,
}

/// An attribute value: string, number, boolean, or a list of those.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttrValue {
    Text(String),
    Number(serde_json::Number),
    Bool(bool),
    List(Vec<AttrValue>),
}

impl AttrValue {
    /// The value as a person would read it (lists joined with ", ").
    pub fn display(&self) -> String {
        match self {
            AttrValue::Text(s) => s.clone(),
            AttrValue::Number(n) => n.to_string(),
            AttrValue::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
            AttrValue::List(v) => v
                .iter()
                .map(AttrValue::display)
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    fn char_len(&self) -> usize {
        match self {
            AttrValue::Text(s) => s.chars().count(),
            AttrValue::Number(n) => n.to_string().len(),
            AttrValue::Bool(_) => 3,
            AttrValue::List(v) => v.iter().map(AttrValue::char_len).sum(),
        }
    }
}

/// Where a record sat in the submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "n")]
pub enum Position {
    /// 1-based line of a JSONL submission.
    Line(usize),
    /// 0-based index in a JSON array.
    Index(usize),
    /// The submission was one object.
    Single,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Position::Line(n) => write!(f, "line {n}"),
            Position::Index(n) => write!(f, "item {n}"),
            Position::Single => write!(f, "the product"),
        }
    }
}

/// Why one record was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{position}: {field}: {message}")]
pub struct SpecError {
    pub position: Position,
    /// The product id when it could be read.
    pub product_id: Option<String>,
    /// The field at fault (`id`, `attributes.Color`, ...), or `(record)` for the whole record.
    pub field: String,
    pub message: String,
}

/// One parsed record: its position and the spec or the error.
pub type ParsedRecord = (Position, Result<ProductSpec, SpecError>);

/// Parses a submission of any of the accepted shapes. Never fails as a whole: every record
/// yields a spec or an error. An empty submission yields no records.
pub fn parse_submission(bytes: &[u8], limits: &InputLimits) -> Vec<ParsedRecord> {
    let trimmed = trim_ascii(bytes);
    if trimmed.is_empty() {
        return Vec::new();
    }
    // A JSON array, or a single object that spans several lines, is one JSON document.
    // JSONL is tried when the whole does not parse as one document.
    if trimmed[0] == b'[' {
        if let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(trimmed) {
            return items
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    let pos = Position::Index(i);
                    (pos, validate(v, pos, limits))
                })
                .collect();
        }
    }
    if trimmed[0] == b'{' {
        if let Ok(v @ Value::Object(_)) = serde_json::from_slice::<Value>(trimmed) {
            return vec![(Position::Single, validate(v, Position::Single, limits))];
        }
    }
    parse_jsonl(bytes, limits)
}

fn parse_jsonl(bytes: &[u8], limits: &InputLimits) -> Vec<ParsedRecord> {
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = trim_ascii(raw);
        if line.is_empty() {
            continue;
        }
        let pos = Position::Line(i + 1);
        let text = match std::str::from_utf8(line) {
            Ok(t) => t,
            Err(e) => {
                out.push((
                    pos,
                    Err(SpecError {
                        position: pos,
                        product_id: None,
                        field: "(record)".into(),
                        message: format!(
                            "not valid UTF-8 (invalid byte at offset {})",
                            e.valid_up_to()
                        ),
                    }),
                ));
                continue;
            }
        };
        let result = match serde_json::from_str::<Value>(text) {
            Ok(v) => validate(v, pos, limits),
            Err(e) => Err(SpecError {
                position: pos,
                product_id: None,
                field: "(record)".into(),
                message: format!("malformed JSON: {e}"),
            }),
        };
        out.push((pos, result));
    }
    out
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    // A UTF-8 byte-order mark at the start of a file is not content.
    let s = &b[start..end];
    s.strip_prefix(&[0xEF, 0xBB, 0xBF]).unwrap_or(s)
}

/// Validates one JSON value as a product spec.
pub fn validate(v: Value, pos: Position, limits: &InputLimits) -> Result<ProductSpec, SpecError> {
    let err = |id: Option<&str>, field: &str, message: String| SpecError {
        position: pos,
        product_id: id.map(str::to_string),
        field: field.to_string(),
        message,
    };
    let Value::Object(mut obj) = v else {
        return Err(err(
            None,
            "(record)",
            format!("expected a JSON object, got {}", kind_of(&v)),
        ));
    };

    let id = match obj.remove("id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(Value::String(_)) => return Err(err(None, "id", "must not be empty".into())),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Null) | None => return Err(err(None, "id", "is required".into())),
        Some(other) => {
            return Err(err(
                None,
                "id",
                format!("must be a string or number, got {}", kind_of(&other)),
            ))
        }
    };
    if id.chars().count() > limits.max_id_chars {
        return Err(err(
            None,
            "id",
            format!("is longer than {} characters", limits.max_id_chars),
        ));
    }
    let id_ref = Some(id.as_str());

    let opt_text = |obj: &mut serde_json::Map<String, Value>, field: &str, max: usize| match obj
        .remove(field)
    {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let s = s.trim().to_string();
            let n = s.chars().count();
            if n > max {
                Err(err(
                    id_ref,
                    field,
                    format!("is too long ({n} characters, at most {max})"),
                ))
            } else if s.is_empty() {
                Ok(None)
            } else {
                Ok(Some(s))
            }
        }
        Some(other) => Err(err(
            id_ref,
            field,
            format!("must be a string, got {}", kind_of(&other)),
        )),
    };
    let brand = opt_text(&mut obj, "brand", limits.max_title_chars)?;
    let category = opt_text(&mut obj, "category", limits.max_title_chars)?;
    let title = opt_text(&mut obj, "title", limits.max_title_chars)?;
    let description = opt_text(&mut obj, "description", limits.max_description_chars)?;
    let locale = opt_text(&mut obj, "locale", 35)?.unwrap_or_else(|| "en-US".to_string());
    if !locale
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(err(
            id_ref,
            "locale",
            format!("`{locale}` is not a locale tag like en-US"),
        ));
    }

    let attributes = match obj.remove("attributes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(map)) => {
            if map.len() > limits.max_attributes {
                return Err(err(
                    id_ref,
                    "attributes",
                    format!(
                        "has {} attributes, at most {}",
                        map.len(),
                        limits.max_attributes
                    ),
                ));
            }
            let mut attrs = Vec::with_capacity(map.len());
            for (name, value) in map {
                let field = format!("attributes.{name}");
                if name.trim().is_empty() {
                    return Err(err(
                        id_ref,
                        "attributes",
                        "has an attribute with an empty name".into(),
                    ));
                }
                let Some(value) = attr_value(value) else {
                    return Err(err(
                        id_ref,
                        &field,
                        "must be a string, number, boolean or an array of those".into(),
                    ));
                };
                if value.char_len() > limits.max_attribute_value_chars {
                    return Err(err(
                        id_ref,
                        &field,
                        format!(
                            "is longer than {} characters",
                            limits.max_attribute_value_chars
                        ),
                    ));
                }
                // Empty values carry no facts; they are dropped rather than refused.
                if value.display().trim().is_empty() {
                    continue;
                }
                attrs.push((name.trim().to_string(), value));
            }
            attrs
        }
        Some(other) => {
            return Err(err(
                id_ref,
                "attributes",
                format!(
                    "must be an object of name -> value, got {}",
                    kind_of(&other)
                ),
            ))
        }
    };
    if attributes.is_empty() {
        return Err(err(
            id_ref,
            "attributes",
            "is empty: at least one attribute with a value is needed to write grounded copy".into(),
        ));
    }

    Ok(ProductSpec {
        id,
        brand,
        category,
        attributes,
        title,
        description,
        locale,
        extra: obj,
    })
}

fn attr_value(v: Value) -> Option<AttrValue> {
    Some(match v {
        Value::String(s) => AttrValue::Text(s.trim().to_string()),
        Value::Number(n) => AttrValue::Number(n),
        Value::Bool(b) => AttrValue::Bool(b),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for i in items {
                match attr_value(i)? {
                    AttrValue::List(_) => return None,
                    x => out.push(x),
                }
            }
            AttrValue::List(out)
        }
        Value::Null | Value::Object(_) => return None,
    })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl ProductSpec {
    /// Attribute lookup by name, case-insensitive.
    pub fn attribute(&self, name: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Attributes as an ordered map of display strings (for templates and tables).
    pub fn attribute_strings(&self) -> BTreeMap<String, String> {
        self.attributes
            .iter()
            .map(|(n, v)| (n.clone(), v.display()))
            .collect()
    }

    /// Every piece of spec text that copy may draw facts from: brand, category, attribute
    /// names and values, title, description. Used by the grounding checks.
    pub fn fact_texts(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(self.brand.clone());
        out.extend(self.category.clone());
        for (n, v) in &self.attributes {
            out.push(format!("{n}: {}", v.display()));
        }
        out.extend(self.title.clone());
        out.extend(self.description.clone());
        out
    }

    /// The spec as stored: the input shape, extra fields included.
    pub fn to_json(&self) -> Value {
        let mut obj = self.extra.clone();
        obj.insert("id".into(), Value::String(self.id.clone()));
        if let Some(b) = &self.brand {
            obj.insert("brand".into(), Value::String(b.clone()));
        }
        if let Some(c) = &self.category {
            obj.insert("category".into(), Value::String(c.clone()));
        }
        let attrs: serde_json::Map<String, Value> = self
            .attributes
            .iter()
            .map(|(n, v)| (n.clone(), serde_json::to_value(v).unwrap_or(Value::Null)))
            .collect();
        obj.insert("attributes".into(), Value::Object(attrs));
        if let Some(t) = &self.title {
            obj.insert("title".into(), Value::String(t.clone()));
        }
        if let Some(d) = &self.description {
            obj.insert("description".into(), Value::String(d.clone()));
        }
        obj.insert("locale".into(), Value::String(self.locale.clone()));
        Value::Object(obj)
    }

    /// Reads back a stored spec (it was validated when it was stored).
    pub fn from_stored(v: Value) -> Result<Self, SpecError> {
        let limits = InputLimits {
            max_description_chars: usize::MAX,
            max_title_chars: usize::MAX,
            max_attributes: usize::MAX,
            max_attribute_value_chars: usize::MAX,
            max_id_chars: usize::MAX,
        };
        validate(v, Position::Single, &limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> InputLimits {
        InputLimits::default()
    }

    #[test]
    fn accepts_single_object_array_and_jsonl() {
        let one = br#"{"id":"a","attributes":{"Color":"red"}}"#;
        let r = parse_submission(one, &limits());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1.as_ref().unwrap().id, "a");

        let arr = br#"[{"id":"a","attributes":{"x":1}},{"id":"b","attributes":{"y":true}}]"#;
        let r = parse_submission(arr, &limits());
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, Position::Index(1));

        let jsonl = b"{\"id\":\"a\",\"attributes\":{\"x\":\"1\"}}\n\n{\"id\":\"b\",\"attributes\":{\"x\":\"2\"}}\n";
        let r = parse_submission(jsonl, &limits());
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, Position::Line(3));
    }

    #[test]
    fn a_pretty_printed_single_object_is_one_record() {
        let pretty = b"{\n  \"id\": \"a\",\n  \"attributes\": {\"Color\": \"red\"}\n}\n";
        let r = parse_submission(pretty, &limits());
        assert_eq!(r.len(), 1);
        assert!(r[0].1.is_ok());
    }

    #[test]
    fn bad_lines_fail_alone_and_name_line_and_field() {
        let input = concat!(
            "{\"id\":\"ok1\",\"attributes\":{\"a\":\"b\"}}\n",
            "{\"id\": broken\n",
            "{\"brand\":\"X\",\"attributes\":{\"a\":\"b\"}}\n",
            "{\"id\":\"e\",\"attributes\":{}}\n",
            "{\"id\":\"n\",\"attributes\":{\"a\":{\"nested\":1}}}\n",
            "{\"id\":\"ok2\",\"attributes\":{\"a\":[\"b\",2,false]}}\n",
        );
        let r = parse_submission(input.as_bytes(), &limits());
        assert_eq!(r.len(), 6);
        assert!(r[0].1.is_ok());
        let e = r[1].1.as_ref().unwrap_err();
        assert_eq!(
            (e.position, e.field.as_str()),
            (Position::Line(2), "(record)")
        );
        assert!(e.message.contains("malformed JSON"));
        let e = r[2].1.as_ref().unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("id", "is required")
        );
        let e = r[3].1.as_ref().unwrap_err();
        assert_eq!(e.field, "attributes");
        assert_eq!(e.product_id.as_deref(), Some("e"));
        let e = r[4].1.as_ref().unwrap_err();
        assert_eq!(e.field, "attributes.a");
        assert_eq!(
            r[5].1.as_ref().unwrap().attributes[0].1.display(),
            "b, 2, no"
        );
        assert_eq!(
            e.to_string(),
            "line 5: attributes.a: must be a string, number, boolean or an array of those"
        );
    }

    #[test]
    fn non_utf8_line_fails_alone() {
        let mut input = b"{\"id\":\"a\",\"attributes\":{\"x\":\"1\"}}\n".to_vec();
        input.extend_from_slice(b"{\"id\":\"b\",\"attributes\":{\"x\":\"\xff\xfe\"}}\n");
        input.extend_from_slice(b"{\"id\":\"c\",\"attributes\":{\"x\":\"1\"}}\n");
        let r = parse_submission(&input, &limits());
        assert_eq!(r.len(), 3);
        assert!(r[0].1.is_ok() && r[2].1.is_ok());
        let e = r[1].1.as_ref().unwrap_err();
        assert!(e.message.contains("UTF-8"), "{e}");
        assert_eq!(e.position, Position::Line(2));
    }

    #[test]
    fn oversized_description_names_the_field() {
        let big = "x".repeat(5 * 1024 * 1024);
        let v = serde_json::json!({"id": "big", "attributes": {"a": "b"}, "description": big});
        let e = validate(v, Position::Line(1), &limits()).unwrap_err();
        assert_eq!(e.field, "description");
        assert!(e.message.contains("too long"), "{}", e.message);
    }

    #[test]
    fn keeps_extra_fields_and_round_trips_through_storage() {
        let v = serde_json::json!({
            "id": 123, "brand": "HP", "attributes": {"Cache": "24MB", "Cores": 10},
            "meta": {"shop": "x"}, "bullets": []
        });
        let s = validate(v, Position::Single, &limits()).unwrap();
        assert_eq!(s.id, "123");
        assert_eq!(s.locale, "en-US");
        assert!(s.extra.contains_key("meta"));
        let back = ProductSpec::from_stored(s.to_json()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn real_data_files_load_as_they_are() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/products");
        for name in ["wdc-pave-dev.jsonl", "flipkart-dev.jsonl"] {
            let bytes = std::fs::read(dir.join(name)).expect("shared test data");
            let r = parse_submission(&bytes, &limits());
            assert!(r.len() > 200, "{name}: {} records", r.len());
            let bad: Vec<_> = r.iter().filter_map(|(_, x)| x.as_ref().err()).collect();
            assert!(bad.is_empty(), "{name}: {bad:?}");
        }
    }
}
