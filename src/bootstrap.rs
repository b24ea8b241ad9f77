//! The development tenant: `taskmesh up` (and `taskmesh bootstrap`) make sure tenant `default`
//! exists with an admin key, written to `<data dir>/api-key` (only its hash goes into events).

use std::path::Path;

use anyhow::Context;
use taskmesh_bus::Bus;
use taskmesh_events::command::{CreateApiKey, CreateTenant};
use taskmesh_events::{ErrorCode, Role};
use taskmesh_ingest::Ingest;
use uuid::Uuid;

/// The development tenant's id.
pub const DEFAULT_TENANT: &str = "default";

/// Ensures tenant `default` and an admin key whose value is in `<dir>/api-key`. Reuses a key
/// already there (re-registering it if the event log was reset). Returns the key.
pub async fn ensure_dev_tenant(bus: &Bus, dir: &Path) -> anyhow::Result<String> {
    let ingest = Ingest::new(bus.clone());
    match ingest.create_tenant(CreateTenant { tenant_id: DEFAULT_TENANT.into(), name: "Default".into() }).await {
        Ok(_) => {}
        Err(p) if p.code == ErrorCode::Conflict => {}
        Err(p) => return Err(p).context("creating tenant 'default'"),
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key_file = dir.join("api-key");
    let id_file = dir.join("api-key.id");
    let existing = std::fs::read_to_string(&key_file).ok().zip(std::fs::read_to_string(&id_file).ok());
    let (key, key_id) = match existing.and_then(|(k, id)| Some((k.trim().to_string(), id.trim().parse::<Uuid>().ok()?)))
    {
        Some(pair) => pair,
        None => {
            let (key, _, _) = taskmesh_ingest::generate_api_key();
            let id = Uuid::now_v7();
            write_private(&key_file, &key)?;
            write_private(&id_file, &id.to_string())?;
            (key, id)
        }
    };
    let command = CreateApiKey {
        tenant: DEFAULT_TENANT.into(),
        key_id,
        role: Role::Admin,
        key_hash: taskmesh_ingest::hash_api_key(&key),
        prefix: key.chars().take(10).collect(),
        name: Some("development admin key".into()),
    };
    match ingest.create_api_key(command).await {
        Ok(_) => {}
        Err(p) if p.code == ErrorCode::Conflict => {}
        Err(p) => return Err(p).context("registering the admin key"),
    }
    Ok(key)
}

/// The development secrets key in `<dir>/secrets.key`, generated on first use. Production
/// deployments set `TASKMESH_SECRETS__KEY` instead.
pub fn dev_secrets_key(dir: &Path) -> anyhow::Result<secrecy::SecretString> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("secrets.key");
    let key = match std::fs::read_to_string(&path) {
        Ok(k) => k.trim().to_string(),
        Err(_) => {
            let k = taskmesh_secrets::Keyring::generate_key();
            write_private(&path, &k)?;
            k
        }
    };
    Ok(secrecy::SecretString::from(key))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{text}")?;
    Ok(())
}
