"""trace's scheduling: the drain loop at real-time priority (SCHED_RR 1), its other threads not.

A workload that saturates the CPUs made drains at nice -5 wait up to 113 ms on the run queue
(scripts/bench, docs/bench.md); in SCHED_RR they run as soon as events wait. The /proc lookups
run on another thread, which must stay at the normal policy.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SCHED_OTHER, SCHED_RR = 0, 2


def policies(pid: int) -> dict[int, tuple[int, int, int]]:
    """tid -> (policy, real-time priority, nice) of each thread of a process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        # Fields after the command name start at field 3: nice is 19, rt_priority 40, policy 41.
        out[int(tid)] = (int(fields[38]), int(fields[37]), int(fields[16]))
    return out


def wait_policy(pid: int, want: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        now = policies(pid)
        if now[pid][0] == want or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def test_only_the_drain_loop_runs_at_real_time_priority(tracer):
    tr = tracer()
    start = next(r for r in tr.records if r["event"] == "start")
    assert start["realtime"] is True and start["nice"] == -5, start
    pid = tr.proc.pid
    now = wait_policy(pid, SCHED_RR)
    assert now[pid] == (SCHED_RR, 1, -5), now  # the main thread drains the ring
    others = {tid: p for tid, p in now.items() if tid != pid}
    assert others, "the holder lookups' thread is missing"
    # The holder lookups' thread stays at the normal policy (threads the drain loop would
    # start get it back too: SCHED_RESET_ON_FORK).
    assert all(p[0] == SCHED_OTHER for p in others.values()), now


def test_no_realtime_leaves_the_normal_policy(tracer):
    tr = tracer(extra=["--no-realtime"])
    start = next(r for r in tr.records if r["event"] == "start")
    assert start["realtime"] is False, start
    time.sleep(1.0)  # well past where the real-time policy would have been set
    now = policies(tr.proc.pid)
    assert all(p[0] == SCHED_OTHER for p in now.values()), now
    assert now[tr.proc.pid][2] == -5  # --nice still applies
