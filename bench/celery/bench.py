#!/usr/bin/env python3
"""Celery + Redis reference benchmark: the workloads of Taskmesh's load generator
(bench/loadgen), run against a Celery worker, with the same JSON output shape.

    python bench.py throughput --n 1000 [--concurrency C]
    python bench.py dag --n 200 [--concurrency C]
    python bench.py roundtrip --n 200

Workloads:

- `throughput`: N `noop.delay()` submitted as fast as possible, then waits until all N results
  are ready. Figures: submit_seconds (until the last message is in the broker), total_seconds
  (from the first submission until the last result is ready), runs and steps per second
  (= N / total_seconds; a run is one step here).
- `dag`: N workflows of shape 1 → 10 → 1, `chain(noop.si(), chord([noop.si()] * 10, noop.si()))`,
  submitted as fast as possible, then waits until every workflow's final task (the chord body)
  has a result. steps_per_second = 12 N / total_seconds.
- `roundtrip`: N sequential `noop.delay().get()`, each awaited before the next; latency
  percentiles over the N round trips (submit → result ready and seen by the client).

Submission: with --concurrency 1 (the default) a single loop in the main thread submits
everything, which is how a Celery client usually submits; with C > 1 the N submissions are
split among C threads sharing one producer pool and one result backend. Either way submission is
just the publish (`delay()` / `apply_async()`, which also subscribes to the result channel, as
any Celery client with the Redis backend does); it never waits on the worker. The clock starts
before the first submission, so a slow client counts against Celery, as a slow client counts
against Taskmesh in bench/loadgen.

Before each workload: the `celery` queue is purged, a worker must answer a ping (retried for up
to 30 s; otherwise the script fails) and one `noop` must complete end to end (a warm-up: the
worker's pool processes and the client's connections are up before the clock starts, as
Taskmesh is warm when bench/loadgen starts).

Prints exactly one JSON line on stdout; progress goes to stderr. Exits non-zero, with nothing on
stdout, when no worker answers or the results do not all arrive within 10 minutes.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from celery import chain, chord  # noqa: E402
from celery.result import ResultSet  # noqa: E402

from tasks import REDIS_URL, app, noop  # noqa: E402

PING_SECONDS = 30
DEADLINE_SECONDS = 600  # as bench/loadgen: give up when results have not all arrived in 10 min


def log(msg):
    print(f"[celery-bench] {msg}", file=sys.stderr, flush=True)


def fail(msg):
    log(f"ERROR: {msg}")
    sys.exit(1)


def percentile(sorted_ms, p):
    """Same rule as bench/loadgen's `percentile`: the element at index round((len - 1) * p) of
    the sorted list, rounding halves away from zero like Rust's f64::round (Python's round()
    rounds halves to even, which would pick a different element)."""
    if not sorted_ms:
        return float("nan")
    x = (len(sorted_ms) - 1) * p
    i = math.floor(x)
    if x - i >= 0.5:
        i += 1
    return sorted_ms[i]


def latency_summary(ms):
    ms = sorted(ms)
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 0.5),
        "p90_ms": percentile(ms, 0.9),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": ms[-1] if ms else float("nan"),
    }


def prepare():
    """Purge the queue, wait for a worker to answer, and run one task end to end."""
    purged = app.control.purge()
    log(f"purged {purged} waiting message(s) from the queue")
    deadline = time.monotonic() + PING_SECONDS
    last_error = None
    while True:
        try:
            replies = app.control.ping(timeout=1.0)
            if replies:
                log(f"worker(s) answered: {', '.join(sorted(k for r in replies for k in r))}")
                break
        except Exception as e:  # broker down or refusing: retried until the deadline
            last_error = e
        if time.monotonic() > deadline:
            why = f" (last error: {last_error!r})" if last_error else ""
            fail(
                f"no Celery worker answered a ping within {PING_SECONDS} s on {REDIS_URL}{why}; "
                "start one with bench/celery/worker.sh VENV"
            )
        time.sleep(0.5)
    try:
        noop.delay().get(timeout=PING_SECONDS)
    except Exception as e:
        fail(f"the warm-up noop did not complete within {PING_SECONDS} s: {e!r}")


def submit_all(n, concurrency, submit_one):
    """Calls submit_one() n times, from one loop or split among `concurrency` threads; returns
    the AsyncResults in submission order (per thread)."""
    if concurrency <= 1:
        return [submit_one() for _ in range(n)]
    shares = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    out = [None] * concurrency
    errors = []

    def work(i):
        try:
            out[i] = [submit_one() for _ in range(shares[i])]
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [r for part in out for r in part]


def wait_all(results, start):
    """Waits until every result is ready; returns the number that failed.

    ResultSet.join_native is event driven with the Redis backend: the client subscribed to each
    task's result channel when it submitted it (or when the result joins the set), first reads
    the results already stored with one MGET, then blocks on the pub/sub socket and handles each
    published result as it arrives. Nothing is polled, so waiting costs one small message per
    task and no timer granularity (polling AsyncResult.ready() would be one Redis GET per
    pending task per loop: thousands of commands per loop competing with the worker for Redis
    and the CPU, or a coarse sleep that would blur the end time). propagate=False: a failed task
    yields its exception as its value instead of aborting the wait, and is counted.
    """
    failed = 0

    def on_result(_task_id, value):
        nonlocal failed
        if isinstance(value, BaseException):
            failed += 1

    remaining = DEADLINE_SECONDS - (time.monotonic() - start)
    rs = ResultSet(results, app=app)
    try:
        rs.join_native(timeout=max(remaining, 1), propagate=False, callback=on_result)
    except TimeoutError:
        ended = sum(1 for r in results if r.ready())
        fail(f"only {ended} of {len(results)} ended in {DEADLINE_SECONDS // 60} minutes")
    return failed


def flood(n, concurrency, submit_one, label):
    start = time.monotonic()
    results = submit_all(n, concurrency, submit_one)
    submitted = time.monotonic() - start
    log(f"{label}: submitted {n} in {submitted:.3f} s; waiting for results")
    failed = wait_all(results, start)
    total = time.monotonic() - start
    log(f"{label}: {n} ended ({failed} failed) in {total:.3f} s")
    return submitted, total, failed


def throughput(n, concurrency):
    submitted, total, failed = flood(n, concurrency, noop.delay, "throughput")
    return {
        "workload": "celery-throughput",
        "runs": n,
        "failed": failed,
        "submit_seconds": submitted,
        "total_seconds": total,
        "runs_per_second": n / total,
        "steps_per_second": n / total,
    }


def dag_workflow():
    # 1 → 10 → 1. The chain's result is the chord body's: ready when the whole workflow is.
    return chain(noop.si(), chord([noop.si() for _ in range(10)], noop.si())).apply_async()


def dag(n, concurrency):
    submitted, total, failed = flood(n, concurrency, dag_workflow, "dag")
    return {
        "workload": "celery-dag",
        "runs": n,
        "failed": failed,
        "submit_seconds": submitted,
        "total_seconds": total,
        "runs_per_second": n / total,
        "steps_per_second": n * 12 / total,
    }


def roundtrip(n):
    ms = []
    for _ in range(n):
        t = time.perf_counter()
        noop.delay().get(timeout=60)
        ms.append((time.perf_counter() - t) * 1000.0)
    summary = latency_summary(ms)
    log(f"roundtrip: {n} done; p50 {summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms")
    return {"workload": "celery-roundtrip", "latency": summary}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=["throughput", "dag", "roundtrip"])
    parser.add_argument("--n", type=int, default=500, help="runs (workflows for dag)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="submitting threads for throughput and dag (1: a single loop); roundtrip is sequential",
    )
    args = parser.parse_args()
    if args.n < 1 or args.concurrency < 1:
        parser.error("--n and --concurrency must be at least 1")
    if args.concurrency > 1:
        # One result backend (one pub/sub consumer) for every thread, so the results the
        # submitting threads get back can be awaited from the main thread. Celery's Redis result
        # consumer serialises its pub/sub use with a lock.
        app.conf.result_backend_thread_safe = True

    out = sys.stdout
    # Anything a library prints goes to stderr: stdout carries the one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        log(f"{args.workload}: n={args.n}, concurrency={args.concurrency}, redis {REDIS_URL}")
        prepare()
        if args.workload == "throughput":
            report = throughput(args.n, args.concurrency)
        elif args.workload == "dag":
            report = dag(args.n, args.concurrency)
        else:
            report = roundtrip(args.n)
    print(json.dumps(report), file=out, flush=True)


if __name__ == "__main__":
    main()
