#!/usr/bin/env python3
"""Static checks of the deployment files (no Docker engine or cluster needed).

Checks that docker-compose.yml and every k8s/*.yaml parse, that every `serve <name>`
names one of the seven Taskmesh services, and that ports, probes, health endpoints,
depends_on conditions, security settings, the projector's single replica and the KEDA
trigger are consistent. Needs PyYAML. Exit status 0 when everything holds.

Usage: python3 scripts/check_deploy.py   (from anywhere; paths are relative to the repo)
"""
import glob
import os
import re
import sys

try:
    import yaml
except ImportError:
    sys.exit("check_deploy: PyYAML is required (pip install pyyaml)")

os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SERVICES = {"gateway","ingest","scheduler","executor","git-integration","notification","projector"}
ok = True
def fail(m):
    global ok; ok = False; print("FAIL:", m)
files = ["docker-compose.yml"] + sorted(glob.glob("k8s/*.yaml"))
docs = {}
for f in files:
    try:
        docs[f] = [d for d in yaml.safe_load_all(open(f)) if d is not None]
        print(f"parsed {f}: {len(docs[f])} document(s)")
    except Exception as e:
        fail(f"{f}: {e}")

# every `serve <name>` anywhere in the written files
for f in files + ["Dockerfile", "docs/operations.md", "k8s/README.md"]:
    text = open(f).read()
    for m in re.finditer(r'serve["\',\s]+([A-Za-z<][\w<>-]*)', text):
        n = m.group(1)
        if n not in SERVICES and n not in ("<service>",):
            fail(f"{f}: serve {n}")

# compose
c = docs["docker-compose.yml"][0]
assert "version" not in c
svcs = c["services"]
want = {"nats","postgres","migrate"} | SERVICES
if set(svcs) != want: fail(f"compose services {set(svcs)}")
if set(c["volumes"]) != {"nats-data","pg-data"}: fail("volumes")
port = {"gateway":8080,"git-integration":8081}
for s in SERVICES:
    d = svcs[s]
    if d.get("build") != "." or d.get("image") != "taskmesh:local": fail(f"{s} build/image")
    if d["command"] != ["serve", s]: fail(f"{s} command {d['command']}")
    if d.get("restart") != "unless-stopped": fail(f"{s} restart")
    dep = d["depends_on"]
    if dep != {"migrate":{"condition":"service_completed_successfully"},"nats":{"condition":"service_healthy"},"postgres":{"condition":"service_healthy"}}: fail(f"{s} depends_on {dep}")
    env = d["environment"]
    for k in ("TASKMESH_NATS__URL","TASKMESH_POSTGRES__URL","TASKMESH_TELEMETRY__LOG_FORMAT","RUST_LOG","TASKMESH_NATS__REPLICAS"):
        if k not in env: fail(f"{s} env missing {k}")
    p = port.get(s, 9090)
    hc = d["healthcheck"]["test"]
    if hc != ["CMD","curl","-fsS",f"http://localhost:{p}/readyz"]: fail(f"{s} healthcheck {hc}")
    if p == 9090 and env.get("TASKMESH_HEALTH__LISTEN") != "0.0.0.0:9090": fail(f"{s} health listen")
    if p != 9090 and "TASKMESH_HEALTH__LISTEN" in env: fail(f"{s} has health listen")
    if s == "gateway" and (env.get("TASKMESH_GATEWAY__LISTEN") != "0.0.0.0:8080" or d["ports"] != ["8080:8080"]): fail("gateway listen/ports")
    if s == "git-integration" and (env.get("TASKMESH_GIT__LISTEN") != "0.0.0.0:8081" or d["ports"] != ["8081:8081"]): fail("git listen/ports")
    if s not in port and "ports" in d: fail(f"{s} publishes ports")
    bad = [k for k in env if k.startswith("TASKMESH_") and not re.fullmatch(r"TASKMESH_[A-Z]+__[A-Z_]+", k)]
    if bad: fail(f"{s} malformed env {bad}")
m = svcs["migrate"]
if m["command"] != ["migrate"] or m["restart"] != "no" or m["build"] != ".": fail("migrate")
if svcs["nats"]["image"] != "nats:2.10-alpine" or svcs["postgres"]["image"] != "postgres:16-alpine": fail("images")

# k8s
kz = docs["k8s/kustomization.yaml"][0]
listed = set(kz["resources"])
on_disk = {f.split("/")[1] for f in glob.glob("k8s/*.yaml")} - {"kustomization.yaml"}
if on_disk - listed != {"secret.example.yaml"}: fail(f"kustomization vs disk: {on_disk ^ listed}")
deps = {}
for f, ds in docs.items():
    if not f.startswith("k8s/"): continue
    for d in ds:
        if d.get("kind") == "Deployment": deps[d["metadata"]["name"]] = (f, d)
