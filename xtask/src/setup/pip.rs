//! Python packages from PyPI that Debian does not ship, installed into
//! Debian's own Python (`/usr/bin/python3`, where `python3-kubernetes`
//! lives too), never into whatever `python3` comes first on PATH (a pyenv
//! on some machines). Checked by importing each module.

use std::process::Command;

use anyhow::Result;

use crate::run;

/// The interpreter the tests run these with.
pub const PYTHON: &str = "/usr/bin/python3";

/// (PyPI name and pinned version, module to import, why).
pub const PACKAGES: &[(&str, &str, &str)] = &[(
    "kubernetes-validate==1.37.0",
    "kubernetes_validate",
    "the Kubernetes 1.32 schemas the manifests are validated against (kubectl cannot without an API server)",
)];

/// The packages whose module does not import.
pub fn missing() -> Vec<String> {
    PACKAGES
        .iter()
        .filter(|(_, module, _)| {
            !Command::new(PYTHON)
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(name, _, _)| (*name).to_owned())
        .collect()
}

pub fn install(packages: &[String]) -> Result<()> {
    let mut cmd = Command::new(PYTHON);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--root-user-action=ignore",
        // Debian marks its Python as externally managed; these packages
        // add a module and a schema directory, nothing Debian ships.
        "--break-system-packages",
    ])
    .args(packages);
    run::status(&mut cmd)
}
