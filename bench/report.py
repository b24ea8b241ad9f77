#!/usr/bin/env python3
"""Turns scripts/bench's results into docs/benchmarks.md (medians over repetitions)."""
import datetime
import json
import platform
import statistics
import subprocess
import sys

path, idle_kb, peak_kb, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rows = [json.loads(l) for l in open(path) if l.strip()]
by = {}
for r in rows:
    key = r["workload"] + (f"@{r['rate']:g}" if r["workload"] == "openloop" else "")
    by.setdefault(key, []).append(r)
nan = float("nan")


def med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else nan


def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"


def get(rows, *keys):
    out = []
    for r in rows:
        v = r
        for k in keys:
            v = v.get(k, {}) if isinstance(v, dict) else {}
        out.append(v if isinstance(v, (int, float)) else nan)
    return out


def fmt(x, digits=1):
    return "—" if x != x else f"{x:,.{digits}f}"


t, d, rt, ch, api, lim = (by.get(k, []) for k in ["throughput", "dag", "roundtrip", "chain", "api", "limits"])
cpu = by.get("cpu_split", [])


def cpu_share(part):
    """Median share of the machine's CPU a part used during the throughput workload (%)."""
    return med([100 * r["cpu_seconds"].get(part, 0) / (r["seconds"] * r["cores"]) for r in cpu])


def cpu_per_run(part):
    """Median CPU milliseconds a part spent per run of the throughput workload."""
    runs = med(get(t, "runs"))
    return med([1000 * r["cpu_seconds"].get(part, 0) / runs for r in cpu])
ct, cd, crt = (by.get(k, []) for k in ["celery-throughput", "celery-dag", "celery-roundtrip"])
open_rates = sorted({r["rate"] for r in rows if r["workload"] == "openloop"})

steps_s = med(get(t, "steps_per_second"))
dag_s = med(get(d, "runs_per_second"))
rt50, rt99 = med(get(rt, "latency", "p50_ms")), med(get(rt, "latency", "p99_ms"))
chain_s, hop_ms = med(get(ch, "total_seconds")), med(get(ch, "ms_per_hop"))
api_rps, api50, api99 = med(get(api, "requests_per_second")), med(get(api, "latency", "p50_ms")), med(get(api, "latency", "p99_ms"))
lag50, lag99 = med(get(t, "projection_lag", "p50_ms")), med(get(t, "projection_lag", "p99_ms"))
c_steps = med(get(ct, "steps_per_second"))
c_dag = med(get(cd, "runs_per_second"))
c50, c99 = med(get(crt, "latency", "p50_ms")), med(get(crt, "latency", "p99_ms"))
js_one = med(get(lim, "jetstream_publish_acked_one_by_one_per_second"))
js_pipe = med(get(lim, "jetstream_publish_pipelined_per_second"))
js_cons = med(get(lim, "jetstream_consume_acked_per_second"))
pg_commit = med(get(lim, "postgres_single_row_commits_per_second"))
pg_batch = med(get(lim, "postgres_batched_rows_per_second"))


# RunSubmitted, StepDispatched, RunStarted, StepStarted, StepSucceeded, RunSucceeded (pinned by
# tests/e2e/events.rs) and the submission's AuditRecorded.
EVENTS_PER_RUN = 7


def sustained(rate):
    """Runs started per second at an open-loop rate: all of them had started by the end of the
    arrivals plus the slowest start."""
    rows = by.get(f"openloop@{rate:g}", [])
    return med([r["runs"] / (r["offered_seconds"] + r["start_latency"]["max_ms"] / 1000) for r in rows])


write_rate = med([sustained(r) for r in open_rates if r >= 500])


def ratio(a, b):
    return nan if (a != a or b != b or b == 0) else a / b


