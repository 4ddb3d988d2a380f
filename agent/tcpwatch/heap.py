"""Give freed heap memory back to the kernel.

glibc keeps the pages of freed blocks for reuse, so after a big, short-lived allocation (the
compiler's, a /proc snapshot of 100,000 sockets, a batch of 100,000 leak lookups) the agent's
RSS would stay at its peak for the rest of the run.
"""

from __future__ import annotations

import contextlib
import ctypes


def trim() -> None:
    """malloc_trim(0): hand the heap's free pages back (a no-op without glibc)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
