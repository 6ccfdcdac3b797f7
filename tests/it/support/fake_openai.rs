//! A fake OpenAI-compatible server over real HTTP on loopback, speaking the chat-completions
//! wire format — including its failures: 429 with Retry-After, 500, hanging (timeouts),
//! malformed JSON, a 429 with a non-JSON body, and a 400 for an unsupported response_format.

#![allow(dead_code)]

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use serde_json::{json, Value};

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with schema-shaped copy built from the prompt's product data.
    Copy,
    /// 200 with this exact message content.
    Content(String),
    /// An error status with an optional Retry-After and a body (JSON or not).
    Status {
        code: u16,
        retry_after: Option<String>,
        body: String,
    },
    /// Wait this long before answering with copy (longer than the client timeout = timeout).
    Hang(Duration),
    /// 200 with a body that is not JSON.
    Malformed,
    /// 400 when the request has `response_format.type == json_schema`, else copy.
    RefuseJsonSchema,
    /// What llama-cpp-python's server does with `json_schema`: a 500 whose body is a
    /// validation error naming `response_format`; else copy.
    RefuseJsonSchemaWith500,
}

#[derive(Default)]
struct Inner {
    script: VecDeque<Reply>,
    default: Option<Reply>,
    requests: Vec<(Instant, Value, Option<String>)>,
}

#[derive(Clone)]
pub struct FakeOpenAi {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl FakeOpenAi {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Answers the next requests with these replies, in order, then with the default.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.inner.lock().unwrap().script.extend(replies);
    }

    /// What to answer once the script is used up (default: `Copy`).
    pub fn set_default(&self, r: Reply) {
        self.inner.lock().unwrap().default = Some(r);
    }

    pub fn request_count(&self) -> usize {
        self.inner.lock().unwrap().requests.len()
    }

    pub fn requests(&self) -> Vec<Value> {
        self.inner
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|r| r.1.clone())
            .collect()
    }

    pub fn request_times(&self) -> Vec<Instant> {
        self.inner
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|r| r.0)
            .collect()
    }

    pub fn auth_headers(&self) -> Vec<Option<String>> {
        self.inner
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|r| r.2.clone())
            .collect()
    }
}

async fn chat(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    Json(req): Json<Value>,
) -> Response {
    let reply = {
        let mut g = inner.lock().unwrap();
        g.requests.push((
            Instant::now(),
            req.clone(),
            headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        ));
        g.script
            .pop_front()
            .or_else(|| g.default.clone())
            .unwrap_or(Reply::Copy)
    };
    match reply {
        Reply::Copy => completion(&req, &copy_for(&req)),
        Reply::Content(c) => completion(&req, &c),
        Reply::Status {
            code,
            retry_after,
            body,
        } => {
            let mut resp = (
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body,
            )
                .into_response();
            if let Some(ra) = retry_after {
                resp.headers_mut()
                    .insert("retry-after", ra.parse().unwrap());
            }
            resp
        }
        Reply::Hang(d) => {
            tokio::time::sleep(d).await;
            completion(&req, &copy_for(&req))
        }
        Reply::Malformed => (
            StatusCode::OK,
            [("content-type", "application/json")],
            "{\"id\": \"x\", \"choices\": [",
        )
            .into_response(),
        Reply::RefuseJsonSchema | Reply::RefuseJsonSchemaWith500
            if req["response_format"]["type"] == "json_schema" =>
        {
            let refusal = if matches!(reply, Reply::RefuseJsonSchema) {
                (
                    StatusCode::BAD_REQUEST,
                    json!({"error": {"message": "response_format json_schema is not supported", "type": "invalid_request_error", "param": "response_format", "code": null}}),
                )
            } else {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": {"message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema'}", "type": "internal_server_error", "param": null, "code": null}}),
                )
            };
            (refusal.0, Json(refusal.1)).into_response()
        }
        Reply::RefuseJsonSchema | Reply::RefuseJsonSchemaWith500 => {
            completion(&req, &copy_for(&req))
        }
    }
}

fn completion(req: &Value, content: &str) -> Response {
    let prompt_chars: usize = req["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|x| x["content"].as_str().unwrap_or("").len())
                .sum()
        })
        .unwrap_or(0);
    Json(json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000u64,
        "model": req["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_chars / 4, "completion_tokens": content.len() / 4, "total_tokens": (prompt_chars + content.len()) / 4}
    }))
    .into_response()
}

/// Lines `Name: value` of the prompt's product data block.
pub fn product_facts(req: &Value) -> Vec<(String, String)> {
    let user = req["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|x| x["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let block = user
        .split("<product_data>")
        .nth(1)
        .and_then(|b| b.split("</product_data>").next())
        .unwrap_or("")
        .to_string();
    block
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| !k.starts_with("Shop"))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out = String::new();
    for w in s.split_whitespace() {
        if out.chars().count() + w.chars().count() + 1 > max {
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(w);
    }
    out
}

/// Copy that uses only the spec's own words, shaped by the request's JSON schema.
pub fn copy_for(req: &Value) -> String {
    let facts = product_facts(req);
    let get = |k: &str| {
        facts
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    let brand = get("Brand").unwrap_or_default();
    let kind = get("Product Type")
        .or_else(|| get("Category"))
        .unwrap_or_else(|| "product".into());
    let attrs: Vec<(String, String)> = facts
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "Brand" | "Category"))
        .cloned()
        .collect();
    let details = attrs
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let headline = cut(&format!("{brand} {kind} with {details}"), 60);
    let props = req["response_format"]["json_schema"]["schema"]["properties"].clone();
    let names: Vec<String> = match props.as_object() {
        Some(p) => p.keys().cloned().collect(),
        None => vec!["title".into(), "meta_description".into()],
    };
    let mut out = serde_json::Map::new();
    for name in names {
        let v = match name.as_str() {
            "title" => json!(headline),
            "meta_description" => json!(cut(&format!("{brand} {kind}: {details}."), 158)),
            "bullets" => json!((0..5)
                .map(|i| match attrs.get(i) {
                    Some((k, v)) => format!("{k}: {v}"),
                    None => format!("{brand} {kind} number {}", i + 1),
                })
                .collect::<Vec<_>>()),
            "post" => json!(cut(&format!("New: {brand} {kind}. {details}"), 270)),
            "caption" => json!(format!("Meet the {brand} {kind}. {details}.")),
            "hashtags" => json!([format!("#{}", brand.split_whitespace().collect::<String>())]),
            _ => json!(headline),
        };
        out.insert(name, v);
    }
    Value::Object(out).to_string()
}
