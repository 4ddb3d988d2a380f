#!/usr/bin/env bash
# Set up a machine to run and test tcpwatch (Debian 12+ / Ubuntu 22.04+).
#
#   sudo scripts/install.sh [--no-apt] [--venv DIR] [-q]
#
# What it does (each step is skipped when already done, so it is safe to re-run):
#   1. apt: bpfcc-tools python3-bpfcc python3-venv python3-pip iproute2 tmux, gcc and python3-dev
#      (tcpwatch._fastlines, the compiled part of trace; scripts/bench) and kernel headers
#      (linux-headers-$(uname -r) when the distro has it, else the nearest generic headers, linked
#      under /lib/modules/$(uname -r)/{build,source} with a WARNING).
#   2. mounts tracefs at /sys/kernel/tracing and debugfs at /sys/kernel/debug when not mounted.
#   3. venv at <repo>/.venv (or --venv DIR / $TCPWATCH_VENV) made from /usr/bin/python3 with
#      --system-site-packages, so the OS's bcc module is importable; then
#      pip install -e '.[test,plot,zstd]' (pytest; matplotlib for `analyze --plot`, zstandard for
#      .zst logs: the tests exercise both) and ruff, and checks that the imports work.
# See docs/install.md.
set -euo pipefail
set -E # ERR trap in functions too

PROG=install.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OS_PYTHON=/usr/bin/python3
APT_PACKAGES=(bpfcc-tools python3-bpfcc python3-venv python3-pip iproute2 tmux gcc python3-dev)
RUFF_SPEC="ruff>=0.4"
# pyproject.toml extras installed into the venv: pytest, and the optional features the tests cover
EXTRAS="test,plot,zstd"

DO_APT=1
QUIET=0
VENV="${TCPWATCH_VENV:-$REPO/.venv}"

usage() {
    cat <<EOF
usage: $0 [--no-apt] [--venv DIR] [-q]
  --no-apt    skip apt-get (package installs); still does headers links, mounts and the venv
  --venv DIR  where to make the virtualenv (default: \$TCPWATCH_VENV or $REPO/.venv)
  -q          quiet: print only warnings and errors
Must run as root. See docs/install.md.
EOF
}

ORIG_ARGS=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --no-apt) DO_APT=0 ;;
        -q | --quiet) QUIET=1 ;;
        --venv)
            [ $# -ge 2 ] || { echo "$PROG: --venv needs a directory" >&2; exit 2; }
            VENV="$2"
            shift
            ;;
        --venv=*) VENV="${1#--venv=}" ;;
        -h | --help) usage; exit 0 ;;
        *) echo "$PROG: unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac

say() { [ "$QUIET" = 1 ] || echo "==> $*"; }
warn() { echo "WARNING: $*" >&2; }

LOG="$(mktemp /tmp/tcpwatch-install.XXXXXX.log)"
VENV_MADE_NOW=0 # 1 while a venv created by this run is not yet verified
VENV_STAMP_RM=0

cleanup_venv_on_failure() {
    if [ "$VENV_MADE_NOW" = 1 ] && [ -d "$VENV" ]; then
        rm -rf -- "$VENV"
        echo "ERROR: removed the half-made venv at $VENV (re-run $PROG to make it again)" >&2
    elif [ "$VENV_STAMP_RM" = 1 ]; then
        echo "ERROR: the venv at $VENV is NOT up to date (pip install did not finish); re-run $PROG" >&2
    fi
}

die() {
    echo "ERROR: $*" >&2
    cleanup_venv_on_failure
    exit 1
}

on_err() {
    local rc=$? line=$1 cmd=$2
    trap - ERR
    echo "ERROR: $PROG failed (exit $rc) at line $line: $cmd" >&2
    if [ -s "$LOG" ]; then
        echo "---- last lines of $LOG ----" >&2
        tail -n 25 "$LOG" >&2
    fi
    cleanup_venv_on_failure
    exit 1
}
trap 'on_err $LINENO "$BASH_COMMAND"' ERR
on_exit() {
    local rc=$?
    if [ "$rc" -eq 0 ]; then rm -f "$LOG"; elif [ -s "$LOG" ]; then echo "full log: $LOG" >&2; else rm -f "$LOG"; fi
}
trap on_exit EXIT

