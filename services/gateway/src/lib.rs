//! The gateway: Taskmesh's public REST API. It reads the Postgres projections and turns writes
//! into commands for ingest; it never writes to Postgres or the log itself.
//!
//! Every route but health and the spec needs `Authorization: Bearer <api key>`, and every read
//! is scoped to the key's tenant: another tenant's run is a 404. Every error is RFC 9457
//! `application/problem+json` with a stable `type`.
//!
//! # Layout
//! - [`access`]: the middleware that authenticates keys, applies rate limits and the payload
//!   quota, records keys' last use and writes the audit log.
//! - [`audit`]: `GET /v1/audit`.
//! - [`auth`]: the authenticated [`auth::Caller`] and the platform administrator.
//! - [`breakers`]: `GET /v1/circuit-breakers`, the tenant's breakers as the dispatcher keeps them.
//! - [`cache`]: `DELETE /v1/cache`, forgetting the tenant's kept `cache:` outcomes.
//! - [`deliveries`]: webhook endpoints' failed deliveries, sending one again, and enabling a
//!   disabled endpoint.
//! - [`events`]: CloudEvents in, runs of the stored workflows they trigger out.
//! - [`logs`]: step logs, paged or followed as Server-Sent Events.
//! - [`live`]: a run's events as Server-Sent Events, resumable with `Last-Event-ID`.
//! - [`places`]: places for requests that stay open (live streams, waiting reads), bounded in
//!   all and per tenant.
//! - [`runs`] serves `/v1/runs`.
//! - [`resources`]: repository connections and webhook endpoints.
//! - [`workflows`]: stored, versioned workflow definitions.
//! - [`schedules`]: cron schedules.
//! - [`secrets`]: write-only secrets, sealed on arrival.
//! - [`tenancy`]: tenants (platform administrator) and API keys.
//! - [`ui`]: the web dashboard at `/ui/` (static files that use the API with the user's key).
//! - this file: [`AppState`], [`router`], [`Application`], health, the OpenAPI document.

pub mod access;
pub mod audit;
pub mod auth;
pub mod breakers;
pub mod cache;
pub mod deliveries;
pub mod events;
pub mod executors;
pub mod live;
pub mod logs;
pub mod places;
pub mod resources;
pub mod runs;
pub mod schedules;
pub mod secrets;
pub mod tenancy;
pub mod ui;
pub mod workflows;

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::IntoResponse;
use axum::routing::get;
use sqlx::PgPool;
use taskmesh_bus::Bus;
use taskmesh_config::HttpSettings;
use taskmesh_events::ErrorCode;
use taskmesh_http::Server;
use taskmesh_ingest::IngestClient;
use utoipa::OpenApi;

use taskmesh_http::ApiError;

