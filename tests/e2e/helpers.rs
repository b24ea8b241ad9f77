//! `spawn_mesh`: a test's own mesh, and helpers to drive it through its public API.

use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use sqlx::PgPool;
use taskmesh::mesh::{Mesh, Service};
use taskmesh_bus::Bus;
use taskmesh_events::{Envelope, RunKey};
use taskmesh_testkit::{TestEnv, eventually};
use uuid::Uuid;

pub use taskmesh::mesh::Service as Svc;

/// A running test mesh and clients for it.
pub struct TestMesh {
    pub env: TestEnv,
    pub bus: Bus,
    pub pool: PgPool,
    pub mesh: Option<Mesh>,
    pub api: String,
    pub git: String,
    /// An admin key of tenant `default`.
    pub key: String,
    pub http: reqwest::Client,
    _data: tempfile::TempDir,
}

/// Every service, the usual case.
pub async fn spawn_mesh() -> TestMesh {
    spawn_with(&Service::ALL, |_| {}).await
}

/// A mesh with `services` and settings adjusted by `tweak`. Tenant `default` and its admin
/// key exist (and are visible to the gateway) before this returns, if a projector runs.
pub async fn spawn_with(services: &[Service], tweak: impl FnOnce(&mut taskmesh_config::Settings)) -> TestMesh {
    let mut env = TestEnv::new().await.expect("test environment");
    tweak(&mut env.settings);
    let (bus, pool) = taskmesh::mesh::connect(&env.settings, true).await.expect("connect");
    let pool = pool.expect("pool");
    let data = tempfile::tempdir().unwrap();
    let key = taskmesh::bootstrap::ensure_dev_tenant(&bus, data.path()).await.expect("bootstrap");
    let mesh = Mesh::start(&env.settings, bus.clone(), Some(pool.clone()), services).await.expect("mesh");
    let api = mesh.gateway.map(|a| format!("http://{a}")).unwrap_or_default();
    let git = mesh.git.map(|a| format!("http://{a}")).unwrap_or_default();
    let tm = TestMesh { env, bus, pool, mesh: Some(mesh), api, git, key, http: reqwest::Client::new(), _data: data };
    if services.contains(&Service::Projector) {
        tm.wait_projected().await;
    }
    tm
}

impl TestMesh {
    /// Stops the mesh and removes its namespace and database.
    pub async fn finish(mut self) {
        if let Some(mesh) = self.mesh.take() {
            mesh.stop().await.expect("services stop cleanly");
        }
        self.pool.close().await;
        self.env.cleanup().await;
    }

