#!/usr/bin/env bash
# Create .venv and install eep with its test/bench extras. Idempotent: a second run only checks
# that pyproject.toml has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "eep needs Python 3.11 (found: $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# etcd: the multi-host membership store; its tests start a private server (eep/testbed/etcd.py).
# Debian's etcd-server, never started as a service here (no init system: the package's start fails
# quietly, and a service would be nothing of ours).
if ! command -v etcd >/dev/null 2>&1 && [ ! -x /usr/bin/etcd ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "eep's tests need etcd 3.4+ (Debian/Ubuntu: etcd-server); install it and run again" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q etcd-server >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q etcd-server >/dev/null; }
fi

stamp=.venv/.eep-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch is pinned to 2.13.0 (the local CPU wheel); a looser pin would pull gigabytes of CUDA.
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[test]"
    echo "$want" > "$stamp"
fi
