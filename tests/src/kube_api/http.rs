//! Routing and answering one request: discovery, LIST/WATCH/GET/POST/PUT/
//! PATCH/DELETE on nodes and pods, authentication, accounting and faults.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Method, Request, Response, body::Incoming, header};
use serde_json::{Value, json};

use super::{
    PatchRecord, Shared,
    merge::{json_patch, merge_patch, strategic_merge},
    status::{ApiError, now_rfc3339},
    store::{Part, Resource, name_of, namespace_of},
    watch::{self, WatchRequest},
};

pub(super) type Body = BoxBody<Bytes, Infallible>;

/// What a path names.
enum Route {
    Version,
    Api,
    ApiV1,
    Apis,
    Health,
    /// `/api/v1/nodes`, `/api/v1/pods`, `/api/v1/namespaces/{ns}/pods`.
    Collection {
        res: Resource,
        ns: Option<String>,
    },
    /// An object, or its `/status` subresource.
    Item {
        res: Resource,
        ns: String,
        name: String,
        status: bool,
    },
    Unknown,
}

fn route(path: &str) -> Route {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match parts.as_slice() {
        ["version"] => Route::Version,
        ["api"] => Route::Api,
        ["api", "v1"] => Route::ApiV1,
        ["apis"] => Route::Apis,
        ["healthz" | "livez" | "readyz"] => Route::Health,
        ["api", "v1", "nodes"] => Route::Collection {
            res: Resource::Node,
            ns: None,
        },
        ["api", "v1", "pods"] => Route::Collection {
            res: Resource::Pod,
            ns: None,
        },
        ["api", "v1", "namespaces", ns, "pods"] => Route::Collection {
            res: Resource::Pod,
            ns: Some((*ns).into()),
        },
        ["api", "v1", "nodes", name, rest @ ..] if rest.is_empty() || rest == ["status"] => {
            Route::Item {
                res: Resource::Node,
                ns: String::new(),
                name: (*name).into(),
                status: !rest.is_empty(),
            }
        }
        ["api", "v1", "namespaces", ns, "pods", name, rest @ ..]
            if rest.is_empty() || rest == ["status"] =>
        {
            Route::Item {
                res: Resource::Pod,
                ns: (*ns).into(),
                name: (*name).into(),
                status: !rest.is_empty(),
            }
        }
        _ => Route::Unknown,
    }
}

/// The `(verb, pattern)` a request is counted under.
fn accounting(route: &Route, method: &Method, watch: bool) -> (String, String) {
    let verb = match (route, method) {
        (Route::Collection { .. }, &Method::GET) if watch => "watch",
        (Route::Collection { .. }, &Method::GET) => "list",
        (Route::Collection { .. }, &Method::POST) => "create",
        (_, &Method::GET) => "get",
        (_, &Method::PUT) => "update",
        (_, &Method::PATCH) => "patch",
        (_, &Method::DELETE) => "delete",
        (_, m) => return (m.as_str().to_lowercase(), "other".into()),
    };
    let pattern = match route {
        Route::Collection { res, ns: None } => res.plural().to_owned(),
        Route::Collection { res, ns: Some(_) } => format!("namespaces/{{ns}}/{}", res.plural()),
        Route::Item { res, status, .. } => {
            let base = if res.namespaced() {
                format!("namespaces/{{ns}}/{}/{{name}}", res.plural())
            } else {
                format!("{}/{{name}}", res.plural())
            };
            if *status {
                format!("{base}/status")
            } else {
                base
            }
        }
        Route::Unknown => "other".into(),
        _ => "discovery".into(),
    };
    (verb.into(), pattern)
}

