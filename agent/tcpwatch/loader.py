"""Loading the kernel programs: the only module that imports bcc.

It checks the host (root, bcc, tracefs, headers), picks hooks by trying them,
calibrates the struct reads it does (the network namespace of a socket; the tuple for the
rescue program) on sockets of its own, writes filters into maps, and hands raw events to
its caller in batches.

>>> src = KernelSource(Options(ports=(8080,)))     # doctest: +SKIP
>>> src.open().hooks["state"]                        # doctest: +SKIP
'tracepoint:sock:inet_sock_set_state'
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tcpwatch import heap, ringbuf, schema, sysnr

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
# offsetof(struct sock, __sk_common.skc_net) on 64-bit kernels since 4.x; checked at start.
SKC_NET_OFFSET = 48
SKC_FAMILY_OFFSET = 16
SKC_NUM_OFFSET = 14
# skc_prot, read by the rescue program (its struct tw_skc_head covers offsets 0-17), checked.
SKC_PROT_OFFSET = 40
KERNEL_POINTER_MIN = 0xFFFF800000000000
# Perf buffer: wake the reader every N events per CPU, not per event (kernel-notes.md:
# ~6 us per event with 1, ~0.6 us with 64); the rest is drained on the poll timer.
PERF_WAKEUP_EVENTS = 64

# The optional tracepoints, by the name of the -DTW_HAVE_<NAME> define that builds their
# program: whoever touches a socket (its owner), and why a socket left CLOSE_WAIT. The
# syscall ones are attached by _use_sysnr() only when the syscall number cannot be read.
OWNER_TPS = {
    "RECV_LENGTH": ("sock", "sock_recv_length"),
    "SEND_LENGTH": ("sock", "sock_send_length"),
}
SYSCALL_TPS = {
    "SYS_CLOSE": ("syscalls", "sys_enter_close"),
    "SYS_CLOSE_RANGE": ("syscalls", "sys_enter_close_range"),
    "SYS_SHUTDOWN": ("syscalls", "sys_enter_shutdown"),
}
OUTCOME_TPS = {
    **SYSCALL_TPS,
    "PROCESS_EXIT": ("sched", "sched_process_exit"),
    "RECEIVE_RESET": ("tcp", "tcp_receive_reset"),
    "ERROR_REPORT": ("sock", "inet_sk_error_report"),
}
OPTIONAL_TPS = {**OWNER_TPS, **OUTCOME_TPS}


def _tp_names(tps: dict[str, tuple[str, str]]) -> list[str]:
    """"category:event" of each, as `optional` and the hooks report name them."""
    return [f"{cat}:{event}" for cat, event in tps.values()]


def port_words(ports) -> dict[int, int]:
    """The kernel's `port_bits` array for these ports: word index -> bits (port p is bit
    p % 64 of word p // 64).

    >>> port_words([80, 443, 8080, 65535])
    {1: 65536, 6: 576460752303423488, 126: 65536, 1023: 9223372036854775808}
    """
    words: dict[int, int] = {}
    for port in ports:
        words[port >> 6] = words.get(port >> 6, 0) | 1 << (port & 63)
    return words


class LoaderError(Exception):
    """A problem with the host that the user must fix; str() is the one-line advice."""


@dataclass
class Options:
    stacks: bool = False
    pids: tuple[int, ...] = ()
    ports: tuple[int, ...] = ()
    states: tuple[int, ...] = ()
    max_socks: int = 262144
    ring_pages: int = 2048  # 8 MiB: ~58k events of headroom between two drains
    # top: sockets in CLOSE_WAIT stay in the kernel's `cw` map (read with read_cw()) and only
    # CLOSE_WAIT exits are sent, instead of every entry, EOF and owner event.
    cw_map: bool = False
    # With cw_map: CLOSE_WAIT stays shorter than this are counted in the kernel (read_exits())
    # instead of sent, where the kernel offers top's raw path (KernelSource.cw_raw).
    exit_detail_s: float = 1.0
    ephemeral: tuple[int, int] = (32768, 60999)  # the host's ip_local_port_range (exits' keys)
    # False (or TCPWATCH_RAW=0): keep the classic state program (tests and benches compare)
    raw_path: bool = True


@dataclass
class Opened:
    hooks: dict[str, str | None]
    warnings: list[str] = field(default_factory=list)
    startup_s: float = 0.0


def tracefs() -> str | None:
    """The mounted tracefs with TCP events, or None."""
    for path in TRACEFS_CANDIDATES:
        if os.path.isdir(os.path.join(path, "events", "sock")) or os.path.isdir(
            os.path.join(path, "events", "tcp")
        ):
            return path
    return None


def tracepoint_exists(category: str, name: str) -> bool:
    root = tracefs()
    return bool(root) and os.path.isdir(os.path.join(root, "events", category, name))


def tracepoint_field_offset(category: str, name: str, fld: str) -> int | None:
    """Offset of an 8-byte field in a tracepoint's record, from its format file."""
    root = tracefs()
    if root is None:
        return None
    try:
        with open(os.path.join(root, "events", category, name, "format")) as f:
            return format_field_offset(f.read(), fld)
    except OSError:
        return None


def format_field_offset(text: str, fld: str) -> int | None:
    """Offset of the 8-byte field `fld` in a tracepoint format file's text, or None."""
    m = re.search(r"field:[^;]*\b" + re.escape(fld) + r";\s*offset:(\d+);\s*size:8;", text)
    return int(m.group(1)) if m else None


