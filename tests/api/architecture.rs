//! The crate's imports point one way: from the layers near the network and the command
//! line down to the shared types, never back. This test reads `src/` and fails on any
//! `crate::…` reference that runs against the order below (test modules excepted), and on
//! a top-level module the table does not place. Inside the store, each backend keeps to
//! itself and only `store/open.rs` opens a store from the config. Below the routes, nothing
//! knows HTTP; in the routes, only `/metrics` and `/readyz` read the store (the rest goes through
//! `ingest` and `operations`).
//!
//! The order, lowest first (a module may use any module of a lower layer):
//! ```text
//! 0  domain, clock, telemetry          shared types and leaves: import nothing of the crate
//! 1  config                            typed config.toml
//! 2  verify                            signature schemes; what a verified delivery is
//! 3  store                             durable memory
//! 4  calls, alerts                     downstream calls: the client and its journal;
//!                                      operational webhooks
//! 5  handlers, metrics, fixture        the Handler trait and built-ins; metrics; fixtures
//! 6  dispatch, retention, export, replay, admin_client, testing, backfill
//! 7  ingest, operations                HTTP-free: authenticate, claim, ack policy; the
//!                                      operator's actions (admin API and console)
//! 8  error                             the one table from errors to HTTP
//! 9  routes                            thin HTTP endpoints
//! 10 startup                           builds and runs the service
//! 11 cli                               the command line
//! ```

use std::collections::BTreeMap;
use std::path::Path;

