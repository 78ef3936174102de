//! `GET /healthz` (the process answers) and `GET /readyz` (the store accepts writes).

use actix_web::{HttpResponse, web};

use crate::startup::AppState;

/// Liveness: the process is up.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(r#"{"status":"ok"}"#)
}

/// Readiness: the store is open and accepts writes (false after a failed flush).
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if state.store.is_healthy() {
        HttpResponse::Ok()
            .content_type("application/json")
            .body(r#"{"status":"ready"}"#)
    } else {
        HttpResponse::ServiceUnavailable()
            .content_type("application/json")
            .body(r#"{"status":"storage_unavailable"}"#)
    }
}