/// What every handler shares: one allocation, so the clone each extractor and middleware takes
/// is one reference count, not a copy of every field.
#[derive(Clone)]
pub struct AppState(std::sync::Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The fields of [`AppState`].
pub struct Shared {
    pub pool: PgPool,
    pub bus: Bus,
    pub ingest: IngestClient,
    /// Appends audit records, gathering those that arrive together.
    pub audit: audit::AuditWriter,
    /// Base URL for `Location` headers.
    pub public_url: String,
    /// Seals secret values as they arrive; none when no secrets key is configured.
    pub keyring: Option<std::sync::Arc<taskmesh_secrets::Keyring>>,
    /// The platform administrator's key, if configured.
    pub admin_key: Option<secrecy::SecretString>,
    /// Rate-limit buckets, quotas and last-used marks.
    pub access: std::sync::Arc<access::Access>,
    /// The projector's checkpoint as announced at each commit (see [`taskmesh_store::follow_checkpoint`]).
    pub projected: tokio::sync::watch::Receiver<u64>,
    /// Reads waiting for runs to end (`GET /v1/runs/{id}?wait=`), woken by the projector's
    /// announcements.
    pub run_ends: std::sync::Arc<taskmesh_store::RunEnds>,
    /// Keys already looked up, dropped as the projector announces their revocation.
    pub keys: std::sync::Arc<taskmesh_store::NotifiedCache<auth::Caller>>,
    /// Proxies whose `X-Forwarded-For` names the client ([`access::client_addr`]).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The live streams served (a run's events, steps' logs followed), bounded.
    pub streams: std::sync::Arc<places::Places>,
    /// Reads waiting for a run's end, bounded per tenant (and in all, as [`Shared::run_ends`]).
    pub waiting_reads: std::sync::Arc<places::Places>,
    /// The highest last sequence the event log was seen at: a `Taskmesh-Min-Seq` at or below it
    /// is in the log, without asking.
    pub log_reached: std::sync::atomic::AtomicU64,
}

/// Most API keys one gateway keeps looked up.
pub const MAX_CACHED_KEYS: usize = 10_000;
/// Longest a looked-up key is trusted without looking again (revocations are announced sooner).
pub const CACHED_KEY_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Most reads of one gateway waiting for runs to end at once.
pub const MAX_WAITING_READS: usize = 10_000;
/// Most of them one tenant's, so one tenant cannot take them all.
pub const MAX_TENANT_WAITING_READS: usize = 1_000;

/// Cuts `rows` (fetched with `LIMIT limit + 1`) to one page and returns the cursor of the next
/// page, taken from the page's last row, when there is one.
pub fn cut_page<R, C>(rows: &mut Vec<R>, limit: i64, cursor: impl Fn(&R) -> C) -> Option<C> {
    if rows.len() as i64 <= limit {
        return None;
    }
    rows.truncate(limit as usize);
    rows.last().map(cursor)
}

/// The paging of a list whose other parameters are its path's: a page size and where the page
/// starts. Runs and the audit log have parameters of their own, filters too; failed deliveries
/// page by an integer cursor (`deliveries::FailedDeliveryParams`).
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(max_length = 256)]
    pub cursor: Option<String>,
}

/// A list's page as asked for: [`PageParams`] checked (a bad one is a `400`).
#[derive(Debug)]
pub struct Page {
    /// Rows a page holds; fetch one more, for [`cut_page`] to tell whether another follows.
    pub limit: i64,
    cursor: Option<String>,
}

impl Page {
    /// Where the page starts: the cursor read as the list's kind (an id, a version: a string
    /// that is not one is a `400`; a name list takes any name), or `None` for the first page.
    pub fn after<T: std::str::FromStr>(&self) -> Result<Option<T>, ApiError> {
        self.cursor.as_deref().map(|c| c.parse().map_err(|_| not_a_cursor())).transpose()
    }

    /// This page of one of `tenant`'s lists, and the next page's cursor (the last row's `key`)
    /// if another follows: `sql` selects the tenant's rows (`$1`) after the cursor (`$2`, a `T`;
    /// null on the first page) in the list's order, at most `$3`.
    pub async fn of_tenant<T>(
        &self,
        pool: &PgPool,
        sql: &'static str,
        tenant: &str,
        key: &str,
    ) -> Result<(Vec<sqlx::postgres::PgRow>, Option<T>), ApiError>
    where
        T: std::str::FromStr + sqlx::Type<sqlx::Postgres> + Send,
        T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + for<'r> sqlx::Decode<'r, sqlx::Postgres>,
    {
        self.fetch(pool, sqlx::query(sql).bind(tenant), key).await
    }

    /// This page of a list, and the next page's cursor (the last row's `key`) if another
    /// follows: `query`, with its own parameters bound, is given the cursor (a `T`; null on the
    /// first page) and then the most rows to fetch as its next two.
    pub async fn fetch<'q, T>(
        &self,
        pool: &PgPool,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        key: &str,
    ) -> Result<(Vec<sqlx::postgres::PgRow>, Option<T>), ApiError>
    where
        T: std::str::FromStr + sqlx::Type<sqlx::Postgres> + Send + 'q,
        T: sqlx::Encode<'q, sqlx::Postgres> + for<'r> sqlx::Decode<'r, sqlx::Postgres>,
    {
        use sqlx::Row;
        let mut rows = query.bind(self.after::<T>()?).bind(self.limit + 1).fetch_all(pool).await?;
        let next = cut_page(&mut rows, self.limit, |r| r.get::<T, _>(key));
        Ok((rows, next))
    }
}

