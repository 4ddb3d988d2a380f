"""bpf(2) through ctypes, for the few calls bcc does not make for us: a map's type and size
(ringbuf.map_info), the verifier probe of sysnr.helpers_load(), and the kernel tests' program
runs and map writes. (scripts/bpf_floor keeps a copy of the numbers: it runs on the standard
library alone.)"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

NR_BPF = {"x86_64": 321, "aarch64": 280}  # asm/unistd.h
ATTR_SIZE = 128  # a prefix of union bpf_attr, enough for the commands used here


def call(cmd: int, attr: ctypes.Array | ctypes.Structure, what: str = "bpf") -> int:
    """bpf(cmd, &attr, sizeof(attr)): its result (an fd, or 0); OSError on failure, its
    message prefixed with `what`. `attr` is a union bpf_attr member as a ctypes object, or
    attr_buffer() of its bytes."""
    nr = NR_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOTSUP, f"no bpf syscall number for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_long(cmd), ctypes.byref(attr),
                       ctypes.c_ulong(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def attr_buffer(data: bytes) -> ctypes.Array:
    """A union bpf_attr from the bytes of its first members, zero-filled to ATTR_SIZE."""
    return ctypes.create_string_buffer(data, ATTR_SIZE)