def preflight() -> list[str]:
    """Raise LoaderError with a fix for anything that stops tracing; return warnings."""
    if os.geteuid() != 0:
        raise LoaderError("tracing needs root: run it with sudo (e.g. sudo tcpwatch trace)")
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise LoaderError(
            "bcc's Python module is not importable: install python3-bpfcc (Debian/Ubuntu) "
            "and use a venv made with --system-site-packages (scripts/install.sh does both); "
            "the PyPI package named 'bcc' is an unrelated project"
        ) from None
    if tracefs() is None:
        raise LoaderError(
            "tracefs is not mounted, so no tracepoint is visible: "
            "mount -t tracefs tracefs /sys/kernel/tracing"
        )
    if not (
        tracepoint_exists("sock", "inet_sock_set_state")
        or tracepoint_exists("tcp", "tcp_set_state")
        or _kprobes_possible()
    ):
        raise LoaderError(
            "this kernel has neither the sock:inet_sock_set_state (4.16+) nor the "
            "tcp:tcp_set_state (4.15) tracepoint, nor kprobes: TCP state changes cannot be traced"
        )
    warnings = []
    release = os.uname().release
    build = Path(f"/lib/modules/{release}/build")
    if os.environ.get("BCC_KERNEL_SOURCE"):
        build = Path(os.environ["BCC_KERNEL_SOURCE"])
    if not build.exists():
        raise LoaderError(
            f"kernel headers not found at {build}: install linux-headers-{release} "
            "(or the nearest, linked there; scripts/install.sh does it)"
        )
    version = build.resolve().name
    if release not in version:
        warnings.append(
            f"kernel headers are from {version}, not {release}: tracepoint programs are "
            "unaffected, struct reads are checked at start-up"
        )
    return warnings


def _kprobes_possible() -> bool:
    root = tracefs()
    return bool(root) and os.path.exists(os.path.join(root, "kprobe_events"))


