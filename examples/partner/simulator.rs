//! A partner API that applies the idempotency rules of design.md's "Downstream calls" to
//! its own writes, with faults to inject and a count of actions per key. Used by
//! `cargo run --example partner` and, through `#[path]`, by the project's tests.
//!
//! Every `POST`, `PUT`, `PATCH` or `DELETE` is a write that **acts** (creates a resource
//! `res_<n>`, answered 201 with `{"id","key","path"}`), under its `Idempotency-Key`:
//! - no key: 400;
//! - a key seen with the same request (method, path, body): the first answer, replayed,
//!   with `Idempotent-Replayed: true` — nothing acts again;
//! - a key seen with another request: 422;
//! - a key whose first request is still being worked on: 409 with `Retry-After: 1`.
//!
//! Faults, consumed one per write in the order queued ([`Partner::push_fault`] or
//! `POST /_sim/faults` with `["act-then-drop", "429:2", …]`): act then drop the
//! connection, act then answer 500, answer 429 with `Retry-After` (seconds or an HTTP date)
//! before acting, be slow before acting. `ignore_keys` makes a partner that acts on every
//! request whatever its key. `GET /_sim/actions` answers `{"total": n, "per_key": {…}}`.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

/// A fault to inject into the next write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Act, then close the connection without an answer.
    ActThenDrop,
    /// Act, then answer 500.
    ActThenFail,
    /// Answer 429 with `Retry-After: <seconds>`, without acting.
    Throttle(u64),
    /// Answer 429 with `Retry-After` as an HTTP date this many seconds ahead.
    ThrottleUntil(u64),
    /// Wait this long (the key in flight meanwhile), then go on.
    Slow(Duration),
}

impl std::str::FromStr for Fault {
    type Err = String;

    /// `act-then-drop`, `act-then-500`, `429:<seconds>`, `429-date:<seconds>`, `slow:<ms>`.
    fn from_str(s: &str) -> Result<Fault, String> {
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        let number = || {
            arg.parse::<u64>()
                .map_err(|_| format!("fault `{s}`: a number after ':'"))
        };
        match name {
            "act-then-drop" => Ok(Fault::ActThenDrop),
            "act-then-500" => Ok(Fault::ActThenFail),
            "429" => Ok(Fault::Throttle(number()?)),
            "429-date" => Ok(Fault::ThrottleUntil(number()?)),
            "slow" => Ok(Fault::Slow(Duration::from_millis(number()?))),
            _ => Err(format!(
                "fault `{s}`: one of act-then-drop, act-then-500, 429:<s>, 429-date:<s>, slow:<ms>"
            )),
        }
    }
}

#[derive(Debug, Clone)]
enum KeyState {
    InFlight {
        fingerprint: String,
    },
    Done {
        fingerprint: String,
        status: u16,
        body: String,
    },
}

#[derive(Debug, Default)]
struct State {
    keys: HashMap<String, KeyState>,
    actions: HashMap<String, u32>,
    total: u32,
    faults: VecDeque<Fault>,
}

/// A running partner simulator.
#[derive(Debug, Clone)]
pub struct Partner {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    ignore_keys: bool,
}

