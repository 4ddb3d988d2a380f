"""The syscall a task is in, read by the kernel programs instead of syscall tracepoints.

Why a closer left CLOSE_WAIT (close(), shutdown()) used to come from syscall tracepoints. Once
one is attached, every syscall of every task on the host takes the kernel's slow entry path:
measured here, +30 ns on every syscall and +185 ns on every close(). The state program instead
reads the number of the syscall the closing task is in from the registers it entered the kernel
with (bpf_task_pt_regs(), Linux 5.15+ with BTF). This module says whether the kernel offers
that and which numbers to compare with; the loader checks the reading on its calibration
sockets before it trusts it, and keeps the tracepoints otherwise.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

from tcpwatch import bpfsys

# Per machine: where the syscall's number is in the registers a task entered the kernel with
# (x86-64: orig_ax, the 16th of struct pt_regs' u64s, the user ABI's order), the syscalls an
# outcome is told by, and listen() for the start-up check (asm/unistd_64.h).
NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {"regs_nr_off": 120, "close": 3, "close_range": 436, "shutdown": 48,
               "listen": 50},
}

_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_RAW_TRACEPOINT = 17
_FUNC_GET_CURRENT_TASK_BTF = 158
_FUNC_TASK_PT_REGS = 175


def numbers() -> dict[str, int] | None:
    """This machine's numbers, or None: another architecture, or the syscall tracepoints
    asked for (TCPWATCH_SYSCALL_TP=1, to compare the two in scripts/bench)."""
    if os.environ.get("TCPWATCH_SYSCALL_TP") == "1":
        return None
    return NUMBERS.get(platform.machine())


def _insn(code: int, dst: int = 0, src: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, 0, imm)


def helpers_load() -> bool:
    """Does the verifier accept a raw tracepoint program calling
    bpf_task_pt_regs(bpf_get_current_task_btf())? Five instructions loaded and closed: a
    probe of a millisecond, where a failed compile of the real programs would cost one."""
    insns = b"".join((
        _insn(0x85, imm=_FUNC_GET_CURRENT_TASK_BTF),  # call
        _insn(0xBF, dst=1, src=0),  # r1 = r0
        _insn(0x85, imm=_FUNC_TASK_PT_REGS),  # call
        _insn(0xB7, dst=0, imm=0),  # r0 = 0
        _insn(0x95),  # exit
    ))
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = bpfsys.attr_buffer(struct.pack(
        "<IIQQ", _BPF_PROG_TYPE_RAW_TRACEPOINT, len(insns) // 8,
        ctypes.addressof(code), ctypes.addressof(lic)))
    try:
        fd = bpfsys.call(_BPF_PROG_LOAD, attr, "BPF_PROG_LOAD")
    except OSError:
        return False
    os.close(fd)
    return True


def build_flags() -> list[str]:
    """-D flags for the kernel programs: TW_HAVE_TASK_REGS and the numbers, or none."""
    nums = numbers()
    if not nums or not helpers_load():
        return []
    return ["-DTW_HAVE_TASK_REGS", f"-DTW_REGS_NR_OFF={nums['regs_nr_off']}",
            f"-DTW_NR_CLOSE={nums['close']}",
            f"-DTW_NR_CLOSE_RANGE={nums['close_range']}", f"-DTW_NR_SHUTDOWN={nums['shutdown']}"]


def check(listener: dict | None, child: dict | None) -> str | None:
    """None if the calibration read listen() and close() right; else what it read."""
    nums = NUMBERS.get(platform.machine())
    if not nums:
        return f"no syscall numbers for {platform.machine()}"
    want = (nums["listen"], nums["close"])
    got = tuple(d.get("sysnr") if d else None for d in (listener, child))
    if got == want:
        return None
    return f"listen() read as {got[0]}, close() as {got[1]}, expected {want[0]} and {want[1]}"
