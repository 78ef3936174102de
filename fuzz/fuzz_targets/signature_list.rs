//! Comma/space-separated signature lists (GitHub, Shopify, Slack, generic) never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let (prefix, value) = text.split_once('\n').unwrap_or(("sha256=", text));
        let _ = webhook_inbox::verify::hmac_generic::parse_signature_list(value, prefix, |t| {
            hex::decode(t).ok()
        });
    }
});
