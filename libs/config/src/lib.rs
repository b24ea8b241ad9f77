//! Typed settings for every Taskmesh service.
//!
//! Settings come from, in order of precedence: built-in defaults, then a TOML file (optional),
//! then environment variables `TASKMESH_<SECTION>__<KEY>` (for example
//! `TASKMESH_NATS__URL=nats://10.0.0.5:4222`). Secrets are [`secrecy::SecretString`] and never
//! printed.
//!
//! # Layout
//! Everything is in this file: [`Settings`] and one struct per section.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::SecretString;
use serde::Deserialize;

/// What can go wrong loading settings.
#[derive(Debug, thiserror::Error)]
#[error("invalid Taskmesh configuration: {0}")]
pub struct ConfigError(String);

/// All settings of a Taskmesh process; each service reads its own section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub nats: NatsSettings,
    pub postgres: PostgresSettings,
    pub gateway: HttpSettings,
    pub git: HttpSettings,
    pub executor: ExecutorSettings,
    pub scheduler: SchedulerSettings,
    pub limits: LimitsSettings,
    pub notification: NotificationSettings,
    pub telemetry: TelemetrySettings,
    pub health: HealthSettings,
    pub secrets: SecretsSettings,
    /// Where steps' and webhooks' outbound requests may go.
    pub egress: EgressSettings,
    /// Where `taskmesh up` keeps its private NATS and Postgres data and the dev API key.
    pub data_dir: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            nats: NatsSettings::default(),
            postgres: PostgresSettings::default(),
            gateway: HttpSettings::on(8080),
            git: HttpSettings::on(8081),
            executor: ExecutorSettings::default(),
            scheduler: SchedulerSettings::default(),
            limits: LimitsSettings::default(),
            notification: NotificationSettings::default(),
            telemetry: TelemetrySettings::default(),
            health: HealthSettings::default(),
            secrets: SecretsSettings::default(),
            egress: EgressSettings::default(),
            data_dir: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    pub url: String,
    /// Prefix of every stream and subject.
    pub namespace: String,
    /// JetStream replicas per stream (1 on a single server, 3 on a cluster).
    pub replicas: usize,
    /// How long events are kept; 0 keeps them forever.
    pub events_max_age_days: u64,
    /// Cap on the event stream's size; -1 for none.
    pub events_max_bytes: i64,
    /// How long step logs are kept.
    pub logs_max_age_days: u64,
    /// Cap on the log stream's size; the oldest lines go first.
    pub logs_max_bytes: i64,
    /// Cap on the kept step outcomes' size (`cache:`); the oldest go first.
    pub cache_max_bytes: i64,
    /// The window in which JetStream deduplicates `Nats-Msg-Id`.
    pub duplicate_window_secs: u64,
    /// How long a request to another service waits for its reply.
    pub request_timeout_ms: u64,
    /// Most outbound deliveries (webhooks, commit statuses) one tenant may have queued or
    /// waiting for a retry; past it, new ones are dropped (with an error in the log), so one
    /// tenant's dead endpoint never fills the queue every tenant shares.
    pub deliveries_per_tenant: u32,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            namespace: "tm".into(),
            replicas: 1,
            events_max_age_days: 0,
            events_max_bytes: -1,
            logs_max_age_days: 7,
            logs_max_bytes: 1 << 30,
            cache_max_bytes: 1 << 30,
            duplicate_window_secs: 120,
            request_timeout_ms: 5_000,
            deliveries_per_tenant: 100_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSettings {
    pub url: SecretString,
    pub max_connections: u32,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self { url: SecretString::from("postgres://postgres@127.0.0.1:5432/taskmesh"), max_connections: 10 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    /// Largest accepted request body.
    pub body_limit_bytes: usize,
    /// The URL clients use to reach this service (for links and `Location`); defaults to
    /// `http://{listen}`.
    pub public_url: Option<String>,
    /// The platform administrator's key (gateway only): manages tenants. None: no platform API.
    pub admin_key: Option<SecretString>,
    /// Reverse proxies (an ingress, a load balancer) trusted to name the client in
    /// `X-Forwarded-For` (gateway only). A request whose peer is in one of these ranges is
    /// attributed to the last address in that header that is not (for the failed-authentication
    /// limit and the audit log); anything else, to its peer. Empty: every request to its peer.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Whether this listener answers `GET /metrics`. Off where the port is public and the
    /// platform's counts should not be; then give `taskmesh serve` a `health.listen`, which
    /// answers it always (nothing else does).
    pub metrics: bool,
}

impl HttpSettings {
    fn on(port: u16) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            body_limit_bytes: 512 * 1024,
            public_url: None,
            admin_key: None,
            trusted_proxies: Vec::new(),
            metrics: true,
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self::on(8080)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutorSettings {
    /// Steps run at once by one executor.
    pub slots: usize,
    /// A step's lease: without a heartbeat for this long, the step goes to another executor.
    pub lease_secs: u64,
    /// Most bytes of output kept per step; the rest is dropped and marked truncated.
    pub output_limit_bytes: usize,
    /// Where steps get their working directories; the system temp dir if unset.
    pub work_dir: Option<PathBuf>,
    /// How long SIGTERM waits for running steps before handing them back.
    pub drain_timeout_secs: u64,
    /// This executor's name in events; hostname and pid if unset.
    pub id: Option<String>,
    /// Custom labels advertised besides the detected ones (os, arch, cpus, memory_mb, gpu…);
    /// a custom label overrides a detected one of the same name.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The docker- or podman-compatible CLI for container steps: `auto` (docker, then podman,
    /// whichever answers `info`), `none`, or a program name or path.
    pub container_cli: String,
    /// Sandboxing of shell steps: `none`, `bwrap` (required: the executor refuses to start
    /// without bubblewrap) or `auto` (bubblewrap when installed).
    pub sandbox: String,
    /// Run shell steps as this user (a name or uid); the executor must be root to switch.
    pub run_as: Option<String>,
    /// CPU-time limit of a step's processes, in seconds: the default, and the most a step's
    /// `limits` may ask for.
    pub cpu_seconds: Option<u64>,
    /// Memory limit of a step's processes, in MiB: the default, and the most a step's
    /// `limits` may ask for.
    pub memory_mb: Option<u64>,
}

impl Default for ExecutorSettings {
    fn default() -> Self {
        Self {
            slots: 4,
            lease_secs: 30,
            output_limit_bytes: 64 * 1024,
            work_dir: None,
            drain_timeout_secs: 30,
            id: None,
            labels: Default::default(),
            container_cli: "auto".into(),
            sandbox: "none".into(),
            run_as: None,
            cpu_seconds: None,
            memory_mb: None,
        }
    }
}

impl ExecutorSettings {
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs.max(1))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSettings {
    /// Runs whose state the scheduler keeps in memory; older ones are reloaded from the log.
    pub cache_runs: usize,
    /// Times a step may lose its executor before it fails.
    pub max_lost_attempts: u32,
    /// How long an event delivered to a replica may go unacknowledged before JetStream gives it
    /// to another: the delay a crashed replica's in-flight events see.
    pub event_ack_wait_secs: u64,
    /// Steps of all tenants on the dispatch queue or running at once (0: no limit); when it is
    /// reached, tenants take turns.
    pub dispatch_window: u32,
    /// How long the dispatcher's leader lease lasts unless renewed: the pause in admissions
    /// when the leading replica dies.
    pub leader_ttl_ms: u64,
    /// The deadline of a run whose workflow sets no `timeout_seconds` (0: none): no run waits
    /// or runs forever.
    pub max_run_seconds: u64,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self {
            cache_runs: 10_000,
            max_lost_attempts: 3,
            event_ack_wait_secs: 10,
            dispatch_window: 0,
            leader_ttl_ms: 3_000,
            max_run_seconds: 7 * 86_400,
        }
    }
}

/// Per-tenant limits, read by ingest (runs), the scheduler's dispatcher (steps) and the
/// gateway (request rates and quotas).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSettings {
    /// Steps of one tenant on the dispatch queue or running at once (0: no limit).
    pub tenant_max_steps: u32,
    /// Runs of one tenant started and not yet ended at once (0: no limit); further runs wait
    /// their turn in submission order.
    pub tenant_max_runs: u32,
    /// API requests per second of one tenant, all its keys together (a token bucket refilled
    /// at this rate; 0: no limit). For the whole mesh: each of N gateways keeps buckets of 1/N.
    pub requests_per_second: u32,
    /// The tenant bucket's size: how many requests may come at once after a quiet spell.
    pub request_burst: u32,
    /// API requests per second of one key (0: no limit).
    pub key_requests_per_second: u32,
    /// The key bucket's size.
    pub key_request_burst: u32,
    /// Quota: runs of one tenant not yet ended (queued or running); a submission beyond it
    /// is refused with `quota-exceeded` (0: no quota).
    pub max_active_runs: u32,
    /// Quota: stored workflows (names) of one tenant (0: no quota).
    pub max_workflows: u32,
    /// Quota: schedules of one tenant not deleted (0: no quota).
    pub max_schedules: u32,
    /// Quota: outbound webhook endpoints of one tenant not deleted (0: no quota). Each run's
    /// end is queued once for each of them.
    pub max_webhook_endpoints: u32,
    /// Quota: steps declared in one run's workflow, a matrix step counting once (0: only the
    /// workflow format's own limit of 5,000).
    pub max_steps_per_run: u32,
    /// Quota: bytes of one request body of the tenant, below the gateway's own body limit
    /// (0: only that limit).
    pub max_payload_bytes: u32,
    /// Requests per second bearing an API key that does not exist (or was revoked), per client
    /// address (0: no limit; each of N gateways takes 1/N). Past it, the address's requests are refused
    /// with `429` before their key is looked up, until it is under the limit again; keys the
    /// gateway has already looked up still pass.
    pub failed_auth_per_second: u32,
    /// The failed-authentication bucket's size.
    pub failed_auth_burst: u32,
    /// Per-tenant overrides, e.g. `{ acme = { max_steps = 50, max_runs = 10 } }`.
    pub tenants: std::collections::BTreeMap<String, TenantLimits>,
}

