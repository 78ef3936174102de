//! The whole request path: arbitrary headers and bodies, sometimes correctly signed, sent
//! as raw HTTP to the real service (sled store, handlers, dispatcher) running in this
//! process. Whatever comes in: an answer arrives, it is never a 5xx other than 503, and
//! every 4xx of the webhook route is the contract's JSON error.
//!
//! Input: a flags byte (bit 0: add valid signature headers; bits 1–2: the source), then
//! header lines (`name: value`, `\n`-separated) up to a 0xFE byte, then the body.
#![no_main]

use std::io::{Read as _, Write as _};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use webhook_inbox::config::Config;
use webhook_inbox::verify::Source;

const SOURCES: [&str; 4] = ["sw", "stripe", "github", "slack"];

fn config_text(dir: &std::path::Path) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_body_bytes = 65536
workers = 1
body_timeout = "2s"
[storage]
path = "{}"
durability = "buffered"
[sources.sw]
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
[sources.stripe]
scheme = "stripe"
secrets = ["s"]
[sources.github]
scheme = "github"
secrets = ["s"]
[sources.slack]
scheme = "slack"
secrets = ["s"]
[[handlers]]
name = "log"
kind = "log"
"#,
        dir.display()
    )
}

struct Service {
    port: u16,
    config: Config,
}

fn service() -> &'static Service {
    static SERVICE: OnceLock<Service> = OnceLock::new();
    SERVICE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("webhook-inbox-fuzz-{}", std::process::id()));
        let config = Config::parse(&config_text(&dir), "fuzz.toml").expect("config");
        let (tx, rx) = std::sync::mpsc::channel();
        let app_config = config.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            runtime.block_on(async move {
                let app = webhook_inbox::ApplicationBuilder::new(app_config)
                    .build()
                    .await
                    .expect("app");
                tx.send(app.port()).expect("port");
                app.run_until_stopped(std::future::pending()).await.expect("serve");
            });
        });
        let port = rx.recv().expect("the service starts");
        Service { port, config }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let service = service();
    let name = SOURCES[(flags as usize >> 1) % SOURCES.len()];
    let (head, body) = match rest.iter().position(|b| *b == 0xFE) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let mut request = format!(
        "POST /webhooks/{name} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for line in head.split(|b| *b == b'\n') {
        // Keep the framing ours: no line breaks inside a header line.
        let line: Vec<u8> = line.iter().copied().filter(|b| *b != b'\r').collect();
        if line.contains(&b':') {
            request.extend_from_slice(&line);
            request.extend_from_slice(b"\r\n");
        }
    }
    if flags & 1 == 1 {
        let source = Source::named(&service.config, name).expect("source");
        let id = format!("fuzz-{}", data.len());
        for (k, v) in source.sign(&id, body, SystemTime::now()) {
            request.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(body);

    let mut stream = std::net::TcpStream::connect(("127.0.0.1", service.port)).expect("the service is up");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    // The server may answer and close before reading everything (a 401 before the body).
    let _ = stream.write_all(&request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    assert!(status < 500 || status == 503, "{status}: {text}");
    if (400..500).contains(&status) && text.contains("application/json") {
        assert!(text.contains("\"error\":"), "{text}");
    }
});
