//! A small test kit for handler authors: run a fixture through one handler in-process, the
//! way the service would, and check that a second run with the same key has no second
//! effect.
//!
//! ```
//! use webhook_inbox::testing;
//! use webhook_inbox::{Delivery, Handler, HandlerContext, HandlerError};
//! use std::sync::Mutex;
//! use std::collections::HashSet;
//!
//! /// Remembers which keys it acted on: a second run with the same key does nothing.
//! #[derive(Default)]
//! struct OpenCase { opened: Mutex<HashSet<String>> }
//!
//! #[webhook_inbox::async_trait]
//! impl Handler for OpenCase {
//!     async fn handle(&self, _: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
//!         self.opened.lock().unwrap().insert(ctx.idempotency_key.clone());
//!         Ok(())
//!     }
//! }
//!
//! # tokio_test_block_on(async {
//! let handler = OpenCase::default();
//! let delivery = testing::delivery("credicorp", "msg_1", Some("application.created"), r#"{"type":"application.created"}"#);
//! testing::assert_one_effect(&handler, "open-case", &delivery, || handler.opened.lock().unwrap().len()).await;
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
//! # }
//! ```

use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::fixture::Fixture;
use crate::handlers::{Delivery, Handler, HandlerContext, HandlerError};
use crate::store::DeliveryKey;
use crate::verify::{Authenticated, AuthenticatedDelivery, Headers, Source};

/// Why the kit could not make a delivery.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// The fixture could not be read or signed.
    #[error(transparent)]
    Fixture(#[from] crate::fixture::FixtureError),
    /// The source is not configured, or cannot be built.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The signed request did not authenticate.
    #[error(transparent)]
    Auth(#[from] crate::verify::AuthError),
    /// The body is a provider handshake, which is answered and never becomes a delivery.
    #[error("the body is a provider handshake, not a delivery")]
    Handshake,
}

/// How a handler breaks the contract every handler must meet ([`check_conformance`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Nonconformance {
    /// It failed on a valid delivery.
    #[error("a valid delivery failed: {0}")]
    FirstRunFailed(HandlerError),
    /// It failed when re-run with the same key (a retry after a crash).
    #[error("a re-run with the same key failed: {0}")]
    RerunFailed(HandlerError),
    /// It kept running after the shutdown signal.
    #[error("ignored the shutdown signal for 10 s")]
    IgnoredShutdown,
    /// Shutdown made it fail for good (it must be retried instead).
    #[error("shutdown turned into a permanent failure: {0}")]
    PermanentOnShutdown(String),
}

