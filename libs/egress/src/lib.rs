//! Where Taskmesh's outbound HTTP may go. `http` and `llm` steps and webhook deliveries are
//! requests that tenants aim, so an address they name must not reach what only the platform
//! should: a cloud's instance-metadata service (credentials), the cluster's own services.
//! [`Egress`] judges an address; [`Egress::client`] builds a `reqwest` client that enforces the
//! judgement where the address is known for certain: in its DNS resolver (each address a name
//! resolves to is judged, and only permitted ones are connected to, so a name that resolves
//! elsewhere a moment later gains nothing), and for a URL that names an address itself (no
//! lookup happens), before the request ([`Egress::check_url`]) and at each redirect.
//!
//! Denied:
//! - always: link-local addresses (`169.254.0.0/16`, `fe80::/10`), where clouds serve instance
//!   metadata, and the metadata addresses outside them (`fd00:ec2::254`, `100.100.100.200`);
//! - with `egress.deny_private`: every address not on the public internet: loopback, private
//!   (RFC 1918, `fc00::/7`), shared (`100.64.0.0/10`), `0.0.0.0/8` and `::` (they reach the
//!   local host), multicast, broadcast, reserved and special-purpose ranges;
//! - the ranges `egress.deny` lists.
//!
//! `egress.allow` lists ranges permitted whatever the rest says. An IPv6 address that carries an
//! IPv4 one (`::ffff:a.b.c.d`, NAT64's `64:ff9b::/96`) is judged as that IPv4 address. A request
//! through a proxy is resolved by the proxy: give it the same rules.
//!
//! Also here, for whatever reads an outbound response: [`retry_after`] (how long the far end
//! asks to wait), [`rate_limit_wait`] and [`rate_limited`] (how long a rate limit asks to be
//! left alone), [`body_start`] and [`says_rate_limited`], [`error_chain`] and [`is_denied`]
//! (whether a failure was the rules' refusal).
//!
//! # Layout
//! - this file: [`Egress`], [`Denied`] and [`DeniedHost`], the resolver, [`error_chain`] for
//!   messages, [`is_denied`], and [`retry_after`], [`rate_limit_wait`], [`rate_limited`],
//!   [`body_start`] and [`says_rate_limited`] for a refusal.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use taskmesh_config::EgressSettings;

/// The outbound address rules (see the crate's docs). The default denies only link-local and
/// instance-metadata addresses.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    deny_private: bool,
    deny: Vec<IpNet>,
    allow: Vec<IpNet>,
}

/// A request went, or would have gone, to an address the rules deny.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("egress to {addr} is denied: {why} (an operator can permit it with egress.allow)")]
pub struct Denied {
    pub addr: IpAddr,
    pub why: &'static str,
}

/// A name that resolves only to addresses the rules deny.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{host}: {denied}")]
pub struct DeniedHost {
    pub host: String,
    pub denied: Denied,
}

/// Whether `e`, or one of its causes, is a request the rules refused ([`Denied`], [`DeniedHost`]):
/// a refusal that lasts until the rules or the address change, unlike a failure to connect.
pub fn is_denied(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<Denied>() || e.is::<DeniedHost>() {
            return true;
        }
        next = e.source();
    }
    false
}

impl Egress {
    pub fn new(settings: &EgressSettings) -> Self {
        Self { deny_private: settings.deny_private, deny: settings.deny.clone(), allow: settings.allow.clone() }
    }

    /// Whether a request may connect to `addr`.
    pub fn check(&self, addr: IpAddr) -> Result<(), Denied> {
        let addr = embedded_v4(addr).map(IpAddr::V4).unwrap_or(addr);
        if self.allow.iter().any(|n| n.contains(&addr)) {
            return Ok(());
        }
        let why = metadata(addr)
            .or_else(|| self.deny.iter().any(|n| n.contains(&addr)).then_some("it is in a range egress.deny lists"))
            .or_else(|| if self.deny_private { not_public(addr) } else { None });
        match why {
            Some(why) => Err(Denied { addr, why }),
            None => Ok(()),
        }
    }

