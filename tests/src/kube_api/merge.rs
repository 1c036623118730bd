//! The three PATCH flavours a Kubernetes API server accepts, on JSON values.
//!
//! - JSON merge patch (RFC 7386, `application/merge-patch+json`): objects
//!   merge recursively, `null` deletes, every list is replaced whole.
//! - Strategic merge patch (`application/strategic-merge-patch+json`): the
//!   same, except for the lists the Kubernetes types tag with a merge key
//!   (`status.conditions` by `type`, ...), whose elements are merged one by
//!   one, and the `$patch` directive (`replace`/`delete`) on objects and list
//!   elements. The list of merge keys is the handful of fields of Node and
//!   Pod that clients patch, not the whole schema: any other list is
//!   replaced, as it would be for a field without a patch strategy.
//!   `$setElementOrder/...` and `$retainKeys` only order or prune and are
//!   dropped.
//! - JSON patch (RFC 6902, `application/json-patch+json`): add, remove,
//!   replace, move, copy and test.

use serde_json::{Map, Value};

use super::status::ApiError;

/// How a list at a given path merges in a strategic merge patch.
enum ListMerge {
    /// Elements are objects identified by this key.
    ByKey(&'static str),
    /// Elements are scalars; the result is the union, in order.
    Primitive,
}

/// Lists with a patch strategy of `merge` in Node and Pod (paths of object
/// keys from the root, list indexes skipped).
fn list_merge(path: &[String]) -> Option<ListMerge> {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match p.as_slice() {
        ["status", "conditions"] | ["status", "addresses"] => Some(ListMerge::ByKey("type")),
        ["metadata", "ownerReferences"] => Some(ListMerge::ByKey("uid")),
        ["metadata", "finalizers"] => Some(ListMerge::Primitive),
        ["spec", "containers"]
        | ["spec", "initContainers"]
        | ["spec", "ephemeralContainers"]
        | ["spec", "volumes"]
        | ["spec", "containers", "env"]
        | ["spec", "containers", "volumeMounts"] => Some(ListMerge::ByKey("name")),
        ["spec", "containers", "ports"] => Some(ListMerge::ByKey("containerPort")),
        ["spec", "podCIDRs"] => Some(ListMerge::Primitive),
        _ => None,
    }
}

/// RFC 7386.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Strategic merge of `patch` into `target` (both whole objects).
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let mut path = Vec::new();
    strategic_at(target, patch, &mut path)
}

fn strategic_at(target: &mut Value, patch: &Value, path: &mut Vec<String>) -> Result<(), ApiError> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = Value::Object(without_directives(p));
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown patch type: {other}"
            )));
        }
        None => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        path.push(k.clone());
        let slot = t.entry(k.clone()).or_insert(Value::Null);
        match (v, list_merge(path)) {
            (Value::Array(items), Some(ListMerge::ByKey(key))) => {
                merge_keyed(slot, items, key, path)?
            }
            (Value::Array(items), Some(ListMerge::Primitive)) => {
                let mut out = slot.as_array().cloned().unwrap_or_default();
                for item in items {
                    if !out.contains(item) {
                        out.push(item.clone());
                    }
                }
                *slot = Value::Array(out);
            }
            (Value::Object(_), _) => {
                strategic_at(slot, v, path)?;
                if slot.is_null() {
                    t.remove(k);
                }
            }
            _ => *slot = v.clone(),
        }
        path.pop();
    }
    Ok(())
}

/// Merges list elements identified by `key`: a patch element replaces
/// nothing but merges into the element with the same key (appended when
/// there is none); `$patch: delete` removes it.
fn merge_keyed(
    slot: &mut Value,
    items: &[Value],
    key: &str,
    path: &mut Vec<String>,
) -> Result<(), ApiError> {
    let mut out = slot.as_array().cloned().unwrap_or_default();
    for item in items {
        let Some(id) = item.get(key) else {
            return Err(ApiError::bad_request(format!(
                "map: {item} does not contain declared merge key: {key}"
            )));
        };
        let pos = out.iter().position(|e| e.get(key) == Some(id));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                out.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_at(&mut out[i], item, path)?,
            (None, false) => {
                let mut fresh = Value::Object(Map::new());
                strategic_at(&mut fresh, item, path)?;
                out.push(fresh);
            }
        }
    }
    *slot = Value::Array(out);
    Ok(())
}

fn without_directives(p: &Map<String, Value>) -> Map<String, Value> {
    p.iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// RFC 6902 on a copy: either every operation applies or `target` is unchanged.
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), ApiError> {
    let Some(ops) = ops.as_array() else {
        return Err(ApiError::bad_request(
            "json patch must be a list of operations",
        ));
    };
    let mut doc = target.clone();
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
        let path = op.get("path").and_then(Value::as_str).unwrap_or("");
        let bad =
            |why: &str| ApiError::new(422, "Invalid", format!("json patch {kind} {path}: {why}"));
        match kind {
            "add" | "replace" | "test" => {
                let value = op.get("value").cloned().ok_or_else(|| bad("no value"))?;
                match kind {
                    "add" => add(&mut doc, path, value).map_err(&bad)?,
                    "replace" => *doc.pointer_mut(path).ok_or_else(|| bad("no such path"))? = value,
                    _ => {
                        if doc.pointer(path) != Some(&value) {
                            return Err(bad("test failed"));
                        }
                    }
                }
            }
            "remove" => {
                remove(&mut doc, path).ok_or_else(|| bad("no such path"))?;
            }
            "move" | "copy" => {
                let from = op
                    .get("from")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("no from"))?;
                let value = if kind == "move" {
                    remove(&mut doc, from)
                } else {
                    doc.pointer(from).cloned()
                };
                let value = value.ok_or_else(|| bad("no such from path"))?;
                add(&mut doc, path, value).map_err(&bad)?;
            }
            _ => return Err(bad("unknown operation")),
        }
    }
    *target = doc;
    Ok(())
}

