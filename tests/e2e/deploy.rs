//! docker-compose.yml and k8s/ are checked statically (there is no Docker engine or cluster
//! here): they parse, and name only services, images and commands that exist.

use std::path::Path;

use clap::ValueEnum;
use serde_yaml_ng::Value;
use taskmesh::mesh::Service;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn service_names() -> Vec<String> {
    Service::value_variants().iter().map(|s| s.to_possible_value().unwrap().get_name().to_string()).collect()
}

/// Whether `args` is a `taskmesh` command line that exists.
fn valid_command(args: &[String]) -> bool {
    match args {
        [cmd] => ["up", "migrate", "bootstrap"].contains(&cmd.as_str()),
        [serve, services @ ..] if serve == "serve" => {
            !services.is_empty() && services.iter().all(|s| service_names().contains(s))
        }
        _ => false,
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

#[test]
fn compose_file_names_only_real_services_images_and_commands() {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let doc: Value = serde_yaml_ng::from_str(&text).unwrap();
    let services = doc["services"].as_mapping().expect("services");
    let names: Vec<String> = services.keys().filter_map(|k| k.as_str().map(str::to_owned)).collect();
    for required in service_names().iter().chain(["nats".to_string(), "postgres".to_string()].iter()) {
        assert!(names.contains(required), "compose runs {required}");
    }
    assert!(root().join("Dockerfile").is_file());
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        if svc.get("build").is_some() {
            assert_eq!(
                svc["build"].as_str().or_else(|| svc["build"]["context"].as_str()),
                Some("."),
                "{name} builds the workspace"
            );
            let command = strings(&svc["command"]);
            assert!(valid_command(&command), "{name}: `taskmesh {}` is not a command", command.join(" "));
        } else {
            let image = svc["image"].as_str().unwrap_or_default();
            assert!(image.starts_with("nats:") || image.starts_with("postgres:"), "{name} uses a known image: {image}");
        }
        for dep in svc["depends_on"].as_mapping().map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
            assert!(names.contains(&dep.as_str().unwrap().to_string()), "{name} depends on an existing service");
        }
        assert!(svc.get("healthcheck").is_some() || svc["restart"] == "no", "{name} has a health check");
    }
}

#[test]
fn kubernetes_manifests_run_real_commands() {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(root().join("k8s")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let doc = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let pod = match doc["kind"].as_str() {
                Some("Deployment") => &doc["spec"]["template"]["spec"],
                Some("Job") => &doc["spec"]["template"]["spec"],
                _ => continue,
            };
            for c in pod["containers"].as_sequence().unwrap() {
                let args = strings(&c["args"]);
                assert!(valid_command(&args), "{}: `taskmesh {}`", path.display(), args.join(" "));
                if args.len() == 2 {
                    seen.push(args[1].clone());
                }
            }
        }
    }
    seen.sort();
    let mut all = service_names();
    all.sort();
    assert_eq!(seen, all, "one Deployment per service");
    let keda = std::fs::read_to_string(root().join("k8s/executor-keda.yaml")).unwrap();
    let keda: Value = serde_yaml_ng::from_str(&keda).unwrap();
    assert_eq!(keda["spec"]["minReplicaCount"], 0, "executors scale to zero");
    assert_eq!(
        keda["spec"]["triggers"][0]["metadata"]["consumer"],
        taskmesh_events::subjects::pool_consumer(taskmesh_events::subjects::ANY_POOL)
    );
}

use serde::Deserialize;
