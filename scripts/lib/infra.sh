#!/usr/bin/env bash
# shellcheck shell=bash
#
# scripts/lib/infra.sh — make sure the infrastructure Taskmesh needs is up.
#
# Sourced by scripts/test and scripts/demo (not meant to be run directly).
# It provides:
#
#   tm_need_pkg BIN PKG   install Debian package PKG unless command BIN exists
#   tm_find_bin BIN       print the full path of BIN (PATH, sbin dirs, postgres bin dirs)
#   tm_port_open HOST PORT  true if a TCP connect to HOST:PORT succeeds
#   tm_ensure_nats        NATS (with JetStream) answers on TM_NATS_HOST:TM_NATS_PORT
#   tm_ensure_postgres    Postgres answers on TM_PG_HOST:TM_PG_PORT and lets the
#                         `postgres` role in without a password
#
# Everything is idempotent: when a server already answers on the configured
# port nothing is started. Servers that are started here keep running after
# the calling script exits (their state, logs and pid files live in
# $TM_STATE_DIR) so the next run simply reuses them.
#
# Environment (all optional):
#   TM_NATS_HOST (127.0.0.1)  TM_NATS_PORT (4222)
#   TM_PG_HOST   (127.0.0.1)  TM_PG_PORT   (5432)
#   TM_STATE_DIR ($REPO/.taskmesh/infra)  — data, logs and pid files of the
#                                            servers started by this file

set -euo pipefail

# Repository root: two levels above this file (scripts/lib/infra.sh).
TM_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

: "${TM_NATS_HOST:=127.0.0.1}"
: "${TM_NATS_PORT:=4222}"
: "${TM_PG_HOST:=127.0.0.1}"
: "${TM_PG_PORT:=5432}"
: "${TM_STATE_DIR:=$TM_REPO/.taskmesh/infra}"

# Set once `apt-get update` has run in this shell.
_TM_APT_UPDATED=0

# --- small helpers -----------------------------------------------------------

tm_log() { printf '[infra] %s\n' "$*" >&2; }
tm_die() {
  printf '[infra] ERROR: %s\n' "$*" >&2
  exit 1
}

# Run a command as root: directly when we are root, through sudo when it
# exists; otherwise fail with status 127.
_tm_as_root() {
  if ((EUID == 0)); then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    return 127
  fi
}

# Make TM_STATE_DIR exist and absolute (servers are started with other cwds).
_tm_state_dir() {
  mkdir -p "$TM_STATE_DIR"
  TM_STATE_DIR="$(cd "$TM_STATE_DIR" && pwd)"
}

# Print the last lines of a log file to stderr (used when a start fails).
_tm_tail_log() {
  local file=$1
  if [[ -f $file ]]; then
    tm_log "last lines of $file:"
    tail -n 30 "$file" >&2 || true
  fi
}

# --- packages ----------------------------------------------------------------