/// One tenant's overrides of the defaults in [`LimitsSettings`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantLimits {
    pub max_steps: Option<u32>,
    pub max_runs: Option<u32>,
    pub requests_per_second: Option<u32>,
    pub request_burst: Option<u32>,
    pub key_requests_per_second: Option<u32>,
    pub key_request_burst: Option<u32>,
    pub max_active_runs: Option<u32>,
    pub max_workflows: Option<u32>,
    pub max_schedules: Option<u32>,
    pub max_webhook_endpoints: Option<u32>,
    pub max_steps_per_run: Option<u32>,
    pub max_payload_bytes: Option<u32>,
}

impl Default for LimitsSettings {
    fn default() -> Self {
        Self {
            tenant_max_steps: 1_000,
            tenant_max_runs: 0,
            requests_per_second: 1_000,
            request_burst: 2_000,
            key_requests_per_second: 500,
            key_request_burst: 1_000,
            max_active_runs: 100_000,
            max_workflows: 1_000,
            max_schedules: 1_000,
            max_webhook_endpoints: 100,
            max_steps_per_run: 0,
            max_payload_bytes: 0,
            failed_auth_per_second: 10,
            failed_auth_burst: 100,
            tenants: Default::default(),
        }
    }
}

/// A tenant's effective value of one limit: its override, else the default.
macro_rules! tenant_limit {
    ($(#[$doc:meta] $name:ident),* $(,)?) => {
        impl LimitsSettings {
            $(
                #[$doc]
                pub fn $name(&self, tenant: &str) -> u32 {
                    self.tenants.get(tenant).and_then(|t| t.$name).unwrap_or(self.$name)
                }
            )*
        }
    };
}

tenant_limit!(
    /// The tenant's request rate (per second; 0: none).
    requests_per_second,
    /// The tenant's request burst.
    request_burst,
    /// One key's request rate (per second; 0: none).
    key_requests_per_second,
    /// One key's request burst.
    key_request_burst,
    /// The tenant's quota of runs not yet ended (0: none).
    max_active_runs,
    /// The tenant's quota of stored workflows (0: none).
    max_workflows,
    /// The tenant's quota of schedules (0: none).
    max_schedules,
    /// The tenant's quota of webhook endpoints (0: none).
    max_webhook_endpoints,
    /// The tenant's quota of steps per run (0: none).
    max_steps_per_run,
    /// The tenant's quota of request body bytes (0: only the gateway's limit).
    max_payload_bytes,
);

impl LimitsSettings {
    /// The concurrency limit of `tenant`'s steps (0: none).
    pub fn max_steps(&self, tenant: &str) -> u32 {
        self.tenants.get(tenant).and_then(|t| t.max_steps).unwrap_or(self.tenant_max_steps)
    }
    /// The limit of `tenant`'s concurrent runs (0: none).
    pub fn max_runs(&self, tenant: &str) -> u32 {
        self.tenants.get(tenant).and_then(|t| t.max_runs).unwrap_or(self.tenant_max_runs)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotificationSettings {
    /// Timeout of one delivery attempt.
    pub timeout_ms: u64,
    /// Delays before each retry; its length + 1 is the number of attempts.
    pub retry_delays_secs: Vec<u64>,
    /// The dashboard's address as users reach it (`https://taskmesh.example.com/ui/`): commit
    /// statuses link to their run's page there. None: the gateway's `public_url` followed by
    /// `/ui/`, if that is set; otherwise statuses carry no link.
    pub dashboard_url: Option<String>,
    /// Most deliveries (webhooks, Slack messages, e-mails, commit statuses) one notifier sends
    /// at once, across tenants.
    pub concurrency: usize,
    /// Most of one tenant's deliveries one notifier sends at once: a tenant whose endpoint
    /// hangs holds this many of the `concurrency` places, never all of them.
    pub per_tenant_concurrency: usize,
    /// Most tenants one notifier pulls deliveries for at once; others wait for a place, which
    /// a tenant with only retries waiting gives up.
    pub tenants_at_once: usize,
    /// How long, in seconds, a tenant with deliveries under way keeps its place while other
    /// tenants wait for one (it then takes nothing more, and goes when those end).
    pub tenant_slice_secs: u64,
    /// A webhook endpoint every delivery to which has failed for this many seconds (counted
    /// from the first failure since it last took one) is disabled when the next is given up;
    /// 0: never.
    pub disable_after_secs: u64,
    /// A disabled endpoint's runs' ends are listed among its failed deliveries (unsent, to be
    /// sent again once it is enabled) for this many seconds after it was disabled; later ones
    /// are not queued for it at all. 0: none is listed.
    pub disabled_listed_secs: u64,
    /// The SMTP server e-mail endpoints are sent through, as a URL: `smtps://user:password@host`
    /// (TLS, port 465), `smtp://user:password@host:587?tls=required` (STARTTLS), or
    /// `smtp://host:25` (plain, for a relay on a trusted network). None: e-mail endpoints are
    /// refused when created, and their deliveries given up (recorded as failed).
    pub smtp_url: Option<SecretString>,
    /// The sender of e-mails (`Taskmesh <taskmesh@example.com>`); needed with `smtp_url`.
    pub email_from: Option<String>,
    /// The domains e-mail endpoints may send to (each with its subdomains); empty: any. On a
    /// multi-tenant deployment, where any tenant's admin could otherwise make the operator's
    /// server mail anyone, list the tenants' own.
    pub email_domains: Vec<String>,
}

impl Default for NotificationSettings {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            retry_delays_secs: vec![5, 30, 120, 600, 1800, 3600, 10800],
            dashboard_url: None,
            concurrency: 32,
            per_tenant_concurrency: 4,
            tenants_at_once: 1024,
            tenant_slice_secs: 30,
            disable_after_secs: 5 * 86_400,
            disabled_listed_secs: 30 * 86_400,
            smtp_url: None,
            email_from: None,
            email_domains: Vec::new(),
        }
    }
}

impl NotificationSettings {
    /// Whether e-mail may go to `address` (see `email_domains`).
    pub fn email_allowed(&self, address: &str) -> bool {
        let domain = address.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()).unwrap_or_default();
        self.email_domains.is_empty()
            || self.email_domains.iter().any(|allowed| {
                let allowed = allowed.trim_start_matches('.').to_ascii_lowercase();
                domain == allowed || domain.ends_with(&format!(".{allowed}"))
            })
    }

    /// Where commit statuses and Slack messages link to (see `dashboard_url`); an error names
    /// the setting that is not an http(s) URL a browser can be sent to: one with a user name
    /// or password (which would be shown on every commit), a query or fragment (the run's page
    /// is put in the fragment), or longer than 1,000 bytes.
    pub fn dashboard(&self, gateway: &HttpSettings) -> Result<Option<url::Url>, String> {
        let (name, url) = match (&self.dashboard_url, &gateway.public_url) {
            (Some(url), _) => ("notification.dashboard_url", url::Url::parse(url)),
            (None, Some(public)) => {
                let base = url::Url::parse(public).map(|mut base| {
                    // `https://tm.example/base` is the directory `base/`, under which `ui/` is.
                    if !base.path().ends_with('/') {
                        base.set_path(&format!("{}/", base.path()));
                    }
                    base
                });
                ("gateway.public_url", base.and_then(|base| base.join("ui/")))
            }
            (None, None) => return Ok(None),
        };
        let url = url.map_err(|e| format!("{name}: not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("{name}: '{url}' is not an http(s) URL"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!("{name}: the dashboard's address must not carry a user name or password"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("{name}: '{url}' has a query or fragment (the run's page goes in the fragment)"));
        }
        if url.as_str().len() > 1000 {
            return Err(format!("{name}: the dashboard's address is longer than 1,000 bytes"));
        }
        Ok(Some(url))
    }
}