fn not_a_cursor() -> ApiError {
    ApiError::new(ErrorCode::BadRequest, "cursor is not of this list's kind (a next_cursor it gave)")
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Page {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Query(params) = axum::extract::Query::<PageParams>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
        // Every cursor a list gives is short and printable; Postgres refuses a text with a NUL.
        if params.cursor.as_deref().is_some_and(|c| c.chars().count() > 256 || c.contains(char::is_control)) {
            return Err(not_a_cursor());
        }
        Ok(Page { limit: page_limit(params.limit)?, cursor: params.cursor })
    }
}

/// A page size from a `limit` parameter: 1 to 200, 50 by default.
pub fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::new(ErrorCode::BadRequest, "limit must be 1 to 200"));
    }
    Ok(limit)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Taskmesh API", version = "1", description = "Submit workflows, follow their runs, connect repositories and subscribe to notifications. Errors are RFC 9457 problem documents (application/problem+json) whose `type` is stable; see docs/api.md."),
    paths(runs::submit, runs::submit_batch, runs::list, runs::get_run, runs::cancel, runs::rerun, runs::resend_commit_status, logs::logs, live::run_events, workflows::store, workflows::get_one, workflows::list, workflows::versions, schedules::create, schedules::list, schedules::get_one, schedules::pause, schedules::resume, schedules::delete, schedules::update, schedules::trigger, schedules::backfill, secrets::set, secrets::list, secrets::delete, cache::purge, breakers::list, tenancy::create_tenant, tenancy::list_tenants, tenancy::create_key, tenancy::list_keys, tenancy::revoke_key, tenancy::whoami, audit::list, resources::create_repo_connection, resources::list_repo_connections, resources::update_repo_connection, resources::delete_repo_connection, resources::create_webhook_endpoint, resources::list_webhook_endpoints, resources::update_webhook_endpoint, resources::rotate_webhook_secret, resources::delete_webhook_endpoint, deliveries::list, deliveries::retry, deliveries::retry_all, deliveries::enable, executors::list, events::publish, healthz, readyz, metrics),
    components(schemas(taskmesh_events::Problem, taskmesh_events::FieldError, taskmesh_events::ErrorCode)),
    modifiers(&BearerAuth, &CommonResponses),
    tags((name = "runs", description = "Workflow runs"), (name = "integrations", description = "Forges and outbound webhooks"), (name = "workflows", description = "Stored, versioned workflow definitions"), (name = "schedules", description = "Cron schedules"), (name = "secrets", description = "Write-only secrets"), (name = "events", description = "CloudEvents that trigger stored workflows"), (name = "executors", description = "Live executors and queue depth per label set"), (name = "tenancy", description = "Tenants and API keys"), (name = "health", description = "Probes"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some("A Taskmesh API key")).build(),
            ),
        );
    }
}

/// Documents on every operation the answers any route may give, where its own annotation does
/// not: 304 on reads (see [`etags`]); 400 (a malformed parameter or header), 401, 403 (role or quota), 429 (rate limit,
/// with `Retry-After`) and 503 (a dependency unavailable) on authenticated routes, 404 where a
/// path names a resource, and 413 and 415 where there is a body.
struct CommonResponses;

