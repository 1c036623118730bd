//! The objects, the resourceVersion counter and the event history.
//!
//! One counter for every resource, like etcd's revision behind a real API
//! server: each change takes the next resourceVersion, stamps it into the
//! object, and appends an event to a bounded history. A watch from
//! resourceVersion N replays the events after N from that history; once an
//! event it would need was dropped (history full, or [`Store::compact`]),
//! the watch is answered with 410 Expired, as etcd's compaction makes a real
//! server do.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use serde_json::{Map, Value, json};

use super::status::{ApiError, new_uid, now_rfc3339};

/// The resources served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Node,
    Pod,
}

impl Resource {
    pub fn kind(self) -> &'static str {
        match self {
            Resource::Node => "Node",
            Resource::Pod => "Pod",
        }
    }
    /// The plural name used in paths and in error messages.
    pub fn plural(self) -> &'static str {
        match self {
            Resource::Node => "nodes",
            Resource::Pod => "pods",
        }
    }
    pub fn namespaced(self) -> bool {
        self == Resource::Pod
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub rv: u64,
    pub kind: EventType,
    pub resource: Resource,
    pub object: Arc<Value>,
}

/// Which part of an object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Anything (the test's own writes).
    All,
    /// The main resource over HTTP: `status` is kept, as the registry's
    /// update strategy does for resources with a status subresource.
    Main,
    /// The `/status` subresource: `spec` is kept.
    Status,
}

type Key = (Resource, String, String);

pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Event>,
    capacity: usize,
    /// The oldest resourceVersion a watch may start from: every event after
    /// it is still in `history`.
    floor: u64,
    uids: u64,
}