@contextlib.contextmanager
def _stderr_silenced():
    """Keep clang's header warnings and libbcc's probe errors off the user's terminal:
    they are expected while hooks are tried, and the outcome is reported in one line."""
    if os.environ.get("TCPWATCH_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _quiet_bpf(**kwargs):
    from bcc import BPF

    with _stderr_silenced():
        return BPF(**kwargs)


def _try_close_hook(kind: int) -> bool:
    """Load and attach a do-nothing tcp_close program: the check BPF.support_kfunc()
    cannot make (it says yes on kernels that refuse fentry with EPERM)."""
    text = {
        1: "KFUNC_PROBE(tcp_close, void *sk, long timeout) { return 0; }",
        2: "int probe(struct pt_regs *ctx) { return 0; }",
    }[kind]
    try:
        b = _quiet_bpf(text=text)
        try:
            if kind == 2:
                with _stderr_silenced():
                    b.attach_kprobe(event="tcp_close", fn_name="probe")
            return True
        finally:
            b.cleanup()
    except Exception:
        return False


class KernelSource:
    """Live events from the kernel: open(), then poll() for raw event batches."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.bpf = None
        self.perf = False
        self._batch: list[bytes] = []
        self._callback = None
        # Ring-buffer mode: read through mmap (ringbuf.MmapRing) or bcc's per-event callback.
        self._ring: ringbuf.MmapRing | None = None
        self.ring_reader: str | None = None  # "mmap" or "bcc"; None with the perf buffer
        self._stack_cache: dict[tuple[int, int], list[str]] = {}
        self.cw_raw = False  # top's raw path is on (see _use_raw)
        self.raw_state = False  # trace's raw path is on
        self._raw_fd = -1
        self._missed_shown = 0  # the highest `missed` counters() has returned
        self._skips_from = self._rescued_from = 0  # the kernel's counts when tracing began
        self._raw_ok = False  # the struct reads it needs passed their checks
        self._sport_off = 0  # offset of inet_sport, found on the calibration sockets
        self._raw_link: int | None = None  # tw_top's or tw_trace's raw tracepoint attachment
        self._task_regs: list[str] = []  # sysnr.build_flags() of this kernel
        self._calib_v4: tuple[dict, dict] | None = None
        self.sysnr_outcome = False  # outcomes from the syscall number, tracepoints detached

    # --- start-up ---------------------------------------------------------------

    def _defines(self, state_tp: int, close_hook: int, perf: bool, raw: bool = True
                 ) -> list[str]:
        self.rescue_built = raw and state_tp == 1 and not perf
        flags = [
            f"-DTW_STATE_TP={state_tp}",
            f"-DTW_CLOSE_HOOK={close_hook}",
            f"-DTW_MAX_SOCKS={int(self.opts.max_socks)}",
            f"-DTW_RB_PAGES={int(self.opts.ring_pages)}",
            f"-DTW_RAW_SOCK_HOOKS={int(raw)}",
            f"-DTW_SKC_PROT_AT={SKC_PROT_OFFSET}",
            # The rescue program is a raw tracepoint on the same event (4.17+); with the perf
            # buffer it would share the per-CPU scratch event with the program it interrupts.
            f"-DTW_RESCUE={int(self.rescue_built)}",
            f"-I{schema.bpf_dir()}",
        ]
        self.optional = {}
        for name, (cat, event) in OPTIONAL_TPS.items():
            ok = tracepoint_exists(cat, event)
            if ok and name == "SYS_SHUTDOWN":
                how = tracepoint_field_offset(cat, event, "how")
                ok = how is not None
                if ok:
                    flags.append(f"-DTW_SHUTDOWN_HOW_OFF={how}")
            self.optional[f"{cat}:{event}"] = ok
            if ok:
                flags.append(f"-DTW_HAVE_{name}")
        flags += self._task_regs
        if self.opts.stacks:
            flags.append("-DTW_STACKS")
        if perf:
            flags.append("-DTW_PERF_BUFFER")
        return flags

    def open(self) -> Opened:
        started = time.monotonic()
        warnings: list[str] = []
        state_candidates = []
        if tracepoint_exists("sock", "inet_sock_set_state"):
            state_candidates.append((1, "tracepoint:sock:inet_sock_set_state"))
        if tracepoint_exists("tcp", "tcp_set_state"):
            state_candidates.append((2, "tracepoint:tcp:tcp_set_state"))
        state_candidates.append((3, "kprobe:tcp_set_state"))

        close_hook, close_name = 0, None
        if _try_close_hook(1):
            close_hook, close_name = 1, "fentry:tcp_close"
        elif _try_close_hook(2):
            close_hook, close_name = 2, "kprobe:tcp_close"

        src = (schema.bpf_dir() / "tcpwatch.bpf.c").read_text()
        self._task_regs = sysnr.build_flags()
        # The ring buffer needs 5.8; before that, the perf buffer. Tried in that order.
        buffers = [("perf", True)] if os.environ.get("TCPWATCH_PERF_BUFFER") == "1" else [
            ("ring", False), ("perf", True)]
        errors = []
        state_name = None
        # Raw tracepoints for the recv/send hooks and the rescue program (fewer recursion
        # misses, see the C); the classic hooks and no rescue where they do not load.
        raws = (False,) if os.environ.get("TCPWATCH_RAW_HOOKS") == "0" else (True, False)
        for (state_tp, name), (buf_name, perf), raw in itertools.product(
                state_candidates, buffers, raws):
            try:
                flags = self._defines(state_tp, close_hook, perf, raw)
                self.bpf = _quiet_bpf(text=src, cflags=flags)
                state_name, self.perf = name, perf
                break
            except Exception as exc:  # bcc raises plain Exception on load/attach failures
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                kind = "raw" if raw else "classic"
                errors.append(f"{name} with {buf_name} buffer, {kind} recv/send hooks: {first}")
        if self.bpf is None:
            raise LoaderError("could not load any TCP state hook (" + "; ".join(errors) + ")")
        if errors:
            warnings.append(f"fell back to {state_name} ({'; '.join(errors)})")
        warnings += self._attach_rescue()

        warnings += self._calibrate(state_tp)
        warnings += self._use_sysnr()
        self._configure()
        self._use_raw()
        if self.perf:
            self._callback = self._on_perf_event
            per_cpu = 1 << (max(1, self.opts.ring_pages // os.cpu_count()).bit_length() - 1)
            self.bpf["events"].open_perf_buffer(
                self._callback, page_cnt=per_cpu, wakeup_events=PERF_WAKEUP_EVENTS
            )
        else:
            warnings += self._open_ring()
        # Before events flow: from then on, until the first drain, they pile up in the buffer
        # (~0.07 s of it under load).
        _release_compiler_memory()
        self._count_skips_from_here()
        self._set(schema.layout().consts["TW_CFG_ENABLED"], 1)

        owner = [k for k in _tp_names(OWNER_TPS) if self.optional[k]]
        outcome = ["syscall number (pt_regs, checked)"] if self.sysnr_outcome else []
        outcome += [k for k in _tp_names(OUTCOME_TPS) if self.optional[k]]
        if not owner:
            warnings.append(
                "no sock_recv_length/sock_send_length tracepoints (Linux < 6.5): owners of "
                "accepted sockets are found from the listener or from /proc only"
            )
        if close_hook == 0:
            warnings.append(
                "no fentry or kprobe on tcp_close on this kernel: close outcomes come from "
                + ("the syscall number and the exit tracepoint" if self.sysnr_outcome
                   else "the close/shutdown/exit tracepoints")
            )
        hooks = {
            "state": state_name,
            "buffer": "perf" if self.perf else "ring",
            "close": close_name,
            "owner": ",".join(owner) or None,
            "outcome": ",".join(outcome) or None,
            "netns": self.netns_hook,
            "rescue": self.rescue_hook if not self.cw_raw or not self.rescue_loaded else None,
        }
        if self.cw_raw:
            hooks["state"] = ("raw_tracepoint:inet_sock_set_state (CLOSE_WAIT only, struct "
                              "reads checked" + (", skips rescued)" if self.rescue_loaded
                                                 else ")"))
        elif self.raw_state:
            hooks["state"] = ("raw_tracepoint:inet_sock_set_state (struct reads checked, "
                              f"inet_sport at +{self._sport_off})")
        return Opened(hooks=hooks, warnings=warnings, startup_s=time.monotonic() - started)

    def _attach_rescue(self) -> list[str]:
        """The rescue program goes on after the classic state program: for each firing, the
        kernel runs the probes of a tracepoint in the order they were attached."""
        self.rescue_loaded = False
        if not self.rescue_built:
            return []
        try:
            self.bpf.attach_raw_tracepoint(tp=b"inet_sock_set_state", fn_name=b"tw_rescue")
        except Exception as exc:  # bcc raises plain Exception
            return [f"transitions the kernel skips cannot be rescued ({exc}): they stay "
                    "counted as missed"]
        self.rescue_loaded = True
        return []

    def _use_raw(self) -> None:
        """Hand the state tracepoint to a raw program (top: tw_top, CLOSE_WAIT only; trace:
        tw_trace, every transition) where the rescue's struct reads passed their checks for
        both families; else the classic program stays. tw_rescue stays after it."""
        self.cw_raw = self.raw_state = False
        if not (self.opts.raw_path and self.rescue_loaded and self.rescue_hook and self._raw_ok):
            return
        if os.environ.get("TCPWATCH_RAW") == "0":  # for comparison (scripts/bench)
            return
        c = schema.layout().consts
        if self.opts.cw_map:
            if self.opts.pids or set(self.opts.states) - {schema.CLOSE_WAIT}:
                return
            prog, slot = b"tw_top", "TW_CFG_CW_RAW"
            lo, hi = self.opts.ephemeral
            self._set(c["TW_CFG_EPH_LO"], lo)
            self._set(c["TW_CFG_EPH_HI"], hi)
            self._set(c["TW_CFG_EXIT_DETAIL_NS"], int(self.opts.exit_detail_s * 1e9))
        elif self.opts.stacks or not self._sport_off:
            return  # the classic program's stacks, as tested; or inet_sport not found
        else:
            prog, slot = b"tw_trace", "TW_CFG_RAW_STATE"
        from bcc import BPF, lib

        # The raw program goes before tw_rescue (probes run in the order they were attached,
        # as the calibration checked): take tw_rescue off and put it back after. Nothing is
        # sent before TW_CFG_ENABLED, so what passes meanwhile does not matter.
        tp = b"inet_sock_set_state"
        try:
            raw = self.bpf.load_func(prog, BPF.RAW_TRACEPOINT)
        except Exception:  # bcc raises plain Exception; the classic program stays
            return
        self.bpf.detach_raw_tracepoint(tp)
        fd = lib.bpf_attach_raw_tracepoint(raw.fd, tp)
        # TCPWATCH_RESCUE=0 (scripts/bench's *-norescue, for comparison only): one program on
        # the tracepoint instead of two; the skips it leaves are counted as missed.
        if os.environ.get("TCPWATCH_RESCUE") == "0" and fd >= 0:
            self.rescue_loaded = False
            self.rescue_hook = "off (TCPWATCH_RESCUE=0): skipped transitions are missed"
        else:
            self.bpf.attach_raw_tracepoint(tp=tp, fn_name=b"tw_rescue")
        if fd < 0:
            return
        self._raw_link, self._raw_fd = fd, raw.fd
        self.bpf.detach_tracepoint(b"sock:inet_sock_set_state")
        # The classic program's skips stop growing here; _skips_total() still adds them in.
        self._set(c[slot], 1)
        self.cw_raw, self.raw_state = bool(self.opts.cw_map), not self.opts.cw_map

    def _open_ring(self) -> list[str]:
        """Read the ring buffer through mmap where we can (a fraction of bcc's per-event
        ctypes callback); else, or with TCPWATCH_RINGBUF=bcc (for comparison), through bcc.
        Never both: each would consume records the other then misses."""
        choice = os.environ.get("TCPWATCH_RINGBUF", "mmap")
        if choice not in ("mmap", "bcc"):
            raise LoaderError(f"TCPWATCH_RINGBUF={choice!r}: use mmap (the default) or bcc")
        warnings = []
        if choice == "mmap" and ringbuf.mmap_supported():
            table = self.bpf["events"]
            try:
                self._ring = ringbuf.MmapRing(table.map_fd, table.max_entries)
                self.ring_reader = "mmap"
                return []
            except (OSError, ValueError) as exc:
                warnings.append(f"ring buffer read through bcc's callback, mmap failed ({exc}): "
                                "about 0.3-0.5 us more agent CPU per event")
        self._callback = self._on_event
        self.bpf["events"].open_ring_buffer(self._callback)
        self.ring_reader = "bcc"
        return warnings

    def _set(self, slot: int, value: int) -> None:
        table, key = self.bpf["config"], ctypes.c_int(0)
        settings = table[key]
        settings.v[slot] = value
        table[key] = settings

    def _calibrate(self, state_tp: int) -> list[str]:
        """Check the struct reads against sockets of our own: the namespace inode through
        struct net (looked for where the kernel points), and the tuple the rescue program
        reads from struct sock_common (compared with what the tracepoint says)."""
        c = schema.layout().consts
        self._set(c["TW_CFG_NET_OFF"], SKC_NET_OFFSET)
        v4 = self._calib_connection(socket.AF_INET, "127.0.0.1", "127.0.0.2")
        self._calib_v4 = v4
        warnings = self._check_netns(v4[0] if v4 else None)
        self.rescue_hook = None
        if not self.rescue_loaded:
            return warnings
        # The rescue program must run after the classic one for each firing (the order
        # they were attached in). If it ran first, it would find none of the calibration
        # firings handled: then it would handle every transition twice. Nothing to rescue.
        unran, seen = self._count("UNRAN"), self._count("TRANSITIONS")
        if not seen or unran * 2 > seen:
            self.bpf.detach_raw_tracepoint(b"inet_sock_set_state")
            self.rescue_loaded = False
            return warnings + [
                "transitions the kernel skips cannot be rescued (the rescue program runs "
                f"before the state program: {unran} of {seen} calibration transitions unran): "
                "they stay counted as missed"]
        v6 = None
        if socket.has_ipv6:
            with contextlib.suppress(OSError):
                v6 = self._calib_connection(socket.AF_INET6, "::ffff:127.0.0.1",
                                            "::ffff:127.0.0.2")
        check = check_rescue_layout(v4, v6)
        self._sport_off = find_inet_sport([pair for pair in (v4, v6) if pair]) or 0
        self._set(c["TW_CFG_SPORT_OFF"], self._sport_off)
        # top's raw path reads every tuple from the struct: both families must be checked
        # (or IPv6 absent here).
        self._raw_ok = check.mode == 3 or (check.mode == 1 and v6 is None)
        if check.problems:
            warnings.append("transitions the kernel skips " + (
                "for IPv6 sockets " if check.mode else "") + "cannot be rescued ("
                + "; ".join(check.problems) + "): they stay counted as missed")
        if check.mode:
            self._set(c["TW_CFG_PROT_OFF"], SKC_PROT_OFFSET)
            self._set(c["TW_CFG_TCP_PROT"], check.tcp_prot)
            self._set(c["TW_CFG_TCPV6_PROT"], check.tcpv6_prot)
            self._set(c["TW_CFG_V6_OFF"], check.v6_off)
            self._set(c["TW_CFG_RESCUE"], check.mode)
            self.rescue_hook = "raw_tracepoint:inet_sock_set_state (" + (
                "IPv4+IPv6" if check.mode == 3 else "IPv4") + ", checked)"
        return warnings

    def _use_sysnr(self) -> list[str]:
        """Outcomes from the number of the syscall the closer is in, where the calibration
        read listen() and close() right; else from the syscall tracepoints, attached only
        then: attached, they put every task on the host on the slow syscall path (see
        sysnr.py)."""
        self.sysnr_outcome = False
        warnings = []
        if self._task_regs:
            problem = sysnr.check(*(self._calib_v4 or (None, None)))
            if not problem:
                self._set(schema.layout().consts["TW_CFG_SYSNR"], 1)
                self.sysnr_outcome = True
            else:
                warnings.append(f"the current syscall cannot be read ({problem}): close and "
                                "shutdown outcomes come from the syscall tracepoints")
        # From here on `optional` says what is attached, as for the other hooks.
        for tp in _tp_names(SYSCALL_TPS):
            if not self.optional.get(tp):
                continue
            if self.sysnr_outcome:
                self.optional[tp] = False
                continue
            fn = "tw_sys_" + tp.removeprefix("syscalls:sys_enter_")
            try:
                self.bpf.attach_tracepoint(tp=tp.encode(), fn_name=fn.encode())
            except Exception as exc:  # bcc raises plain Exception
                self.optional[tp] = False
                warnings.append(f"{tp} not attached ({exc}): its outcomes are unknown")
        return warnings

    def _count(self, name: str) -> int:
        key = ctypes.c_int(schema.layout().consts["TW_CNT_" + name])
        return int(sum(self.bpf["counters"][key]))

    def _calib_connection(self, family: int, server: str, client: str
                          ) -> tuple[dict, dict] | None:
        """One connection from `client` to a listener on `server` while the state program
        dumps what it sees of both ends (calibrate() in the C): (listener, accepted child)
        as tw_calib dicts, or None if the kernel skipped those transitions every time."""
        c = schema.layout().consts
        lay = schema.layout_of("tw_calib")
        table = self.bpf["calib"]
        empty = table.Leaf()
        for _ in range(3):  # a transition can be skipped (a recursion miss): try again
            for i in (0, 1):
                table[ctypes.c_int(i)] = empty
            with socket.socket(family) as lsock, socket.socket(family) as csock:
                if family == socket.AF_INET6:
                    lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    csock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                lsock.bind((server, 0))
                port = lsock.getsockname()[1]
                self._set(c["TW_CFG_CALIB_PORT"], port)
                try:
                    lsock.listen(1)
                    csock.bind((client, 0))
                    csock.connect((server, port))
                    child, _ = lsock.accept()
                    child.close()
                finally:
                    self._set(c["TW_CFG_CALIB_PORT"], 0)
            dumps = tuple(dict(zip(lay.names, lay.struct.unpack(bytes(table[ctypes.c_int(i)]))))
                          for i in (0, 1))
            if all(d["sport"] == port for d in dumps):
                return dumps
        return None

    def _check_netns(self, listener: dict | None) -> list[str]:
        c = schema.layout().consts
        self.netns_hook = None
        want = os.stat("/proc/self/ns/net").st_ino
        problem = None
        if listener is None:
            problem = "the calibration listener was never seen"
        else:
            head, body, net_ptr = listener["sock"], listener["bytes"], listener["net"]
            family = struct.unpack_from("=H", head, SKC_FAMILY_OFFSET)[0]
            num = struct.unpack_from("=H", head, SKC_NUM_OFFSET)[0]
            if family != socket.AF_INET or num != listener["sport"]:
                problem = "struct sock_common does not have the expected layout"
            elif net_ptr < KERNEL_POINTER_MIN:
                problem = "sk->skc_net is not a kernel pointer"
            else:
                hits = [
                    off for off in range(0, len(body) - 3, 4)
                    if struct.unpack_from("=I", body, off)[0] == want
                ]
                if len(hits) != 1:
                    problem = f"namespace inode found {len(hits)} times in struct net"
                else:
                    self._set(c["TW_CFG_NETNS_OFF"], hits[0])
                    self.netns_hook = f"struct net+{hits[0]} (checked)"
                    return []
        self._set(c["TW_CFG_NET_OFF"], 0)
        return [f"network namespace ids disabled ({problem}); netns will be null"]

    def _configure(self) -> None:
        c = schema.layout().consts
        if self.opts.pids:
            table = self.bpf["pid_filter"]
            for pid in self.opts.pids:
                table[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
            self._set(c["TW_CFG_FILTER_PID"], 1)
        if self.opts.ports:
            table = self.bpf["port_bits"]
            for word, bits in port_words(self.opts.ports).items():
                table[ctypes.c_int(word)] = ctypes.c_uint64(bits)
            self._set(c["TW_CFG_FILTER_PORT"], 1)
        if self.opts.states:
            mask = 0
            for st in self.opts.states:
                mask |= 1 << st
            self._set(c["TW_CFG_STATE_MASK"], mask)
        if self.opts.cw_map:
            self._set(c["TW_CFG_CW_MAP"], 1)

    # --- running ----------------------------------------------------------------

    def _on_event(self, ctx, data, size) -> int:
        # Return 0: returning None costs bcc an exception per event (kernel-notes.md).
        self._batch.append(ctypes.string_at(data, size))
        return 0

    def _on_perf_event(self, cpu, data, size) -> None:
        self._batch.append(ctypes.string_at(data, size))

    def poll(self, timeout_s: float) -> list[bytes]:
        """Wait up to timeout_s for the buffer to fill, then drain whatever is there."""
        if self.perf:
            self.bpf.perf_buffer_poll(int(timeout_s * 1000))
            self.bpf.perf_buffer_consume()
            # One buffer per CPU, read one after the other: a socket's events can come out
            # of order (its CLOSE_WAIT before its SYN_SENT). Put them back in time order
            # (ts_ns is the event's first field).
            self._batch.sort(key=_event_ts)
        elif self._ring is not None:
            # Straight from the ring's memory; everything submitted by now (poll(0) included).
            self._ring.wait(timeout_s)
            return self._ring.drain()
        else:
            self.bpf.ring_buffer_poll(int(timeout_s * 1000))
            self.bpf.ring_buffer_consume()
        batch, self._batch = self._batch, []
        return batch

    def poll_scanned(self, timeout_s: float, scan: Callable) -> list | None:
        """poll() with `scan` walking the records in the ring's memory (see
        ringbuf.MmapRing.drain_with): its items; None (nothing waited for or read) when
        this source does not read a ring buffer in place."""
        if self._ring is None or self.perf:
            return None
        self._ring.wait(timeout_s)
        return self._ring.drain_with(scan)

    def counters(self) -> dict[str, int | float]:
        """Kernel-side counts. `lost`: events the buffer had no room for; `missed`: state
        transitions no program of ours handled (see the rescue program in the C);
        `buffer_peak_pct` (ring buffer read in place only): the most of it ever in use."""
        out = {}
        for name in ("EVENTS", "LOST", "SOCK_MISS", "SOCK_FULL", "FILTERED", "TRANSITIONS",
                     "CW_FULL", "SOCK_INSERT", "SOCK_DELETE", "EXIT_AGG", "EXIT_FULL",
                     "STALE_RAN"):
            out[name.lower()] = self._count(name)
        # An LRU map evicts silently; entries neither deleted nor still there were evicted.
        # At most max_socks are there, so this many at least were evicted.
        out["sock_evicted_min"] = max(
            0, out["sock_insert"] - out["sock_delete"] - int(self.opts.max_socks))
        out["missed"], out["rescued"] = self._missed()
        if self._ring is not None:
            # How full the buffer was at the fullest drain: the headroom left before losses.
            out["buffer_peak_pct"] = round(100 * self._ring.peak / self._ring.data_size, 1)
        return out

    def _missed(self) -> tuple[int, int]:
        """(missed, rescued): the state program's skips, counted by the kernel, less those
        the rescue program handled. (A firing dropped before any program ran would be in
        neither count; the oracle in tests/kernel/test_rescue_root.py has seen none.)

        The kernel counts a skip a moment before tw_rescue handles that firing, on another
        CPU perhaps, so one reading can hold a skip without its rescue. Totals reported
        never go down, so a reading that shows more missed than the last one is taken again
        1 ms later, and the smaller of the two counts: a true miss is in both.
        """
        missed, rescued = self._missed_once()
        if missed > self._missed_shown:
            time.sleep(0.001)
            again, rescued = self._missed_once()
            missed = min(missed, again)
        self._missed_shown = max(self._missed_shown, missed)
        return missed, rescued

    def _missed_once(self) -> tuple[int, int]:
        # Skips first, then rescues: a rescue comes after its skip, so read this way round
        # every rescue of a skip counted here is usually in (and never a rescue too many).
        skips = self.skips()
        rescued = self._count("RESCUED") - self._rescued_from
        return max(0, skips - rescued), rescued

    def skips(self) -> int:
        """The kernel's skips of the state program since events started to be sent (what
        `missed` is counted against)."""
        return self._skips_total() - self._skips_from

    def _skips_total(self) -> int:
        # The classic program's since it was loaded, and the raw one's (tw_top or tw_trace)
        # once it took over.
        raw = recursion_misses(self._raw_fd) if self.cw_raw or self.raw_state else 0
        return sum(recursion_misses(fd) for fd in self._state_fds()) + raw

    def _count_skips_from_here(self) -> None:
        """Skips and rescues count from now on, when events start to be sent: a skip before
        (during the calibration, the rescue program does not take over yet) lost nothing.
        Read until no rescue ran between the two reads of `rescued`: a skip and its rescue
        split by the reads would be a miss (or a rescue) for good."""
        for _ in range(10):
            rescued = self._count("RESCUED")
            skips = self._skips_total()
            if self._count("RESCUED") == rescued:
                break
        self._skips_from, self._rescued_from = skips, rescued

    def read_exits(self) -> list[tuple[tuple, int, bytes]]:
        """The `exits` map (top's raw path): [(struct tw_exit_key values, count since
        tracing began, the histogram as bytes of __u32)]; [] without the raw path."""
        if not self.cw_raw:
            return []
        kl, vl = schema.layout_of("tw_exit_key"), schema.layout_of("tw_exit_agg")
        keys, values = _map_bytes(self.bpf["exits"], kl.size, vl.size)
        return [(k, count, hist) for k, (count, hist) in zip(
            kl.struct.iter_unpack(keys), vl.struct.iter_unpack(values))]

    def read_cw(self) -> Iterator[tuple[int, tuple]]:
        """The `cw` map (Options.cw_map): (sk, values of struct tw_cw in header order), one
        entry at a time from the raw bytes (100,000 decoded at once would take ~50 MB).

        Read in batches of raw bytes (BPF_MAP_LOOKUP_BATCH, 5.6+) and unpacked with
        struct.iter_unpack: 100,000 sockets cost tens of milliseconds, not one syscall and one
        ctypes object each. Falls back to bcc's per-key iteration on older kernels.
        """
        lay = schema.layout_of("tw_cw")
        for keys, values in self.read_cw_chunks():
            for (sk,), value in zip(struct.iter_unpack("=Q", keys),
                                    lay.struct.iter_unpack(values)):
                yield sk, value

    def read_cw_chunks(self) -> Iterator[tuple[bytes, bytes]]:
        """The `cw` map as read_cw() reads it, undecoded: (keys, values) per batch, the
        sk addresses (8 bytes each) and the struct tw_cw values back to back. top compares
        a socket's value bytes with the last frame's before decoding anything."""
        return _map_chunks(self.bpf["cw"], 8, schema.layout_of("tw_cw").size)

    def forget_cw(self, sks: list[int]) -> None:
        """Drop entries userspace found stale (the socket is no longer in CLOSE_WAIT: its exit
        was lost or skipped)."""
        table = self.bpf["cw"]
        for sk in sks:
            with contextlib.suppress(KeyError):
                del table[ctypes.c_uint64(sk)]

    def _state_fds(self) -> list[int]:
        return [f.fd for name, f in self.bpf.funcs.items() if name in STATE_PROGS]

    def symbolize(self, ev: dict) -> dict:
        """Kernel and user stacks of an event as lists of 'function+0xoff' strings."""
        if not self.opts.stacks:
            return {}
        out = {}
        for key, sid, pid in (
            ("kstack", ev["kstack_id"], -1),
            ("ustack", ev["ustack_id"], ev["actor_pid"]),
        ):
            if sid >= 0:
                if (sid, pid) not in self._stack_cache:
                    self._stack_cache[(sid, pid)] = self._frames(sid, pid)
                out[key] = self._stack_cache[(sid, pid)]
        return out

    def _frames(self, sid: int, pid: int) -> list[str]:
        try:
            addrs = list(self.bpf["stacks"].walk(sid))
        except KeyError:
            return []
        if pid < 0:
            names = [self.bpf.ksym(a, show_offset=True) for a in addrs]
        else:
            names = [self.bpf.sym(a, pid, show_module=True, show_offset=True) for a in addrs]
        return [n.decode("utf-8", "replace") for n in names]

    def close(self) -> None:
        if self._raw_link is not None:
            os.close(self._raw_link)  # attached outside bcc: its cleanup would not detach it
            self._raw_link = None
        if self._ring is not None:
            self._ring.close()  # before bcc's cleanup unloads the map
            self._ring = None
        if self.bpf is not None:
            with contextlib.suppress(Exception):
                self.bpf.cleanup()
            self.bpf = None


# bcc's names for the programs that see state transitions (one of them is loaded).
STATE_PROGS = (
    b"tracepoint__sock__inet_sock_set_state",
    b"tracepoint__tcp__tcp_set_state",
    b"kprobe__tcp_set_state",
)


_BATCH = 8192


def _map_bytes(table, key_size: int, value_size: int) -> tuple[bytes, bytes]:
    """All keys and values of a bcc hash table as two byte strings (see _map_chunks)."""
    chunks = list(_map_chunks(table, key_size, value_size))
    return b"".join(k for k, _ in chunks), b"".join(v for _, v in chunks)


def _map_chunks(table, key_size: int, value_size: int) -> Iterator[tuple[bytes, bytes]]:
    """The keys and values of a bcc hash table as byte strings, a chunk at a time: in
    batches where the kernel has BPF_MAP_LOOKUP_BATCH (5.6+), else in one chunk through
    bcc's per-key iteration (also if a batch fails before any was given)."""
    given = False
    try:
        for chunk in _lookup_batch(table.map_fd, key_size, value_size):
            given = True
            yield chunk
    except OSError:
        if given:
            raise
        pairs = list(table.items())
        yield b"".join(bytes(k) for k, _ in pairs), b"".join(bytes(v) for _, v in pairs)


