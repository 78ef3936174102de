//! The one table from a failure to an HTTP status and the contract's JSON error body
//! `{"error":"<code>","message":"<one human sentence>"}`: every error of the layers below
//! the routes ([`crate::ingest`], [`crate::operations`], the store) is mapped here, and so
//! are the outcome labels a webhook request is counted and traced under.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

/// Every error the public listener answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The `{source}` of the URL is not configured.
    #[error("no source with this name is configured")]
    UnknownSource,
    /// The body is larger than `server.max_body_bytes`.
    #[error("the body is larger than this endpoint accepts")]
    PayloadTooLarge,
    /// The scheme's signature headers are absent.
    #[error("the signature headers of this source's scheme are missing")]
    MissingSignature,
    /// No secret produces the signature, or a header is malformed.
    #[error("the signature does not match any configured secret, or its header is malformed")]
    InvalidSignature,
    /// The signed timestamp is too far from now, in either direction.
    #[error("the signed timestamp is outside the accepted tolerance")]
    TimestampOutOfTolerance,
    /// No usable delivery id (absent, empty, over 255 bytes, control characters).
    #[error("the delivery id is missing, longer than 255 bytes, or holds control characters")]
    InvalidDeliveryId,
    /// The event type is over 255 bytes or holds control characters.
    #[error("the event type is longer than 255 bytes or holds control characters")]
    InvalidEventType,
    /// The body did not arrive within `server.body_timeout`.
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    /// Too many bytes of bodies are being read at once (`server.max_inflight_bytes`), or the
    /// service is shutting down.
    #[error("the service is busy; retry later")]
    ServerBusy,
    /// The request body could not be read (a broken chunked encoding, a reset).
    #[error("the request body could not be read")]
    InvalidBody,
    /// The body must be JSON to read the id or event type from it, and is not.
    #[error("the body is not valid JSON")]
    InvalidJson,
    /// The delivery id was seen with a different body.
    #[error("this delivery id was already received with a different body")]
    DeliveryIdConflict,
    /// `ack = "processed"`: the first copy is still being processed.
    #[error("this delivery is still being processed; retry later")]
    DeliveryInProgress {
        /// Seconds the sender should wait.
        retry_after_secs: u64,
    },
    /// `ack = "processed"`: a handler failed; nothing final was stored.
    #[error("a handler failed; the delivery was kept and a retry runs only what has not succeeded")]
    HandlerFailed,
    /// Admin API: no or a wrong bearer token.
    #[error("a valid `Authorization: Bearer <token>` header is required")]
    Unauthorized,
    /// Admin API: no token is configured, so the admin API is off.
    #[error("the admin API is disabled: set the environment variable named by admin.token_env")]
    AdminDisabled,
    /// Admin API: no such delivery.
    #[error("no such delivery is stored")]
    NotFound,
    /// Admin API: no handler of that name is configured.
    #[error("no handler of that name is configured")]
    UnknownHandler,
    /// Admin API: a query parameter is invalid.
    #[error(
        "a query parameter is invalid (status: pending, running, failed, dead, succeeded, in_progress; limit: 1 to 1000)"
    )]
    InvalidQuery,
    /// The store cannot record the delivery, or the flush failed.
    #[error("the delivery could not be recorded durably; retry later")]
    StorageUnavailable,
}

impl From<crate::verify::AuthError> for ApiError {
    fn from(e: crate::verify::AuthError) -> ApiError {
        use crate::verify::{AuthError, VerifyError};
        match e {
            AuthError::Signature(VerifyError::Missing) => ApiError::MissingSignature,
            AuthError::Signature(VerifyError::Invalid) => ApiError::InvalidSignature,
            AuthError::Signature(VerifyError::OutOfTolerance) => ApiError::TimestampOutOfTolerance,
            AuthError::InvalidDeliveryId => ApiError::InvalidDeliveryId,
            AuthError::InvalidJson => ApiError::InvalidJson,
            AuthError::InvalidEventType => ApiError::InvalidEventType,
        }
    }
}