# run LABEL CMD...: run a noisy command with its output in $LOG; on failure show the tail and stop.
run() {
    local label=$1 rc=0
    shift
    echo "+ $*" >>"$LOG"
    "$@" >>"$LOG" 2>&1 </dev/null || rc=$?
    if [ "$rc" -ne 0 ]; then
        trap - ERR
        echo "ERROR: $label failed (exit $rc): $*" >&2
        echo "---- last lines of output ----" >&2
        tail -n 25 "$LOG" >&2
        cleanup_venv_on_failure
        exit 1
    fi
}

[ "$(id -u)" -eq 0 ] || die "$PROG must run as root (try: sudo $0 ${ORIG_ARGS[*]:-})"

START=$SECONDS
KREL="$(uname -r)"
KDIR="/lib/modules/$KREL"

# ---------------------------------------------------------------------------------------- distro
OS_ID="" OS_LIKE="" OS_VER=""
if [ -r /etc/os-release ]; then
    # shellcheck disable=SC1091
    { read -r OS_ID; read -r OS_LIKE; read -r OS_VER; } < <(
        . /etc/os-release && printf '%s\n' "${ID:-}" "${ID_LIKE:-}" "${VERSION_ID:-}"
    )
fi
FAMILY=""
case " $OS_ID $OS_LIKE " in
    *" ubuntu "*) FAMILY=ubuntu ;;
    *" debian "*) FAMILY=debian ;;
esac
ARCH=""
command -v dpkg >/dev/null 2>&1 && ARCH="$(dpkg --print-architecture)"

if [ "$DO_APT" = 1 ]; then
    if [ -z "$FAMILY" ] || ! command -v apt-get >/dev/null 2>&1; then
        die "unsupported distribution '${OS_ID:-unknown}': $PROG installs packages for Debian 12+/Ubuntu 22.04+ only; install bcc's Python module and kernel headers by hand (docs/install.md), then re-run with --no-apt"
    fi
    major="${OS_VER%%.*}"
    [[ "$major" =~ ^[0-9]+$ ]] || major=""
    if [ "$OS_ID" = debian ] && [ -n "$major" ] && [ "$major" -lt 12 ]; then
        warn "Debian $OS_VER is older than the supported Debian 12; trying anyway"
    elif [ "$OS_ID" = ubuntu ] && [ -n "$major" ] && [ "$major" -lt 22 ]; then
        warn "Ubuntu $OS_VER is older than the supported Ubuntu 22.04; trying anyway"
    elif [ "$OS_ID" != debian ] && [ "$OS_ID" != ubuntu ]; then
        warn "'$OS_ID' is not Debian or Ubuntu; treating it as $FAMILY"
    fi
fi

# ------------------------------------------------------------------------------------- apt steps
pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}
# apt_has PKG: the configured repositories offer PKG (needs apt-get update first)
apt_has() {
    local cand
    cand="$(apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" {print $2}')"
    [ -n "$cand" ] && [ "$cand" != "(none)" ]
}