impl utoipa::Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder, path::Operation};
        let retry_after = || {
            HeaderBuilder::new()
                .schema(utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::Type::Integer))
                .description(Some(
                    "Seconds to wait before retrying (1 unless a rate limit says otherwise; absent \
                     when the refusal lasts until the configuration changes)",
                ))
                .build()
        };
        let problem = |description: &str, code: ErrorCode| {
            let mut r = ResponseBuilder::new().description(description).content(
                "application/problem+json",
                ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build(),
            );
            if matches!(code, ErrorCode::RateLimited | ErrorCode::Unavailable) {
                r = r.header("Retry-After", retry_after());
            }
            RefOr::T(r.build())
        };
        let add = |op: &mut Operation, path: &str| {
            let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
            let mut wanted = vec![("400", "Malformed request", ErrorCode::BadRequest)];
            if secured {
                wanted.extend([
                    ("401", "No or bad API key", ErrorCode::Unauthorized),
                    ("403", "The key's role does not allow this, or a quota would be exceeded", ErrorCode::Forbidden),
                    ("429", "Rate limited; see Retry-After and the RateLimit headers", ErrorCode::RateLimited),
                    ("503", "A dependency is unavailable; retry", ErrorCode::Unavailable),
                ]);
            }
            if path.contains('{') {
                wanted.push(("404", "No such resource in the caller's tenant", ErrorCode::NotFound));
            }
            if op.request_body.is_some() {
                wanted.extend([
                    ("413", "The body is too large", ErrorCode::PayloadTooLarge),
                    ("415", "Unsupported content type", ErrorCode::UnsupportedMediaType),
                ]);
            }
            for (status, description, code) in wanted {
                op.responses.responses.entry(status.to_string()).or_insert_with(|| problem(description, code));
            }
            // A route's own 429 and 503 say when to retry too.
            for status in ["429", "503"] {
                if let Some(RefOr::T(r)) = op.responses.responses.get_mut(status) {
                    r.headers.entry("Retry-After".to_string()).or_insert_with(retry_after);
                }
            }
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            if let Some(get) = item.get.as_mut().filter(|_| path.starts_with("/v1/")) {
                get.responses.responses.entry("304".to_string()).or_insert_with(|| {
                    RefOr::T(
                        ResponseBuilder::new()
                            .description("Not modified: If-None-Match named the current ETag")
                            .build(),
                    )
                });
            }
            for op in
                [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten()
            {
                add(op, path);
            }
        }
    }
}

/// The OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Liveness: the process answers.
#[utoipa::path(get, operation_id = "healthz", path = "/healthz", tag = "health", responses((status = 200, description = "Alive")))]
pub async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

/// The process's Prometheus metrics (see operations.md, Metrics), without a key. Taskmesh's
/// HTTP servers answer it (`taskmesh_http::finish` adds the route) unless the operator turned
/// it off on this port (`TASKMESH_GATEWAY__METRICS=false`); this function only lists it in
/// the spec.
#[utoipa::path(get, operation_id = "metrics", path = "/metrics", tag = "health", responses(
    (status = 200, description = "The Prometheus text format, version 0.0.4", body = String, content_type = "text/plain"),
    (status = 404, description = "Not answered on this port", body = taskmesh_events::Problem, content_type = "application/problem+json")))]
#[allow(dead_code)]
fn metrics() {}

/// Readiness: Postgres and NATS answer.
#[utoipa::path(get, operation_id = "readyz", path = "/readyz", tag = "health", responses(
    (status = 200, description = "Ready"),
    (status = 503, body = taskmesh_events::Problem, content_type = "application/problem+json")))]
pub async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    sqlx::query("SELECT 1")
        .execute(&state.pool)
        .await
        .map_err(|_| ApiError::new(ErrorCode::Unavailable, "postgres does not answer"))?;
    if state.bus.client().connection_state() != async_nats::connection::State::Connected {
        return Err(ApiError::new(ErrorCode::Unavailable, "nats is not connected"));
    }
    Ok(Json(serde_json::json!({"status": "ready"})))
}

/// The header a client sends with a read to see at least its own write: the `seq` a write
/// answered. The read waits (up to [`READ_WAIT`]) until the read side has applied that event.
pub const MIN_SEQ_HEADER: &str = "taskmesh-min-seq";
/// The header a write answered `204 No Content` carries its event's sequence in (the `seq`
/// other writes answer in their body): send it back as [`MIN_SEQ_HEADER`] to read the write.
pub const SEQ_HEADER: &str = "taskmesh-seq";

/// A write's answer without a body: `204`, its event's sequence in [`SEQ_HEADER`].
pub struct Written(pub u64);

impl IntoResponse for Written {
    fn into_response(self) -> axum::response::Response {
        (axum::http::StatusCode::NO_CONTENT, [(SEQ_HEADER, self.0.to_string())]).into_response()
    }
}

/// Longest a read waits for the read side.
pub const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// How often a waiting read looks at the checkpoint table itself, between announcements.
const READ_RECHECK: std::time::Duration = std::time::Duration::from_millis(250);
/// How often a read waiting for the read side asks the log for its last sequence at most, while
/// the log does not answer.
const LOG_ASK_GAP: std::time::Duration = std::time::Duration::from_secs(1);