# tm_find_bin BIN: print the path of BIN. Looks on PATH, then in the sbin
# directories (not on a non-root user's PATH on Debian, e.g. nats-server),
# then in the newest /usr/lib/postgresql/*/bin (Debian's postgres server
# binaries: initdb, pg_ctl, postgres). Returns 1 if not found.
tm_find_bin() {
  local bin=$1 p
  if p="$(command -v "$bin" 2>/dev/null)" && [[ $p == /* ]]; then
    printf '%s\n' "$p"
    return 0
  fi
  for p in /usr/local/sbin/"$bin" /usr/sbin/"$bin" /sbin/"$bin"; do
    if [[ -x $p ]]; then
      printf '%s\n' "$p"
      return 0
    fi
  done
  local candidates=() c
  for c in /usr/lib/postgresql/*/bin/"$bin"; do
    [[ -x $c ]] && candidates+=("$c")
  done
  if ((${#candidates[@]} > 0)); then
    # Highest major version wins.
    printf '%s\n' "${candidates[@]}" | sort -V | tail -n 1
    return 0
  fi
  return 1
}

# tm_apt_install PKG: install Debian package PKG with apt-get (as root, or via
# sudo), running apt-get update once first.
tm_apt_install() {
  local pkg=$1
  if ! command -v apt-get >/dev/null 2>&1; then
    tm_die "package '$pkg' is needed and apt-get is not available: install it by hand"
  fi
  if ((EUID != 0)) && ! command -v sudo >/dev/null 2>&1; then
    tm_die "package '$pkg' is needed; not root and no sudo: run 'apt-get install -y $pkg' as root"
  fi
  if ((_TM_APT_UPDATED == 0)); then
    _tm_as_root env DEBIAN_FRONTEND=noninteractive apt-get update \
      || tm_die "apt-get update failed (needed to install '$pkg')"
    _TM_APT_UPDATED=1
  fi
  _tm_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg" \
    || tm_die "apt-get install -y $pkg failed"
}

# tm_need_pkg BIN PKG: make sure command BIN exists, installing Debian
# package PKG with apt-get if it does not.
tm_need_pkg() {
  local bin=$1 pkg=$2
  if tm_find_bin "$bin" >/dev/null; then
    return 0
  fi
  tm_log "'$bin' not found: installing Debian package '$pkg'"
  tm_apt_install "$pkg"
  tm_find_bin "$bin" >/dev/null \
    || tm_die "package '$pkg' installed but '$bin' is still not found"
}

# tm_need_python_venv: python3 and its venv module (Debian ships it apart, as
# python3.X-venv), installed with apt-get when missing.
tm_need_python_venv() {
  tm_need_pkg python3 python3
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    local version
    version=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    tm_log "python3 has no venv module: installing python${version}-venv"
    tm_apt_install "python${version}-venv"
  fi
}

# --- network -----------------------------------------------------------------

# tm_port_open HOST PORT: true if a TCP connection to HOST:PORT succeeds
# within 2 seconds (bash's /dev/tcp, no extra tools needed).
tm_port_open() {
  local host=$1 port=$2
  # shellcheck disable=SC2016 # $1/$2 are expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" >/dev/null 2>&1
}

# _tm_wait_port HOST PORT SECONDS: wait until the port answers.
_tm_wait_port() {
  local host=$1 port=$2 secs=$3 i
  for ((i = 0; i < secs * 4; i++)); do
    tm_port_open "$host" "$port" && return 0
    sleep 0.25
  done
  return 1
}

# _tm_wait_port_closed HOST PORT SECONDS: wait until nothing answers.
_tm_wait_port_closed() {
  local host=$1 port=$2 secs=$3 i
  for ((i = 0; i < secs * 4; i++)); do
    tm_port_open "$host" "$port" || return 0
    sleep 0.25
  done
  return 1
}

# --- NATS --------------------------------------------------------------------

# tm_ensure_nats: make sure a NATS server answers on TM_NATS_HOST:TM_NATS_PORT;
# if nothing does, start a private one with JetStream enabled.
tm_ensure_nats() {
  local host=$TM_NATS_HOST port=$TM_NATS_PORT
  if tm_port_open "$host" "$port"; then
    tm_log "NATS: something already answers on $host:$port — using it"
    return 0
  fi

  tm_need_pkg nats-server nats-server
  local nats
  nats="$(tm_find_bin nats-server)"

  _tm_state_dir
  local store="$TM_STATE_DIR/nats" log="$TM_STATE_DIR/nats.log" pidfile="$TM_STATE_DIR/nats.pid"
  mkdir -p "$store"
  tm_log "NATS: starting $nats on $host:$port (JetStream store $store, log $log)"

  # setsid detaches the server from our process group, so it survives this
  # script (and a Ctrl-C in its terminal). The server writes its own pid file.
  local launcher=()
  command -v setsid >/dev/null 2>&1 && launcher=(setsid)
  printf '\n--- started by scripts/lib/infra.sh at %s ---\n' "$(date -Is)" >>"$log"
  "${launcher[@]}" nohup "$nats" -a "$host" -p "$port" -js -sd "$store" -P "$pidfile" \
    </dev/null >>"$log" 2>&1 &

  if ! _tm_wait_port "$host" "$port" 15; then
    _tm_tail_log "$log"
    tm_die "NATS did not answer on $host:$port within 15 s"
  fi
  tm_log "NATS: up on $host:$port (pid $(cat "$pidfile" 2>/dev/null || echo '?'))"
}

# --- PostgreSQL --------------------------------------------------------------

# _tm_pg_ok HOST PORT: the postgres role can run a query over TCP without a
# password (-w: never prompt).
_tm_pg_ok() {
  local host=$1 port=$2 psql
  psql="$(tm_find_bin psql)" || return 1
  PGCONNECT_TIMEOUT=3 "$psql" -w -X -q -h "$host" -p "$port" -U postgres -d postgres \
    -c 'select 1' >/dev/null 2>&1
}

# _tm_pg_wait_ok HOST PORT SECONDS: wait until _tm_pg_ok succeeds.
_tm_pg_wait_ok() {
  local host=$1 port=$2 secs=$3 i
  for ((i = 0; i < secs * 2; i++)); do
    _tm_pg_ok "$host" "$port" && return 0
    sleep 0.5
  done
  return 1
}

# _tm_debian_cluster_for_port PORT: print the version of a Debian "main"
# cluster (/etc/postgresql/<ver>/main) configured for PORT, newest first.
_tm_debian_cluster_for_port() {
  local want=$1 dir ver port found=()
  for dir in /etc/postgresql/*/main; do
    [[ -d $dir ]] || continue
    ver="$(basename "$(dirname "$dir")")"
    port="$(sed -n 's/^[[:space:]]*port[[:space:]]*=[[:space:]]*\([0-9][0-9]*\).*/\1/p' \
      "$dir/postgresql.conf" 2>/dev/null | tail -n 1)"
    [[ ${port:-5432} == "$want" ]] && found+=("$ver")
  done
  ((${#found[@]} > 0)) || return 1
  printf '%s\n' "${found[@]}" | sort -V | tail -n 1
}

# _tm_pg_try_debian_cluster HOST PORT: try to serve HOST:PORT with Debian's
# default cluster. Returns 0 if it runs and lets `postgres` in without a
# password. If the cluster came up (started by us, or by the package install
# just before) but wants a password, it is stopped again so that the private
# cluster can take the port.
_tm_pg_try_debian_cluster() {
  local host=$1 port=$2 ver
  command -v pg_ctlcluster >/dev/null 2>&1 || return 1
  ver="$(_tm_debian_cluster_for_port "$port")" || return 1

  if ! tm_port_open "$host" "$port"; then
    tm_log "Postgres: starting Debian cluster $ver/main"
    if ! _tm_as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start; then
      tm_log "Postgres: could not start Debian cluster $ver/main"
      return 1
    fi
    _tm_wait_port "$host" "$port" 15 || true
  fi

  if _tm_pg_wait_ok "$host" "$port" 10; then
    tm_log "Postgres: Debian cluster $ver/main is up on $host:$port"
    return 0
  fi

  # Typically: Debian's pg_hba.conf asks for scram-sha-256 over TCP.
  tm_log "Postgres: Debian cluster $ver/main does not let 'postgres' in over TCP without a password;"
  tm_log "          stopping it and using a private trust-auth cluster instead"
  _tm_as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main stop || true
  _tm_wait_port_closed "$host" "$port" 15 \
    || tm_die "could not free $host:$port from Debian cluster $ver/main"
  return 1
}

# _tm_as_postgres CMD...: run CMD as the `postgres` OS user (runuser lives in
# /usr/sbin, which may not be on PATH).
_tm_as_postgres() {
  local runuser
  runuser="$(tm_find_bin runuser)" || tm_die "runuser (package util-linux) not found"
  "$runuser" -u postgres -- "$@"
}

# Postgres refuses to run as root. Make sure the `postgres` OS user exists
# (the Debian package creates it; create a system user otherwise).
_tm_pg_ensure_os_user() {
  if ! id -u postgres >/dev/null 2>&1; then
    tm_log "Postgres: creating system user 'postgres'"
    "$(tm_find_bin useradd)" --system --user-group --no-create-home --home-dir /var/lib/postgresql \
      --shell /bin/bash postgres
  fi
}

# _tm_pg_dirs: set _TM_PG_BASE (holds data dir and log), _TM_PG_DATA, _TM_PG_LOG.
# Normally the data dir is $TM_STATE_DIR/pg. When running as root and the
# `postgres` user cannot reach $TM_STATE_DIR (e.g. a repo under /root), a
# directory under /var/tmp is used instead.
_tm_pg_dirs() {
  _TM_PG_BASE=$TM_STATE_DIR
  if ((EUID == 0)) && id -u postgres >/dev/null 2>&1 \
    && ! _tm_as_postgres test -x "$TM_STATE_DIR" 2>/dev/null; then
    _TM_PG_BASE="/var/tmp/taskmesh-pg-$TM_PG_PORT"
  fi
  _TM_PG_DATA="$_TM_PG_BASE/pg"
  _TM_PG_LOG="$_TM_PG_BASE/postgres.log"
}

# _tm_pg_private HOST PORT: initialise (once) and start the private cluster
# in $TM_STATE_DIR/pg, trust auth for everyone, superuser `postgres`.
_tm_pg_private() {
  local host=$1 port=$2
  tm_need_pkg initdb postgresql
  local initdb bindir pg_ctl
  initdb="$(tm_find_bin initdb)"
  # Resolve symlinks (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/N/bin).
  initdb="$(readlink -f "$initdb")"
  bindir="$(dirname "$initdb")"
  # Use pg_ctl from the same installation as initdb.
  if [[ -x $bindir/pg_ctl ]]; then pg_ctl="$bindir/pg_ctl"; else pg_ctl="$(tm_find_bin pg_ctl)"; fi

  # As root, run the server tools as the `postgres` OS user.
  local as_pg=()
  if ((EUID == 0)); then
    _tm_pg_ensure_os_user
    as_pg=(_tm_as_postgres)
  fi

  _tm_pg_dirs
  mkdir -p "$_TM_PG_BASE" "$_TM_PG_DATA"
  touch "$_TM_PG_LOG"
  if ((EUID == 0)); then
    chown postgres: "$_TM_PG_DATA" "$_TM_PG_LOG"
  fi
  chmod 700 "$_TM_PG_DATA"

  # The tools are run from / because the postgres user may not be allowed to
  # read the caller's working directory.
  if [[ ! -f $_TM_PG_DATA/PG_VERSION ]]; then
    tm_log "Postgres: initdb $_TM_PG_DATA (superuser postgres, trust auth)"
    (cd / && "${as_pg[@]}" "$initdb" -D "$_TM_PG_DATA" -U postgres --auth=trust -E UTF8) \
      >"$_TM_PG_BASE/initdb.log" 2>&1 || {
      _tm_tail_log "$_TM_PG_BASE/initdb.log"
      tm_die "initdb failed"
    }
  fi

  if (cd / && "${as_pg[@]}" "$pg_ctl" -D "$_TM_PG_DATA" status >/dev/null 2>&1); then
    tm_log "Postgres: private cluster in $_TM_PG_DATA is already running"
  else
    tm_log "Postgres: starting private cluster $_TM_PG_DATA on $host:$port (log $_TM_PG_LOG)"
    (cd / && "${as_pg[@]}" "$pg_ctl" -D "$_TM_PG_DATA" \
      -o "-p $port -k /tmp -c listen_addresses=$host" \
      -l "$_TM_PG_LOG" -w -t 30 start) >&2 || {
      _tm_tail_log "$_TM_PG_LOG"
      tm_die "pg_ctl start failed for $_TM_PG_DATA"
    }
  fi

  if ! _tm_pg_wait_ok "$host" "$port" 30; then
    _tm_tail_log "$_TM_PG_LOG"
    tm_die "Postgres on $host:$port does not accept 'psql -U postgres' after 30 s"
  fi
  tm_log "Postgres: private cluster is up on $host:$port"
}

# tm_ensure_postgres: make sure Postgres answers on TM_PG_HOST:TM_PG_PORT.
tm_ensure_postgres() {
  local host=$TM_PG_HOST port=$TM_PG_PORT

  # The client is needed in every case (to check, and by the callers).
  tm_need_pkg psql postgresql-client

  if tm_port_open "$host" "$port"; then
    tm_log "Postgres: something already answers on $host:$port — using it"
    if ! _tm_pg_ok "$host" "$port"; then
      tm_log "WARNING: 'psql -h $host -p $port -U postgres' fails without a password there;"
      tm_log "         tests need trust (or .pgpass/PGPASSWORD) access for the postgres role"
    fi
    return 0
  fi

  _tm_state_dir
  _tm_pg_dirs

  # A private cluster made by an earlier run wins: that run already found
  # that Debian's cluster could not be used (or the port is not 5432).
  if [[ -f $_TM_PG_DATA/PG_VERSION ]]; then
    _tm_pg_private "$host" "$port"
    return 0
  fi

  # Debian's default cluster only serves the default port.
  if [[ $port == 5432 ]]; then
    if ! tm_find_bin initdb >/dev/null && ! _tm_debian_cluster_for_port "$port" >/dev/null; then
      # Fresh machine: installing the server package creates (and may start)
      # Debian's default cluster, which is then tried like any other.
      tm_need_pkg initdb postgresql
    fi
    if _tm_pg_try_debian_cluster "$host" "$port"; then
      return 0
    fi
  fi

  _tm_pg_private "$host" "$port"
}