def _lookup_batch(map_fd: int, key_size: int, value_size: int
                  ) -> Iterator[tuple[bytes, bytes]]:
    """The keys and values of a hash map, _BATCH entries per syscall and per chunk."""
    from bcc import lib  # loader.py is the one bcc importer; bcc is loaded once open() ran

    keys_buf = ctypes.create_string_buffer(key_size * _BATCH)
    vals_buf = ctypes.create_string_buffer(value_size * _BATCH)
    token_in, token_out, count = ctypes.c_uint32(0), ctypes.c_uint32(0), ctypes.c_uint32(0)
    first = True
    while True:
        count.value = _BATCH
        res = lib.bpf_lookup_batch(map_fd, None if first else ctypes.byref(token_in),
                                   ctypes.byref(token_out), keys_buf, vals_buf,
                                   ctypes.byref(count))
        err = ctypes.get_errno()
        n = count.value
        if res != 0 and not (err in (errno.ENOENT, 0) or abs(res) == errno.ENOENT):
            raise OSError(err or -res, "BPF_MAP_LOOKUP_BATCH failed")
        if n:
            yield keys_buf.raw[: n * key_size], vals_buf.raw[: n * value_size]
        if res != 0:
            break  # the end of the map
        token_in.value, first = token_out.value, False