/// The `Last-Event-ID` a reconnecting Server-Sent Events client sends, as the gateway's
/// streams write their ids: a stream sequence, and for a run event that was not the last of
/// its commit, its part (`{seq}.{part}`).
pub fn last_event_id(headers: &axum::http::HeaderMap) -> Result<Option<(u64, Option<u32>)>, ApiError> {
    let Some(value) = headers.get("last-event-id") else { return Ok(None) };
    let bad = || ApiError::new(ErrorCode::BadRequest, "Last-Event-ID must be an event's id as this stream gave it");
    let text = value.to_str().map_err(|_| bad())?.trim();
    let (seq, part) = match text.split_once('.') {
        Some((seq, part)) => (seq, Some(part.parse::<u32>().map_err(|_| bad())?)),
        None => (text, None),
    };
    let seq = seq.parse::<u64>().map_err(|_| bad())?;
    if seq == 0 && part.is_some() {
        return Err(bad());
    }
    Ok(Some((seq, part)))
}

/// Whether an `If-None-Match` value names `tag` (weak comparison, as RFC 9110 asks for it).
pub fn etag_matches(if_none_match: &str, tag: &str) -> bool {
    if_none_match.split(',').any(|t| {
        let t = t.trim();
        t == "*" || t.trim_start_matches("W/") == tag.trim_start_matches("W/")
    })
}

/// A JSON answer tagged with the strong entity tag `"{version}"` (a resource's version: the
/// log sequence of its last event; none: untagged, and the weak tag of [`etags`] applies), or
/// `304 Not Modified` when the request's `If-None-Match` names that tag.
pub fn versioned<T: serde::Serialize>(
    headers: &axum::http::HeaderMap,
    version: Option<u64>,
    body: T,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    let Some(version) = version else { return axum::Json(body).into_response() };
    let if_none_match = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok());
    if !if_none_match.is_some_and(|v| etag_matches(v, &format!("\"{version}\""))) {
        return changed(version, body);
    }
    let mut res = StatusCode::NOT_MODIFIED.into_response();
    res.headers_mut().insert(header::ETAG, version_tag(version));
    res
}

/// `body` with a versioned resource's version as its strong `ETag`: the answer to a read of it,
/// or to a change of it (the version after the change, for the next one's `If-Match`).
pub fn changed<T: serde::Serialize>(version: u64, body: T) -> axum::response::Response {
    let mut res = axum::Json(body).into_response();
    res.headers_mut().insert(axum::http::header::ETAG, version_tag(version));
    res
}

/// A read-model row's `version` (the log sequence of its resource's last event); none for a row
/// projected before versions were kept.
pub fn row_version(row: &sqlx::postgres::PgRow) -> Option<u64> {
    use sqlx::Row;
    row.get::<Option<i64>, _>("version").and_then(|v| u64::try_from(v).ok())
}

/// A version as a strong entity tag: `"1234"`.
fn version_tag(version: u64) -> axum::http::HeaderValue {
    axum::http::HeaderValue::from_str(&format!("\"{version}\"")).expect("ascii")
}

/// The versions a change is conditional on, from its `If-Match` header (RFC 9110): `None`
/// without one, or for `*` (any version: the resource exists, which a change needs anyway);
/// else the strong tags `"{version}"` it lists. A weak tag (`W/"…"`) or any other never matches
/// a version, so adds none: a header of only such tags lets nothing through.
pub fn if_match(headers: &axum::http::HeaderMap) -> Result<Option<Vec<u64>>, ApiError> {
    let mut lines = headers.get_all(axum::http::header::IF_MATCH).iter().peekable();
    if lines.peek().is_none() {
        return Ok(None);
    }
    let mut versions = Vec::new();
    for line in lines {
        let line = line.to_str().map_err(|_| ApiError::new(ErrorCode::BadRequest, "If-Match is not ASCII"))?;
        for tag in line.split(',').map(str::trim) {
            if tag == "*" {
                return Ok(None);
            }
            // Compared as the tags are written (strong comparison): digits only, as a version's
            // tag has them, so `"05"` or `"+5"` names no version.
            let digits = tag.strip_prefix('"').and_then(|t| t.strip_suffix('"'));
            if let Some(version) = digits.and_then(|t| t.parse::<u64>().ok().filter(|v| v.to_string() == t)) {
                versions.push(version);
            }
        }
    }
    Ok(Some(versions))
}

