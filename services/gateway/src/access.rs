//! Who calls, how often, and what they changed. One middleware in front of every route:
//!
//! - **Authentication.** A bearer key is looked up by its SHA-256; the [`Caller`] it belongs to
//!   goes into the request's extensions, where the [`Caller`] extractor finds it. A request
//!   without a tenant key passes through untouched, so the routes that need one answer 401.
//! - **Rate limits.** Two token buckets (GCRA, from `governor`) per request: the tenant's, shared
//!   by all its keys, and the key's own, sized from [`LimitsSettings`]. A request either bucket
//!   refuses is answered `429 rate-limited` with `Retry-After`; every answer carries
//!   `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` and `RateLimit-Policy` for the
//!   tighter bucket. Buckets live in this process: with N gateway replicas behind a balancer a
//!   tenant gets up to N times its rate.
//! - **Unknown keys.** Requests whose key does not exist cost a lookup each, so they are limited
//!   per client address ([`LimitsSettings::failed_auth_per_second`]): past the limit, that
//!   address's requests with keys this gateway has not looked up before are answered `429
//!   rate-limited` (scope `address`) without a lookup until the bucket has room again. Keys in
//!   the key cache still pass, so a flood of made-up keys does not lock out known ones.
//! - **Payload quota.** A body longer than the tenant's `max_payload_bytes` is a 413.
//! - **Last used.** A key's use is recorded as an `ApiKeyUsed` event at most once a minute per
//!   key and replica, off the request's path.
//! - **Audit.** Every mutating call (POST, PUT, PATCH, DELETE) by a tenant key is recorded as an
//!   audit record (key, method, path, route, status, client address, user agent), whatever its
//!   outcome, before the answer leaves ([`crate::audit::AuditWriter`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultDirectRateLimiter, Quota};
use sqlx::Row;
use taskmesh_config::LimitsSettings;
use taskmesh_events::command::TouchApiKey;
use taskmesh_events::{AuditRecorded, ErrorCode, Role};
use taskmesh_http::ApiError;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;

/// One token bucket and the quota it was built with.
struct Bucket {
    limiter: DefaultDirectRateLimiter<StateInformationMiddleware>,
    rate: u32,
    burst: u32,
}

/// Buckets and last-used marks. Entries exist only for keys that authenticated, and for client
/// addresses that sent keys that did not; each map is emptied when it outgrows [`MAX_ENTRIES`]
/// (buckets then start full again).
pub struct Access {
    limits: LimitsSettings,
    tenants: Mutex<HashMap<String, Arc<Bucket>>>,
    keys: Mutex<HashMap<Uuid, Arc<Bucket>>>,
    touched: Mutex<HashMap<Uuid, Instant>>,
    /// Per client address: its bucket of failed authentications, and until when it is
    /// refused for having emptied it.
    failures: Mutex<HashMap<IpAddr, Arc<Bucket>>>,
    refused: Mutex<HashMap<IpAddr, (Instant, Headroom)>>,
    /// Per tenant: the room under the active-runs quota as last counted, when, and how many
    /// runs were let through on that count since.
    room: Mutex<HashMap<String, (Instant, i64, i64)>>,
    /// The gateways sharing the limits, this one included, as last counted ([`count_gateways`]).
    gateways: AtomicU32,
}

/// A gateway's share of a limit (`per_gateway`) when `gateways` share it: a rate or a burst
/// divided among them, rounded up, at least 1; 0 (no limit) stays 0.
fn share(limit: u32, gateways: u32) -> u32 {
    if limit == 0 { 0 } else { limit.div_ceil(gateways.max(1)).max(1) }
}

/// The next answer to a count under way (none: the count's subscription ended).
async fn next_answer(
    counting: &mut Option<(async_nats::Subscriber, tokio::time::Instant, u32)>,
) -> Option<async_nats::Message> {
    futures::StreamExt::next(&mut counting.as_mut()?.0).await
}

