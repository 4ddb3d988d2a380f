"""Lost events are counted exactly: forced with a one-page buffer, seen + lost == made."""

from __future__ import annotations

import time

import pytest
from scenarios import PER_CONNECTION, Burst

pytestmark = pytest.mark.kernel

CONNECTIONS = 2000
# Plus the listener's LISTEN>CLOSE (it starts listening before the tracer does).
EXPECTED = CONNECTIONS * PER_CONNECTION + 1


def accounted(records: list[dict]) -> int:
    """Transitions seen plus those the tracer reported lost so far."""
    states = sum(1 for r in records if r["event"] == "state")
    totals = [r["total"] for r in records if r["event"] in ("lost", "summary") and "total" in r]
    return states + (totals[-1] if totals else 0)



def test_forced_losses_are_reported_exactly(tracer, monkeypatch, buffer_kind):
    monkeypatch.setenv("TCPWATCH_RING_PAGES", "1")
    burst = Burst(CONNECTIONS)
    try:
        tr = tracer(port=burst.port, leak_after=60)
        burst.go()
        assert burst.done()
        burst.proc.wait(timeout=60)
    finally:
        burst.close()
    # Under load the last handshakes finish in ksoftirqd after the burst has returned, and
    # `lost` records come once a second: wait until everything is accounted for (or time out).
    deadline = time.monotonic() + 15
    while accounted(tr.snapshot()) < EXPECTED and time.monotonic() < deadline:
        time.sleep(0.2)
    records = tr.stop()
    states = [r for r in records if r["event"] == "state"]
    lost = [r for r in records if r["event"] == "lost"]
    summary = records[-1]
    assert summary["event"] == "summary"
    assert summary["lost"] > 0, "a one-page buffer should overflow under this burst"
    assert len(states) + summary["lost"] == EXPECTED, (summary, lost[-1:])
    assert sum(r["count"] for r in lost) == summary["lost"]
    assert lost[-1]["total"] == summary["lost"]
    # Both causes are counted: buffer drops and transitions the kernel skipped our program for.
    assert lost[-1]["dropped"] + lost[-1]["missed"] == summary["lost"]
    assert lost[-1]["missed"] == summary["missed"]
