//! `GET /healthz` (the process answers) and `GET /readyz` (the store accepts writes).

use actix_web::{HttpResponse, web};

use super::AppState;

/// Liveness: the process is up.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(r#"{"status":"ok"}"#)
}

/// Readiness: the store is open and accepts writes (false after a failed flush), and the
/// dispatcher is running.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if !state
        .dispatcher_running
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return HttpResponse::ServiceUnavailable()
            .content_type("application/json")
            .body(r#"{"status":"dispatcher_stopped"}"#);
    }
    if state.store.is_healthy().await {
        HttpResponse::Ok()
            .content_type("application/json")
            .body(r#"{"status":"ready"}"#)
    } else {
        HttpResponse::ServiceUnavailable()
            .content_type("application/json")
            .body(r#"{"status":"storage_unavailable"}"#)
    }
}