/// Records a finished count; false once the gateway is gone. A count may only flap so far: one
/// with no answer at all failed (a gateway answers itself) and changes nothing, and a lower
/// count takes effect only when the next count is lower too (the higher of the two), since
/// each change refills the buckets.
fn settle(
    access: &std::sync::Weak<Access>,
    count: Option<(async_nats::Subscriber, tokio::time::Instant, u32)>,
    lower: &mut Option<u32>,
) -> bool {
    let Some(access) = access.upgrade() else { return false };
    if let Some((_, _, counted)) = count {
        access.gateways.store(next_count(access.gateways(), counted, lower), Ordering::Relaxed);
    }
    true
}

/// The count of gateways to take after one that found `counted`, where it was `now`, with a
/// lower count waiting in `lower` (see [`settle`]).
fn next_count(now: u32, counted: u32, lower: &mut Option<u32>) -> u32 {
    if counted == 0 {
        now
    } else if counted >= now {
        *lower = None;
        counted
    } else if let Some(before) = lower.take() {
        counted.max(before)
    } else {
        *lower = Some(counted);
        now
    }
}

/// How often a gateway counts the gateways of its namespace.
const COUNT_EVERY: Duration = Duration::from_secs(5);
/// How long a count waits for answers.
const COUNT_WAIT: Duration = Duration::from_millis(250);
/// Most answers a count reads.
const MAX_GATEWAYS: u32 = 10_000;

/// Answers other gateways' counts, and counts the gateways of the namespace every
/// [`COUNT_EVERY`] (a request on `{ns}.ctl.gateways` every gateway answers), so that each takes
/// its share of the rate limits. Ends once `access` is dropped.
pub async fn count_gateways(bus: taskmesh_bus::Bus, access: std::sync::Weak<Access>) {
    let client = bus.client().clone();
    let subject = bus.namespace().gateway_pings();
    let mut pings = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot answer other gateways: each will count itself alone");
            return;
        }
    };
    let mut every = tokio::time::interval(COUNT_EVERY);
    // The answers of a count under way, until when to wait for them, and how many came.
    let mut counting: Option<(async_nats::Subscriber, tokio::time::Instant, u32)> = None;
    // A lower count waiting for the next to confirm it.
    let mut lower: Option<u32> = None;
    loop {
        let until = counting.as_ref().map(|c| c.1);
        // In this order: answers already here count before the count's time is up.
        tokio::select! {
            biased;
            ping = futures::StreamExt::next(&mut pings) => {
                let Some(ping) = ping else { return };
                if let Some(reply) = ping.reply {
                    let _ = client.publish(reply, bytes::Bytes::new()).await;
                }
            }
            answer = next_answer(&mut counting), if counting.is_some() => {
                let more = match (answer, counting.as_mut()) {
                    (Some(_), Some(c)) => {
                        c.2 += 1;
                        c.2 < MAX_GATEWAYS
                    }
                    _ => false,
                };
                if !more && !settle(&access, counting.take(), &mut lower) {
                    return;
                }
            }
            _ = tokio::time::sleep_until(until.unwrap_or_else(tokio::time::Instant::now)), if until.is_some() => {
                if !settle(&access, counting.take(), &mut lower) {
                    return;
                }
            }
            _ = every.tick(), if counting.is_none() => {
                if access.strong_count() == 0 {
                    return;
                }
                let inbox = client.new_inbox();
                let Ok(answers) = client.subscribe(inbox.clone()).await else { continue };
                if client.publish_with_reply(subject.clone(), inbox, bytes::Bytes::new()).await.is_ok() {
                    counting = Some((answers, tokio::time::Instant::now() + COUNT_WAIT, 0));
                }
            }
        }
    }
}

/// How long a count of a tenant's active runs is relied on.
const ROOM_FOR: Duration = Duration::from_secs(1);
/// A count is relied on only while it leaves at least this much room: near the quota every
/// submission counts afresh.
const ROOM_MARGIN: i64 = 100;