lines = [
    "# Benchmarks", "",
    f"Measured {datetime.date.today()} by `./scripts/bench` ({reps} repetitions; medians).", "",
    "## Machine and method", "",
    f"- {platform.machine()}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores; "
    f"{version(['nats-server', '--version'])}; {version(['psql', '--version'])}; {version(['redis-server', '--version'])}.",
    "- `taskmesh up` (release build, every service in one process, 16 executor slots, API rate limits",
    "  off) against the machine's NATS JetStream (file storage) and Postgres. Every step is a `noop`",
    "  built-in, so the figures are Taskmesh's own overhead: each step is appended, dispatched,",
    "  leased, reported and projected, durably.",
    "- The load generator (`bench/loadgen`) talks to the public REST API and waits on",
    "  `GET /v1/runs/{id}` (the read side), so every figure includes the projection.",
    "- Celery (`bench/celery`, prefork, 2 processes, Redis broker and result backend) runs the same",
    "  workloads in the same repetitions, after Taskmesh's, on the same machine. Its tasks are",
    "  acknowledged in Redis only; nothing is written durably per task.",
    "- The parts' limits (`taskmesh-bench limits`) are measured in each repetition too: JetStream",
    "  publishes of 512 bytes acknowledged one at a time and with 256 in flight, a pull consumer",
    "  acknowledging each message, and Postgres single-row commits and 1,000-row batched inserts.",
    "",
    "## Results", "",
    "| workload | figure | Taskmesh | Celery + Redis | Taskmesh ÷ Celery |", "|---|---|---|---|---|",
    f"| throughput: one-step runs, 64 in flight | steps/s end to end | {fmt(steps_s, 0)} | {fmt(c_steps, 0)} | {fmt(ratio(steps_s, c_steps), 2)} |",
    f"| 1 → 10 → 1 DAG, 32 in flight | workflows/s | {fmt(dag_s)} | {fmt(c_dag)} | {fmt(ratio(dag_s, c_dag), 2)} |",
    f"| sequential round trip (submit → succeeded, read side) | p50 ms | {fmt(rt50)} | {fmt(c50, 2)} | {fmt(ratio(rt50, c50), 1)} |",
    f"| sequential round trip | p99 ms | {fmt(rt99)} | {fmt(c99, 2)} | {fmt(ratio(rt99, c99), 1)} |",
    f"| {ch[0]['hops'] if ch else '?'}-step sequential chain | total s / ms per hop | {fmt(chain_s, 2)} / {fmt(hop_ms, 2)} | | |",
    f"| `GET /v1/runs/{{id}}`, 32 in flight | requests/s | {fmt(api_rps, 0)} | | |",
    f"| `GET /v1/runs/{{id}}` | p50 / p99 ms | {fmt(api50, 2)} / {fmt(api99, 2)} | | |",
    f"| projection lag under the throughput load (submit accepted → readable) | p50 / p99 ms | {fmt(lag50)} / {fmt(lag99)} | | |",
    f"| memory: `taskmesh up` RSS | idle / peak MB | {idle_kb/1024:.0f} / {peak_kb/1024:.0f} | | |",
    "",
    "Failed runs across all repetitions: " + str(sum(r.get('failed', 0) for r in t + d + ct + cd)) + ".", "",
    "### Open-loop arrivals (one-step runs at a fixed rate)", "",
    "Runs are submitted on a fixed schedule whatever the mesh does, for a few seconds per rate;",
    "latency is from the submission to the step's start and to the run's end (the events' own",
    "times). Where the rate is above what the mesh sustains, the queue grows and so does latency.", "",
    "| offered rate | runs | submit → step start p50 / p90 / p99 / max ms | submit → run end p50 / p99 ms |",
    "|---|---|---|---|",
    *[
        f"| {rate:g}/s | {by[f'openloop@{rate:g}'][0]['runs']} | "
        f"{fmt(med(get(by[f'openloop@{rate:g}'], 'start_latency', 'p50_ms')))} / "
        f"{fmt(med(get(by[f'openloop@{rate:g}'], 'start_latency', 'p90_ms')))} / "
        f"{fmt(med(get(by[f'openloop@{rate:g}'], 'start_latency', 'p99_ms')))} / "
        f"{fmt(med(get(by[f'openloop@{rate:g}'], 'start_latency', 'max_ms')))} | "
        f"{fmt(med(get(by[f'openloop@{rate:g}'], 'finish_latency', 'p50_ms')))} / "
        f"{fmt(med(get(by[f'openloop@{rate:g}'], 'finish_latency', 'p99_ms')))} |"
        for rate in open_rates
    ],
    "",
    "### The parts' own limits on this machine", "",
    "| part | figure | median |", "|---|---|---|",
    f"| JetStream publish, each ack awaited before the next | messages/s | {fmt(js_one, 0)} |",
    f"| JetStream publish, 256 in flight | messages/s | {fmt(js_pipe, 0)} |",
    f"| JetStream pull consumer, ack per message | messages/s | {fmt(js_cons, 0)} |",
    f"| Postgres single-row insert, one commit each | commits/s | {fmt(pg_commit, 0)} |",
    f"| Postgres 1,000-row batched insert (UNNEST) | rows/s | {fmt(pg_batch, 0)} |",
    "",
    f"A one-step run costs Taskmesh {EVENTS_PER_RUN} events in the log, each an",
    "acknowledged JetStream append, plus dispatch, lease and report messages. Read against the",
    f"table: Taskmesh's {fmt(steps_s, 0)} steps/s is {fmt(100 * ratio(steps_s * EVENTS_PER_RUN, js_pipe), 1)} % of what pipelined",
    f"appends would carry at {EVENTS_PER_RUN} events a run, and {fmt(100 * ratio(steps_s * EVENTS_PER_RUN, js_one), 1)} % of one-at-a-time",
    "appends. The gap is Taskmesh's own: the parts are not what holds it back.", "",
    "## Against the issue's targets", "",
    "| target | measured (median) | met |", "|---|---|---|",
    *[f"| {name} | {value} | {'yes' if ok else 'no'} |" for name, value, ok in [
        (f"≥ 5× Celery's throughput in the same run (≥ {fmt(5 * c_steps, 0)} steps/s; the issue's floor 3,500)",
         f"{fmt(steps_s, 0)} steps/s ({fmt(ratio(steps_s, c_steps), 2)}× Celery)", steps_s >= max(3500, 5 * (c_steps if c_steps == c_steps else 0))),
        (f"≥ 5× Celery's 1 → 10 → 1 rate in the same run (≥ {fmt(5 * c_dag)} workflows/s)",
         f"{fmt(dag_s)} workflows/s ({fmt(ratio(dag_s, c_dag), 2)}× Celery)", c_dag == c_dag and dag_s >= 5 * c_dag),
        ("round trip p50 no worse than Celery's in the same run", f"{fmt(rt50)} ms vs {fmt(c50, 2)} ms", c50 == c50 and rt50 <= c50),
        ("round trip p99 < 10 ms", f"{fmt(rt99)} ms", rt99 < 10),
        ("dispatch latency at 500 runs/s: p50 < 5 ms, p99 < 25 ms",
         (f"p50 {fmt(med(get(by['openloop@500'], 'start_latency', 'p50_ms')))} ms, p99 {fmt(med(get(by['openloop@500'], 'start_latency', 'p99_ms')))} ms"
          if "openloop@500" in by else "not measured"),
         "openloop@500" in by and med(get(by["openloop@500"], "start_latency", "p50_ms")) < 5 and med(get(by["openloop@500"], "start_latency", "p99_ms")) < 25),
        ("400-step chain < 2 s (< 5 ms per hop)", f"{fmt(chain_s, 2)} s", chain_s < 2),
        ("`GET /v1/runs/{id}` p99 < 5 ms at 2,000 req/s",
         f"p99 {fmt(api99)} ms at {fmt(api_rps, 0)} req/s (32 in flight, closed loop)", api99 < 5 and api_rps >= 2000),
        ("projection lag p99 < 100 ms at full throughput", f"p99 {fmt(lag99)} ms", lag99 < 100),
        ("`taskmesh up` idle RSS < 80 MB", f"{idle_kb/1024:.0f} MB", idle_kb / 1024 < 80),
    ]],
    "",
    "## What changed, and what the profile said", "",
    "The run before this one (2026-11-22, same machine and method, before the changes below)",
    "measured 103 steps/s, 21.3 DAG workflows/s, a round trip of 21.2 / 30.9 ms (p50 / p99),",
    "a 400-step chain of 3.51 s (8.8 ms per hop) and a projection lag of 765 ms / 1.09 s. Those",
    "figures are from another run and so only a rough guide; the ratios above are the fair",
    "comparison. What was changed, each from a profile or a count of round trips:", "",
    "- **The scheduler held one lock over its whole cache, across every JetStream round trip**,",
    "  and its reactor handled one event at a time. A one-step run needed about nine awaited round",
    "  trips under that lock, so about 100 runs/s was the ceiling whatever the CPU. It now locks",
    "  per run, and the reactor handles run events in 32 lanes by subject (one run's events in",
    "  order, different runs side by side).",
    "- **Each new run was read back from the log** (a last-message request, then an ephemeral",
    "  consumer created, fetched and deleted) although its `RunSubmitted` is its whole state. It",
    "  is now built from the event.",
    "- **Lease and report refreshed the run before deciding** (one more request each). They now",
    "  decide on the cache and let the expected-sequence append catch a stale one.",
    "- **The dispatcher awaited each admission's enqueue and READY deletion in turn.** A round",
    "  now sends them pipelined.",
    "- **The projector waited for up to 512 events** as long as each came within 2 ms, so under",
    "  a steady load a batch took most of a second to gather. It now commits whatever has arrived",
    "  (group commit), writes a run's `last_seq` once per batch, and announces its checkpoint with",
    "  `NOTIFY`, so reads with `Taskmesh-Min-Seq` wake on commit instead of polling.",
    "- **glibc malloc was the top of a flat `taskmesh` profile.** The binary now uses mimalloc.",
    "- **The benchmark itself:** the throughput workload's lag reads held submission slots while",
    "  they waited, so a lagging read side slowed the submitting. They now run beside it.", "",
    "## What stands in the way", "",
    "Where the machine's CPU went during the throughput workload (median over repetitions):", "",
    "| process | share of the machine's CPU | CPU ms per run |", "|---|---|---|",
    *[f"| {p} | {fmt(cpu_share(p))} % | {fmt(cpu_per_run(p), 2)} |" for p in ["nats-server", "taskmesh", "postgres"]],
    f"| the rest: the load generator (gone before the second reading, so not counted by name), the kernel's idle time and other processes | {fmt(100 - sum(cpu_share(p) for p in ['nats-server', 'taskmesh', 'postgres']))} % | |",
    "",
    "A system-wide `perf record` under the same load (taken by hand on 2026-11-22, not by this",
    "script) finds the machine saturated and no single hot spot left in `taskmesh`: allocation,",
    "copying, JSON and the NATS client, spread thin. What the figures say:", "",
    f"- **CPU per run is the limit now.** Taskmesh, nats-server and Postgres together spend about",
    f"  {fmt(sum(cpu_per_run(p) for p in ['nats-server', 'taskmesh', 'postgres']), 1)} CPU-ms per one-step run. That is about two thirds of the machine at this rate; the load generator",
    "  takes much of the rest. The issue's 3,500 steps/s would need under 0.6 CPU-ms per run",
    "  across all three, a ninefold cut: fewer messages per step, not faster code on the same path.",
    "- **JetStream calls per step.** A one-step run is 7 acknowledged appends plus a READY",
    "  publish and delete, a DISPATCH publish, pull and ack, a timer message, a lease and a report",
    "  request/reply, stream-info requests for admission counts, and deliveries to three durable",
    "  consumers (scheduler, projector, notification). Candidates: `RunStarted` appended with the",
    "  first `StepStarted` rather than after it, admission counts kept by the leader between",
    "  stream-info reads, and the timer message only for runs with a deadline shorter than the",
    "  platform's maximum.",
    "- **Memory.** Idle RSS rose from 26 MB to about 46 MB with mimalloc, which keeps freed",
    "  memory for reuse; still under the 80 MB target.",
    f"- **The read side.** The projector still sends one statement per event change inside its",
    f"  batch transaction (p50 lag {fmt(lag50, 0)} ms under the throughput load). Multi-row statements per table per batch",
    "  are next; they need care, since a batch may hold several events for the same row.",
    "- **The round trip** (p50 above) is the sum of the hops: the gateway's key lookup and quota",
    "  count in Postgres, ingest's append, the scheduler's append and READY publish, the",
    "  dispatcher's round, the executor's pull, lease, report and ack, and the projector's commit;",
    "  each is a local round trip, and the load generator polls the run every 0.5 ms. On this",
    "  2-core machine the load generator and Celery's idle worker share the CPU with the mesh.", "",
    "## Not measured yet", "",
    "apalis (the Rust task queue on Redis) in the same run.", "",
    "## Raw figures", "", "```", *[json.dumps(r) for r in rows], "```", "",
]
open("docs/benchmarks.md", "w").write("\n".join(lines))
print("\n".join(lines[:60]))
