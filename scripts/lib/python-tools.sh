#!/usr/bin/env bash
#
# scripts/lib/python-tools.sh — the Python tools the contract tests use, from PyPI, in a
# virtualenv: Schemathesis (fuzzes the API against /openapi.json), openapi-python-client
# (generates a client from docs/openapi.json) and aiosmtpd (the SMTP server e-mail endpoints
# are tested against). Installs python3 and its venv module with
# apt-get when they are missing. Idempotent: a venv with the pinned versions is reused.
#
# Usage: scripts/lib/python-tools.sh [VENV]      (default: .taskmesh/venv in the repository)
# Sourced by scripts/test, which exports TM_PYTHON_TOOLS=VENV for the tests.

set -euo pipefail

_TM_PT_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/lib/infra.sh
source "$_TM_PT_REPO/scripts/lib/infra.sh"

# Pinned: a new release may check more, and a contract test should change on purpose.
TM_PYTHON_REQUIREMENTS=(
  "schemathesis==4.32.5"
  "openapi-python-client==0.29.1"
  "httpx==0.28.1"
  "attrs==26.1.0"
  "python-dateutil==4.0.0"
  "aiosmtpd==1.4.6"
)

tm_python_tools() {
  local venv=${1:-$_TM_PT_REPO/.taskmesh/venv}
  tm_need_python_venv
  local stamp="$venv/.taskmesh-requirements"
  local wanted="${TM_PYTHON_REQUIREMENTS[*]}"
  if [[ -x $venv/bin/st && -x $venv/bin/openapi-python-client && -x $venv/bin/aiosmtpd && -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
    tm_log "python tools ready in $venv"
    return 0
  fi
  tm_log "installing ${TM_PYTHON_REQUIREMENTS[*]} into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${TM_PYTHON_REQUIREMENTS[@]}"
  printf '%s' "$wanted" >"$stamp"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  tm_python_tools "$@"
fi