if set(deps) != SERVICES: fail(f"deployments {set(deps)}")
for name, (f, d) in deps.items():
    if f != f"k8s/{name}.yaml": fail(f"{name} in {f}")
    spec = d["spec"]; pod = spec["template"]["spec"]
    if spec["selector"]["matchLabels"].items() - spec["template"]["metadata"]["labels"].items(): fail(f"{name} selector")
    (ctr,) = pod["containers"]
    if ctr["image"] != "taskmesh:latest" or ctr["args"] != ["serve", name]: fail(f"{name} image/args")
    refs = [list(e.values())[0]["name"] for e in ctr["envFrom"]]
    if refs != ["taskmesh-config","taskmesh-secrets"]: fail(f"{name} envFrom")
    p = port.get(name, 9090)
    ports = {pp["name"]: pp["containerPort"] for pp in ctr["ports"]}
    for probe, path in (("livenessProbe","/healthz"),("readinessProbe","/readyz")):
        g = ctr[probe]["httpGet"]
        if g["path"] != path or ports.get(g["port"]) != p: fail(f"{name} {probe}")
    if not (ctr["resources"]["requests"] and ctr["resources"]["limits"]): fail(f"{name} resources")
    sc = pod["securityContext"]; csc = ctr["securityContext"]
    if not (sc["runAsNonRoot"] and sc["runAsUser"] == 10001 and csc["readOnlyRootFilesystem"] and csc["allowPrivilegeEscalation"] is False): fail(f"{name} security")
    mounts = {vm["mountPath"] for vm in ctr.get("volumeMounts", [])}
    if "/tmp" not in mounts: fail(f"{name} /tmp")
    env = {e["name"]: e.get("value") for e in ctr.get("env", [])}
    if p == 9090 and env.get("TASKMESH_HEALTH__LISTEN") != "0.0.0.0:9090": fail(f"{name} health env")
    if pod.get("enableServiceLinks") is not False: fail(f"{name} service links")
    if name == "executor":
        if pod["terminationGracePeriodSeconds"] != 60 or "replicas" in spec: fail("executor grace/replicas")
        if int(env["TASKMESH_EXECUTOR__DRAIN_TIMEOUT_SECS"]) >= 60: fail("drain >= grace")
    if name == "projector" and (spec["replicas"] != 1 or spec["strategy"]["type"] != "Recreate"): fail("projector")
    print(f"checked deployment {name}: port {p}, replicas {spec.get('replicas', '(KEDA)')}")
svc = {d["metadata"]["name"]: d for ds in docs.values() for d in ds if d.get("kind") == "Service"}
if set(svc) != {"gateway","git-integration"}: fail("services")
for n, s in svc.items():
    if s["spec"]["ports"][0]["port"] != port[n] or s["spec"]["selector"] != deps[n][1]["spec"]["selector"]["matchLabels"]: fail(f"service {n}")
job = docs["k8s/migrate-job.yaml"][0]
if job["spec"]["template"]["spec"]["containers"][0]["args"] != ["migrate"]: fail("job")
so = docs["k8s/executor-keda.yaml"][0]
t = so["spec"]["triggers"][0]
exp = {"natsServerMonitoringEndpoint":"nats.taskmesh.svc.cluster.local:8222","account":"$G","stream":"TM_DISPATCH","consumer":"executors","lagThreshold":"10","activationLagThreshold":"0"}
if so["apiVersion"] != "keda.sh/v1alpha1" or t["type"] != "nats-jetstream" or t["metadata"] != exp: fail("keda trigger")
if so["spec"]["minReplicaCount"] != 0 or so["spec"]["maxReplicaCount"] != 20 or so["spec"]["scaleTargetRef"]["name"] != "executor": fail("keda spec")
if not all(isinstance(v, str) for v in t["metadata"].values()): fail("keda metadata not strings")
pdbs = {d["metadata"]["name"]: d for d in docs["k8s/pdb.yaml"]}
if set(pdbs) != {"gateway","scheduler"}: fail("pdbs")
for n, d in pdbs.items():
    if d["spec"]["selector"]["matchLabels"] != deps[n][1]["spec"]["selector"]["matchLabels"]: fail(f"pdb {n}")
cm = docs["k8s/configmap.yaml"][0]["data"]
if not all(isinstance(v, str) for v in cm.values()): fail("configmap values not strings")
sec = docs["k8s/secret.example.yaml"][0]
if list(sec["stringData"]) != ["TASKMESH_POSTGRES__URL"]: fail("secret")
print("ALL OK" if ok else "FAILURES"); sys.exit(0 if ok else 1)
