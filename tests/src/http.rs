//! The agent's health and metrics endpoints, fetched with curl from inside a
//! host namespace.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};

use crate::agent::sh;

/// `(status code, body)` of `GET http://<ip>:<port><path>` from inside `ns`.
pub fn get(ns: &str, ip: &str, port: u16, path: &str) -> Result<(u16, String)> {
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "curl",
        "-s",
        "-m",
        "2",
        "-w",
        "\n%{http_code}",
        &format!("http://{ip}:{port}{path}"),
    ])?;
    let (body, code) = out.rsplit_once('\n').context("curl output")?;
    Ok((code.trim().parse()?, body.to_owned()))
}

/// The samples of `/metrics` by their full name with labels.
pub fn scrape(ns: &str, ip: &str, port: u16) -> Result<BTreeMap<String, f64>> {
    let (code, body) = get(ns, ip, port, "/metrics")?;
    ensure!(code == 200, "/metrics answered {code}");
    let mut samples = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').context("sample line")?;
        samples.insert(name.to_owned(), value.parse()?);
    }
    Ok(samples)
}

/// One sample, or an error listing what there is.
pub fn sample(m: &BTreeMap<String, f64>, name: &str) -> Result<f64> {
    m.get(name)
        .copied()
        .with_context(|| format!("no sample {name} in {m:#?}"))
}
