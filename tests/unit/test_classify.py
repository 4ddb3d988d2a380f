"""Cause classification: the rules, and the `cause` field the aggregator adds to records."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest
from streams import WALL_OFFSET_NS, Entry, FakeResolver, Found, Holder, Proc, at, eof, life, step

from tcpwatch import classify
from tcpwatch.aggregate import Aggregator
from tcpwatch.classify import Causes, dominant, ended_cause, stuck_cause

SERVER, WORKER = Proc(812, "server"), Proc(813, "worker")
SK = 0xFFFF888105B5DC80
TUPLE = ("10.0.0.1", 8080, "10.0.0.2", 51234)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "ndjson.md"


@pytest.mark.parametrize(
    "kw,cause",
    [
        (dict(inode=0, rx_queue=40), "not_accepted"),
        # inode 0 wins even if the kernel saw an EOF read on a recycled sk: no one accepted it
        (dict(inode=0, rx_queue=1, eof_read=True), "not_accepted"),
        (dict(inode=7, rx_queue=1, holders=[813], owner=(812, "socket")), "held_elsewhere"),
        # a listener's owner (prefork master) is not evidence that it ever held the socket
        (dict(inode=7, rx_queue=1, holders=[813], owner=(812, "listener")), "not_reading"),
        # no holder visible (not ours to read): nothing to compare
        (dict(inode=7, rx_queue=1, holders=[], owner=(812, "socket")), "not_reading"),
        (dict(inode=7, rx_queue=1, holders=[812, 813], owner=(812, "socket")), "not_reading"),
        (dict(inode=7, rx_queue=None, eof_read=True), "eof_ignored"),
        (dict(inode=7, rx_queue=0), "eof_ignored"),  # the FIN's sequence number was read
        (dict(inode=7, rx_queue=6), "not_reading"),
        (dict(inode=None, rx_queue=None, recv_eof=True), "not_reading"),
        (dict(inode=None, rx_queue=None, recv_eof=False), "unknown"),
    ],
)
def test_stuck_cause_rules(kw, cause):
    args = dict(inode=None, rx_queue=None, holders=None, owner=None, eof_read=False)
    assert stuck_cause(**{**args, **kw}) == cause


@pytest.mark.parametrize(
    "outcome,duration,leaked,cause",
    [
        ("closed", 0.001, False, "closed"),
        ("closed", 1.0, False, "closed"),  # the threshold itself is still in time
        ("closed", 1.001, False, "slow_close"),
        ("closed", None, True, "slow_close"),
        ("closed", None, False, "closed"),
        ("shutdown", 50.0, False, "shutdown"),
        ("reset", 0.1, False, "reset"),
        ("exit", 0.1, False, "exited"),
        ("error", 0.1, False, "error"),
        ("unknown", 0.1, False, "unknown"),
    ],
)
def test_ended_cause_rules(outcome, duration, leaked, cause):
    assert ended_cause(outcome, duration, leaked) == cause
    assert cause in classify.ENDED_CAUSES


def test_dominant_prefers_count_then_actionable():
    assert dominant(["unknown", "unknown", "not_reading"]) == "unknown"
    assert dominant(["unknown", "not_reading"]) == "not_reading"
    assert dominant(["closed", "slow_close", "slow_close"]) == "slow_close"


def test_causes_from_hooks():
    assert Causes.from_hooks({"owner": None}).recv_eof is False
    assert Causes.from_hooks({"owner": "sock:sock_recv_length"}, 2.5) == Causes(True, 2.5)
    assert any("sock_recv_length" in s for s in Causes(True).signals())


# ------------------------------------------------------------------ the aggregator's `cause`


WITH_RECV = Causes(recv_eof=True)


def agg(resolver=None, causes=WITH_RECV) -> Aggregator:
    return Aggregator(30.0, WALL_OFFSET_NS, resolver.resolve if resolver else None,
                      causes=causes)


def records(a: Aggregator, events, until_s: float) -> list[dict]:
    out = [r for ev in events for r in a.feed(ev)]
    return out + a.tick(at(until_s))


def test_without_causes_records_are_unchanged():
    a = agg(causes=None)
    recs = records(a, life(SK, [step(0.5, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER)]), 31)
    assert all("cause" not in r for r in recs)


def test_leak_cause_held_elsewhere_from_holders():
    res = FakeResolver({TUPLE: (Found(1, 9204), [Holder(813, "worker", 5)])})
    recs = records(agg(res), life(SK, [step(0.5, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER)]), 31)
    leak = recs[-1]
    assert (leak["event"], leak["cause"], leak["pid"], leak["owner_pid"]) == (
        "leak", "held_elsewhere", 813, 812)
    assert list(leak)[-1] == "cause"  # new fields go last


@pytest.mark.parametrize(
    "found,steps_extra,cause",
    [
        ((Found(40, 0), []), [], "not_accepted"),
        ((Found(1, 9204), [Holder(812, "server", 5)]), [eof(0.7, owner=SERVER)], "eof_ignored"),
        ((Found(6, 9204), [Holder(812, "server", 5)]), [], "not_reading"),
        ((Found(0, 9204), [Holder(812, "server", 5)]), [], "eof_ignored"),
        (None, [], "not_reading"),  # not in /proc: the kernel's "no EOF read" stands
    ],
)
def test_leak_causes(found, steps_extra, cause):
    res = FakeResolver({TUPLE: found} if found else {})
    evs = life(SK, [step(0.5, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER), *steps_extra])
    assert records(agg(res), evs, 31)[-1]["cause"] == cause


def test_leak_cause_unknown_without_recv_hook_or_proc():
    a = agg(FakeResolver(), causes=Causes(recv_eof=False))
    evs = life(SK, [step(0.5, "ESTABLISHED", "CLOSE_WAIT")])
    assert records(a, evs, 31)[-1]["cause"] == "unknown"


def test_preexisting_leak_cause_from_seeded_rx_queue():
    a = agg(FakeResolver())
    a.seed_existing([Entry(0, 4, *TUPLE, rx_queue=0, inode=9100)], {9100: []}, at(0))
    (leak,) = a.tick(at(30))
    # The kernel saw nothing of it, but /proc showed the FIN consumed at start.
    assert (leak["preexisting"], leak["cause"]) == (True, "eof_ignored")


@pytest.mark.parametrize(
    "exit_step,cause",
    [
        (step(0.51, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER, outcome="closed"),
         "closed"),
        (step(2.5, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER, outcome="closed"),
         "slow_close"),
        (step(0.6, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER, outcome="shutdown"),
         "shutdown"),
        (step(0.6, "CLOSE_WAIT", "CLOSE", owner=SERVER, outcome="reset"), "reset"),
        (step(0.6, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=WORKER, outcome="exit"),
         "exited"),
        (step(0.6, "CLOSE_WAIT", "CLOSE", owner=SERVER), "unknown"),
    ],
)
def test_close_wait_causes(exit_step, cause):
    evs = life(SK, [step(0.5, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER), exit_step])
    cw = [r for r in records(agg(), evs, 1) if r["event"] == "close_wait"]
    assert [r["cause"] for r in cw] == [cause]


def test_slow_close_threshold_is_configurable():
    evs = life(SK, [step(0.5, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER),
                    step(2.5, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER,
                         outcome="closed")])
    a = agg(causes=Causes(recv_eof=True, slow_close_s=5.0))
    assert [r["cause"] for r in records(a, evs, 3) if r["event"] == "close_wait"] == ["closed"]


def test_leaked_then_closed_is_slow_close():
    evs = life(SK, [step(0.5, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER)])
    a = agg(FakeResolver())
    records(a, evs, 31)
    out = a.feed(life(SK, [step(0.5, "ESTABLISHED", "CLOSE_WAIT", owner=SERVER),
                           step(40, "CLOSE_WAIT", "LAST_ACK", owner=SERVER, actor=SERVER,
                                outcome="closed")])[1])
    assert out[-1]["cause"] == "slow_close" and out[-1]["leaked"] is True


def test_cause_and_every_value_documented():
    text = DOCS.read_text()
    assert "`cause`" in text
    documented = set(re.findall(r"`([a-z_]+)`", text))
    missing = [c for c in (*classify.STUCK_CAUSES, *classify.ENDED_CAUSES) if c not in documented]
    assert not missing, f"causes not in docs/ndjson.md: {missing}"


def test_docstring_examples():
    assert doctest.testmod(classify).failed == 0
