//! Every scheme's full check (headers, timestamps, ids, JSON or form bodies) never panics.
//! Input: a scheme selector byte, then header value / timestamp / id / body separated by
//! 0xFF bytes.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use webhook_inbox::config::Config;
use webhook_inbox::verify::{Headers, Source};

const CONFIG: &str = r#"
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
[sources.shopify]
scheme = "shopify"
secrets = ["s"]
"#;

fn sources() -> &'static Vec<(Source, [&'static str; 3])> {
    static SOURCES: OnceLock<Vec<(Source, [&'static str; 3])>> = OnceLock::new();
    SOURCES.get_or_init(|| {
        let config = Config::parse(CONFIG, "fuzz.toml").expect("config");
        let names = [
            ("sw", ["webhook-signature", "webhook-timestamp", "webhook-id"]),
            ("stripe", ["stripe-signature", "x-unused", "x-unused-id"]),
            ("github", ["x-hub-signature-256", "x-unused", "x-github-delivery"]),
            ("slack", ["x-slack-signature", "x-slack-request-timestamp", "x-unused-id"]),
            ("shopify", ["x-shopify-hmac-sha256", "x-unused", "x-shopify-webhook-id"]),
        ];
        names
            .into_iter()
            .map(|(n, h)| {
                (Source::from_config(n, &config.sources[n], "fuzz.toml", &|_| None).expect("source"), h)
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let sources = sources();
    let (source, names) = &sources[selector as usize % sources.len()];
    let mut parts = rest.splitn(4, |b| *b == 0xFF);
    let mut text = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let (sig, ts, id) = (text(), text(), text());
    let body = bytes::Bytes::copy_from_slice(parts.next().unwrap_or_default());
    let headers = Headers::from_pairs([(names[0], sig), (names[1], ts), (names[2], id)]);
    let _ = source.authenticate(headers, &[], body, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
});
