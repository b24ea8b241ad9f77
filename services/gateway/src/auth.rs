//! Bearer API keys. A key is looked up by its SHA-256 in the `api_keys` read model; its tenant
//! scopes every read and write the request makes.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use sqlx::Row;
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

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let unauthorized = || ApiError::new(ErrorCode::Unauthorized, "send 'Authorization: Bearer <api key>'");
        let value = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or_else(unauthorized)?;
        let key = value.strip_prefix("Bearer ").map(str::trim).filter(|k| !k.is_empty()).ok_or_else(unauthorized)?;
        let hash = taskmesh_ingest::hash_api_key(key);
        let row = sqlx::query("SELECT id, tenant_id, role FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL")
            .bind(&hash)
            .fetch_optional(&state.pool)
            .await?
            .ok_or_else(unauthorized)?;
        let role: String = row.get("role");
        Ok(Caller {
            tenant: row.get("tenant_id"),
            key_id: row.get("id"),
            role: Role::parse(&role).ok_or_else(unauthorized)?,
        })
    }
}