/// Where `http` and `llm` steps and webhook deliveries may connect (taskmesh-egress). Link-local
/// and cloud instance-metadata addresses are always denied unless `allow` lists them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressSettings {
    /// Deny every address that is not on the public internet (loopback, private, shared,
    /// unspecified, multicast, reserved): for a multi-tenant deployment, where tenants must not
    /// reach the platform's own network.
    pub deny_private: bool,
    /// Further ranges to deny, as CIDR (`10.20.0.0/16`, `2001:db8::/32`).
    pub deny: Vec<ipnet::IpNet>,
    /// Ranges permitted whatever else is denied, as CIDR.
    pub allow: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// `tracing` filter directives, e.g. `info,taskmesh=debug`. `RUST_LOG` wins when set.
    pub log_filter: String,
    /// `text` or `json`.
    pub log_format: String,
    /// OTLP/HTTP endpoint for traces, e.g. `http://127.0.0.1:4318`; none exports nothing.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self { log_filter: "info".into(), log_format: "text".into(), otlp_endpoint: None }
    }
}

/// The keys that seal secrets (AES-256-GCM). The gateway seals with `key`; executors open
/// with `key` or any of `previous_keys` (keep old keys there while rotating).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsSettings {
    /// Base64 of 32 random bytes (`openssl rand -base64 32`). Without one, secrets are off.
    pub key: Option<SecretString>,
    pub previous_keys: Vec<SecretString>,
}