/// Splits a JSON pointer into its parent pointer and unescaped last token.
fn split(path: &str) -> Option<(&str, String)> {
    let i = path.rfind('/')?;
    Some((
        &path[..i],
        path[i + 1..].replace("~1", "/").replace("~0", "~"),
    ))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), &'static str> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split(path).ok_or("bad path")?;
    match doc.pointer_mut(parent).ok_or("no such parent")? {
        Value::Object(m) => {
            m.insert(last, value);
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
            } else {
                let i: usize = last.parse().map_err(|_| "bad index")?;
                if i > a.len() {
                    return Err("index out of range");
                }
                a.insert(i, value);
            }
        }
        _ => return Err("parent is not a container"),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> Option<Value> {
    let (parent, last) = split(path)?;
    match doc.pointer_mut(parent)? {
        Value::Object(m) => m.remove(&last),
        Value::Array(a) => {
            let i: usize = last.parse().ok()?;
            (i < a.len()).then(|| a.remove(i))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node() -> Value {
        json!({
            "metadata": {"name": "n1", "annotations": {"a": "1", "b": "2"}, "finalizers": ["x"]},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"], "taints": [{"key": "t1"}]},
            "status": {
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "KubeletReady"},
                    {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}
                ],
                "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                "images": [{"names": ["a"]}]
            }
        })
    }

    #[test]
    fn strategic_merges_annotations_and_deletes_with_null() {
        let mut n = node();
        strategic_merge(
            &mut n,
            &json!({"metadata": {"annotations": {"b": null, "c": "3"}}}),
        )
        .unwrap();
        assert_eq!(n["metadata"]["annotations"], json!({"a": "1", "c": "3"}));
        assert_eq!(n["spec"]["podCIDR"], "10.244.1.0/24");
    }

    #[test]
    fn strategic_merges_conditions_by_type() {
        let mut n = node();
        let patch = json!({"status": {"conditions": [
            {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"},
            {"type": "MemoryPressure", "status": "False"}
        ]}});
        strategic_merge(&mut n, &patch).unwrap();
        let c = n["status"]["conditions"].as_array().unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0]["type"], "Ready");
        assert_eq!(c[0]["status"], "True");
        assert_eq!(
            c[1],
            json!({"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"})
        );
        assert_eq!(c[2]["type"], "MemoryPressure");
        // A list without a merge key is replaced.
        strategic_merge(&mut n, &json!({"spec": {"taints": [{"key": "t2"}]}})).unwrap();
        assert_eq!(n["spec"]["taints"], json!([{"key": "t2"}]));
    }

    #[test]
    fn strategic_directives() {
        let mut n = node();
        let patch = json!({
            "$setElementOrder/conditions": [{"type": "Ready"}],
            "metadata": {"finalizers": ["y", "x"]},
            "status": {"conditions": [{"type": "Ready", "$patch": "delete"}]}
        });
        strategic_merge(&mut n, &patch).unwrap();
        assert_eq!(n["status"]["conditions"].as_array().unwrap().len(), 1);
        assert_eq!(n["metadata"]["finalizers"], json!(["x", "y"]));
        strategic_merge(
            &mut n,
            &json!({"metadata": {"annotations": {"$patch": "replace", "z": "9"}}}),
        )
        .unwrap();
        assert_eq!(n["metadata"]["annotations"], json!({"z": "9"}));
        let missing_key = json!({"status": {"conditions": [{"status": "True"}]}});
        assert_eq!(strategic_merge(&mut n, &missing_key).unwrap_err().code, 400);
    }

    #[test]
    fn merge_patch_replaces_lists() {
        let mut n = node();
        merge_patch(
            &mut n,
            &json!({"status": {"conditions": [{"type": "X"}]}, "metadata": {"annotations": {"a": null}}}),
        );
        assert_eq!(n["status"]["conditions"], json!([{"type": "X"}]));
        assert_eq!(n["metadata"]["annotations"], json!({"b": "2"}));
    }

    #[test]
    fn json_patch_ops() {
        let mut n = node();
        let ops = json!([
            {"op": "add", "path": "/metadata/annotations/k~1v", "value": "x"},
            {"op": "remove", "path": "/metadata/annotations/a"},
            {"op": "replace", "path": "/spec/podCIDR", "value": "10.244.2.0/24"},
            {"op": "add", "path": "/spec/podCIDRs/-", "value": "fd00::/64"},
            {"op": "test", "path": "/metadata/name", "value": "n1"}
        ]);
        json_patch(&mut n, &ops).unwrap();
        assert_eq!(n["metadata"]["annotations"], json!({"b": "2", "k/v": "x"}));
        assert_eq!(n["spec"]["podCIDRs"], json!(["10.244.1.0/24", "fd00::/64"]));
        let before = n.clone();
        let failing = json!([{"op": "remove", "path": "/metadata/annotations/b"}, {"op": "test", "path": "/metadata/name", "value": "n2"}]);
        assert_eq!(json_patch(&mut n, &failing).unwrap_err().code, 422);
        assert_eq!(n, before, "a failed json patch changes nothing");
    }
}
