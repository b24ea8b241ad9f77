"""The Celery app of the reference benchmark (bench/celery): one `noop` task.

Broker and result backend are the same Redis database, from TM_CELERY_REDIS (default
redis://127.0.0.1:6379/15). The worker runs it with `celery -A tasks worker` (worker.sh) and
bench.py imports it, so both agree on the task's name (`tasks.noop`).

Settings are Celery's defaults where they matter for throughput (prefetch multiplier 4,
acks on receipt rather than late, JSON serialisation, no task events), so the figures are
what a stock Celery + Redis setup gives. The result backend is needed: it is how the client
learns that a task (or a chord) has finished, and chords need it.
"""

import os

from celery import Celery

REDIS_URL = os.environ.get("TM_CELERY_REDIS", "redis://127.0.0.1:6379/15")

app = Celery("tasks", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    # Stated explicitly; all are Celery's defaults.
    worker_prefetch_multiplier=4,
    task_acks_late=False,
    task_ignore_result=False,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_send_task_events=False,
    task_send_sent_event=False,
    # Benchmark results are of no use after the run; Redis drops them after an hour.
    result_expires=3600,
)


@app.task
def noop():
    return None
