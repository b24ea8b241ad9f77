#!/usr/bin/env bash
#
# bench/celery/setup.sh — what the Celery reference benchmark needs: a virtualenv with the
# pinned Celery + Redis client (bench/celery/requirements.txt, from PyPI) and a Redis server
# answering on 127.0.0.1:6379. Installs python3 and its venv module with apt-get when they are
# missing, and the Debian package redis-server when no Redis answers and none is installed.
# Idempotent: a venv holding exactly these requirements is reused, and a Redis that already
# answers is used as it is.
#
# Usage: bench/celery/setup.sh VENV
#
# A Redis started here runs without persistence (--save '' --appendonly no) and keeps running
# after this script exits. The benchmark uses database 15 of it (see tasks.py).

set -euo pipefail

_TM_CELERY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_TM_CELERY_REPO="$(cd "$_TM_CELERY_DIR/../.." && pwd)"
# shellcheck source=scripts/lib/infra.sh
source "$_TM_CELERY_REPO/scripts/lib/infra.sh"

TM_CELERY_REQUIREMENTS="$_TM_CELERY_DIR/requirements.txt"

# tm_celery_venv VENV: VENV exists and holds the pinned requirements.
tm_celery_venv() {
  local venv=$1
  tm_need_python_venv
  # The stamp is a copy of the requirements the venv was made with: editing requirements.txt
  # makes the next run install again.
  local stamp="$venv/.taskmesh-celery-requirements"
  if [[ -x $venv/bin/celery && -x $venv/bin/python && -f $stamp ]] \
    && cmp -s "$TM_CELERY_REQUIREMENTS" "$stamp"; then
    tm_log "celery ready in $venv"
    return 0
  fi
  tm_log "installing $(grep -v '^[[:space:]]*#' "$TM_CELERY_REQUIREMENTS" | xargs) into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$TM_CELERY_REQUIREMENTS"
  cp "$TM_CELERY_REQUIREMENTS" "$stamp"
}

_tm_redis_ok() {
  command -v redis-cli >/dev/null 2>&1 \
    && [[ $(timeout 3 redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null) == PONG ]]
}

# tm_celery_redis: Redis answers on 127.0.0.1:6379; start one if nothing does.
tm_celery_redis() {
  if _tm_redis_ok; then
    tm_log "Redis: answers on 127.0.0.1:6379 — using it"
    return 0
  fi
  # redis-server depends on redis-tools (redis-cli) in Debian.
  tm_need_pkg redis-server redis-server
  tm_need_pkg redis-cli redis-tools
  # Installing the package may have started Debian's own instance.
  if _tm_redis_ok; then
    tm_log "Redis: answers on 127.0.0.1:6379 — using it"
    return 0
  fi
  if tm_port_open 127.0.0.1 6379; then
    tm_die "something listens on 127.0.0.1:6379 but does not answer a Redis PING"
  fi
  local server
  server="$(tm_find_bin redis-server)"
  tm_log "Redis: starting $server on 127.0.0.1:6379 (no persistence)"
  (cd / && "$server" --daemonize yes --port 6379 --save '' --appendonly no) >&2 \
    || tm_die "redis-server did not start"
  local i
  for ((i = 0; i < 40; i++)); do
    if _tm_redis_ok; then
      tm_log "Redis: up on 127.0.0.1:6379"
      return 0
    fi
    sleep 0.25
  done
  tm_die "Redis did not answer on 127.0.0.1:6379 within 10 s"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  if (($# != 1)); then
    printf 'usage: %s VENV\n' "$0" >&2
    exit 2
  fi
  tm_celery_venv "$1"
  tm_celery_redis
fi
