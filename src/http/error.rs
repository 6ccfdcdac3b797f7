//! One error type for every route, mapped to a status code and a JSON body
//! `{"error": {"code": "...", "message": "...", "field": "...", "details": ...}}`.
//! Internal errors (database, model) are logged and answered with an opaque 500.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use crate::{
    channel::ChannelError, delivery::export::ExportError, intake::IntakeError, review::ReviewError,
    store::StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{field}: {message}")]
    Unprocessable {
        field: String,
        message: String,
        details: serde_json::Value,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("authentication required")]
    Unauthorized,
    #[error("this token may not do that")]
    Forbidden,
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn unprocessable(field: &str, message: impl Into<String>) -> Self {
        ApiError::Unprocessable {
            field: field.into(),
            message: message.into(),
            details: serde_json::Value::Null,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unprocessable { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error answering a request");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let mut body = json!({ "error": { "code": code, "message": self.to_string() } });
        if let ApiError::Unprocessable { field, details, .. } = &self {
            body["error"]["field"] = json!(field);
            if !details.is_null() {
                body["error"]["details"] = details.clone();
            }
        }
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::NotFound(what),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<ReviewError> for ApiError {
    fn from(e: ReviewError) -> Self {
        match e {
            ReviewError::NotFound(w) => ApiError::NotFound(w),
            ReviewError::Conflict(m) => ApiError::Conflict(m),
            ReviewError::Invalid {
                field,
                message,
                findings,
            } => ApiError::Unprocessable {
                field,
                message,
                details: if findings.is_empty() {
                    serde_json::Value::Null
                } else {
                    json!({ "findings": findings })
                },
            },
            ReviewError::Store(e) => e.into(),
        }
    }
}

impl From<ChannelError> for ApiError {
    fn from(e: ChannelError) -> Self {
        match e {
            e @ ChannelError::Unknown { .. } => ApiError::unprocessable("channels", e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<IntakeError> for ApiError {
    fn from(e: IntakeError) -> Self {
        match e {
            IntakeError::Channel(c) => c.into(),
            IntakeError::Empty => ApiError::unprocessable("products", "the submission is empty"),
            IntakeError::Budget => {
                ApiError::unprocessable("token_budget", "must be a positive number of tokens")
            }
            IntakeError::NothingValid(errors) => ApiError::Unprocessable {
                field: "products".into(),
                message: format!(
                    "no valid product in the submission ({} refused)",
                    errors.len()
                ),
                details: json!({ "rejected": errors }),
            },
            IntakeError::Store(s) => s.into(),
        }
    }
}

impl From<ExportError> for ApiError {
    fn from(e: ExportError) -> Self {
        match e {
            ExportError::Format(f) => ApiError::unprocessable(
                "format",
                format!("unknown format `{f}` (use jsonl or csv)"),
            ),
            ExportError::Store(s) => s.into(),
            e => ApiError::Internal(e.to_string()),
        }
    }
}