    /// Whether a request may go to `url` when it names an address itself. A URL naming a host
    /// passes here: the host's addresses are judged as it resolves.
    pub fn check_url(&self, url: &url::Url) -> Result<(), Denied> {
        match url.host() {
            Some(url::Host::Ipv4(a)) => self.check(IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => self.check(IpAddr::V6(a)),
            _ => Ok(()),
        }
    }

    /// `builder`'s client, connecting only where these rules permit and following at most
    /// `redirects` redirects, each judged (none: a 3xx is the answer).
    pub fn client(
        self: &Arc<Self>,
        builder: reqwest::ClientBuilder,
        redirects: usize,
    ) -> reqwest::Result<reqwest::Client> {
        let policy = if redirects == 0 {
            reqwest::redirect::Policy::none()
        } else {
            let rules = self.clone();
            reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > redirects {
                    attempt.error(format!("more than {redirects} redirects"))
                } else if let Err(denied) = rules.check_url(attempt.url()) {
                    attempt.error(denied)
                } else {
                    attempt.follow()
                }
            })
        };
        builder.redirect(policy).dns_resolver(Arc::new(Resolver(self.clone()))).build()
    }
}

/// The system's resolver, keeping only the addresses the rules permit.
struct Resolver(Arc<Egress>);

impl Resolve for Resolver {
    fn resolve(&self, name: Name) -> Resolving {
        let rules = self.0.clone();
        Box::pin(async move {
            let host = name.as_str();
            let mut denied = None;
            let permitted: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
                .await?
                .filter(|a| rules.check(a.ip()).map_err(|d| denied.get_or_insert(d)).is_ok())
                .collect();
            match denied {
                Some(denied) if permitted.is_empty() => {
                    Err(Box::new(DeniedHost { host: host.to_string(), denied }) as _)
                }
                _ => Ok(Box::new(permitted.into_iter()) as Addrs),
            }
        })
    }
}

/// How long the far end of a response asks to be left alone: `Retry-After` (seconds or an
/// HTTP date) or `retry-after-ms`. A wait too long for a `Duration` (`inf`, `1e300`) is the
/// longest one: callers cap it.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let secs = |s: f64| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX);
    if let Some(ms) =
        headers.get("retry-after-ms").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<f64>().ok())
    {
        return Some(secs(ms / 1000.0));
    }
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(s) = v.parse::<f64>() {
        return Some(secs(s));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

/// The start of a response's body: at most `limit` bytes, read chunk by chunk until then or
/// its end (a failure to read ends it too).
pub async fn body_start(res: &mut reqwest::Response, limit: usize) -> Vec<u8> {
    let mut start = Vec::new();
    while start.len() < limit {
        match res.chunk().await {
            Ok(Some(chunk)) => start.extend_from_slice(&chunk[..chunk.len().min(limit - start.len())]),
            _ => break,
        }
    }
    start
}

/// Whether the start of a `403`'s body says it is a rate limit: GitHub's secondary rate
/// limits may say so only in their message, without a header that does.
pub fn says_rate_limited(body_start: &[u8]) -> bool {
    let said = String::from_utf8_lossy(&body_start[..body_start.len().min(4096)]).to_ascii_lowercase();
    said.contains("rate limit")
}

/// The longest wait a rate limit is taken to ask for.
pub const MAX_RATE_LIMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// How long a `403`, `429` or `503` asks to be left alone, by its headers alone, at most
/// [`MAX_RATE_LIMIT_WAIT`]: its [`retry_after`], or, as GitHub says when its primary rate limit
/// is spent (`x-ratelimit-remaining: 0`), until `x-ratelimit-reset` (seconds since the epoch;
/// a minute when it is missing, as GitHub advises). `None` for any other status, and for one
/// whose headers say nothing.
pub fn rate_limit_wait(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
) -> Option<std::time::Duration> {
    use std::time::{Duration, SystemTime};
    if !matches!(status.as_u16(), 403 | 429 | 503) {
        return None;
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let wait = match retry_after(headers) {
        Some(wait) => wait,
        None if header("x-ratelimit-remaining") == Some("0") => {
            match header("x-ratelimit-reset").and_then(|v| v.parse::<u64>().ok()) {
                Some(reset) => {
                    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                    Duration::from_secs(reset.saturating_sub(now.as_secs()).max(1))
                }
                None => Duration::from_secs(60),
            }
        }
        None => return None,
    };
    Some(wait.min(MAX_RATE_LIMIT_WAIT))
}

/// [`rate_limit_wait`], and for a `403` whose headers say nothing, a minute when the start of
/// its body [`says_rate_limited`] (GitHub's secondary limits; it advises a minute's rest). A
/// forge's refusal is asked this; a webhook endpoint's `403` is not read for it.
pub async fn rate_limited(res: &mut reqwest::Response) -> Option<std::time::Duration> {
    if let Some(wait) = rate_limit_wait(res.status(), res.headers()) {
        return Some(wait);
    }
    if res.status() != reqwest::StatusCode::FORBIDDEN {
        return None;
    }
    says_rate_limited(&body_start(res, 4096).await).then_some(std::time::Duration::from_secs(60))
}

/// An error and its causes, one after another (reqwest's own message hides the causes, where
/// a denial is).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The IPv4 address an IPv6 one stands for: IPv4-mapped, or under NAT64's well-known prefix.
fn embedded_v4(addr: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = addr else { return None };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]).then(|| Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7])))
}

