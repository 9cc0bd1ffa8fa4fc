//! Helpers the integration tests that set up system software share.

use std::process::{Command, Output};

/// A finished command's stdout and stderr together, for failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Installs Debian `packages` with apt-get, updating the package lists once if the first try
/// fails (a fresh machine may have none yet). On failure it panics with apt's output and the
/// environment variable `skip` that skips the test.
pub fn apt_install(packages: &[&str], skip: &str) {
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("apt-get runs")
    };
    let mut o = install();
    if !o.status.success() {
        let _ = Command::new("apt-get").args(["update", "-q"]).status();
        o = install();
    }
    assert!(
        o.status.success(),
        "installing {} failed (set {skip}=1 to skip this test):\n{}",
        packages.join(" "),
        text(&o)
    );
}