@dataclass
class RescueLayout:
    mode: int = 0  # TW_CFG_RESCUE: bit 0 IPv4, bit 1 IPv6
    tcp_prot: int = 0
    tcpv6_prot: int = 0
    v6_off: int = 0
    problems: list[str] = field(default_factory=list)


def check_rescue_layout(v4: tuple[dict, dict] | None, v6: tuple[dict, dict] | None
                        ) -> RescueLayout:
    """May the rescue program read tuples from struct sock_common? Each calibration pair is
    (listener, accepted child) as the state program dumped them (struct tw_calib): the
    child's bytes must hold the tuple the tracepoint reported for it at the offsets the C
    reads, and skc_prot must point at the same struct proto for listener and child."""
    out = RescueLayout()
    if v4 is None:
        out.problems.append("the IPv4 calibration connection was never seen")
        return out
    listener, child = v4
    head = child["sock"]
    # struct tw_skc_head of the C: daddr, rcv_saddr, hash, dport (network order), num, family.
    daddr, saddr, _, dport, num, family = struct.unpack_from("=IIIHHH", head, 0)
    want = (struct.unpack_from("=I", child["daddr"])[0],
            struct.unpack_from("=I", child["saddr"])[0],
            socket.htons(child["dport"]), child["sport"], socket.AF_INET)
    prot = struct.unpack_from("=Q", head, SKC_PROT_OFFSET)[0]
    if child["family"] != socket.AF_INET or daddr == saddr or (
            daddr, saddr, dport, num, family) != want:
        out.problems.append("struct sock_common does not hold the IPv4 tuple where expected")
        return out
    if prot < KERNEL_POINTER_MIN or prot != struct.unpack_from("=Q", listener["sock"],
                                                                SKC_PROT_OFFSET)[0]:
        out.problems.append("sk->skc_prot is not the same kernel pointer for two TCP sockets")
        return out
    out.mode, out.tcp_prot = 1, prot
    if v6 is None:
        return out  # no IPv6 here: nothing to rescue either
    listener, child = v6
    head = child["sock"]
    prot6 = struct.unpack_from("=Q", head, SKC_PROT_OFFSET)[0]
    pair = child["daddr"] + child["saddr"]
    hits = [off for off in range(SKC_PROT_OFFSET + 8, len(head) - 31, 8)
            if head[off:off + 32] == pair]
    if child["family"] != socket.AF_INET6 or child["daddr"] == child["saddr"] or len(hits) != 1:
        out.problems.append(f"the IPv6 addresses found {len(hits)} times in struct sock_common")
    elif prot6 < KERNEL_POINTER_MIN or prot6 == prot or prot6 != struct.unpack_from(
            "=Q", listener["sock"], SKC_PROT_OFFSET)[0]:
        out.problems.append("sk->skc_prot of IPv6 TCP sockets is not one kernel pointer")
    else:
        out.mode, out.tcpv6_prot, out.v6_off = 3, prot6, hits[0]
    return out


