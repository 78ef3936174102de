//! Installing it as a service: the systemd unit verifies, gives a graceful stop enough time,
//! and the binary reports its version.

use std::process::Command;

const UNIT: &str = include_str!("../../deploy/webhook-inbox.service");

#[test]
fn the_systemd_unit_verifies() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::TempDir::new().expect("dir");
    // The unit as installed, pointing at this build (verify checks that ExecStart exists).
    let unit = UNIT.replace(
        "/usr/local/bin/webhook-inbox",
        env!("CARGO_BIN_EXE_webhook-inbox"),
    );
    let path = dir.path().join("webhook-inbox.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Unknown keys and bad values are only warnings: none may be printed.
    assert!(
        !stderr.contains("webhook-inbox.service"),
        "warnings: {stderr}"
    );
}

#[test]
fn the_unit_gives_a_graceful_stop_more_than_the_shutdown_grace() {
    let timeout = UNIT
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec is set");
    let timeout = humantime::parse_duration(timeout.trim()).expect("a duration");
    let grace = webhook_inbox::config::DispatchConfig::default().shutdown_grace;
    assert!(timeout > grace, "{timeout:?} <= {grace:?}");
    for hardening in [
        "DynamicUser=yes",
        "StateDirectory=webhook-inbox",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "Restart=on-failure",
    ] {
        assert!(UNIT.lines().any(|l| l == hardening), "{hardening}");
    }
}

#[test]
fn the_binary_reports_its_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
        .arg("--version")
        .output()
        .expect("runs");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("webhook-inbox {}", env!("CARGO_PKG_VERSION"))
    );
}