const LAYERS: &[(&str, u8)] = &[
    ("domain", 0),
    ("clock", 0),
    ("telemetry", 0),
    ("collections", 0),
    ("config", 1),
    ("verify", 2),
    ("store", 3),
    ("calls", 4),
    ("alerts", 4),
    ("handlers", 5),
    ("metrics", 5),
    ("fixture", 5),
    ("dispatch", 6),
    ("retention", 6),
    ("export", 6),
    ("replay", 6),
    ("admin_client", 6),
    ("testing", 6),
    ("backfill", 6),
    ("ingest", 7),
    ("operations", 7),
    ("error", 8),
    ("routes", 9),
    ("startup", 10),
    ("cli", 11),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// Every `.rs` file under `dir`, with the top-level module it belongs to.
fn sources(dir: &Path, top: Option<&str>, out: &mut Vec<(String, String, String)>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("entry").path();
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if path.is_dir() {
            sources(&path, Some(top.unwrap_or(&name)), out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let module = top.map_or(name, str::to_owned);
            let text = std::fs::read_to_string(&path).expect("readable");
            out.push((module, path.display().to_string(), text));
        }
    }
}

/// The code of a file without comments (doc links name modules without importing them)
/// and without the items under `#[cfg(test)]` (each up to its matching closing brace).
fn code(text: &str) -> String {
    let text = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let Some(open) = after.find('{') else {
            return out;
        };
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The top-level modules a file refers to through `crate::…`.
fn references(code: &str) -> Vec<String> {
    code.match_indices("crate::")
        .filter(|(i, _)| {
            // Not a longer path ending in `crate` (e.g. `webhook_inbox_crate::`).
            code[..*i]
                .chars()
                .next_back()
                .is_none_or(|c| !c.is_alphanumeric() && c != '_')
        })
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

/// What runs against the order in these files: (file, from, to) lines.
fn violations(files: &[(String, String, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (module, path, text) in files {
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(from) = layer(module) else {
            found.push(format!("{path}: module `{module}` has no place in LAYERS"));
            continue;
        };
        for target in references(&code(text)) {
            if &target == module {
                continue;
            }
            match layer(&target) {
                Some(to) if to < from => {}
                Some(to) => found.push(format!(
                    "{path}: `{module}` (layer {from}) uses `crate::{target}` (layer {to})"
                )),
                None => {}
            }
        }
    }
    found
}

#[test]
fn imports_point_down_the_layers() {
    let mut files = Vec::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        None,
        &mut files,
    );
    assert!(files.len() > 20, "read the sources");
    let found = violations(&files);
    assert!(
        found.is_empty(),
        "imports against the layering:\n{}",
        found.join("\n")
    );
    let modules: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    assert_eq!(modules.len(), LAYERS.len(), "each module placed once");
}

/// The check itself catches a wrong import: the store reaching up into the routes.
#[test]
fn a_store_that_imports_the_routes_is_caught() {
    let files = vec![(
        "store".to_owned(),
        "src/store/mod.rs".to_owned(),
        "use crate::domain::Headers;\n#[cfg(test)]\nmod tests {\n    use crate::routes::AppState;\n}\nuse crate::routes::AppState; // up\n".to_owned(),
    )];
    let found = violations(&files);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("crate::routes"), "{found:?}");
}

/// Inside the store: each backend keeps its storage details to itself (sled's files never
/// name PostgreSQL's and the reverse), and a store is opened from the config in one place,
/// `store/open.rs` — no other file of the crate calls a backend's constructor.
fn store_violations(files: &[(String, String, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (_, path, text) in files {
        let path_in = |dir: &str| {
            path.replace('\\', "/")
                .contains(&format!("src/store/{dir}/"))
        };
        let code = code(text);
        for (dir, other) in [("sled", "postgres"), ("postgres", "sled")] {
            if path_in(dir) && code.contains(&format!("{other}::")) {
                found.push(format!("{path}: the {dir} backend names the {other} one"));
            }
        }
        let opener = path.replace('\\', "/").ends_with("src/store/open.rs")
            || path_in("sled")
            || path_in("postgres");
        for constructor in [
            "SledStore::open",
            "PgStore::from_config",
            "PgStore::connect",
        ] {
            if !opener && code.contains(constructor) {
                found.push(format!(
                    "{path}: calls {constructor} (stores are opened by store::open)"
                ));
            }
        }
    }
    found
}

#[test]
fn backends_keep_to_themselves_and_stores_are_opened_in_one_place() {
    let mut files = Vec::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        None,
        &mut files,
    );
    let found = store_violations(&files);
    assert!(found.is_empty(), "{}", found.join("\n"));
    // The check catches both.
    let planted = vec![
        (
            "store".to_owned(),
            "src/store/sled/queue.rs".to_owned(),
            "use crate::store::postgres::PgStore;\n".to_owned(),
        ),
        (
            "export".to_owned(),
            "src/export.rs".to_owned(),
            "let s = SledStore::open(path, d, 1);\n".to_owned(),
        ),
    ];
    assert_eq!(store_violations(&planted).len(), 2);
}

/// HTTP stays in the routes: the layers below them never name actix-web, and the routes
/// reach the store only to render `/metrics` and answer `/readyz` — everything else goes through `ingest` or
/// `operations`, so that the admin API and the console cannot drift apart.
fn http_violations(files: &[(String, String, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (module, path, text) in files {
        let code = code(text);
        // `error` (layer 8) is the table from errors to HTTP answers: it may.
        let below_routes = layer(module).is_some_and(|l| l < 8);
        if below_routes && (code.contains("actix_web") || code.contains("HttpResponse")) {
            found.push(format!("{path}: `{module}` knows HTTP"));
        }
        if module == "routes" {
            let store_uses = code.matches("state.store").count();
            let path = path.replace('\\', "/");
            let allowed = usize::from(
                path.ends_with("src/routes/admin.rs") || path.ends_with("src/routes/health.rs"),
            );
            if store_uses > allowed {
                found.push(format!(
                    "{path}: a route reads the store itself ({store_uses} times)"
                ));
            }
        }
    }
    found
}

#[test]
fn http_stays_in_the_routes_and_the_routes_go_through_ingest_and_operations() {
    let mut files = Vec::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        None,
        &mut files,
    );
    let found = http_violations(&files);
    assert!(found.is_empty(), "{}", found.join("\n"));
    let planted = vec![
        (
            "operations".to_owned(),
            "src/operations.rs".to_owned(),
            "fn f() -> actix_web::HttpResponse { todo!() }\n".to_owned(),
        ),
        (
            "routes".to_owned(),
            "src/routes/console/mod.rs".to_owned(),
            "let n = state.store.dead_letters().await?;\n".to_owned(),
        ),
    ];
    assert_eq!(http_violations(&planted).len(), 2);
}
