//! `POST /calls/{token}` on the admin listener: `webhook-inbox call` inside a `command`
//! handler's run makes its step through the service (see [`crate::calls::loopback`]).
//! Only a live run's own token is accepted; anything else is 404 `unknown_run`.

use actix_web::{HttpResponse, web};

use super::AppState;
use crate::calls::loopback::{WireAnswer, WireRequest};

/// The most a program may send as one step's request (the body base64, its headers).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// `POST /calls/{token}`.
pub async fn call(
    token: web::Path<String>,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> HttpResponse {
    let Some(calls) = state.calls.live_runs().get(&token) else {
        return HttpResponse::NotFound().json(serde_json::json!({
            "error": "unknown_run",
            "message": "no live run holds this token: it is valid only while its run lives",
        }));
    };
    let wire: WireRequest = match serde_json::from_slice(&body) {
        Ok(wire) => wire,
        Err(e) => {
            return HttpResponse::BadRequest().json(serde_json::json!({
                "error": "invalid_request",
                "message": format!("not a call request: {e}"),
            }));
        }
    };
    let answer: WireAnswer = match wire.into_request() {
        Ok((step, request)) => calls.execute(&step, request).await.into(),
        Err(e) => Err(e).into(),
    };
    HttpResponse::Ok().json(answer)
}
