//! API tokens and roles.
//!
//! A token is `enr_` + 40 random base62 characters, shown once at creation; only its
//! sha256 is stored, so a database leak does not leak usable tokens. A token holds one or
//! more roles:
//! - `submitter` (marketing): submit batches, read their status;
//! - `reviewer` (product managers): read drafts and act on them;
//! - `consumer` (the PIM): read approved content, the feed, exports;
//! - `admin`: tokens, webhooks, configuration — and everything the other roles may do.

use rand::{distributions::Alphanumeric, Rng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{self, tokens::TokenRow, Db, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Submitter,
    Reviewer,
    Consumer,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Submitter, Role::Reviewer, Role::Consumer, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Submitter => "submitter",
            Role::Reviewer => "reviewer",
            Role::Consumer => "consumer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Self::ALL.into_iter().find(|r| r.as_str() == s.trim())
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no valid token")]
    Unauthenticated,
    #[error("the token lacks the `{0}` role")]
    Forbidden(Role),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who is calling: a valid, unrevoked token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Caller {
    pub token_id: String,
    pub name: String,
    pub roles: Vec<Role>,
}

impl Caller {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&Role::Admin) || self.roles.contains(&role)
    }

    /// Ok when the caller holds `role` (admins hold every role).
    pub fn require(&self, role: Role) -> Result<(), AuthError> {
        if self.has(role) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(role))
        }
    }

    /// Ok when the caller holds any of `roles`.
    pub fn require_any(&self, roles: &[Role]) -> Result<(), AuthError> {
        if roles.iter().any(|r| self.has(*r)) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(roles[0]))
        }
    }

    /// The name recorded in drafts and the audit log.
    pub fn actor(&self) -> String {
        format!("token:{}", self.name)
    }
}

/// sha256 hex of a secret (tokens, session ids).
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new random secret with `prefix`.
pub fn random_secret(prefix: &str, len: usize) -> String {
    let body: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect();
    format!("{prefix}{body}")
}

/// A created token: the secret is only available here, once.
#[derive(Debug, Clone, Serialize)]
pub struct NewToken {
    pub id: String,
    pub name: String,
    pub roles: Vec<Role>,
    pub token: String,
}

/// Creates a token with `roles`.
pub async fn create_token(
    db: &Db,
    name: &str,
    roles: &[Role],
    created_by: &str,
) -> Result<NewToken, AuthError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(AuthError::Invalid {
            field: "name".into(),
            message: "must be 1 to 100 characters".into(),
        });
    }
    if roles.is_empty() {
        return Err(AuthError::Invalid {
            field: "roles".into(),
            message: format!(
                "at least one role is needed (one of: {})",
                Role::ALL.map(Role::as_str).join(", ")
            ),
        });
    }
    let mut roles = roles.to_vec();
    roles.sort();
    roles.dedup();
    let token = random_secret("enr_", 40);
    let id = store::tokens::insert(db, name, &hash_secret(&token), &roles, created_by).await?;
    Ok(NewToken {
        id,
        name: name.to_string(),
        roles,
        token,
    })
}

/// Resolves a presented token to its caller.
pub async fn authenticate(db: &Db, token: &str) -> Result<Caller, AuthError> {
    let token = token.trim();
    if !token.starts_with("enr_") || token.len() > 200 {
        return Err(AuthError::Unauthenticated);
    }
    let row = store::tokens::find_active_by_hash(db, &hash_secret(token))
        .await?
        .ok_or(AuthError::Unauthenticated)?;
    Ok(caller_of(row))
}

pub(crate) fn caller_of(row: TokenRow) -> Caller {
    Caller {
        token_id: row.id,
        name: row.name,
        roles: row.roles,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_holds_every_role() {
        let c = Caller {
            token_id: "t".into(),
            name: "n".into(),
            roles: vec![Role::Admin],
        };
        for r in Role::ALL {
            assert!(c.require(r).is_ok());
        }
        let r = Caller {
            roles: vec![Role::Reviewer],
            ..c
        };
        assert!(r.require(Role::Reviewer).is_ok());
        assert!(matches!(
            r.require(Role::Consumer),
            Err(AuthError::Forbidden(Role::Consumer))
        ));
        assert!(r.require_any(&[Role::Submitter, Role::Reviewer]).is_ok());
    }

    #[test]
    fn secrets_are_random_and_hashed() {
        let a = random_secret("enr_", 40);
        let b = random_secret("enr_", 40);
        assert_ne!(a, b);
        assert_eq!(a.len(), 44);
        assert_eq!(hash_secret(&a).len(), 64);
        assert_ne!(hash_secret(&a), a);
        assert_eq!(Role::parse("reviewer"), Some(Role::Reviewer));
        assert_eq!(Role::parse("root"), None);
    }
}