pub(super) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = parse_query(req.uri().query().unwrap_or(""));
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let watching = q("watch").is_some_and(parse_bool);
    let route = route(&path);
    let (verb, pattern) = accounting(&route, req.method(), watching);
    shared.count(&verb, &pattern);

    let (fault, delay) = shared.next_fault(matches!(
        route,
        Route::Collection { .. } | Route::Item { .. }
    ));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(code) = fault {
        let reason = if code == 500 {
            "InternalError"
        } else {
            "ServiceUnavailable"
        };
        return Ok(error(&ApiError::new(code, reason, "injected fault")));
    }
    if let Some(token) = &shared.token {
        let sent = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if sent != Some(token.as_str()) {
            return Ok(error(&ApiError::new(401, "Unauthorized", "Unauthorized")));
        }
    }
    let as_table = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let method = req.method().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(error(&ApiError::bad_request("unreadable body"))),
    };

    let answer = match (route, method) {
        (Route::Version, Method::GET) => Ok(ok(version())),
        (Route::Api, Method::GET) => Ok(ok(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr}],
        }))),
        (Route::ApiV1, Method::GET) => Ok(ok(api_v1())),
        (Route::Apis, Method::GET) => Ok(ok(
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        )),
        (Route::Health, Method::GET) => Ok(text(200, "ok")),
        (Route::Collection { res, ns }, Method::GET) => {
            let selector = Selector::parse(q("fieldSelector"), q("labelSelector"));
            match selector {
                Err(e) => Err(e),
                Ok(selector) if watching => {
                    let from = match q("resourceVersion").unwrap_or("") {
                        "" | "0" => Ok(None),
                        rv => rv.parse().map(Some).map_err(|_| {
                            ApiError::bad_request(format!("invalid resource version: {rv}"))
                        }),
                    };
                    from.map(|from| {
                        let timeout = q("timeoutSeconds")
                            .and_then(|t| t.parse().ok())
                            .map(Duration::from_secs)
                            .unwrap_or(shared.default_watch_timeout);
                        let req = WatchRequest {
                            resource: res,
                            ns,
                            selector,
                            from,
                            timeout,
                            bookmarks: q("allowWatchBookmarks").is_some_and(parse_bool),
                            as_table,
                        };
                        response(200, "application/json", watch::body(shared.clone(), req))
                    })
                }
                Ok(selector) => list(
                    &shared,
                    res,
                    ns,
                    &selector,
                    q("limit"),
                    q("continue"),
                    as_table,
                ),
            }
        }
        (Route::Collection { res, ns }, Method::POST) => parse_json(&body).and_then(|obj| {
            let ns = ns.unwrap_or_default();
            if !matches!(namespace_of(&obj), "") && namespace_of(&obj) != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the object does not match the namespace on the request",
                ));
            }
            shared
                .with_store(|s| s.create(res, &ns, obj))
                .map(|o| json_response(201, &o))
        }),
        (Route::Item { res, ns, name, .. }, Method::GET) => shared
            .with_store(|s| s.get(res, &ns, &name))
            .map(|o| ok((*o).clone()))
            .ok_or_else(|| ApiError::not_found(res.plural(), &name)),
        (
            Route::Item {
                res,
                ns,
                name,
                status,
            },
            Method::PUT,
        ) => parse_json(&body).and_then(|new| {
            let part = if status { Part::Status } else { Part::Main };
            shared
                .with_store(|s| {
                    s.update(res, &ns, &name, part, |cur| {
                        *cur = new;
                        Ok(())
                    })
                })
                .map(|o| ok((*o).clone()))
        }),
        (
            Route::Item {
                res,
                ns,
                name,
                status,
            },
            Method::PATCH,
        ) => {
            let part = if status { Part::Status } else { Part::Main };
            let result = patch(&shared, res, &ns, &name, part, &content_type, &body);
            shared.record_patch(PatchRecord {
                path: path.clone(),
                content_type: content_type.clone(),
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                code: result.as_ref().map_or_else(|e| e.code, |_| 200),
            });
            result.map(ok)
        }
        (
            Route::Item {
                res,
                ns,
                name,
                status: false,
            },
            Method::DELETE,
        ) => shared
            .with_store(|s| s.delete(res, &ns, &name))
            .map(|o| ok((*o).clone())),
        (Route::Unknown, _) => Ok(text(404, "404 page not found\n")),
        (_, m) => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({m})"),
        )),
    };
    Ok(answer.unwrap_or_else(|e| error(&e)))
}

/// A change to a stored object (one patch flavour applied to it).
type Change = dyn FnOnce(&mut Value) -> Result<(), ApiError>;

fn patch(
    shared: &Shared,
    res: Resource,
    ns: &str,
    name: &str,
    part: Part,
    content_type: &str,
    body: &Bytes,
) -> Result<Value, ApiError> {
    let patch = parse_json(body)?;
    let mime = content_type.split(';').next().unwrap_or("").trim();
    let apply: Box<Change> = match mime {
        "application/strategic-merge-patch+json" => Box::new(move |o| strategic_merge(o, &patch)),
        "application/merge-patch+json" => Box::new(move |o| {
            merge_patch(o, &patch);
            Ok(())
        }),
        "application/json-patch+json" => Box::new(move |o| json_patch(o, &patch)),
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json ({other})"
                ),
            ));
        }
    };
    shared
        .with_store(|s| s.update(res, ns, name, part, apply))
        .map(|o| (*o).clone())
}

