#!/usr/bin/env bash
#
# bench/celery/worker.sh — runs the Celery worker the reference benchmark measures, in the
# foreground (exec: its pid is this script's pid). The issue's reference setup: prefork pool,
# 2 processes, Redis as broker and result backend (TM_CELERY_REDIS, see tasks.py). Gossip,
# mingle and heartbeats are off: they only matter to a cluster of workers.
#
# Usage: bench/celery/worker.sh VENV [EXTRA CELERY WORKER OPTIONS...]
#   (VENV made by bench/celery/setup.sh; a repeated option such as --concurrency 4 wins)
#
# Stop it with SIGTERM (warm shutdown) to its pid; the pool's children exit with it.

set -euo pipefail

if (($# < 1)); then
  printf 'usage: %s VENV [CELERY WORKER OPTIONS...]\n' "$0" >&2
  exit 2
fi
VENV="$(cd "$1" && pwd)"
shift
[[ -x $VENV/bin/celery ]] || { printf '%s has no bin/celery: run bench/celery/setup.sh %s\n' "$VENV" "$VENV" >&2; exit 1; }

cd "$(dirname "${BASH_SOURCE[0]}")"
exec "$VENV/bin/celery" -A tasks worker --pool prefork --concurrency 2 --loglevel WARNING \
  --without-gossip --without-mingle --without-heartbeat "$@"