const MAX_ENTRIES: usize = 100_000;
/// How often a key's use is recorded, at most.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// What a bucket says of a request.
#[derive(Debug, Clone, Copy)]
struct Headroom {
    /// `key` or `tenant`.
    scope: &'static str,
    /// The bucket's size.
    limit: u32,
    /// Requests left in it after this one.
    remaining: u32,
    /// Its refill rate per second.
    rate: u32,
    /// How long until a refused caller may try again (zero when allowed).
    retry_after: Duration,
}

impl Headroom {
    /// Seconds until the bucket is full again (RateLimit-Reset), or until a refused caller
    /// may retry.
    fn reset_secs(&self) -> u64 {
        if self.retry_after > Duration::ZERO {
            return self.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        }
        let missing = f64::from(self.limit.saturating_sub(self.remaining));
        (missing / f64::from(self.rate.max(1))).ceil() as u64
    }

    fn write(&self, headers: &mut HeaderMap) {
        let mut put = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        };
        put("ratelimit-limit", self.limit.to_string());
        put("ratelimit-remaining", self.remaining.to_string());
        put("ratelimit-reset", self.reset_secs().to_string());
        let window = (f64::from(self.limit) / f64::from(self.rate.max(1))).ceil() as u64;
        put("ratelimit-policy", format!("{};w={window};scope={}", self.limit, self.scope));
    }
}

impl Access {
    pub fn new(limits: LimitsSettings) -> Self {
        Self {
            limits,
            tenants: Default::default(),
            keys: Default::default(),
            touched: Default::default(),
            failures: Default::default(),
            refused: Default::default(),
            room: Default::default(),
            gateways: AtomicU32::new(1),
        }
    }

    /// The gateways sharing the limits, this one included, as last counted.
    pub fn gateways(&self) -> u32 {
        self.gateways.load(Ordering::Relaxed)
    }

    /// Whether `addr` is refused for now for its failed authentications: the headroom to
    /// answer it with.
    fn refusing(&self, addr: IpAddr) -> Option<Headroom> {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let (until, mut h) = *refused.get(&addr)?;
        let now = Instant::now();
        if now >= until {
            refused.remove(&addr);
            return None;
        }
        h.retry_after = until - now;
        Some(h)
    }

    /// Records a failed authentication from `addr`: the headroom to refuse it with when this
    /// one empties its bucket.
    fn failed(&self, addr: IpAddr) -> Option<Headroom> {
        let (l, n) = (&self.limits, self.gateways());
        let b = Self::bucket(&self.failures, &addr, share(l.failed_auth_per_second, n), share(l.failed_auth_burst, n))?;
        let Err(h) = take(&b, "address") else { return None };
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if refused.len() >= MAX_ENTRIES {
            let now = Instant::now();
            refused.retain(|_, (until, _)| *until > now);
            if refused.len() >= MAX_ENTRIES {
                // Bounded like the buckets: when full of live refusals, start over.
                refused.clear();
            }
        }
        refused.insert(addr, (Instant::now() + h.retry_after, h));
        Some(h)
    }

    /// Lets `runs` more runs through on a recent count of the tenant's active runs, if that
    /// count (less the runs let through on it since, and these) still leaves ample room.
    /// Conservative: runs that ended since the count only add room, so this never lets through
    /// more than a fresh count would.
    pub(crate) fn take_counted_room(&self, tenant: &str, runs: i64) -> bool {
        let mut room = self.room.lock().unwrap_or_else(|p| p.into_inner());
        match room.get_mut(tenant) {
            Some((at, left, taken)) if at.elapsed() < ROOM_FOR && *left - *taken - runs >= ROOM_MARGIN => {
                *taken += runs;
                true
            }
            _ => false,
        }
    }

