"""The rescue program against the real kernel: transitions the classic state program is
skipped for (a softirq interrupting one of our classic programs) arrive anyway, with the
tuple read from struct sock_common, and every transition is still accounted for.

Skips need a saturating churn: a timer interrupt must land while one of our programs runs
(~0.1 % of transitions here). The C churn of scripts/bench makes them in seconds.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from scenarios import PER_CONNECTION

from tcpwatch import loader, schema

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
PORT = 17889
WANT_SKIPS = 30  # classic-program skips to have seen before judging the rescue
ROUNDS = 6       # of 3 s of churn at most


@pytest.fixture(scope="module")
def churn_bin(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("churn") / "churn"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(REPO / "scripts/churn.c")],
                   check=True, capture_output=True)
    return exe


def classic_skips(src: loader.KernelSource) -> int:
    return sum(loader.recursion_misses(fd) for fd in src._state_fds())


def test_skipped_transitions_are_rescued_and_accounted(churn_bin, netns):
    src = loader.KernelSource(loader.Options(ports=(PORT,), ring_pages=16384))
    try:
        opened = src.open()
        want = "raw_tracepoint:inet_sock_set_state (IPv4+IPv6, checked)"
        assert opened.hooks["rescue"] == want, (opened.hooks, opened.warnings)
        got: list[bytes] = []
        made = 0
        for _ in range(ROUNDS):
            # Its own session: the churn must not share an autogroup with this reader. Its own
            # namespace: its ~100,000 TIME_WAIT sockets go with it, not into later tests.
            churn = subprocess.Popen(
                ["ip", "netns", "exec", netns, str(churn_bin), "--seconds", "3", "--port",
                 str(PORT)], stdout=subprocess.PIPE, text=True, start_new_session=True)
            while churn.poll() is None:
                got += src.poll(0.05)
            out = churn.stdout.read()
            assert churn.returncode == 0, out
            made += json.loads(out)["connections"] * PER_CONNECTION + 2  # + the listener
            if classic_skips(src) >= WANT_SKIPS:
                break
        # The churn has ended: drain until the ring stays empty for a while.
        deadline, quiet = time.monotonic() + 10, 0
        while quiet < 5 and time.monotonic() < deadline:
            batch = src.poll(0.1)
            got += batch
            quiet = 0 if batch else quiet + 1
        counts, skips = src.counters(), classic_skips(src)
    finally:
        src.close()

    assert skips >= WANT_SKIPS, f"only {skips} skips in {ROUNDS} rounds: nothing to rescue"
    assert counts["lost"] == 0, counts
    events = [ev for ev in map(schema.decode, got) if ev["kind"] == STATE]  # not EOF events
    # Nothing is handled twice, and what is missed is counted. (Not `==`: at this rate a few
    # transitions in 100,000 are dropped by perf before any BPF program runs, uncounted;
    # see docs/design.md.)
    assert len(events) + counts["missed"] <= made, (len(events), made, counts)
    assert made - len(events) - counts["missed"] < made // 1000, (len(events), made, counts)
    assert counts["missed"] == skips - counts["rescued"]
    # Most skips come back (the rest: interrupts landing outside our programs' bodies).
    assert counts["rescued"] >= skips // 2, (counts["rescued"], skips)

    rescued = [i for i, ev in enumerate(events) if ev["flags"] & RESCUED]
    assert len(rescued) == counts["rescued"]
    assert all(PORT in (events[i]["lport"], events[i]["rport"]) for i in rescued)
    # A rescued event's tuple, read from struct sock_common, is the one the tracepoint gave
    # for the same socket's previous transition, once both ends are set (from ESTABLISHED).
    last: dict[int, dict] = {}
    checked = 0
    for ev in events:
        prev = last.get(ev["sk"])
        assert prev is None or prev["new"] != ev["new"], ("twice", prev, ev)
        if ev["flags"] & RESCUED and prev is not None and ev["old"] in SETTLED:
            assert ev["old"] == prev["new"], (prev, ev)
            assert {k: ev[k] for k in TUPLE} == {k: prev[k] for k in TUPLE}, (prev, ev)
            checked += 1
        last[ev["sk"]] = None if ev["new"] == CLOSE else ev
    assert checked >= len(rescued) // 2, (checked, len(rescued))


RESCUED = schema.layout().consts["TW_F_RESCUED"]
STATE = schema.layout().consts["TW_KIND_STATE"]
CLOSE = schema.STATE_NUMBERS["CLOSE"]
SETTLED = {schema.STATE_NUMBERS[n] for n in (
    "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "LAST_ACK", "CLOSING")}
TUPLE = ("family", "laddr", "lport", "raddr", "rport")