/// Largest JSON answer given an entity tag (bigger ones are streamed through untouched).
const ETAG_MAX_BYTES: usize = 4 * 1024 * 1024;

/// Entity tags on reads: a `GET` answered 200 with JSON and no `ETag` of its own gets a weak
/// one, a hash of the body, and a request whose `If-None-Match` names it is answered
/// `304 Not Modified` without the body. (`GET /v1/runs/{id}` and `GET /v1/schedules/{id}` set
/// their own, strong: the resource's version; see [`versioned`].)
async fn etags(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::http::{Method, StatusCode, header};
    if req.method() != Method::GET {
        return next.run(req).await;
    }
    let if_none_match = req.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let res = next.run(req).await;
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if res.status() != StatusCode::OK || !is_json || res.headers().contains_key(header::ETAG) {
        return res;
    }
    use http_body::Body as _;
    let size = res.body().size_hint().upper();
    if size.is_none_or(|n| n > ETAG_MAX_BYTES as u64) {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, ETAG_MAX_BYTES).await else {
        return ApiError::new(ErrorCode::Internal, "the answer could not be read").into_response();
    };
    let digest = hmac_sha256::Hash::hash(&bytes);
    let tag = format!("W/\"{}\"", hex::encode(&digest[..12]));
    let value = axum::http::HeaderValue::from_str(&tag).expect("ascii");
    let matches = if_none_match.is_some_and(|v| etag_matches(&v, &tag));
    parts.headers.insert(header::ETAG, value);
    if matches {
        parts.status = StatusCode::NOT_MODIFIED;
        parts.headers.remove(header::CONTENT_TYPE);
        parts.headers.remove(header::CONTENT_LENGTH);
        return axum::response::Response::from_parts(parts, axum::body::Body::empty());
    }
    axum::response::Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// Read-your-writes: holds a request carrying [`MIN_SEQ_HEADER`] until the projection has
/// caught up with that sequence; answers 503 if it does not within [`READ_WAIT`].
async fn read_your_writes(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    // Only for callers with a key: waiting costs the server, and the answer names a sequence.
    if req.extensions().get::<auth::Caller>().is_none() {
        return next.run(req).await;
    }
    let wanted = req.headers().get(MIN_SEQ_HEADER).map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()));
    match wanted {
        None => {}
        Some(None) => {
            return ApiError::new(ErrorCode::BadRequest, "Taskmesh-Min-Seq must be a sequence number").into_response();
        }
        Some(Some(seq)) => {
            if let Err(refused) = wait_until_projected(&state, seq).await {
                return refused.into_response();
            }
        }
    }
    next.run(req).await
}

/// What woke a read waiting for the read side.
enum Woke {
    /// An announcement, or the wait's end.
    Nothing,
    /// The checkpoint table, read (or why not).
    Table(Result<u64, String>),
    /// The log's last sequence, if the stream answered.
    Log(Option<u64>),
}