HEADERS_FALLBACK_PKG=""
if [ "$DO_APT" = 1 ]; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    if [ ${#missing[@]} -eq 0 ] && [ -e "$KDIR/build" ]; then
        say "apt: all packages present and $KDIR/build exists; nothing to install"
    else
        export DEBIAN_FRONTEND=noninteractive
        APT_OPTS=(-y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
        say "apt: apt-get update"
        run "apt-get update" apt-get -q -o DPkg::Lock::Timeout=300 update
        want=("${APT_PACKAGES[@]}")
        if apt_has "linux-headers-$KREL"; then
            want+=("linux-headers-$KREL")
        else
            case "$FAMILY" in
                ubuntu) HEADERS_FALLBACK_PKG=linux-headers-generic ;;
                *) HEADERS_FALLBACK_PKG="linux-headers-$ARCH" ;;
            esac
            if apt_has "$HEADERS_FALLBACK_PKG"; then
                say "apt: the distro has no linux-headers-$KREL; using the nearest: $HEADERS_FALLBACK_PKG"
                want+=("$HEADERS_FALLBACK_PKG")
            else
                warn "the distro has neither linux-headers-$KREL nor $HEADERS_FALLBACK_PKG; install kernel headers by hand (docs/install.md)"
                HEADERS_FALLBACK_PKG=""
            fi
        fi
        todo=()
        for p in "${want[@]}"; do pkg_installed "$p" || todo+=("$p"); done
        if [ ${#todo[@]} -gt 0 ]; then
            say "apt: installing ${todo[*]}"
            run "apt-get install" apt-get "${APT_OPTS[@]}" install "${todo[@]}"
        else
            say "apt: ${want[*]} already installed"
        fi
    fi
else
    say "apt: skipped (--no-apt)"
fi

# --------------------------------------------------------------------------------- kernel headers
# newest_tree FLAVOUR: newest /usr/src/linux-headers-<version>-<abi>-FLAVOUR (no other flavours)
newest_tree() {
    local d
    for d in /usr/src/linux-headers-*-"$1"; do
        [ -d "$d" ] || continue
        # Debian: linux-headers-6.1.0-56-amd64; Ubuntu: linux-headers-6.8.0-31-generic
        if [[ "$(basename "$d")" =~ ^linux-headers-[0-9]+\.[0-9]+(\.[0-9]+)?-[0-9]+-$1$ ]]; then
            echo "$d"
        fi
    done | sort -V | tail -n 1
}

if [ -e "$KDIR/build" ]; then
    target="$(readlink -f "$KDIR/build")"
    case "$target" in
        *"$KREL"*) say "headers: $KDIR/build -> $target" ;;
        *) warn "kernel headers for $KREL: using $target (not the running kernel's); struct layouts may differ (tcpwatch checks its struct reads at start-up)" ;;
    esac
else
    case "$FAMILY" in
        ubuntu) flavour=generic ;;
        *) flavour="$ARCH" ;;
    esac
    tree=""
    [ -n "$flavour" ] && tree="$(newest_tree "$flavour")"
    if [ -z "$tree" ]; then
        warn "no kernel headers for $KREL and no /usr/src/linux-headers-*-${flavour:-<arch>} tree to fall back on; bcc cannot compile programs until headers are installed (docs/install.md)"
    else
        src="$tree"
        if [ "$FAMILY" != ubuntu ]; then
            common="${tree%-"$flavour"}-common"
            [ -d "$common" ] && src="$common"
        fi
        mkdir -p "$KDIR"
        ln -sfn "$tree" "$KDIR/build"
        ln -sfn "$src" "$KDIR/source"
        say "headers: linked $KDIR/build -> $tree and $KDIR/source -> $src"
        warn "these are not the running kernel's headers ($KREL): struct layouts may differ (tcpwatch checks its struct reads at start-up)"
    fi
fi

# ----------------------------------------------------------------------------------------- mounts
is_mounted() { awk -v m="$1" '$2 == m {f = 1} END {exit !f}' /proc/self/mounts; }

if is_mounted /sys/kernel/tracing; then
    say "tracefs: already mounted at /sys/kernel/tracing"
else
    [ -d /sys/kernel/tracing ] || die "/sys/kernel/tracing does not exist: this kernel has no tracefs (CONFIG_TRACING)"
    mount -t tracefs tracefs /sys/kernel/tracing 2>>"$LOG" || die "could not mount tracefs at /sys/kernel/tracing"
    say "tracefs: mounted at /sys/kernel/tracing (not persistent: re-run after a reboot)"
fi
if is_mounted /sys/kernel/debug; then
    say "debugfs: already mounted at /sys/kernel/debug"
elif [ -d /sys/kernel/debug ] && mount -t debugfs debugfs /sys/kernel/debug 2>>"$LOG"; then
    say "debugfs: mounted at /sys/kernel/debug (bcc 0.26 looks under /sys/kernel/debug/tracing first)"
else
    warn "could not mount debugfs at /sys/kernel/debug; bcc will use /sys/kernel/tracing"