    /// Records a fresh count's room, `runs` (those it was counted for) already let through.
    /// Runs let through in the last moment may not be in the read model yet, so while the
    /// previous count is still relied on, what was let through on it carries over: several
    /// requests that counted at once cannot each spend the same room.
    pub(crate) fn counted_room(&self, tenant: &str, left: i64, runs: i64) {
        let mut room = self.room.lock().unwrap_or_else(|p| p.into_inner());
        if room.len() >= MAX_ENTRIES {
            room.clear();
        }
        let entry = match room.get(tenant) {
            Some(&(at, _, taken)) if at.elapsed() < ROOM_FOR => (at, left, taken + runs),
            _ => (Instant::now(), left, runs),
        };
        room.insert(tenant.to_string(), entry);
    }

    pub fn limits(&self) -> &LimitsSettings {
        &self.limits
    }

    fn bucket<K: std::hash::Hash + Eq + Clone>(
        map: &Mutex<HashMap<K, Arc<Bucket>>>,
        key: &K,
        rate: u32,
        burst: u32,
    ) -> Option<Arc<Bucket>> {
        let nz_rate = NonZeroU32::new(rate)?;
        let nz_burst = NonZeroU32::new(burst).unwrap_or(nz_rate);
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ENTRIES && !map.contains_key(key) {
            map.clear();
        }
        let new = || {
            let quota = Quota::per_second(nz_rate).allow_burst(nz_burst);
            Arc::new(Bucket {
                limiter: DefaultDirectRateLimiter::direct(quota).with_middleware(),
                rate,
                burst: nz_burst.get(),
            })
        };
        let bucket = map.entry(key.clone()).or_insert_with(new);
        // The quota changes when the count of gateways does: the bucket starts afresh (full).
        if bucket.rate != rate || bucket.burst != nz_burst.get() {
            *bucket = new();
        }
        Some(bucket.clone())
    }

    /// Takes a token from the key's and the tenant's bucket. `Ok` carries the tighter bucket's
    /// headroom (none when neither is limited), `Err` the refusing one's.
    fn check(&self, caller: &Caller) -> Result<Option<Headroom>, Headroom> {
        let t = caller.tenant.as_str();
        let (l, n) = (&self.limits, self.gateways());
        // Each of the gateways takes its share: together they allow the limits.
        let (key_rate, key_burst) = (share(l.key_requests_per_second(t), n), share(l.key_request_burst(t), n));
        let (rate, burst) = (share(l.requests_per_second(t), n), share(l.request_burst(t), n));
        let buckets = [
            ("key", Self::bucket(&self.keys, &caller.key_id, key_rate, key_burst)),
            ("tenant", Self::bucket(&self.tenants, &caller.tenant, rate, burst)),
        ];
        let mut tightest: Option<Headroom> = None;
        for (scope, bucket) in buckets {
            let Some(b) = bucket else { continue };
            let h = take(&b, scope)?;
            if tightest.is_none_or(|t| h.remaining < t.remaining) {
                tightest = Some(h);
            }
        }
        Ok(tightest)
    }

    /// True when the key's use should be recorded now.
    fn should_touch(&self, key_id: Uuid) -> bool {
        let now = Instant::now();
        let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        if touched.len() >= MAX_ENTRIES {
            touched.retain(|_, at| now.duration_since(*at) < TOUCH_EVERY);
        }
        match touched.get(&key_id) {
            Some(at) if now.duration_since(*at) < TOUCH_EVERY => false,
            _ => {
                touched.insert(key_id, now);
                true
            }
        }
    }
}

/// Takes a token from `b`: its headroom after, or (`Err`) when a refused caller may retry.
fn take(b: &Bucket, scope: &'static str) -> Result<Headroom, Headroom> {
    let mut h = Headroom { scope, limit: b.burst, remaining: 0, rate: b.rate, retry_after: Duration::ZERO };
    match b.limiter.check() {
        Ok(state) => {
            h.remaining = state.remaining_burst_capacity();
            Ok(h)
        }
        Err(not_until) => {
            let now = governor::clock::Clock::now(&governor::clock::DefaultClock::default());
            h.retry_after = not_until.wait_time_from(now).max(Duration::from_millis(1));
            Err(h)
        }
    }
}

