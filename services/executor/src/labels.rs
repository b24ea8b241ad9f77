//! What an executor advertises: labels detected at start (os, arch, cpus, memory, GPUs from
//! `nvidia-smi` or `rocm-smi`, the container CLI, the sandbox) and those from configuration,
//! and the capabilities behind them (a container CLI that answers, bubblewrap).

use std::collections::BTreeMap;
use std::time::Duration;

/// GPUs found on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpus {
    pub vendor: &'static str,
    pub model: String,
    pub count: usize,
    pub memory_mb: u64,
}

/// Runs a probe command with a deadline; its stdout when it exits 0.
pub(crate) async fn probe(program: &str, args: &[&str]) -> Option<String> {
    let run = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(out)) if out.status.success() => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        _ => None,
    }
}

/// Parses `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits`.
pub fn parse_nvidia(csv: &str) -> Option<Gpus> {
    let rows: Vec<(String, u64)> = csv
        .lines()
        .filter_map(|l| {
            let (name, mem) = l.rsplit_once(',')?;
            Some((name.trim().to_string(), mem.trim().parse().ok()?))
        })
        .collect();
    let (model, memory_mb) = rows.first().cloned()?;
    Some(Gpus { vendor: "nvidia", model, count: rows.len(), memory_mb })
}

/// Parses `rocm-smi --showproductname --showmeminfo vram --json`.
pub fn parse_rocm(json: &str) -> Option<Gpus> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let cards: Vec<&serde_json::Map<String, serde_json::Value>> =
        v.as_object()?.iter().filter(|(k, _)| k.starts_with("card")).filter_map(|(_, c)| c.as_object()).collect();
    let first = cards.first()?;
    let model = ["Card Series", "Card series", "Card model", "Card SKU"]
        .iter()
        .find_map(|k| first.get(*k).and_then(|v| v.as_str()))
        .unwrap_or("amd")
        .trim()
        .to_string();
    let memory_mb = first
        .iter()
        .find(|(k, _)| k.contains("VRAM Total Memory"))
        .and_then(|(_, v)| v.as_str().and_then(|s| s.trim().parse::<u64>().ok()).or_else(|| v.as_u64()))
        .map_or(0, |b| b / (1024 * 1024));
    Some(Gpus { vendor: "amd", model, count: cards.len(), memory_mb })
}

/// The GPUs `nvidia-smi` or `rocm-smi` report, if either is installed and answers.
pub async fn detect_gpus() -> Option<Gpus> {
    if let Some(out) = probe("nvidia-smi", &["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]).await
        && let Some(g) = parse_nvidia(&out)
    {
        return Some(g);
    }
    let out = probe("rocm-smi", &["--showproductname", "--showmeminfo", "vram", "--json"]).await?;
    parse_rocm(&out)
}

/// The container CLI to use: the configured one if it answers `info`, or with `auto` the
/// first of docker and podman that does.
pub async fn detect_container_cli(setting: &str) -> Option<String> {
    let candidates: Vec<&str> = match setting {
        "none" | "" => return None,
        "auto" => vec!["docker", "podman"],
        other => vec![other],
    };
    for cli in candidates {
        if probe(cli, &["info"]).await.is_some() {
            return Some(cli.to_string());
        }
    }
    tracing::info!(setting, "no container CLI answers `info`; container steps will fail on this executor");
    None
}

/// Total memory in MiB, from /proc/meminfo.
fn memory_mb() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// The detected labels, then the configured ones over them.
pub fn labels(
    gpus: Option<&Gpus>,
    container_cli: Option<&str>,
    sandboxed: bool,
    configured: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert("os".into(), std::env::consts::OS.into());
    out.insert("arch".into(), std::env::consts::ARCH.into());
    out.insert("cpus".into(), std::thread::available_parallelism().map_or(1, |n| n.get()).to_string());
    if let Some(mb) = memory_mb() {
        out.insert("memory_mb".into(), mb.to_string());
    }
    if let Some(g) = gpus {
        out.insert("gpu".into(), g.vendor.into());
        out.insert("gpu_model".into(), g.model.clone());
        out.insert("gpus".into(), g.count.to_string());
        out.insert("gpu_memory_mb".into(), g.memory_mb.to_string());
    }
    if let Some(cli) = container_cli {
        let name = std::path::Path::new(cli).file_name().map_or(cli.into(), |n| n.to_string_lossy().into_owned());
        out.insert("container".into(), name);
    }
    if sandboxed {
        out.insert("sandbox".into(), "bwrap".into());
    }
    out.extend(configured.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi_csv() {
        let g = parse_nvidia("NVIDIA A100-SXM4-80GB, 81920\nNVIDIA A100-SXM4-80GB, 81920\n").unwrap();
        assert_eq!(g, Gpus { vendor: "nvidia", model: "NVIDIA A100-SXM4-80GB".into(), count: 2, memory_mb: 81920 });
        assert_eq!(parse_nvidia(""), None);
        assert_eq!(parse_nvidia("No devices were found\n"), None);
    }

    #[test]
    fn parses_rocm_smi_json() {
        let json = r#"{"card0": {"Card Series": "AMD Instinct MI210", "VRAM Total Memory (B)": "68702699520"},
                       "card1": {"Card Series": "AMD Instinct MI210", "VRAM Total Memory (B)": "68702699520"},
                       "system": {"Driver version": "6.1"}}"#;
        let g = parse_rocm(json).unwrap();
        assert_eq!((g.vendor, g.model.as_str(), g.count, g.memory_mb), ("amd", "AMD Instinct MI210", 2, 65520));
        assert_eq!(parse_rocm("{}"), None);
    }

    #[test]
    fn configured_labels_override_detected_ones() {
        let configured: BTreeMap<String, String> =
            [("gpu".into(), "nvidia".into()), ("pool".into(), "fast".into())].into();
        let l = labels(None, Some("/usr/bin/podman"), true, &configured);
        assert_eq!(l["os"], std::env::consts::OS);
        assert_eq!(l["gpu"], "nvidia");
        assert_eq!(l["pool"], "fast");
        assert_eq!(l["container"], "podman");
        assert_eq!(l["sandbox"], "bwrap");
    }
}
