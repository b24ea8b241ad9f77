//! The authenticated caller. [`crate::access`] looks a bearer key up by its SHA-256 in the
//! `api_keys` read model; its tenant scopes every read and write the request makes.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use taskmesh_events::{ErrorCode, Role};
use uuid::Uuid;

use crate::AppState;
use taskmesh_http::ApiError;

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: String,
    pub key_id: Uuid,
    pub role: Role,
    /// The key's display prefix (for the audit log; never the key).
    pub prefix: String,
}

impl Caller {
    /// Fails with 403 unless the caller's role is at least `operator`.
    pub fn require_operator(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Admin | Role::Operator => Ok(()),
            Role::Viewer => Err(ApiError::new(ErrorCode::Forbidden, "this key is read-only")),
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Admin => Ok(()),
            _ => Err(ApiError::new(ErrorCode::Forbidden, "this needs an admin key")),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    /// The caller [`crate::access::middleware`] authenticated, else 401.
    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "send 'Authorization: Bearer <api key>'"))
    }
}
