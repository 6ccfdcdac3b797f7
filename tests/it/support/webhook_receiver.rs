//! A webhook receiver over real HTTP on loopback: it checks every request's signature with
//! its own HMAC code (independent of the service's), records idempotency keys and events in
//! arrival order, and answers from a script — 2xx, an error status (with Retry-After), or a
//! hang longer than the sender's timeout. It can start on an address reserved earlier, so a
//! subscription can point at it while nothing listens (connection refused).

#![allow(dead_code)]

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Router,
};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    Ok,
    Status {
        code: u16,
        retry_after: Option<String>,
    },
    /// Answer 200 only after this long (past the sender's timeout: a timeout for it).
    Hang(Duration),
}

impl Reply {
    pub fn status(code: u16) -> Self {
        Reply::Status {
            code,
            retry_after: None,
        }
    }
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub key: String,
    pub event: Value,
    pub signature_ok: bool,
    pub attempt_header: Option<String>,
    /// The status it was answered with; 0 for a hang.
    pub answered: u16,
}

impl Received {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.answered)
    }
}

struct Inner {
    secret: String,
    script: VecDeque<Reply>,
    default: Reply,
    received: Vec<Received>,
}

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

/// A free loopback port, not listened on (until `Receiver::start_on` takes it).
pub fn reserve_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// The signature the service must send: HMAC-SHA256 over "{timestamp}.{body}", hex, "v1=".
pub fn expected_signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac key");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl Receiver {
    pub async fn start(secret: &str) -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), secret).await
    }

    pub async fn start_on(addr: SocketAddr, secret: &str) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            secret: secret.to_string(),
            script: VecDeque::new(),
            default: Reply::Ok,
            received: Vec::new(),
        }));
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.inner.lock().unwrap().script.extend(replies);
    }

    pub fn set_default(&self, r: Reply) {
        self.inner.lock().unwrap().default = r;
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.lock().unwrap().received.clone()
    }

    /// Polls until `done(received)` holds, or panics after `limit`.
    pub async fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let r = self.received();
            if done(&r) {
                return r;
            }
            assert!(
                start.elapsed() < limit,
                "receiver: {what} not reached after {limit:?} ({} requests, {} answered 2xx)",
                r.len(),
                r.iter().filter(|x| x.ok()).count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn hook(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap, body: Bytes) -> Response {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let ts = h("enricher-timestamp").unwrap_or_default();
    let sig = h("enricher-signature").unwrap_or_default();
    let key = h("enricher-idempotency-key").unwrap_or_default();
    let fresh = ts
        .parse::<i64>()
        .is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() <= 300);
    let reply = {
        let mut g = inner.lock().unwrap();
        let signature_ok = fresh
            && h("content-type").as_deref() == Some("application/json")
            && sig == expected_signature(&g.secret, &ts, &body);
        let reply = g.script.pop_front().unwrap_or_else(|| g.default.clone());
        let answered = match &reply {
            Reply::Ok => 200,
            Reply::Status { code, .. } => *code,
            Reply::Hang(_) => 0,
        };
        g.received.push(Received {
            at: Instant::now(),
            key,
            event: serde_json::from_slice(&body).unwrap_or(Value::Null),
            signature_ok,
            attempt_header: h("enricher-delivery-attempt"),
            answered,
        });
        reply
    };
    match reply {
        Reply::Ok => (StatusCode::OK, "thanks").into_response(),
        Reply::Status { code, retry_after } => {
            let mut r = (
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                format!("scripted {code}"),
            )
                .into_response();
            if let Some(ra) = retry_after {
                r.headers_mut()
                    .insert("retry-after", ra.parse().expect("header"));
            }
            r
        }
        Reply::Hang(d) => {
            tokio::time::sleep(d).await;
            (StatusCode::OK, "too late").into_response()
        }
    }
}
