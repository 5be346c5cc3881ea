//! Deltas between two JSON values: what changed from one snapshot to the next.
//!
//! A delta is itself JSON, one of:
//! - `{"=": V}`: replace the value by `V`;
//! - `{"+": {KEY: DELTA, ...}, "-": [KEY, ...]}`: an object whose members `KEY` change (a new
//!   member's delta is a replacement) and whose members in `-` are removed (either part may be
//!   absent);
//! - `{"[": [[I, DELTA], ...]}`: an array of the same length whose elements `I` change.
//!
//! Unlike JSON Merge Patch (RFC 7396), a `null` is a value like any other, so `Option` fields
//! that become `None` round-trip exactly. Most of a snapshot (model, workload, policy, static
//! per-layer fields) does not change between frames; what does is a small part of its JSON.

use anyhow::{Result, bail};
use serde_json::{Map, Value};

/// The delta that turns `a` into `b`, or `None` when they are equal.
pub fn diff(a: &Value, b: &Value) -> Option<Value> {
    match (a, b) {
        (Value::Object(ao), Value::Object(bo)) => {
            let mut plus = Map::new();
            for (k, bv) in bo {
                match ao.get(k) {
                    Some(av) => {
                        if let Some(d) = diff(av, bv) {
                            plus.insert(k.clone(), d);
                        }
                    }
                    None => {
                        plus.insert(k.clone(), replace(bv));
                    }
                }
            }
            let minus: Vec<Value> = ao
                .keys()
                .filter(|k| !bo.contains_key(*k))
                .map(|k| Value::String(k.clone()))
                .collect();
            if plus.is_empty() && minus.is_empty() {
                return None;
            }
            let mut d = Map::new();
            if !plus.is_empty() {
                d.insert("+".into(), Value::Object(plus));
            }
            if !minus.is_empty() {
                d.insert("-".into(), Value::Array(minus));
            }
            Some(Value::Object(d))
        }
        (Value::Array(aa), Value::Array(ba)) if aa.len() == ba.len() => {
            let edits: Vec<Value> = aa
                .iter()
                .zip(ba)
                .enumerate()
                .filter_map(|(i, (x, y))| diff(x, y).map(|d| Value::Array(vec![i.into(), d])))
                .collect();
            if edits.is_empty() {
                return None;
            }
            // Every element changed: the array itself is shorter than its edits.
            if edits.len() == aa.len() && !aa.iter().any(|v| v.is_object() || v.is_array()) {
                return Some(replace(b));
            }
            let mut d = Map::new();
            d.insert("[".into(), Value::Array(edits));
            Some(Value::Object(d))
        }
        _ if a == b => None,
        _ => Some(replace(b)),
    }
}

fn replace(v: &Value) -> Value {
    let mut d = Map::new();
    d.insert("=".into(), v.clone());
    Value::Object(d)
}

/// Applies `delta` (made by [`diff`]) to `target`. A delta that does not fit the value (a key
/// that is not an object member, an index past the end, an unknown form) is an error and leaves
/// `target` partly changed: the caller discards it.
pub fn apply(target: &mut Value, delta: &Value) -> Result<()> {
    let Value::Object(d) = delta else {
        bail!("a delta is an object, found {}", kind(delta));
    };
    if let Some(v) = d.get("=") {
        if d.len() != 1 {
            bail!("a replacement has one member");
        }
        *target = v.clone();
        return Ok(());
    }
    if let Some(edits) = d.get("[") {
        if d.len() != 1 {
            bail!("an array delta has one member");
        }
        let (Value::Array(items), Value::Array(edits)) = (target, edits) else {
            bail!("an array delta applied to a non-array (or with non-array edits)");
        };
        for e in edits {
            let Some([i, sub]) = e
                .as_array()
                .and_then(|s| <&[Value; 2]>::try_from(s.as_slice()).ok())
            else {
                bail!("an array edit is [index, delta]");
            };
            let Some(i) = i.as_u64().and_then(|i| usize::try_from(i).ok()) else {
                bail!("an array edit's index is not a non-negative integer");
            };
            let n = items.len();
            let Some(item) = items.get_mut(i) else {
                bail!("an array edit's index {i} is past the end ({n} elements)");
            };
            apply(item, sub)?;
        }
        return Ok(());
    }
    if d.keys().any(|k| k != "+" && k != "-") || d.is_empty() {
        bail!(
            "unknown delta form (members {:?})",
            d.keys().collect::<Vec<_>>()
        );
    }
    let Value::Object(obj) = target else {
        bail!("an object delta applied to {}", kind(target));
    };
    if let Some(plus) = d.get("+") {
        let Value::Object(plus) = plus else {
            bail!("an object delta's `+` is not an object");
        };
        for (k, sub) in plus {
            match obj.get_mut(k) {
                Some(v) => apply(v, sub)?,
                None => {
                    let mut v = Value::Null;
                    apply(&mut v, sub)?;
                    obj.insert(k.clone(), v);
                }
            }
        }
    }
    if let Some(minus) = d.get("-") {
        let Value::Array(minus) = minus else {
            bail!("an object delta's `-` is not an array");
        };
        for k in minus {
            let Some(k) = k.as_str() else {
                bail!("an object delta removes a key that is not a string");
            };
            obj.remove(k);
        }
    }
    Ok(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round_trip(a: Value, b: Value) {
        let mut x = a.clone();
        if let Some(d) = diff(&a, &b) {
            apply(&mut x, &d).unwrap();
        }
        assert_eq!(x, b);
    }

    #[test]
    fn deltas_round_trip() {
        round_trip(json!({"a": 1, "b": [1, 2]}), json!({"a": 1, "b": [1, 3]}));
        round_trip(
            json!({"a": 1, "b": null}),
            json!({"a": null, "c": {"x": 2}}),
        );
        round_trip(
            json!({"l": [{"x": 1, "y": 2}, {"x": 3}]}),
            json!({"l": [{"x": 1, "y": 5}, {"x": 3}]}),
        );
        round_trip(json!([1, 2]), json!([1, 2, 3]));
        round_trip(json!({"o": {"p": 1}}), json!({"o": 7}));
        round_trip(json!(1.5), json!("s"));
    }

    #[test]
    fn equal_values_have_no_delta_and_small_changes_small_deltas() {
        let a = json!({"model": {"name": "m", "layers": [1, 2, 3]}, "t": 1.0});
        assert_eq!(diff(&a, &a), None);
        let b = json!({"model": {"name": "m", "layers": [1, 2, 3]}, "t": 2.0});
        assert_eq!(diff(&a, &b), Some(json!({"+": {"t": {"=": 2.0}}})));
    }

    #[test]
    fn a_delta_that_does_not_fit_is_an_error() {
        let mut v = json!({"a": [1]});
        for bad in [
            json!(3),
            json!({"[": [[5, {"=": 1}]]}),
            json!({"+": {"a": {"[": [[0, 1]]}}}),
            json!({"?": 1}),
            json!({}),
            json!({"-": [1]}),
            json!({"=": 1, "+": {}}),
        ] {
            assert!(apply(&mut v, &bad).is_err(), "{bad}");
        }
    }
}