/// Waits until the read side has applied `seq` ([`MIN_SEQ_HEADER`]): `400` for a sequence
/// beyond the log, `503` if the read side is not there within [`READ_WAIT`].
///
/// Woken by the projector's commits (LISTEN/NOTIFY). The table is read every [`READ_RECHECK`]
/// (on a clock of its own, which the commits heard meanwhile do not put off) in case
/// announcements stop coming through, and at once only while none can be heard (the
/// checkpoint heard reads 0 while the listener is down): a read the projector catches up with
/// soon, as most are, costs no query. Once the table is found behind, the log is asked for its
/// last sequence, beside the wait, until it answers: at most once every [`LOG_ASK_GAP`], and
/// not for a sequence at or below the highest the log was seen at.
async fn wait_until_projected(state: &AppState, seq: u64) -> Result<(), ApiError> {
    use std::sync::atomic::Ordering::Relaxed;
    let start = tokio::time::Instant::now();
    let deadline = start + READ_WAIT;
    let mut projected = state.projected.clone();
    let mut recheck = tokio::time::interval_at(start + READ_RECHECK, READ_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether the table was read, when the log may be asked next, and the question under way
    // (once the log is seen to hold `seq`, `log_reached` says so).
    let (mut looked, mut next_ask) = (false, start);
    let mut asking: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Option<u64>> + Send + '_>>> = None;
    // The table, read within what is left of the wait and a recheck more: Postgres slower than
    // that gets the read a 503, as a table that cannot be read does.
    let read_table = || async {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now()) + READ_RECHECK;
        match tokio::time::timeout(left, taskmesh_store::read_checkpoint(&state.pool, "projector")).await {
            Ok(read) => read.map_err(|e| e.to_string()),
            Err(_) => Err("postgres did not answer in time".to_string()),
        }
    };
    loop {
        let heard = *projected.borrow_and_update();
        if heard >= seq {
            return Ok(());
        }
        let woke = if (heard == 0 && !looked) || tokio::time::Instant::now() >= deadline {
            Woke::Table(read_table().await)
        } else {
            tokio::select! {
                // (Should the announcer be gone, only the rechecks are left.)
                Ok(()) = projected.changed() => Woke::Nothing,
                _ = recheck.tick() => Woke::Table(read_table().await),
                last = async { asking.as_mut().expect("asking").await }, if asking.is_some() => Woke::Log(last),
                _ = tokio::time::sleep_until(deadline) => Woke::Nothing,
            }
        };
        match woke {
            Woke::Nothing => {}
            Woke::Log(last) => {
                asking = None;
                match last {
                    // A sequence the log has not reached yet is never going to be read.
                    Some(last) if seq > last => {
                        return Err(ApiError::new(
                            ErrorCode::BadRequest,
                            format!("Taskmesh-Min-Seq {seq} is beyond the log's last sequence"),
                        ));
                    }
                    Some(last) => {
                        state.log_reached.fetch_max(last, Relaxed);
                    }
                    None => {}
                }
            }
            Woke::Table(Ok(applied)) if applied >= seq => return Ok(()),
            Woke::Table(Ok(applied)) => {
                looked = true;
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Err(ApiError::new(
                        ErrorCode::Unavailable,
                        format!("the read side is at sequence {applied}, not yet {seq}; retry"),
                    ));
                }
                let in_log = seq <= state.log_reached.load(Relaxed);
                if !in_log && asking.is_none() && now >= next_ask {
                    next_ask = now + LOG_ASK_GAP;
                    asking = Some(Box::pin(last_written(state)));
                }
            }
            Woke::Table(Err(e)) => {
                tracing::warn!(error = %e, "reading the projection checkpoint");
                return Err(ApiError::new(ErrorCode::Unavailable, "the read side is unavailable; retry"));
            }
        }
    }
}

/// The event log's last sequence, if the stream answers.
async fn last_written(state: &AppState) -> Option<u64> {
    log_state(state).await.map(|s| s.last_sequence)
}

/// The event log's first and last sequences, if the stream answers (one request: getting the
/// stream fetches its info).
pub(crate) async fn log_state(state: &AppState) -> Option<async_nats::jetstream::stream::State> {
    let stream = state.bus.jetstream().get_stream(state.bus.namespace().events_stream()).await.ok()?;
    Some(stream.cached_info().state.clone())
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

/// The gateway's routes, separate from serving so tests can call them directly.
/// `body` answered with `status` and a `Location` of `path` under the gateway's public URL:
/// where what the request created (or accepted) can be read.
pub(crate) fn located(
    state: &AppState,
    status: axum::http::StatusCode,
    body: impl axum::response::IntoResponse,
    path: &str,
) -> axum::response::Response {
    let mut res = (status, body).into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("{}{path}", state.public_url)) {
        res.headers_mut().insert(axum::http::header::LOCATION, v);
    }
    res
}