/// Why an address is an instance-metadata one, if it may be.
fn metadata(addr: IpAddr) -> Option<&'static str> {
    const AWS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    const ALIBABA: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);
    const LINK_LOCAL: &str = "it is link-local, where clouds serve instance metadata";
    match addr {
        IpAddr::V4(a) if a.is_link_local() => Some(LINK_LOCAL),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some(LINK_LOCAL),
        IpAddr::V4(ALIBABA) | IpAddr::V6(AWS_V6) => Some("it is a cloud's instance-metadata address"),
        _ => None,
    }
}

/// Why an address is not on the public internet, if it is not.
fn not_public(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(a) => {
            let [o0, o1, o2, _] = a.octets();
            if a.is_loopback() {
                Some("it is a loopback address")
            } else if a.is_private() {
                Some("it is a private address")
            } else if o0 == 100 && (64..128).contains(&o1) {
                Some("it is in the shared address space (100.64.0.0/10)")
            } else if o0 == 0 {
                Some("it is in 0.0.0.0/8, which reaches the local host")
            } else if a.is_multicast() || a.is_broadcast() || o0 >= 240 {
                Some("it is a multicast, broadcast or reserved address")
            } else if (o0, o1, o2) == (192, 0, 0)
                || (o0, o1, o2) == (192, 0, 2)
                || (o0, o1, o2) == (198, 51, 100)
                || (o0, o1, o2) == (203, 0, 113)
                || (o0 == 198 && (o1 == 18 || o1 == 19))
            {
                Some("it is a special-purpose address (RFC 6890)")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if a.is_loopback() || a.is_unspecified() {
                Some("it is the loopback or unspecified address")
            } else if a.is_unique_local() {
                Some("it is a private (unique local) address")
            } else if a.is_multicast() {
                Some("it is a multicast address")
            } else if s[0] == 0x2001 && s[1] == 0xdb8 {
                Some("it is a documentation address")
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_403_says_it_is_a_rate_limit_in_its_message() {
        assert!(says_rate_limited(br#"{"message": "You have exceeded a secondary rate limit."}"#));
        assert!(says_rate_limited(b"API Rate Limit exceeded"));
        assert!(!says_rate_limited(br#"{"message": "Resource not accessible by integration"}"#));
        assert!(!says_rate_limited(b""));
    }

    fn answer(status: u16, headers: &[(&str, String)], body: &'static str) -> reqwest::Response {
        let mut res = http::Response::builder().status(status);
        for (name, value) in headers {
            res = res.header(*name, value);
        }
        reqwest::Response::from(res.body(body).unwrap())
    }

    #[tokio::test]
    async fn a_rate_limit_says_how_long_to_wait_by_its_headers_or_a_403_by_its_message() {
        use std::time::{Duration, SystemTime};
        let wait = |status, headers: &[(&str, String)], body| {
            let mut res = answer(status, headers, body);
            async move { rate_limited(&mut res).await }
        };
        assert_eq!(wait(429, &[("retry-after", "7".into())], "").await, Some(Duration::from_secs(7)));
        assert_eq!(wait(503, &[("retry-after", "99999".into())], "").await, Some(MAX_RATE_LIMIT_WAIT), "capped");
        assert_eq!(wait(500, &[("retry-after", "7".into())], "").await, None, "only a 403, 429 or 503");
        assert_eq!(wait(429, &[], "").await, None, "no wait said");
        // GitHub's spent primary limit: until the reset, or a minute without one.
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let reset = (now + 120).to_string();
        let spent = wait(403, &[("x-ratelimit-remaining", "0".into()), ("x-ratelimit-reset", reset.clone())], "");
        let spent = spent.await.unwrap();
        assert!((Duration::from_secs(115)..=Duration::from_secs(120)).contains(&spent), "{spent:?}");
        let past = wait(403, &[("x-ratelimit-remaining", "0".into()), ("x-ratelimit-reset", "5".into())], "");
        assert_eq!(past.await, Some(Duration::from_secs(1)), "a reset passed: a second");
        let no_reset = wait(429, &[("x-ratelimit-remaining", "0".into())], "");
        assert_eq!(no_reset.await, Some(Duration::from_secs(60)));
        let left = wait(403, &[("x-ratelimit-remaining", "12".into()), ("x-ratelimit-reset", reset)], "denied");
        assert_eq!(left.await, None, "a 403 with requests left is a refusal");
        // A secondary limit says so only in its message.
        let secondary = wait(403, &[], r#"{"message": "You have exceeded a secondary rate limit."}"#);
        assert_eq!(secondary.await, Some(Duration::from_secs(60)));
        assert_eq!(wait(429, &[], "rate limit").await, None, "only a 403's body is read");
        // A wait of nothing, or of a date gone by, is a wait of nothing (callers round it up).
        assert_eq!(wait(429, &[("retry-after", "0".into())], "").await, Some(Duration::ZERO));
        let past = wait(503, &[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT".into())], "");
        assert_eq!(past.await, Some(Duration::ZERO));
        assert_eq!(wait(429, &[("retry-after", "soon".into())], "").await, None, "not a wait");
        // The headers alone: a 403's message is not read.
        let headers = answer(403, &[], "rate limit");
        assert_eq!(rate_limit_wait(headers.status(), headers.headers()), None);
    }

    #[test]
    fn retry_after_reads_seconds_milliseconds_and_dates() {
        use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
        use std::time::Duration;
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        let mut h = HeaderMap::new();
        let later = std::time::SystemTime::now() + Duration::from_secs(60);
        h.insert(RETRY_AFTER, HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(55) && d <= Duration::from_secs(60), "{d:?}");
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
        // Too long to hold, or not a number at all: the longest wait, or none; never a panic.
        for (value, wait) in
            [("inf", Some(Duration::MAX)), ("1e300", Some(Duration::MAX)), ("NaN", Some(Duration::ZERO))]
        {
            h.insert(RETRY_AFTER, HeaderValue::from_static(value));
            assert_eq!(retry_after(&h), wait, "{value}");
            h.remove(RETRY_AFTER);
            h.insert("retry-after-ms", HeaderValue::from_static(value));
            assert_eq!(retry_after(&h), wait, "ms {value}");
            h.remove("retry-after-ms");
        }
    }

    fn rules(deny_private: bool, deny: &[&str], allow: &[&str]) -> Egress {
        let nets = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect();
        Egress { deny_private, deny: nets(deny), allow: nets(allow) }
    }

    fn denied(e: &Egress, addr: &str) -> bool {
        e.check(addr.parse().unwrap()).is_err()
    }

    #[test]
    fn metadata_addresses_are_denied_by_default_and_nothing_else_is() {
        let e = Egress::default();
        for addr in [
            "169.254.169.254",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(denied(&e, addr), "{addr}");
        }
        for addr in ["127.0.0.1", "10.1.2.3", "192.168.0.1", "::1", "93.184.216.34", "2606:4700::1111"] {
            assert!(!denied(&e, addr), "{addr}");
        }
    }

    #[test]
    fn deny_private_denies_every_non_public_address_however_written() {
        let e = rules(true, &[], &[]);
        for addr in [
            "127.0.0.1",
            "127.9.9.9",
            "10.0.0.1",
            "172.16.5.5",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
            "2001:db8::1",
        ] {
            assert!(denied(&e, addr), "{addr}");
        }
        for addr in ["93.184.216.34", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:1.1.1.1"] {
            assert!(!denied(&e, addr), "{addr}");
        }
    }

    #[test]
    fn allow_wins_and_deny_adds_ranges() {
        let e = rules(true, &["93.184.216.0/24"], &["10.1.0.0/16", "169.254.169.254/32"]);
        assert!(!denied(&e, "10.1.2.3"));
        assert!(denied(&e, "10.2.0.1"));
        assert!(!denied(&e, "169.254.169.254"), "an operator may permit even the metadata address");
        assert!(denied(&e, "93.184.216.34"));
        assert!(!denied(&e, "93.184.217.1"));
        let why = e.check("10.2.0.1".parse().unwrap()).unwrap_err().to_string();
        assert!(why.contains("10.2.0.1") && why.contains("private") && why.contains("egress.allow"), "{why}");
    }

    #[test]
    fn urls_naming_an_address_are_judged_and_named_hosts_wait_for_their_lookup() {
        let e = rules(true, &[], &[]);
        assert!(e.check_url(&"http://127.0.0.1:8080/x".parse().unwrap()).is_err());
        assert!(e.check_url(&"http://[::1]/".parse().unwrap()).is_err());
        assert!(
            e.check_url(&"http://2130706433/".parse().unwrap()).is_err(),
            "the URL parser reads 2130706433 as 127.0.0.1"
        );
        assert!(e.check_url(&"http://localhost/".parse().unwrap()).is_ok());
    }

    /// Serves `/ok` and `/bounce` (a redirect to 127.0.0.2, same port) on 127.0.0.1; returns
    /// the port.
    async fn serve() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let bounce = format!("http://127.0.0.2:{port}/ok");
        let app = axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .route("/bounce", axum::routing::get(move || async move { axum::response::Redirect::temporary(&bounce) }));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        port
    }

    #[tokio::test]
    async fn the_client_connects_only_where_the_rules_permit_and_judges_each_redirect() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let port = serve().await;
        // A name that resolves to loopback only is refused before any connection.
        let strict = Arc::new(rules(true, &[], &[]));
        let client = strict.client(reqwest::Client::builder(), 5).unwrap();
        let err = client.get(format!("http://localhost:{port}/ok")).send().await.unwrap_err();
        let text = error_chain(&err);
        assert!(text.contains("egress to") && text.contains("loopback"), "{text}");
        assert!(is_denied(&err), "{text}");
        // Permitted, the same name is reached.
        let loopback = Arc::new(rules(true, &[], &["127.0.0.1/32", "::1/128"]));
        let client = loopback.client(reqwest::Client::builder(), 5).unwrap();
        let ok = client.get(format!("http://localhost:{port}/ok")).send().await.unwrap();
        assert_eq!(ok.text().await.unwrap(), "ok");
        // A redirect to an address the rules deny is not followed.
        let err = client.get(format!("http://127.0.0.1:{port}/bounce")).send().await.unwrap_err();
        let text = error_chain(&err);
        assert!(text.contains("egress to 127.0.0.2 is denied"), "{text}");
        assert!(is_denied(&err), "{text}");
        // Failing to connect is no refusal.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let err = client.get(format!("http://127.0.0.1:{closed}/ok")).send().await.unwrap_err();
        assert!(!is_denied(&err), "{}", error_chain(&err));
        // Without redirects the 3xx is the answer.
        let client = loopback.client(reqwest::Client::builder(), 0).unwrap();
        let res = client.get(format!("http://127.0.0.1:{port}/bounce")).send().await.unwrap();
        assert_eq!(res.status(), 307);
    }
}