impl From<crate::ingest::IngestError> for ApiError {
    fn from(e: crate::ingest::IngestError) -> ApiError {
        use crate::ingest::IngestError;
        match e {
            IngestError::UnknownSource => ApiError::UnknownSource,
            IngestError::Auth(e) => e.into(),
            IngestError::DeliveryIdConflict => ApiError::DeliveryIdConflict,
            IngestError::InProgress { retry_after_secs } => {
                ApiError::DeliveryInProgress { retry_after_secs }
            }
            IngestError::HandlerFailed => ApiError::HandlerFailed,
            IngestError::Storage(_) => ApiError::StorageUnavailable,
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    /// The store failed: logged here, once, and answered as unavailable (the sender, or the
    /// operator, retries); what failed is never in the answer.
    fn from(e: crate::store::StoreError) -> ApiError {
        tracing::error!(error = %e, "store failure");
        ApiError::StorageUnavailable
    }
}

impl From<crate::operations::OperationError> for ApiError {
    fn from(e: crate::operations::OperationError) -> ApiError {
        use crate::operations::OperationError;
        match e {
            OperationError::NotFound => ApiError::NotFound,
            OperationError::UnknownHandler => ApiError::UnknownHandler,
            OperationError::Invalid(_) => ApiError::InvalidQuery,
            OperationError::Storage(e) => e.into(),
            OperationError::Interrupted => {
                tracing::error!("an operator action's task ended without an answer");
                ApiError::StorageUnavailable
            }
        }
    }
}

/// How a webhook request ended, as it is counted (`webhook_inbox_deliveries_total`'s
/// `outcome` and `reason`) and traced: the outcome of an answered delivery, or of an error
/// that is not the sender's fault; `rejected` with the error's code for the rest.
pub fn outcome_labels(
    result: &Result<crate::ingest::Outcome, ApiError>,
) -> (&'static str, &'static str) {
    use crate::ingest::Outcome;
    match result {
        Ok(Outcome::Accepted(_)) => ("accepted", ""),
        Ok(Outcome::Processed(_)) => ("processed", ""),
        Ok(Outcome::Replayed(_)) => ("replayed", ""),
        Ok(Outcome::BodyDuplicate(_)) => ("body_duplicate", ""),
        Ok(Outcome::Handshake(_)) => ("handshake", ""),
        Err(ApiError::DeliveryIdConflict) => ("conflict", ""),
        Err(ApiError::DeliveryInProgress { .. }) => ("in_progress", ""),
        Err(ApiError::StorageUnavailable) => ("unavailable", ""),
        Err(ApiError::ServerBusy) => ("busy", ""),
        Err(ApiError::HandlerFailed) => ("handler_failed", ""),
        Err(e) => ("rejected", e.code()),
    }
}

impl ApiError {
    /// The machine-readable `error` code of the contract.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::UnknownSource => "unknown_source",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::MissingSignature => "missing_signature",
            ApiError::InvalidSignature => "invalid_signature",
            ApiError::TimestampOutOfTolerance => "timestamp_out_of_tolerance",
            ApiError::InvalidDeliveryId => "invalid_delivery_id",
            ApiError::InvalidEventType => "invalid_event_type",
            ApiError::BodyTimeout => "body_timeout",
            ApiError::ServerBusy => "server_busy",
            ApiError::InvalidBody => "invalid_body",
            ApiError::InvalidJson => "invalid_json",
            ApiError::DeliveryIdConflict => "delivery_id_conflict",
            ApiError::DeliveryInProgress { .. } => "delivery_in_progress",
            ApiError::HandlerFailed => "handler_failed",
            ApiError::StorageUnavailable => "storage_unavailable",
            ApiError::Unauthorized => "unauthorized",
            ApiError::AdminDisabled => "admin_disabled",
            ApiError::NotFound | ApiError::UnknownHandler => "not_found",
            ApiError::InvalidQuery => "invalid_query",
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.code(), "message": self.to_string() }).to_string()
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::UnknownSource => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::MissingSignature
            | ApiError::InvalidSignature
            | ApiError::TimestampOutOfTolerance => StatusCode::UNAUTHORIZED,
            ApiError::InvalidDeliveryId
            | ApiError::InvalidEventType
            | ApiError::InvalidBody
            | ApiError::InvalidJson => StatusCode::BAD_REQUEST,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::ServerBusy => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeliveryIdConflict => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::DeliveryInProgress { .. } => StatusCode::CONFLICT,
            ApiError::HandlerFailed => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::StorageUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::AdminDisabled => StatusCode::FORBIDDEN,
            ApiError::NotFound | ApiError::UnknownHandler => StatusCode::NOT_FOUND,
            ApiError::InvalidQuery => StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        response.content_type("application/json");
        match self {
            ApiError::DeliveryInProgress { retry_after_secs } => {
                response.insert_header(("Retry-After", retry_after_secs.to_string()));
            }
            ApiError::StorageUnavailable | ApiError::ServerBusy => {
                response.insert_header(("Retry-After", "1"));
            }
            ApiError::BodyTimeout => {
                response.insert_header(("Connection", "close"));
            }
            ApiError::Unauthorized => {
                response.insert_header(("WWW-Authenticate", "Bearer"));
            }
            _ => {}
        }
        response.body(self.body())
    }
}