impl Partner {
    /// Starts a simulator on `addr` (port 0: any free port), serving until the runtime ends.
    pub async fn start(addr: SocketAddr, ignore_keys: bool) -> std::io::Result<Partner> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let partner = Partner {
            addr: listener.local_addr()?,
            state: Arc::default(),
            ignore_keys,
        };
        let serving = partner.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let partner = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let partner = partner.clone();
                        async move { partner.answer(request).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(partner)
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues a fault for a coming write.
    pub fn push_fault(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// How many times a write acted under `key`.
    pub fn actions(&self, key: &str) -> u32 {
        self.lock().actions.get(key).copied().unwrap_or(0)
    }

    /// Every action, whatever its key.
    pub fn total_actions(&self) -> u32 {
        self.lock().total
    }

    /// Actions per key.
    pub fn actions_per_key(&self) -> HashMap<String, u32> {
        self.lock().actions.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One request. An `Err` makes hyper close the connection without an answer.
    async fn answer(&self, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, String> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let key = request
            .headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = request
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        match (method.as_str(), path.as_str()) {
            ("GET", "/_sim/actions") => {
                let state = self.lock();
                return Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "total": state.total, "per_key": state.actions }),
                ));
            }
            ("POST", "/_sim/faults") => {
                let names: Vec<String> = serde_json::from_slice(&body).unwrap_or_default();
                let faults: Result<Vec<Fault>, String> = names.iter().map(|n| n.parse()).collect();
                return Ok(match faults {
                    Ok(faults) => {
                        self.lock().faults.extend(faults);
                        json(StatusCode::NO_CONTENT, &serde_json::json!(null))
                    }
                    Err(e) => json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": e })),
                });
            }
            ("POST" | "PUT" | "PATCH" | "DELETE", _) => {}
            _ => {
                return Ok(json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": "no such resource"}),
                ));
            }
        }
        let Some(key) = key else {
            return Ok(json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "an Idempotency-Key header is required"}),
            ));
        };
        let fingerprint = {
            let mut h = Sha256::new();
            h.update(method.as_str());
            h.update(b"\n");
            h.update(&path);
            h.update(b"\n");
            h.update(&body);
            hex::encode(h.finalize())
        };
        // Decide under the lock: replay, refuse, or take the key.
        let fault = {
            let mut state = self.lock();
            if !self.ignore_keys {
                let refused = || {
                    json(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        &serde_json::json!({"error": "this key was used with a different request"}),
                    )
                };
                match state.keys.get(&key) {
                    Some(KeyState::Done {
                        fingerprint: f,
                        status,
                        body,
                    }) => {
                        if *f != fingerprint {
                            return Ok(refused());
                        }
                        let mut response = json(
                            StatusCode::from_u16(*status).unwrap_or(StatusCode::OK),
                            &serde_json::from_str::<serde_json::Value>(body).unwrap_or_default(),
                        );
                        response
                            .headers_mut()
                            .insert("idempotent-replayed", "true".parse().expect("header"));
                        return Ok(response);
                    }
                    Some(KeyState::InFlight { fingerprint: f }) => {
                        if *f != fingerprint {
                            return Ok(refused());
                        }
                        let mut response = json(
                            StatusCode::CONFLICT,
                            &serde_json::json!({"error": "the first request with this key is in progress"}),
                        );
                        response
                            .headers_mut()
                            .insert("retry-after", "1".parse().expect("header"));
                        return Ok(response);
                    }
                    None => {}
                }
            }
            let fault = state.faults.pop_front();
            match fault {
                Some(Fault::Throttle(s)) => {
                    return Ok(throttled(s.to_string()));
                }
                Some(Fault::ThrottleUntil(s)) => {
                    return Ok(throttled(httpdate::fmt_http_date(
                        SystemTime::now() + Duration::from_secs(s),
                    )));
                }
                _ => {}
            }
            if !self.ignore_keys {
                state.keys.insert(
                    key.clone(),
                    KeyState::InFlight {
                        fingerprint: fingerprint.clone(),
                    },
                );
            }
            fault
        };
        // The work goes on whether or not the caller waits for it (as a real partner's
        // would): a caller that timed out finds the key in flight, then done.
        let partner = self.clone();
        let (key_, path_, slow) = (key.clone(), path.clone(), fault.clone());
        let work = tokio::spawn(async move {
            if let Some(Fault::Slow(wait)) = slow {
                tokio::time::sleep(wait).await;
            }
            partner.act(key_, path_, fingerprint)
        });
        let (answer, id) = work.await.map_err(|e| e.to_string())?;
        match fault {
            Some(Fault::ActThenDrop) => Err("acted, then dropped the connection".into()),
            Some(Fault::ActThenFail) => Ok(json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &serde_json::json!({"error": "acted, then failed to answer"}),
            )),
            _ => {
                let mut response = json(
                    StatusCode::CREATED,
                    &serde_json::from_str::<serde_json::Value>(&answer).unwrap_or_default(),
                );
                response
                    .headers_mut()
                    .insert("location", format!("{path}/{id}").parse().expect("header"));
                Ok(response)
            }
        }
    }
}

impl Partner {
    /// Acts once under `key`: a new resource, the answer kept for the key's replays.
    fn act(&self, key: String, path: String, fingerprint: String) -> (String, String) {
        let mut state = self.lock();
        state.total += 1;
        *state.actions.entry(key.clone()).or_default() += 1;
        let id = format!("res_{}", state.total);
        let body = serde_json::json!({ "id": id, "key": key, "path": path }).to_string();
        if !self.ignore_keys {
            state.keys.insert(
                key,
                KeyState::Done {
                    fingerprint,
                    status: 201,
                    body: body.clone(),
                },
            );
        }
        (body, id)
    }
}

fn throttled(retry_after: String) -> Response<Full<Bytes>> {
    let mut response = json(
        StatusCode::TOO_MANY_REQUESTS,
        &serde_json::json!({"error": "slow down"}),
    );
    response
        .headers_mut()
        .insert("retry-after", retry_after.parse().expect("header"));
    response
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = if value.is_null() {
        Bytes::new()
    } else {
        Bytes::from(value.to_string())
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    response
}