fi
[ -e /sys/kernel/tracing/events/sock/inet_sock_set_state ] ||
    warn "tracepoint sock:inet_sock_set_state not found under /sys/kernel/tracing/events: tcpwatch needs Linux 4.16+"

# ------------------------------------------------------------------------------------------- venv
[ -x "$OS_PYTHON" ] || die "$OS_PYTHON not found: install python3 (and python3-bpfcc) first"
"$OS_PYTHON" -c 'import bcc' >/dev/null 2>&1 ||
    die "$OS_PYTHON cannot import bcc: install the OS package python3-bpfcc (Debian/Ubuntu; see docs/install.md). PyPI's 'bcc' is an unrelated project"

venv_ok() {
    [ -x "$VENV/bin/python" ] &&
        "$VENV/bin/python" -c 'import bcc' >/dev/null 2>&1 &&
        "$VENV/bin/python" -m pip --version >/dev/null 2>&1
}

if venv_ok; then
    say "venv: $VENV exists and imports bcc"
else
    if [ -e "$VENV" ]; then
        say "venv: $VENV exists but cannot import bcc (or has no pip); recreating it"
        rm -rf -- "$VENV"
    else
        say "venv: creating $VENV from $OS_PYTHON --system-site-packages"
    fi
    VENV_MADE_NOW=1
    run "python3 -m venv" "$OS_PYTHON" -m venv --system-site-packages "$VENV"
fi

# venv_complete: everything tcpwatch and its tests need imports, from this checkout
VENV_IMPORTS="bcc, click, orjson, pytest, matplotlib, zstandard, tcpwatch"
venv_complete() {
    local where
    where="$("$VENV/bin/python" -c "import $VENV_IMPORTS; print(tcpwatch.__file__)" 2>>"$LOG")" ||
        return 1
    case "$where" in "$REPO"/*) ;; *) return 1 ;; esac
    [ -x "$VENV/bin/ruff" ]
}

# The stamp records what was pip-installed; pip runs again only when it changes (or the venv is
# incomplete), so a re-run does not reinstall under the feet of someone using the venv.
STAMP="$VENV/.tcpwatch-installed"
# The compiled module's sources are in it too: pip builds tcpwatch._fastlines in place.
want_stamp="$(cat "$REPO/pyproject.toml" "$REPO/setup.py" "$REPO/agent/tcpwatch/_fastlines.c" \
    "$REPO/bpf/tcpwatch.h" | sha256sum | cut -d' ' -f1) $REPO [$EXTRAS] $RUFF_SPEC"
if [ "$VENV_MADE_NOW" = 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] && venv_complete; then
    say "pip: tcpwatch[$EXTRAS] and ruff already installed (pyproject.toml and the C unchanged)"
else
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
    rm -f "$STAMP"
    VENV_STAMP_RM=1
    say "pip: installing -e '${REPO}[$EXTRAS]' and $RUFF_SPEC into $VENV"
    run "pip install" "$VENV/bin/python" -m pip install -q -e "${REPO}[$EXTRAS]" "$RUFF_SPEC"
    venv_complete ||
        die "the venv at $VENV cannot import $VENV_IMPORTS (tcpwatch from $REPO), or lacks ruff (try: $VENV/bin/python -c 'import $VENV_IMPORTS')"
    echo "$want_stamp" >"$STAMP"
fi
VENV_MADE_NOW=0 VENV_STAMP_RM=0
if ! "$VENV/bin/python" -c 'import tcpwatch._fastlines' 2>/dev/null; then
    echo "WARNING: tcpwatch._fastlines was not built (it needs gcc and python3-dev): trace runs its slower pure-Python path" >&2
fi
bcc_ver="$("$VENV/bin/python" -c 'import bcc; print(getattr(bcc, "__version__", "?"))' 2>/dev/null || echo '?')"
say "venv: ok: $("$VENV/bin/python" --version 2>&1), bcc $bcc_ver, tcpwatch editable from $REPO"
say "done in $((SECONDS - START))s. Run the tests with: scripts/test.sh"