/// A delivery with the given fields, received now, attempt 1.
pub fn delivery(source: &str, id: &str, event_type: Option<&str>, body: &str) -> Delivery {
    Delivery {
        source: source.to_owned(),
        id: id.to_owned(),
        event_type: event_type.map(str::to_owned),
        received_at: SystemTime::now(),
        attempt: 1,
        headers: Headers::from_pairs([("content-type", "application/json")]),
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

/// The delivery a fixture becomes once signed by its sender and checked by the service
/// (`config` provides the source's scheme and secrets): the real authentication path, so
/// the event type and id are read exactly as in production.
pub fn delivery_from_fixture(config: &Config, path: &Path) -> Result<Delivery, KitError> {
    let fixture = Fixture::load(path)?;
    let source = Source::named(config, &fixture.source)?;
    let request = fixture.sign_as(&source, &fixture.id, SystemTime::now(), false)?;
    match source.authenticate(
        Headers::from_pairs(request.headers),
        &[],
        Bytes::from(request.body),
        SystemTime::now(),
    )? {
        Authenticated::Delivery(d) => {
            let (source, id, event_type, headers, body) = d.into_parts();
            Ok(Delivery {
                source,
                id: id.as_str().to_owned(),
                event_type,
                received_at: SystemTime::now(),
                attempt: 1,
                headers,
                body,
            })
        }
        Authenticated::Handshake(_) => Err(KitError::Handshake),
    }
}

/// `body` sent as delivery `id` by `source`'s sender at `now`, through the real signing and
/// verification: the only way outside a request to get an [`AuthenticatedDelivery`], and so
/// a [`crate::store::NewDelivery`] (store tests, benchmarks).
pub fn authenticated(
    source: &Source,
    id: &str,
    body: &[u8],
    now: SystemTime,
) -> Result<AuthenticatedDelivery, KitError> {
    let headers = Headers::from_pairs(source.sign(id, body, now));
    match source.authenticate(headers, &[], Bytes::copy_from_slice(body), now)? {
        Authenticated::Delivery(d) => Ok(d),
        Authenticated::Handshake(_) => Err(KitError::Handshake),
    }
}

/// The context the service gives handler `handler_name` for `delivery`: its production
/// idempotency key, a shutdown signal that never fires, and a downstream client without a
/// journal (the same keys and retry rules).
pub fn context(handler_name: &str, delivery: &Delivery) -> HandlerContext {
    let job = DeliveryKey::new(&delivery.source, &delivery.id).job(handler_name);
    HandlerContext {
        idempotency_key: job.idempotency_key(),
        shutdown: CancellationToken::new(),
        calls: crate::calls::Calls::direct(job, crate::config::CallsConfig::default()),
    }
}

/// Runs `handler` once on `delivery` as handler `handler_name`.
pub async fn run_once(
    handler: &dyn Handler,
    handler_name: &str,
    delivery: &Delivery,
) -> Result<(), HandlerError> {
    handler
        .handle(delivery, &context(handler_name, delivery))
        .await
}

/// Runs `handler` twice on `delivery` with the same key (attempts 1 and 2), as a retry after
/// a crash would.
pub async fn run_twice(
    handler: &dyn Handler,
    handler_name: &str,
    delivery: &Delivery,
) -> (Result<(), HandlerError>, Result<(), HandlerError>) {
    let ctx = context(handler_name, delivery);
    let first = handler.handle(delivery, &ctx).await;
    let mut again = delivery.clone();
    again.attempt += 1;
    let second = handler.handle(&again, &ctx).await;
    (first, second)
}

/// Asserts that two runs with the same key both succeed and leave exactly one effect, as
/// counted by `effects`.
///
/// # Panics
/// When a run fails or the count after either run is not 1.
pub async fn assert_one_effect(
    handler: &dyn Handler,
    handler_name: &str,
    delivery: &Delivery,
    effects: impl Fn() -> usize,
) {
    let ctx = context(handler_name, delivery);
    handler
        .handle(delivery, &ctx)
        .await
        .unwrap_or_else(|e| panic!("first run failed: {e}"));
    assert_eq!(effects(), 1, "the first run must have exactly one effect");
    let mut again = delivery.clone();
    again.attempt += 1;
    handler
        .handle(&again, &ctx)
        .await
        .unwrap_or_else(|e| panic!("second run failed: {e}"));
    assert_eq!(
        effects(),
        1,
        "a second run with the same key must not act again"
    );
}

/// The contract every handler must meet, built-in or plugin: it succeeds on a valid
/// delivery, succeeds again when re-run with the same key (a retry after a crash), and
/// returns promptly once the shutdown signal has fired.
pub async fn check_conformance(
    handler: &dyn Handler,
    handler_name: &str,
    delivery: &Delivery,
) -> Result<(), Nonconformance> {
    let (first, second) = run_twice(handler, handler_name, delivery).await;
    first.map_err(Nonconformance::FirstRunFailed)?;
    second.map_err(Nonconformance::RerunFailed)?;
    let ctx = context(handler_name, delivery);
    ctx.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), handler.handle(delivery, &ctx))
        .await
        .map_err(|_| Nonconformance::IgnoredShutdown)?
        .or_else(|e| match e {
            HandlerError::Retryable(_) => Ok(()),
            HandlerError::Permanent(m) => Err(Nonconformance::PermanentOnShutdown(m)),
        })
}