    pub fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        req.bearer_auth(&self.key)
    }

    /// Submits a YAML workflow with an `Idempotency-Key`; returns the run id and whether the
    /// answer took it for a repeat (`duplicate`).
    pub async fn submit_keyed(&self, key: &str, yaml: &str) -> (Uuid, Value) {
        let body = self.submit_yaml(&self.key, Some(key), yaml).await;
        (body["id"].as_str().unwrap().parse().unwrap(), body["duplicate"].clone())
    }

    /// Submits a YAML workflow; returns the run id.
    pub async fn submit(&self, yaml: &str) -> Uuid {
        self.submit_as(&self.key, yaml).await
    }

    /// Submits a YAML workflow with another tenant's (or role's) `key`; returns the run id.
    pub async fn submit_as(&self, key: &str, yaml: &str) -> Uuid {
        self.submit_yaml(key, None, yaml).await["id"].as_str().unwrap().parse().unwrap()
    }

    /// `POST /v1/runs` of a YAML workflow with `key`, and `idempotency_key` if given: the
    /// accepted answer's body.
    async fn submit_yaml(&self, key: &str, idempotency_key: Option<&str>, yaml: &str) -> Value {
        let mut req = self
            .http
            .post(format!("{}/v1/runs", self.api))
            .bearer_auth(key)
            .header("content-type", "application/yaml")
            .body(yaml.to_string());
        if let Some(k) = idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 202, "submit: {}", res.text().await.unwrap());
        res.json().await.unwrap()
    }

    /// Submits a run with `body` as `POST /v1/runs`'s JSON, as the `key`'s tenant; its id.
    pub async fn submit_json_as(&self, key: &str, body: Value) -> Uuid {
        let res = self.http.post(format!("{}/v1/runs", self.api)).bearer_auth(key).json(&body).send().await.unwrap();
        assert_eq!(res.status(), 202, "submit: {}", res.text().await.unwrap());
        res.json::<Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap()
    }

    /// `method` `path` (under the API) with the tenant's key and `body` as JSON.
    pub async fn send_json(&self, method: reqwest::Method, path: &str, body: &Value) -> reqwest::Response {
        self.auth(self.http.request(method, format!("{}{path}", self.api))).json(body).send().await.unwrap()
    }

    /// An authenticated GET whose answer is JSON.
    pub async fn get_json(&self, url: impl reqwest::IntoUrl) -> Value {
        self.auth(self.http.get(url)).send().await.unwrap().json().await.unwrap()
    }

    /// The `seq` of a write answered `204`, from its `Taskmesh-Seq` header.
    pub fn written_seq(res: &reqwest::Response) -> u64 {
        assert_eq!(res.status(), 204);
        let seq = res.headers().get("taskmesh-seq").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        seq.expect("a Taskmesh-Seq header with a sequence")
    }

    /// [`Self::get_json`] once the read side holds the write `seq` answered (`Taskmesh-Min-Seq`);
    /// the answer must be a `200`.
    pub async fn get_json_after(&self, url: impl reqwest::IntoUrl, seq: u64) -> Value {
        let req = self.auth(self.http.get(url)).header("Taskmesh-Min-Seq", seq.to_string());
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 200, "read after {seq}");
        res.json().await.unwrap()
    }

    pub async fn get_run(&self, id: Uuid) -> (u16, Value) {
        self.get_run_as(&self.key, id).await
    }

    pub async fn get_run_as(&self, key: &str, id: Uuid) -> (u16, Value) {
        let res = self.http.get(format!("{}/v1/runs/{id}", self.api)).bearer_auth(key).send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Waits until the run is terminal in the read model; returns its view.
    pub async fn wait_run(&self, id: Uuid, timeout: Duration) -> Value {
        self.wait_run_as(&self.key, id, timeout).await
    }

    /// [`Self::wait_run`] with another tenant's (or role's) `key`.
    pub async fn wait_run_as(&self, key: &str, id: Uuid, timeout: Duration) -> Value {
        eventually(&format!("run {id} to finish"), timeout, || async {
            let (status, run) = self.get_run_as(key, id).await;
            Ok((status == 200
                && ["succeeded", "failed", "cancelled", "timed_out"].contains(&run["status"].as_str().unwrap_or("")))
            .then_some(run))
        })
        .await
        .unwrap()
    }

    /// The `taskmesh` binary, on this test's namespace, with none of this process's
    /// `TASKMESH_*` variables. Its streams keep the test's caps: every service provisions the
    /// streams as it starts, and the defaults would set aside a GiB of the server's disk each.
    pub fn service_command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskmesh"));
        for (k, _) in std::env::vars() {
            if k.starts_with("TASKMESH_") {
                cmd.env_remove(k);
            }
        }
        let nats = &self.env.settings.nats;
        cmd.env("TASKMESH_NATS__URL", &nats.url)
            .env("TASKMESH_NATS__NAMESPACE", &nats.namespace)
            .env("TASKMESH_NATS__LOGS_MAX_BYTES", nats.logs_max_bytes.to_string())
            .env("TASKMESH_NATS__CACHE_MAX_BYTES", nats.cache_max_bytes.to_string());
        cmd
    }

    /// `taskmesh serve <service>`, to start as a child process on the test's namespace.
    pub fn serve_command(&self, service: &str) -> tokio::process::Command {
        let mut cmd = self.service_command();
        cmd.args(["serve", service])
            .env("TASKMESH_SCHEDULER__EVENT_ACK_WAIT_SECS", self.env.settings.scheduler.event_ack_wait_secs.to_string())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// The gateway's `GET /metrics` (no key), checking it answers the Prometheus text format.
    pub async fn metrics(&self) -> String {
        scrape(&self.http, &format!("{}/metrics", self.api)).await
    }

    /// Creates tenant `id` with the platform administrator's key, once the gateway sees it;
    /// returns its admin key.
    pub async fn new_tenant(&self, platform_key: &str, id: &str) -> String {
        let res = self
            .http
            .post(format!("{}/v1/tenants", self.api))
            .bearer_auth(platform_key)
            .json(&serde_json::json!({"id": id, "name": id}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "creating tenant {id}");
        let key = res.json::<Value>().await.unwrap()["admin_key"].as_str().unwrap().to_string();
        self.wait_projected().await;
        key
    }

    /// Waits until the projector has applied everything in the event stream.
    pub async fn wait_projected(&self) {
        let stream = self.bus.namespace().events_stream();
        eventually("the projector to catch up", Duration::from_secs(20), || async {
            let last = self.bus.jetstream().get_stream(&stream).await?.info().await?.state.last_sequence;
            let applied = taskmesh_store::read_checkpoint(&self.pool, taskmesh_projector::NAME).await?;
            Ok((applied >= last).then_some(()))
        })
        .await
        .unwrap();
    }

    /// Every event of a run of tenant `default`, from the log.
    pub async fn run_events(&self, id: Uuid) -> Vec<Envelope> {
        self.tenant_run_events("default", id).await
    }

    /// Every event of a run of `tenant`, from the log.
    pub async fn tenant_run_events(&self, tenant: &str, id: Uuid) -> Vec<Envelope> {
        let key = RunKey { tenant: tenant.into(), run_id: id };
        self.bus
            .read_subject(&self.bus.namespace().run(&key), 0)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.envelope)
            .collect()
    }

    /// Every message payload of a stream, as text (to scan for what must not be there).
    /// A stream's state (its messages, first and last sequences) as the server has it now.
    pub async fn stream_state(&self, stream: &str) -> async_nats::jetstream::stream::State {
        self.bus.jetstream().get_stream(stream).await.unwrap().get_info().await.unwrap().state
    }

    pub async fn stream_text(&self, stream: &str) -> String {
        use async_nats::jetstream::consumer::pull::OrderedConfig;
        use futures::StreamExt;
        let stream = self.bus.jetstream().get_stream(stream).await.unwrap();
        let consumer = stream.create_consumer(OrderedConfig::default()).await.unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut text = String::new();
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_millis(500), messages.next()).await {
            text.push_str(&String::from_utf8_lossy(&msg.payload));
            text.push('\n');
            if msg.info().map(|i| i.pending).unwrap_or(0) == 0 {
                break;
            }
        }
        text
    }

    /// Every row of every read-model table, as JSON text.
    pub async fn postgres_text(&self) -> String {
        let tables: Vec<String> =
            sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
                .fetch_all(&self.pool)
                .await
                .unwrap();
        let mut text = String::new();
        for table in tables {
            let rows: Vec<String> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT row_to_json(t)::text FROM {table} t")))
                    .fetch_all(&self.pool)
                    .await
                    .unwrap();
            text.push_str(&rows.join("\n"));
        }
        text
    }

    /// Waits until the queues between "ready" and "running" hold nothing: READY (every entry
    /// removed once admitted, held ones included), GROUPS (every run's place given back when it
    /// ended) and DISPATCH (every step taken and acked). Call it once every run has ended.
    pub async fn wait_queues_drained(&self) {
        let ns = self.bus.namespace();
        for stream in [ns.ready_stream(), ns.groups_stream(), ns.dispatch_stream()] {
            eventually(&format!("{stream} to be empty"), Duration::from_secs(20), || async {
                let messages = self.bus.jetstream().get_stream(&stream).await?.info().await?.state.messages;
                Ok((messages == 0).then_some(()))
            })
            .await
            .unwrap();
        }
    }

    /// The events on `subject`, oldest first.
    pub async fn events_on(&self, subject: &str) -> Vec<taskmesh_events::Event> {
        self.bus.read_subject(subject, 0).await.unwrap().into_iter().map(|e| e.envelope.event).collect()
    }

    /// How many events the stream holds, not counting access records: the audit log (a refused
    /// call is audited, and changes nothing else) and keys' uses.
    pub async fn event_count(&self) -> u64 {
        let ns = self.bus.namespace();
        let mut access = 0;
        for filter in [ns.audit("*"), format!("{}.evt.*.keyuse.*", ns.as_str())] {
            access += self.bus.subject_counts(&ns.events_stream(), &filter).await.unwrap().values().sum::<u64>();
        }
        let stream = self.bus.jetstream().get_stream(ns.events_stream()).await.unwrap();
        stream.cached_info().state.messages - access
    }
}

/// The step named `id` in a run view.
pub fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .with_context(|| format!("step {id} in {run}"))
        .unwrap()
}

/// `GET url` answered `200` in the Prometheus text format (no key needed): its body.
pub async fn scrape(http: &reqwest::Client, url: &str) -> String {
    let res = http.get(url).send().await.unwrap();
    assert_eq!(res.status(), 200, "{url} needs no key");
    let kind = res.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    res.text().await.unwrap()
}

/// The sum of the samples of metric `name` in a scrape whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A timestamp field of a JSON view.
pub fn ts(v: &Value, field: &str) -> chrono::DateTime<chrono::Utc> {
    v[field].as_str().with_context(|| format!("{field} in {v}")).unwrap().parse().unwrap()
}