impl Store {
    /// `capacity` events are kept for watches (at least 1).
    pub fn new(capacity: usize) -> Store {
        Store {
            // Start well above 0 so "0" (any version) is never a real one.
            rv: 1000,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            capacity: capacity.max(1),
            floor: 0,
            uids: 0,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion a watch can still start from.
    pub fn oldest_watchable(&self) -> u64 {
        self.floor
    }

    pub fn get(&self, res: Resource, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.objects
            .get(&(res, ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Objects of `res` (in `ns` when given) in name order, with the current
    /// resourceVersion.
    pub fn list(&self, res: Resource, ns: Option<&str>) -> (Vec<Arc<Value>>, u64) {
        let items = self
            .objects
            .range((res, String::new(), String::new())..)
            .take_while(|((r, _, _), _)| *r == res)
            .filter(|((_, n, _), _)| ns.is_none_or(|ns| ns == n.as_str()))
            .map(|(_, v)| v.clone())
            .collect();
        (items, self.rv)
    }

    /// Create only (POST): 409 AlreadyExists if the name is taken.
    pub fn create(&mut self, res: Resource, ns: &str, obj: Value) -> Result<Arc<Value>, ApiError> {
        let name = name_of(&obj)
            .ok_or_else(|| ApiError::invalid(res.plural(), "", "metadata.name: Required value"))?;
        if self.get(res, ns, &name).is_some() {
            return Err(ApiError::already_exists(res.plural(), &name));
        }
        Ok(self
            .write(res, ns, &name, obj, None)
            .expect("a new object is always written"))
    }

    /// Create or replace (the test's `put_*`); `None` if nothing changed.
    pub fn put(
        &mut self,
        res: Resource,
        ns: &str,
        obj: Value,
    ) -> Result<Option<Arc<Value>>, ApiError> {
        let name = name_of(&obj)
            .ok_or_else(|| ApiError::invalid(res.plural(), "", "metadata.name: Required value"))?;
        let old = self.get(res, ns, &name);
        Ok(self.write(res, ns, &name, obj, old.as_deref()))
    }

    /// Replace an existing object (PUT), or change it with `change` (PATCH);
    /// `part` says what may change. A `metadata.resourceVersion` in the new
    /// object must be the stored one (409 Conflict otherwise). No change, no
    /// new resourceVersion and no event, as with a real server.
    pub fn update(
        &mut self,
        res: Resource,
        ns: &str,
        name: &str,
        part: Part,
        change: impl FnOnce(&mut Value) -> Result<(), ApiError>,
    ) -> Result<Arc<Value>, ApiError> {
        let old = self
            .get(res, ns, name)
            .ok_or_else(|| ApiError::not_found(res.plural(), name))?;
        let mut new = (*old).clone();
        change(&mut new)?;
        if !new.is_object() {
            return Err(ApiError::bad_request("the object must be a JSON object"));
        }
        let sent_rv = new["metadata"]
            .get("resourceVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        if sent_rv
            .is_some_and(|rv| Some(rv.as_str()) != old["metadata"]["resourceVersion"].as_str())
        {
            return Err(ApiError::conflict(res.plural(), name));
        }
        if name_of(&new).is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                name_of(&new).unwrap_or_default()
            )));
        }
        let m = new.as_object_mut().expect("checked above");
        m.entry("metadata").or_insert_with(|| json!({}))["name"] = json!(name);
        let keep = match part {
            Part::All => None,
            Part::Main => Some("status"),
            Part::Status => Some("spec"),
        };
        if let Some(field) = keep {
            match old.get(field) {
                Some(v) => m.insert(field.to_owned(), v.clone()),
                None => m.remove(field),
            };
        }
        Ok(self.write(res, ns, name, new, Some(&old)).unwrap_or(old))
    }

    pub fn delete(&mut self, res: Resource, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        let key = (res, ns.to_owned(), name.to_owned());
        let old = self
            .objects
            .remove(&key)
            .ok_or_else(|| ApiError::not_found(res.plural(), name))?;
        self.rv += 1;
        // The final state carries the deletion's resourceVersion, as a real
        // watch's DELETED event does.
        let mut last = (*old).clone();
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let last = Arc::new(last);
        self.record(EventType::Deleted, res, last.clone());
        Ok(last)
    }

    /// Forgets the history: every watch from before now gets 410 Expired.
    pub fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
    }

    /// Events of `res` (in `ns` when given) after `rv`, and the current
    /// resourceVersion; `Err(oldest)` when events after `rv` were dropped.
    pub fn events_since(
        &self,
        res: Resource,
        ns: Option<&str>,
        rv: u64,
    ) -> Result<(Vec<Event>, u64), u64> {
        if rv < self.floor {
            return Err(self.floor);
        }
        let start = self.history.partition_point(|e| e.rv <= rv);
        let events = self
            .history
            .range(start..)
            .filter(|e| e.resource == res && ns.is_none_or(|ns| namespace_of(&e.object) == ns))
            .cloned()
            .collect();
        Ok((events, self.rv))
    }

    /// Stamps and stores `obj`, keeping identity fields from `old`; `None`
    /// when it equals `old` apart from the resourceVersion.
    fn write(
        &mut self,
        res: Resource,
        ns: &str,
        name: &str,
        mut obj: Value,
        old: Option<&Value>,
    ) -> Option<Arc<Value>> {
        let m = obj.as_object_mut()?;
        m.insert("kind".into(), json!(res.kind()));
        m.insert("apiVersion".into(), json!("v1"));
        let meta = m.entry("metadata").or_insert_with(|| json!({}));
        if !meta.is_object() {
            *meta = json!({});
        }
        let meta = meta.as_object_mut().expect("made an object above");
        meta.insert("name".into(), json!(name));
        if res.namespaced() {
            meta.insert("namespace".into(), json!(ns));
        }
        let old_meta = old.map(|o| &o["metadata"]);
        for field in ["uid", "creationTimestamp"] {
            match old_meta.and_then(|m| m.get(field)) {
                Some(v) => {
                    meta.insert(field.into(), v.clone());
                }
                None => {
                    meta.entry(field).or_insert(Value::Null);
                }
            }
        }
        if meta["uid"].is_null() {
            self.uids += 1;
            meta.insert("uid".into(), json!(new_uid(self.uids)));
        }
        if meta["creationTimestamp"].is_null() {
            meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        }
        // flannel adds annotations to a node's map without checking it exists.
        if res == Resource::Node && !meta.get("annotations").is_some_and(Value::is_object) {
            meta.insert("annotations".into(), Value::Object(Map::new()));
        }
        if let Some(old) = old {
            meta.insert(
                "resourceVersion".into(),
                old["metadata"]["resourceVersion"].clone(),
            );
            if &obj == old {
                return None;
            }
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let obj = Arc::new(obj);
        self.objects
            .insert((res, ns.to_owned(), name.to_owned()), obj.clone());
        let kind = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(kind, res, obj.clone());
        Some(obj)
    }

    fn record(&mut self, kind: EventType, resource: Resource, object: Arc<Value>) {
        self.history.push_back(Event {
            rv: self.rv,
            kind,
            resource,
            object,
        });
        while self.history.len() > self.capacity {
            let dropped = self.history.pop_front().expect("longer than capacity");
            self.floor = dropped.rv;
        }
    }
}

pub fn name_of(obj: &Value) -> Option<String> {
    obj["metadata"]["name"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

pub fn namespace_of(obj: &Value) -> &str {
    obj["metadata"]["namespace"].as_str().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {"podCIDR": "10.244.1.0/24"}})
    }

    #[test]
    fn writes_stamp_objects_and_bump_the_version() {
        let mut s = Store::new(10);
        let rv0 = s.resource_version();
        let a = s.put(Resource::Node, "", node("a")).unwrap().unwrap();
        assert_eq!(a["kind"], "Node");
        assert_eq!(a["apiVersion"], "v1");
        assert_eq!(a["metadata"]["annotations"], json!({}));
        assert_eq!(a["metadata"]["resourceVersion"], (rv0 + 1).to_string());
        let uid = a["metadata"]["uid"].clone();
        // The same object again: no change, no version, no event.
        assert!(s.put(Resource::Node, "", (*a).clone()).unwrap().is_none());
        assert_eq!(s.resource_version(), rv0 + 1);
        let b = s
            .update(Resource::Node, "", "a", Part::Status, |n| {
                n["spec"]["podCIDR"] = json!("changed");
                n["metadata"]["annotations"]["k"] = json!("v");
                Ok(())
            })
            .unwrap();
        assert_eq!(b["spec"]["podCIDR"], "10.244.1.0/24", "/status keeps spec");
        assert_eq!(b["metadata"]["annotations"]["k"], "v");
        assert_eq!(b["metadata"]["uid"], uid);
        let stale = s.update(Resource::Node, "", "a", Part::Main, |n| {
            n["metadata"]["resourceVersion"] = json!(rv0.to_string());
            Ok(())
        });
        assert_eq!(stale.unwrap_err().code, 409);
        assert_eq!(
            s.create(Resource::Node, "", node("a")).unwrap_err().code,
            409
        );
        assert_eq!(s.delete(Resource::Node, "", "zz").unwrap_err().code, 404);
    }

    #[test]
    fn history_serves_events_after_a_version_then_expires() {
        let mut s = Store::new(3);
        let start = s.resource_version();
        for n in ["a", "b", "c"] {
            s.put(Resource::Node, "", node(n)).unwrap();
        }
        s.put(Resource::Pod, "ns", json!({"metadata": {"name": "p"}}))
            .unwrap();
        // Four events, three kept: the first node's ADDED is gone.
        assert_eq!(s.events_since(Resource::Node, None, start), Err(start + 1));
        let (ev, now) = s.events_since(Resource::Node, None, start + 1).unwrap();
        assert_eq!(now, start + 4);
        let names: Vec<_> = ev
            .iter()
            .map(|e| e.object["metadata"]["name"].clone())
            .collect();
        assert_eq!(names, [json!("b"), json!("c")]);
        assert!(ev.iter().all(|e| e.kind == EventType::Added));
        let gone = s.delete(Resource::Node, "", "b").unwrap();
        let (ev, _) = s.events_since(Resource::Node, None, now).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, EventType::Deleted);
        assert_eq!(ev[0].object, gone);
        assert_eq!(gone["metadata"]["resourceVersion"], (now + 1).to_string());
        s.compact();
        let now = s.resource_version();
        assert_eq!(s.events_since(Resource::Node, None, now - 1), Err(now));
        assert_eq!(
            s.events_since(Resource::Node, None, now).unwrap().0.len(),
            0
        );
        let (pods, _) = s.list(Resource::Pod, Some("ns"));
        assert_eq!(pods.len(), 1);
        assert_eq!(s.list(Resource::Node, None).0.len(), 2);
    }
}