/// Looks up the tenant key a request from `peer` carries, if any. A key that is not known
/// counts against the address's failed authentications; `Err` is the answer to give instead.
async fn lookup(state: &AppState, headers: &HeaderMap, peer: Option<IpAddr>) -> Result<Option<Caller>, Response> {
    let Some(key) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
    else {
        return Ok(None);
    };
    // The platform administrator's key is no tenant's: not looked up, and not a failed
    // authentication (its calls are not limited).
    if crate::tenancy::is_admin_key(state, key) {
        return Ok(None);
    }
    let hash = taskmesh_ingest::hash_api_key(key);
    let ticket = match state.keys.get(&hash) {
        Ok(caller) => return Ok(Some(caller)),
        Err(ticket) => ticket,
    };
    if let Some(h) = peer.and_then(|p| state.access.refusing(p)) {
        return Err(too_many(h));
    }
    let row =
        sqlx::query("SELECT id, tenant_id, role, prefix FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL")
            .bind(&hash)
            .fetch_optional(&state.pool)
            .await
            .map_err(|e| ApiError::from(e).into_response())?;
    let caller = row.and_then(|row| {
        let role: String = row.get("role");
        Some(Caller {
            tenant: row.get("tenant_id"),
            key_id: row.get("id"),
            role: Role::parse(&role)?,
            prefix: row.get("prefix"),
        })
    });
    // Only keys that exist are kept: one created a moment ago must work once it is projected.
    match &caller {
        Some(caller) => state.keys.keep(ticket, &hash, caller.clone()),
        None => {
            if let Some(h) = peer.and_then(|p| state.access.failed(p)) {
                return Err(too_many(h));
            }
        }
    }
    Ok(caller)
}

fn too_many(h: Headroom) -> Response {
    let secs = h.reset_secs();
    let detail = match h.scope {
        "address" => format!(
            "too many requests with unknown API keys from this address ({}/s, burst {}); retry in {secs} s",
            h.rate, h.limit
        ),
        scope => format!("the {scope}'s rate limit is {}/s (burst {}); retry in {secs} s", h.rate, h.limit),
    };
    let mut res = ApiError::new(ErrorCode::RateLimited, detail).into_response();
    h.write(res.headers_mut());
    res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    res
}

/// The middleware: authenticate, limit, record.
pub async fn middleware(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| client_addr(c.0.ip(), req.headers(), &state.trusted_proxies));
    let caller = match lookup(&state, req.headers(), peer).await {
        Ok(Some(c)) => c,
        Ok(None) => return next.run(req).await,
        Err(answer) => return answer,
    };
    let headroom = match state.access.check(&caller) {
        Ok(h) => h,
        Err(h) => return too_many(h),
    };
    let max_body = state.access.limits.max_payload_bytes(&caller.tenant);
    let length =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if max_body > 0 {
        if length.is_some_and(|l| l > u64::from(max_body)) {
            return ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("this tenant's requests carry at most {max_body} bytes"),
            )
            .into_response();
        }
        // A body without a length (chunked) is cut off at the quota as it is read: a 413.
        req = req.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, max_body as usize)));
    }
    if state.access.should_touch(caller.key_id) {
        let ingest = state.ingest.clone();
        let cmd = TouchApiKey { tenant: caller.tenant.clone(), key_id: caller.key_id, at: chrono::Utc::now() };
        tokio::spawn(async move {
            if let Err(e) = ingest.touch_api_key(&cmd).await {
                tracing::debug!(error = %e, "recording a key's use");
            }
        });
    }
    let audited = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH | Method::DELETE);
    let record = audited.then(|| AuditRecorded {
        key_id: Some(caller.key_id),
        actor: format!("key:{}", caller.prefix),
        method: req.method().to_string(),
        // Cut again, by bytes, when it is queued (`AuditRecorded::clip`).
        path: req.uri().path().chars().take(AuditRecorded::MAX_PATH).collect(),
        route: req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()),
        status: 0,
        ip: peer.map(|p| p.to_string()),
        user_agent: user_agent(req.headers()),
        at: chrono::Utc::now(),
    });
    let tenant = caller.tenant.clone();
    req.extensions_mut().insert(caller);
    let mut res = next.run(req).await;
    if let Some(h) = headroom {
        h.write(res.headers_mut());
    }
    if let Some(mut record) = record {
        record.status = res.status().as_u16();
        // On its own task: a client that hangs up now does not cancel the record.
        let _ = tokio::spawn(async move { state.audit.record(&tenant, record).await }).await;
    }
    res
}

