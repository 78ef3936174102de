//! Start-up validation through the real binary: each error names the key and the file.

use std::process::Command;

fn check_config(text: &str) -> (bool, String) {
    let dir = tempfile::TempDir::new().expect("dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
        .args(["check-config", "--config"])
        .arg(&path)
        .env_remove("DEMO_SECRETS")
        .output()
        .expect("binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("bad.toml"), "names the file: {text}");
    (out.status.success(), text)
}

const SOURCE: &str = r#"
[sources.credicorp]
secrets = ["whsec_dGVzdC1zZWNyZXQ="]
"#;

#[test]
fn the_shipped_config_is_valid() {
    let out = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
        .args(["check-config", "--config"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_unknown_key_is_named() {
    let (ok, text) = check_config(&format!("[server]\nlissten = \"127.0.0.1:1\"\n{SOURCE}"));
    assert!(!ok);
    assert!(text.contains("lissten"), "{text}");
}

#[test]
fn an_unknown_key_in_a_handler_is_named() {
    let (ok, text) = check_config(&format!(
        "{SOURCE}\n[[handlers]]\nname = \"h\"\nkind = \"log\"\ncommandd = [\"x\"]\n"
    ));
    assert!(!ok);
    assert!(text.contains("commandd"), "{text}");
}

#[test]
fn a_bad_duration_is_named() {
    let (ok, text) = check_config(&format!(
        "[storage]\nretention = \"7 fortnights\"\n{SOURCE}"
    ));
    assert!(!ok);
    assert!(
        text.contains("retention") && text.contains("7 fortnights"),
        "{text}"
    );
}

#[test]
fn an_empty_secret_list_is_named() {
    let (ok, text) = check_config("[sources.credicorp]\nsecrets = []\n");
    assert!(!ok);
    assert!(text.contains("sources.credicorp.secrets"), "{text}");
}

#[test]
fn a_secrets_env_that_is_unset_is_named() {
    let (ok, text) = check_config("[sources.credicorp]\nsecrets_env = \"DEMO_SECRETS\"\n");
    assert!(!ok);
    assert!(text.contains("DEMO_SECRETS"), "{text}");
}

#[test]
fn secrets_env_supplies_secrets() {
    let dir = tempfile::TempDir::new().expect("dir");
    let path = dir.path().join("env.toml");
    std::fs::write(
        &path,
        "[sources.credicorp]\nsecrets_env = \"DEMO_SECRETS\"\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
        .args(["check-config", "--config"])
        .arg(&path)
        .env(
            "DEMO_SECRETS",
            "whsec_dGVzdC1zZWNyZXQ=, whsec_b2xkLXNlY3JldA==",
        )
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_secret_that_is_not_base64_is_named_without_echoing_it() {
    let (ok, text) = check_config("[sources.credicorp]\nsecrets = [\"whsec_s3cr3t!!\"]\n");
    assert!(!ok);
    assert!(text.contains("sources.credicorp.secrets"), "{text}");
    assert!(
        !text.contains("s3cr3t!!"),
        "the secret must not be printed: {text}"
    );
}

#[test]
fn a_handler_bound_to_a_missing_source_is_named() {
    let (ok, text) = check_config(&format!(
        "{SOURCE}\n[[handlers]]\nname = \"h\"\nkind = \"log\"\nsource = \"acme\"\n"
    ));
    assert!(!ok);
    assert!(
        text.contains("acme") && text.contains("handlers[0]"),
        "{text}"
    );
}

#[test]
fn a_retention_shorter_than_a_tolerance_is_named() {
    let (ok, text) = check_config(&format!("[storage]\nretention = \"1m\"\n{SOURCE}"));
    assert!(!ok);
    assert!(
        text.contains("storage.retention") && text.contains("tolerance"),
        "{text}"
    );
}

/// A retention shorter than the longest retry schedule could forget a delivery while a
/// retry of it is still due (design.md, invariant 2).
#[test]
fn a_retention_shorter_than_the_retry_schedule_is_named() {
    // 9 attempts from 1 s, capped at 10 min: up to 382.5 s of back-off.
    let (ok, text) = check_config(&format!(
        "[storage]\nretention = \"5m\"\n[dispatch]\nmax_attempts = 9\n{SOURCE}"
    ));
    assert!(!ok);
    assert!(
        text.contains("storage.retention") && text.contains("dispatch.max_attempts"),
        "{text}"
    );
    let (ok, text) = check_config(&format!(
        "[storage]\nretention = \"5m\"\n[dispatch]\nmax_attempts = 8\n{SOURCE}"
    ));
    assert!(ok, "190.5 s of back-off fits in 5 minutes: {text}");
}

/// Each scheme takes its own keys: one of another scheme is a parse error naming the key
/// and the source's table.
#[test]
fn a_key_of_another_scheme_is_named() {
    for (scheme, key) in [
        ("github", "prefix = \"sha256=\""),
        ("stripe", "public_keys = []"),
        ("standard-webhooks", "signed_content = \"{body}\""),
    ] {
        let (ok, text) = check_config(&format!(
            "[sources.partner]\nscheme = \"{scheme}\"\nsecrets = [\"whsec_dGVzdC1zZWNyZXQ=\"]\n{key}\n"
        ));
        let name = key.split(' ').next().unwrap_or_default();
        assert!(!ok, "{scheme} with {name}");
        assert!(
            text.contains(&format!("unknown field `{name}`")) && text.contains("[sources.partner]"),
            "{text}"
        );
    }
    let (ok, text) = check_config(
        "[sources.partner]\nscheme = \"hmac-sha256\"\nsecrets = [\"s\"]\nid_header = \"x-id\"\n",
    );
    assert!(!ok);
    assert!(text.contains("missing field `signature_header`"), "{text}");
}

#[test]
fn a_bad_match_is_named() {
    for (matcher, expected) in [
        (r#"{ "data/product" = ["a"] }"#, "is not a JSON pointer"),
        (r#"{ "/data/product" = [] }"#, "at least one allowed value"),
    ] {
        let (ok, text) = check_config(&format!(
            "{SOURCE}[[handlers]]\nname = \"h\"\nkind = \"log\"\nmatch = {matcher}\n"
        ));
        assert!(!ok);
        assert!(
            text.contains("handlers[0].match") && text.contains(expected),
            "{text}"
        );
    }
}

#[test]
fn a_processed_lease_under_a_second_is_named() {
    let (ok, text) = check_config(&format!("{SOURCE}processed_lease = \"100ms\"\n"));
    assert!(!ok);
    assert!(text.contains("sources.credicorp.processed_lease"), "{text}");
}

#[test]
fn serve_refuses_a_bad_config_with_the_same_message() {
    let dir = tempfile::TempDir::new().expect("dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[sources.credicorp]\nsecrets = []\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("binary runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("sources.credicorp.secrets"),
        "{err}"
    );
}

/// Issue 22.5: `hmac-sha256` with a `timestamp_header` its `signed_content` does not sign is
/// refused at start, naming the source and both keys (the tolerance would check a value
/// nobody signed, so a captured request with a fresh header would pass).
#[test]
fn an_unsigned_timestamp_header_is_named() {
    let text = r#"
[sources.partner]
scheme = "hmac-sha256"
secrets = ["s3cret"]
signature_header = "X-Signature"
id_header = "X-Id"
timestamp_header = "X-Timestamp"
signed_content = "{id}.{body}"
"#;
    let (ok, out) = check_config(text);
    assert!(!ok, "{out}");
    assert!(
        out.contains("sources.partner.timestamp_header")
            && out.contains("sources.partner.signed_content"),
        "{out}"
    );
    // Signed, it is fine.
    let (ok, out) = check_config(&text.replace("{id}.{body}", "{id}.{timestamp}.{body}"));
    assert!(ok, "{out}");
}
