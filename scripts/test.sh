#!/usr/bin/env bash
# Set up this machine and run the whole tcpwatch test suite (tests/unit and tests/kernel), as root.
#
#   sudo scripts/test.sh [PYTEST ARGS...]      e.g. scripts/test.sh -k procnet -x
#
# Steps: scripts/install.sh (idempotent; quick when everything is in place), ruff check, pytest
# with the venv's python. Exits with pytest's status (5 = no tests collected).
# Environment:
#   TCPWATCH_INSTALL_ARGS  extra options for install.sh, e.g. "--no-apt -q"
#   TCPWATCH_VENV          the venv to use (default: <repo>/.venv)
#   TCPWATCH_LINT_STRICT=0 report ruff findings without failing the run (default: they fail it)
#   CI=true                skipped tests count as failures (tests/conftest.py)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        echo "==> test.sh: not root; re-running with sudo" >&2
        exec sudo --preserve-env=CI,TCPWATCH_INSTALL_ARGS,TCPWATCH_VENV,TCPWATCH_LINT_STRICT \
            bash "$REPO/scripts/test.sh" "$@"
    fi
    echo "ERROR: test.sh must run as root (the kernel tests load BPF programs)" >&2
    exit 1
fi

export TCPWATCH_VENV="${TCPWATCH_VENV:-$REPO/.venv}"
VENV="$TCPWATCH_VENV"
read -r -a install_args <<<"${TCPWATCH_INSTALL_ARGS:-}"

echo "==> test.sh: scripts/install.sh ${install_args[*]:-}"
bash "$REPO/scripts/install.sh" --venv "$VENV" "${install_args[@]}" </dev/null

cd "$REPO"
echo "==> test.sh: ruff check"
lint_rc=0
"$VENV/bin/ruff" check . || lint_rc=$?
if [ "$lint_rc" -ne 0 ]; then
    if [ "${TCPWATCH_LINT_STRICT:-1}" = 1 ]; then
        echo "ERROR: ruff check failed (exit $lint_rc) and TCPWATCH_LINT_STRICT=1" >&2
    else
        echo "WARNING: ruff check found problems (exit $lint_rc); not fatal because TCPWATCH_LINT_STRICT=0" >&2
        lint_rc=0
    fi
fi

echo "==> test.sh: pytest (${VENV}/bin/python -m pytest, CI=${CI:-unset})"
rc=0
"$VENV/bin/python" -m pytest -ra "$@" </dev/null || rc=$?
if [ "$rc" -eq 0 ] && [ "$lint_rc" -ne 0 ]; then
    exit "$lint_rc"
fi
exit "$rc"