fn list(
    shared: &Shared,
    res: Resource,
    ns: Option<String>,
    selector: &Selector,
    limit: Option<&str>,
    cont: Option<&str>,
    as_table: bool,
) -> Result<Response<Body>, ApiError> {
    let limit: usize = limit
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let (items, now, oldest) = shared.with_store(|s| {
        let (items, now) = s.list(res, ns.as_deref());
        (items, now, s.oldest_watchable())
    });
    // A continue token is `<list's resourceVersion>|<ns>|<last name>`.
    let (list_rv, after) = match cont.filter(|c| !c.is_empty()) {
        None => (now, None),
        Some(c) => {
            let mut it = c.splitn(3, '|');
            let rv: u64 = it
                .next()
                .and_then(|r| r.parse().ok())
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            let key = (
                it.next().unwrap_or("").to_owned(),
                it.next().unwrap_or("").to_owned(),
            );
            if rv < oldest {
                return Err(ApiError::new(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some(key))
        }
    };
    let mut page = Vec::new();
    let mut next = None;
    for obj in items.iter().filter(|o| {
        after.as_ref().is_none_or(|(ns, name)| {
            (namespace_of(o), name_of(o).unwrap_or_default().as_str())
                > (ns.as_str(), name.as_str())
        })
    }) {
        if !selector.matches(obj) {
            continue;
        }
        if page.len() == limit {
            let last: &Value = page.last().expect("limit > 0");
            next = Some(format!(
                "{list_rv}|{}|{}",
                namespace_of(last),
                name_of(last).unwrap_or_default()
            ));
            break;
        }
        page.push((**obj).clone());
    }
    let body = if as_table {
        table(res, &page, Some(list_rv))
    } else {
        let mut meta = json!({"resourceVersion": list_rv.to_string()});
        if let Some(n) = next.clone() {
            meta["continue"] = json!(n);
        }
        json!({"kind": format!("{}List", res.kind()), "apiVersion": "v1", "metadata": meta, "items": page})
    };
    let mut body = body;
    if as_table && let Some(n) = next {
        body["metadata"]["continue"] = json!(n);
    }
    Ok(ok(body))
}

/// `fieldSelector` and `labelSelector` terms: `k=v`, `k==v`, `k!=v`, and for
/// labels `k` (exists) and `!k`. Set-based terms (`in`, `notin`) are refused
/// with 400, not ignored.
#[derive(Clone, Debug, Default)]
pub(super) struct Selector {
    /// `(path in the object, expected value or None for "exists", equal?)`.
    terms: Vec<(Vec<String>, Option<String>, bool)>,
}

impl Selector {
    fn parse(fields: Option<&str>, labels: Option<&str>) -> Result<Selector, ApiError> {
        let mut terms = Vec::new();
        for (spec, is_label) in [(fields, false), (labels, true)] {
            for term in spec
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
            {
                if term.contains(" in ") || term.contains(" notin ") || term.contains('(') {
                    return Err(ApiError::bad_request(format!(
                        "unsupported selector term: {term}"
                    )));
                }
                let (key, value, eq) = if let Some((k, v)) = term.split_once("!=") {
                    (k, Some(v), false)
                } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('='))
                {
                    (k, Some(v), true)
                } else if !is_label {
                    return Err(ApiError::bad_request(format!(
                        "invalid field selector: {term}"
                    )));
                } else if let Some(k) = term.strip_prefix('!') {
                    (k, None, false)
                } else {
                    (term, None, true)
                };
                let path = if is_label {
                    vec!["metadata".into(), "labels".into(), key.trim().into()]
                } else {
                    key.trim().split('.').map(str::to_owned).collect()
                };
                terms.push((path, value.map(|v| v.trim().to_owned()), eq));
            }
        }
        Ok(Selector { terms })
    }

    pub(super) fn matches(&self, obj: &Value) -> bool {
        self.terms.iter().all(|(path, value, eq)| {
            let got = path.iter().try_fold(obj, |o, k| o.get(k));
            let got = got.and_then(Value::as_str);
            match value {
                None => got.is_some() == *eq,
                Some(v) => (got.unwrap_or("") == v) == *eq,
            }
        })
    }
}

/// Objects as the `Table` kubectl's human output asks for: the columns a
/// real server prints for nodes and pods, rows with partial metadata.
pub(super) fn table(res: Resource, objs: &[Value], rv: Option<u64>) -> Value {
    let col = |name: &str, format: &str| json!({"name": name, "type": "string", "format": format, "description": "", "priority": 0});
    let columns = match res {
        Resource::Node => vec![
            col("Name", "name"),
            col("Status", ""),
            col("Roles", ""),
            col("Age", ""),
            col("Version", ""),
        ],
        Resource::Pod => vec![
            col("Name", "name"),
            col("Ready", ""),
            col("Status", ""),
            col("Restarts", ""),
            col("Age", ""),
        ],
    };
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            let name = name_of(o).unwrap_or_default();
            let age = age(o["metadata"]["creationTimestamp"].as_str().unwrap_or(""));
            let cells = match res {
                Resource::Node => {
                    let ready = o["status"]["conditions"]
                        .as_array()
                        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                        .map(|c| if c["status"] == "True" { "Ready" } else { "NotReady" })
                        .unwrap_or("Unknown");
                    let version = o["status"]["nodeInfo"]["kubeletVersion"].as_str().unwrap_or("");
                    json!([name, ready, "<none>", age, version])
                }
                Resource::Pod => json!([name, "0/0", o["status"]["phase"].as_str().unwrap_or("Pending"), 0, age]),
            };
            json!({
                "cells": cells,
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]},
            })
        })
        .collect();
    let mut meta = json!({});
    if let Some(rv) = rv {
        meta["resourceVersion"] = json!(rv.to_string());
    }
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "columnDefinitions": columns, "rows": rows})
}