def find_inet_sport(pairs: list[tuple[dict, dict]]) -> int | None:
    """Offset of inet_sk(sk)->inet_sport in struct sock: the one place where every
    calibration socket's dump (struct tw_calib's `inet`, from TW_CALIB_INET_AT on) holds
    that socket's local port in network order. None if no such place, or more than one.
    Each pair is (listener, accepted child); their ports differ between pairs."""
    at = schema.layout().consts["TW_CALIB_INET_AT"]
    found: set[int] | None = None
    for dump in (d for pair in pairs for d in pair):
        want = struct.pack("!H", dump["sport"])
        inet = dump["inet"]
        hits = {off for off in range(0, len(inet) - 1, 2) if inet[off:off + 2] == want}
        found = hits if found is None else found & hits
    if not found or len(found) != 1 or len({p[0]["sport"] for p in pairs}) != len(pairs):
        return None
    return at + found.pop()


def recursion_misses(prog_fd: int) -> int:
    """How often the kernel skipped this program (5.12+; 0 before).

    A tracepoint program is not run while another BPF tracing program is running on the
    same CPU: a transition made in softirq while our close or recv hook runs in process
    context never reaches us. The kernel counts those per program; fdinfo shows the count.
    """
    try:
        with open(f"/proc/self/fdinfo/{prog_fd}") as f:
            for line in f:
                if line.startswith("recursion_misses:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


# The compiler's libraries: bcc runs them once, to compile. Their code stays mapped.
_COMPILER_LIBS = re.compile(r"/lib(LLVM|clang|z3|icudata)[^/]*\.so[^/]*$")
_MADV_PAGEOUT = 21  # Linux 5.4+


def compiler_ranges(maps: str) -> list[tuple[int, int]]:
    r"""Address ranges of the compiler's libraries in a /proc/PID/maps text.

    >>> compiler_ranges("7f00-7f80 r-xp 0 08:01 5 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1\n"
    ...                 "7f80-7f90 r--p 0 08:01 6 /usr/lib/libbcc.so.0.26.0\n")
    [(32512, 32640)]
    """
    out = []
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and _COMPILER_LIBS.search(parts[5]):
            lo, hi = parts[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def _release_compiler_memory() -> None:
    """Give back what compiling cost: the heap LLVM used (~36 MB of RSS measured by
    scripts/bench), and the resident pages of LLVM's and clang's code (~75 MB here), which
    the agent never runs again (pages it touches would come back on their own)."""
    heap.trim()
    try:
        with open("/proc/self/maps") as f:
            ranges = compiler_ranges(f.read())
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return
    for lo, hi in ranges:
        libc.madvise(lo, hi - lo, _MADV_PAGEOUT)  # EINVAL before 5.4: nothing happens


def _event_ts(raw: bytes) -> int:
    return int.from_bytes(raw[:8], sys.byteorder)


def mono_to_wall_ns() -> int:
    """Offset from bpf_ktime_get_ns() (CLOCK_MONOTONIC) to wall-clock ns."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)