/// Health endpoints of worker processes (the HTTP services serve their own).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct HealthSettings {
    /// Where `taskmesh serve <service>` answers `GET /healthz`, `/readyz` and `/metrics`; none
    /// if unset.
    pub listen: Option<SocketAddr>,
}

impl Settings {
    /// Defaults, then `file` if given, then `TASKMESH_…` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        // `git` shares `HttpSettings` (whose own default listens on 8080) with `gateway`: a
        // `[git]` table or `TASKMESH_GIT__*` variable naming other fields keeps it on 8081.
        let git_listen = Settings::default().git.listen;
        let mut figment = Figment::new().merge(Serialized::default("git.listen", git_listen));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError(format!("config file {} does not exist", file.display())));
            }
            figment = figment.merge(Toml::file(file));
        }
        let settings: Settings = figment
            .merge(Env::prefixed("TASKMESH_").split("__").ignore(&[
                "config",
                "url",
                "api_key",
                "profile",
                "profile_file",
            ]))
            .extract()
            .map_err(|e| ConfigError(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Defaults only, ignoring the environment: for tests.
    pub fn defaults() -> Self {
        Self::default()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.nats.namespace.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            || self.nats.namespace.is_empty()
        {
            return Err(ConfigError(format!(
                "nats.namespace {:?} must be letters, digits, '_' or '-'",
                self.nats.namespace
            )));
        }
        if self.executor.slots == 0 {
            return Err(ConfigError("executor.slots must be at least 1".into()));
        }
        Ok(())
    }

    /// The directory for local state (`.taskmesh` in the working directory by default).
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| PathBuf::from(".taskmesh"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_link_to_the_dashboard_named_or_under_the_gateways_public_url() {
        let mut gateway = HttpSettings::on(8080);
        let mut n = NotificationSettings::default();
        assert_eq!(n.dashboard(&gateway), Ok(None), "no address known: no link");
        gateway.public_url = Some("https://tm.example/".into());
        assert_eq!(n.dashboard(&gateway).unwrap().unwrap().as_str(), "https://tm.example/ui/");
        n.dashboard_url = Some("https://dash.example/ui/".into());
        assert_eq!(n.dashboard(&gateway).unwrap().unwrap().as_str(), "https://dash.example/ui/");
        n.dashboard_url = Some("javascript:alert(1)".into());
        assert!(n.dashboard(&gateway).unwrap_err().starts_with("notification.dashboard_url"));
        for refused in
            ["https://user:pass@dash.example/ui/", "https://dash.example/ui/?a=b", "https://dash.example/ui/#x"]
        {
            n.dashboard_url = Some(refused.into());
            assert!(n.dashboard(&gateway).is_err(), "{refused} is refused");
        }
        n.dashboard_url = Some(format!("https://dash.example/{}", "a".repeat(1000)));
        assert!(n.dashboard(&gateway).is_err(), "a too long address is refused");
        n.dashboard_url = None;
        gateway.public_url = Some("https://tm.example/base".into());
        assert_eq!(n.dashboard(&gateway).unwrap().unwrap().as_str(), "https://tm.example/base/ui/");
        gateway.public_url = Some("https://token@tm.example/".into());
        assert!(n.dashboard(&gateway).unwrap_err().starts_with("gateway.public_url"));
    }

    #[test]
    fn e_mail_goes_only_to_the_domains_listed() {
        let mut n = NotificationSettings::default();
        assert!(n.email_allowed("anyone@anywhere.example"), "no list: any");
        n.email_domains = vec!["example.com".into()];
        for allowed in ["ops@example.com", "ops@MAIL.Example.com"] {
            assert!(n.email_allowed(allowed), "{allowed}");
        }
        for refused in ["ops@example.org", "ops@badexample.com", "ops@example.com.evil.org", "ops"] {
            assert!(!n.email_allowed(refused), "{refused}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own error type
    fn env_overrides_nested_keys_and_unknown_keys_fail() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TASKMESH_NATS__NAMESPACE", "abc");
            jail.set_env("TASKMESH_EXECUTOR__SLOTS", "7");
            let s = Settings::load(None).unwrap();
            assert_eq!(s.nats.namespace, "abc");
            assert_eq!(s.executor.slots, 7);
            assert_eq!(s.git.listen.port(), 8081);
            jail.set_env("TASKMESH_GIT__LISTEN", "0.0.0.0:9000");
            assert_eq!(Settings::load(None).unwrap().git.listen.port(), 9000);
            assert!(s.gateway.metrics && s.git.metrics, "/metrics on by default");
            jail.set_env("TASKMESH_GATEWAY__METRICS", "false");
            let off = Settings::load(None).unwrap();
            assert!(!off.gateway.metrics && off.git.metrics);
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            // Another field of git-integration's set, it stays on its own port; the client
            // commands' variables are not settings, and are no reason to refuse to start.
            jail.set_env("TASKMESH_GIT__METRICS", "false");
            jail.set_env("TASKMESH_PROFILE", "staging");
            jail.set_env("TASKMESH_PROFILE_FILE", "/tmp/profiles.toml");
            let s = Settings::load(None).unwrap();
            assert_eq!((s.git.listen.port(), s.git.metrics, s.gateway.listen.port()), (8081, false, 8080));
            assert!(!s.egress.deny_private && s.egress.allow.is_empty());
            jail.set_env("TASKMESH_EGRESS__DENY_PRIVATE", "true");
            jail.set_env("TASKMESH_EGRESS__ALLOW", "[10.1.0.0/16, \"fd00::/8\"]");
            let s = Settings::load(None).unwrap();
            assert!(s.egress.deny_private);
            assert_eq!(s.egress.allow, ["10.1.0.0/16".parse::<ipnet::IpNet>().unwrap(), "fd00::/8".parse().unwrap()]);
            jail.set_env("TASKMESH_EGRESS__ALLOW", "[10.1.0.0/33]");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.to_lowercase().contains("egress.allow"), "{err}");
            jail.set_env("TASKMESH_EGRESS__ALLOW", "[]");
            jail.set_env("TASKMESH_GATEWAY__TRUSTED_PROXIES", "[10.0.0.0/8]");
            assert_eq!(
                Settings::load(None).unwrap().gateway.trusted_proxies,
                ["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
            );
            jail.set_env("TASKMESH_NATS__BOGUS", "1");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.contains("bogus"), "{err}");
            Ok(())
        });
    }
}