/// The address a request from `peer` came from: `peer` itself, unless it is one of the
/// `trusted` proxies; then the last address in `X-Forwarded-For` (each proxy appends the one it
/// heard from) that is not a trusted proxy. An entry that is not an address ends the search at
/// the proxy that wrote it, so a client cannot pass for another by writing the header itself:
/// only what trusted proxies appended is read.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    // `::ffff:10.0.0.2` (a peer of a gateway listening on `[::]`) is 10.0.0.2.
    let is_trusted = |a: &IpAddr| trusted.iter().any(|n| n.contains(a));
    let mut addr = peer.to_canonical();
    if !is_trusted(&addr) {
        return addr;
    }
    // Several header lines read as one list, in order.
    let lines: Vec<&HeaderValue> = headers.get_all("x-forwarded-for").iter().collect();
    for line in lines.into_iter().rev() {
        let Ok(line) = line.to_str() else { return addr };
        for entry in line.rsplit(',') {
            let entry = entry.trim();
            let parsed = entry.parse::<IpAddr>().or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip()));
            let Ok(hop) = parsed else { return addr };
            addr = hop.to_canonical();
            if !is_trusted(&addr) {
                return addr;
            }
        }
    }
    addr
}

/// The caller's `User-Agent`, as much of it as the audit log keeps.
pub fn user_agent(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|u| u.chars().take(AuditRecorded::MAX_USER_AGENT).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_the_last_forwarded_address_that_is_not_a_trusted_proxy() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let forwarded = |lines: &[&str]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append("x-forwarded-for", HeaderValue::from_str(l).unwrap());
            }
            h
        };
        let from = |peer: &str, lines: &[&str]| client_addr(ip(peer), &forwarded(lines), &trusted);
        // A peer that is no trusted proxy is the client, whatever it writes.
        assert_eq!(from("203.0.113.9", &["198.51.100.1"]), ip("203.0.113.9"));
        // Through one proxy, and through a chain of them (the client's own entries ignored).
        assert_eq!(from("10.0.0.2", &["198.51.100.1"]), ip("198.51.100.1"));
        assert_eq!(from("10.0.0.2", &["6.6.6.6, 198.51.100.1, 10.1.1.1"]), ip("198.51.100.1"));
        assert_eq!(from("10.0.0.2", &["6.6.6.6", "198.51.100.1:4711", "fd00::1"]), ip("198.51.100.1"));
        assert_eq!(from("10.0.0.2", &["2001:db8::7"]), ip("2001:db8::7"));
        // IPv4 as IPv6 (a gateway listening on `[::]`) is IPv4.
        assert_eq!(from("::ffff:10.0.0.2", &["::ffff:198.51.100.1"]), ip("198.51.100.1"));
        // No header, or one that is not an address: the last trusted hop is all that is known.
        assert_eq!(from("10.0.0.2", &[]), ip("10.0.0.2"));
        assert_eq!(from("10.0.0.2", &["198.51.100.1, unknown"]), ip("10.0.0.2"));
        assert_eq!(from("10.0.0.2", &["10.0.0.3"]), ip("10.0.0.3"));
        // Nothing trusted: the peer.
        assert_eq!(client_addr(ip("10.0.0.2"), &forwarded(&["198.51.100.1"]), &[]), ip("10.0.0.2"));
    }

    #[test]
    fn a_count_rises_at_once_falls_when_two_counts_agree_and_a_failed_one_changes_nothing() {
        let mut lower = None;
        assert_eq!(next_count(1, 3, &mut lower), 3, "a new gateway counts at once");
        assert_eq!(next_count(3, 0, &mut lower), 3, "no answer at all: the count failed");
        assert_eq!(next_count(3, 2, &mut lower), 3, "one lower count is not believed yet");
        assert_eq!(next_count(3, 3, &mut lower), 3);
        assert_eq!(next_count(3, 2, &mut lower), 3, "a higher count in between starts it over");
        assert_eq!(next_count(3, 1, &mut lower), 2, "two lower counts: the higher of them");
        assert_eq!(next_count(2, 2, &mut lower), 2);
    }

    #[test]
    fn each_gateway_takes_its_share_of_a_limit_rounded_up() {
        assert_eq!(share(20, 1), 20);
        assert_eq!(share(20, 2), 10);
        assert_eq!(share(20, 3), 7);
        assert_eq!(share(5, 10), 1, "never below one");
        assert_eq!(share(0, 3), 0, "no limit stays none");
        assert_eq!(share(7, 0), 7, "a count of none is read as this one alone");
    }

    #[test]
    fn failed_authentications_are_not_limited_when_the_limit_is_zero() {
        let access = Access::new(LimitsSettings { failed_auth_per_second: 0, ..LimitsSettings::default() });
        let addr: IpAddr = "198.51.100.1".parse().unwrap();
        for _ in 0..10_000 {
            assert!(access.failed(addr).is_none());
        }
        assert!(access.refusing(addr).is_none());
        // And with the default limit, the same failures are refused.
        let access = Access::new(LimitsSettings::default());
        assert!((0..10_000).any(|_| access.failed(addr).is_some()));
        assert!(access.refusing(addr).is_some());
    }

    #[test]
    fn a_recent_count_serves_submissions_only_while_it_leaves_ample_room() {
        let access = Access::new(LimitsSettings::default());
        assert!(!access.take_counted_room("acme", 1), "nothing counted yet: count afresh");
        // Counted 150 free places, one taken by the submission it was counted for.
        access.counted_room("acme", 150, 1);
        let served = std::iter::from_fn(|| access.take_counted_room("acme", 1).then_some(())).take(1_000).count();
        assert_eq!(served as i64, 150 - 1 - ROOM_MARGIN, "let through down to the margin, then count afresh");
        assert!(!access.take_counted_room("other", 1), "counts are per tenant");
        // Near the quota every submission counts afresh.
        access.counted_room("acme", ROOM_MARGIN, 1);
        assert!(!access.take_counted_room("acme", 1));
        // A batch takes its whole size at once, and only if the margin stays.
        access.counted_room("batch", 300, 100);
        assert!(!access.take_counted_room("batch", 101), "300 - 100 - 101 leaves less than the margin");
        assert!(access.take_counted_room("batch", 100), "300 - 100 - 100 leaves the margin");
        assert!(!access.take_counted_room("batch", 1));
    }

    #[test]
    fn requests_that_count_at_once_do_not_each_spend_the_same_room() {
        let access = Access::new(LimitsSettings::default());
        // Two batches of 100 both found no usable count, both counted 250 free places (the
        // read model not yet holding either), and both were let through.
        access.counted_room("acme", 250, 100);
        access.counted_room("acme", 250, 100);
        // 250 - 200 leaves less than the margin: the next submission counts afresh.
        assert!(!access.take_counted_room("acme", 1));
        // Once the count is old, a fresh one starts over.
        let mut room = access.room.lock().unwrap();
        room.get_mut("acme").unwrap().0 -= ROOM_FOR;
        drop(room);
        access.counted_room("acme", 250, 1);
        assert!(access.take_counted_room("acme", 1), "250 - 1 - 1 leaves the margin");
    }
}
