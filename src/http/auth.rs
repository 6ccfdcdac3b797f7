//! Authentication of every API and page request: a `Bearer` token, or the review page's
//! session cookie. Cookie-authenticated requests that change state must carry the session's
//! CSRF token (`x-csrf-token` header, or the `csrf` form field on page forms).

use axum::{
    extract::FromRequestParts,
    http::{header, request::Parts, Method},
};

use super::{ApiError, AppState};
use crate::{
    auth::{self, AuthError, Caller},
    store,
};

/// The name of the review page's session cookie.
pub const SESSION_COOKIE: &str = "enricher_session";

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated => ApiError::Unauthorized,
            AuthError::Forbidden(_) => ApiError::Forbidden,
            AuthError::Invalid { field, message } => ApiError::unprocessable(&field, message),
            AuthError::Store(s) => s.into(),
        }
    }
}

/// How the caller authenticated.
#[derive(Debug, Clone)]
pub enum Via {
    Bearer,
    /// A page session; `csrf` is the session's token for form posts.
    Session {
        csrf: String,
        id_hash: String,
    },
}

/// An authenticated request.
#[derive(Debug, Clone)]
pub struct Authed {
    pub caller: Caller,
    pub via: Via,
}

pub fn cookie_value<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl FromRequestParts<AppState> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(h) = parts.headers.get(header::AUTHORIZATION) {
            let value = h.to_str().map_err(|_| ApiError::Unauthorized)?;
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .ok_or(ApiError::Unauthorized)?;
            let caller = auth::authenticate(&state.db, token).await?;
            return Ok(Authed {
                caller,
                via: Via::Bearer,
            });
        }
        if let Some(sid) = cookie_value(parts, SESSION_COOKIE) {
            let id_hash = auth::hash_secret(sid);
            if let Some(s) = store::tokens::find_session(&state.db, &id_hash).await? {
                return Ok(Authed {
                    caller: auth::caller_of(s.token),
                    via: Via::Session {
                        csrf: s.csrf,
                        id_hash,
                    },
                });
            }
        }
        Err(ApiError::Unauthorized)
    }
}

/// An API caller: like [`Authed`], and a cookie-authenticated request that changes state
/// must carry a matching `x-csrf-token` header.
impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let a = Authed::from_request_parts(parts, state).await?;
        if let Via::Session { csrf, .. } = &a.via {
            let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
            let sent = parts
                .headers
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok());
            if !safe && !sent.is_some_and(|s| crate::http::auth::ct_eq(s, csrf)) {
                return Err(ApiError::Forbidden);
            }
        }
        Ok(a.caller)
    }
}

/// Constant-time string comparison for secrets.
pub fn ct_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}