pub fn router(state: AppState, body_limit: usize, metrics: bool) -> axum::Router {
    let router = axum::Router::new()
        .merge(runs::routes())
        .merge(logs::routes())
        .merge(live::routes())
        .merge(resources::routes())
        .merge(deliveries::routes())
        .merge(workflows::routes())
        .merge(schedules::routes())
        .merge(secrets::routes())
        .merge(cache::routes())
        .merge(breakers::routes())
        .merge(executors::routes())
        .merge(events::routes())
        .merge(tenancy::routes())
        .merge(audit::routes())
        .merge(ui::routes())
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // The spec at /openapi.json and interactive docs at /docs, their assets embedded in the
        // binary (no CDN): they work offline.
        .merge(utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", openapi()))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(etags))
        .layer(axum::middleware::from_fn_with_state(state.clone(), read_your_writes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), access::middleware))
        .layer(DefaultBodyLimit::max(body_limit));
    taskmesh_http::finish(router.with_state(state), metrics)
}

/// Binds the gateway (port 0 picks a free port) and builds its router.
pub async fn build(
    settings: &HttpSettings,
    pool: PgPool,
    bus: Bus,
    keyring: Option<std::sync::Arc<taskmesh_secrets::Keyring>>,
    limits: taskmesh_config::LimitsSettings,
) -> anyhow::Result<Server> {
    let access = std::sync::Arc::new(access::Access::new(limits));
    tokio::spawn(access::count_gateways(bus.clone(), std::sync::Arc::downgrade(&access)));
    let public_url = settings.public_url.clone();
    Server::bind_with(settings.listen, |addr| {
        let public_url = public_url.unwrap_or_else(|| format!("http://{addr}"));
        let admin_key = settings.admin_key.clone();
        let run_ends = taskmesh_store::RunEnds::new(MAX_WAITING_READS);
        let keys = taskmesh_store::NotifiedCache::new(MAX_CACHED_KEYS, CACHED_KEY_TTL);
        let projected = taskmesh_store::follow_checkpoint(&pool, "projector", run_ends.clone(), keys.clone());
        let state = AppState(std::sync::Arc::new(Shared {
            pool,
            ingest: IngestClient::new(bus.clone()),
            audit: audit::AuditWriter::start(IngestClient::new(bus.clone())),
            bus,
            public_url,
            keyring,
            admin_key,
            access,
            projected,
            run_ends,
            keys,
            trusted_proxies: settings.trusted_proxies.clone(),
            streams: places::Places::new("live streams", logs::MAX_STREAMS, logs::MAX_TENANT_STREAMS),
            waiting_reads: places::Places::new(
                "reads waiting for runs to end",
                MAX_WAITING_READS,
                MAX_TENANT_WAITING_READS,
            ),
            log_reached: Default::default(),
        }));
        router(state, settings.body_limit_bytes, settings.metrics)
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// `docs/openapi.json` is what the gateway serves; regenerate with
    /// `TASKMESH_BLESS=1 cargo test -p taskmesh-gateway openapi`.
    #[test]
    fn openapi_document_in_docs_is_up_to_date() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let mut current = serde_json::to_string_pretty(&super::openapi()).unwrap();
        current.push('\n');
        if std::env::var_os("TASKMESH_BLESS").is_some() {
            std::fs::write(&path, &current).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == current,
            "docs/openapi.json is stale: regenerate with TASKMESH_BLESS=1 cargo test -p taskmesh-gateway openapi"
        );
    }

    #[test]
    fn if_match_takes_strong_version_tags_as_written_and_star_as_any() {
        let parse = |lines: &[&str]| {
            let mut headers = axum::http::HeaderMap::new();
            for line in lines {
                headers.append(axum::http::header::IF_MATCH, line.parse().unwrap());
            }
            super::if_match(&headers).unwrap()
        };
        assert_eq!(parse(&[]), None, "unconditional");
        assert_eq!(parse(&["\"12\""]), Some(vec![12]));
        assert_eq!(
            parse(&["\"12\", W/\"13\"", "\"14\""]),
            Some(vec![12, 14]),
            "a list, over two lines; weak tags never match"
        );
        assert_eq!(parse(&["\"012\", \"+12\", \"x\", 12"]), Some(vec![]), "no tag names a version as it is written");
        assert_eq!(parse(&["\"12\", *"]), None, "any");
    }
}