/// kubectl's short age ("45s", "12m", "3h", "2d") from an RFC 3339 time.
fn age(created: &str) -> String {
    let now = now_rfc3339();
    let secs = |t: &str| -> Option<i64> {
        let (d, rest) = t.split_once('T')?;
        let mut ymd = d.split('-').map(|x| x.parse::<i64>().ok());
        let (y, m, dd) = (ymd.next()??, ymd.next()??, ymd.next()??);
        let mut hms = rest
            .trim_end_matches('Z')
            .split(':')
            .map(|x| x.parse::<i64>().ok());
        let (h, mi, s) = (hms.next()??, hms.next()??, hms.next()??);
        // Days from the civil date (March-based years, 400-year eras).
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + dd - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        Some((era * 146_097 + doe - 719_468) * 86_400 + h * 3600 + mi * 60 + s)
    };
    match (secs(created), secs(&now)) {
        (Some(c), Some(n)) => {
            let d = (n - c).max(0);
            match d {
                0..120 => format!("{d}s"),
                120..7200 => format!("{}m", d / 60),
                7200..172_800 => format!("{}h", d / 3600),
                _ => format!("{}d", d / 86_400),
            }
        }
        _ => "<unknown>".into(),
    }
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0-overlay-standin",
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"
    })
}

fn api_v1() -> Value {
    let r = |name: &str, kind: &str, namespaced: bool, verbs: &[&str], short: &[&str]| {
        let mut v = json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": verbs});
        if !short.is_empty() {
            v["shortNames"] = json!(short);
        }
        v
    };
    let main = [
        "create", "delete", "get", "list", "patch", "update", "watch",
    ];
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {"name": "nodes", "singularName": "node", "namespaced": false, "kind": "Node", "verbs": main, "shortNames": ["no"]},
            r("nodes/status", "Node", false, &["get", "patch", "update"], &[]),
            {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod", "verbs": main, "shortNames": ["po"], "categories": ["all"]},
            r("pods/status", "Pod", true, &["get", "patch", "update"], &[]),
        ]
    })
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("couldn't decode the body as JSON: {e}")))
}

/// Booleans as Go's `strconv.ParseBool` reads them: the python client
/// sends `watch=True`.
fn parse_bool(s: &str) -> bool {
    matches!(s, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Percent-decoding for query strings (`+` is a space there).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(c) => {
                        out.push(c);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn response(code: u16, content_type: &str, body: Body) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, content_type)
        .header("Cache-Control", "no-cache, private")
        .body(body)
        .expect("valid response")
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(v).expect("JSON");
    response(
        code,
        "application/json",
        Full::new(Bytes::from(bytes)).boxed(),
    )
}

fn ok(v: Value) -> Response<Body> {
    json_response(200, &v)
}

fn text(code: u16, s: &str) -> Response<Body> {
    response(
        code,
        "text/plain; charset=utf-8",
        Full::new(Bytes::from(s.to_owned())).boxed(),
    )
}

fn error(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_selectors() {
        let q = parse_query("fieldSelector=metadata.name%3Dn1&labelSelector=a%3D1%2C%21b&x");
        assert_eq!(q[0], ("fieldSelector".into(), "metadata.name=n1".into()));
        let s = Selector::parse(Some(&q[0].1), Some(&q[1].1)).unwrap();
        let n1 = json!({"metadata": {"name": "n1", "labels": {"a": "1"}}});
        let n2 = json!({"metadata": {"name": "n2", "labels": {"a": "1"}}});
        let n1b = json!({"metadata": {"name": "n1", "labels": {"a": "1", "b": ""}}});
        assert!(s.matches(&n1));
        assert!(!s.matches(&n2));
        assert!(!s.matches(&n1b));
        assert!(Selector::parse(None, Some("a in (x)")).is_err());
    }
}
