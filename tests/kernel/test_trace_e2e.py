"""End-to-end tests of `tcpwatch trace` against the real kernel (docs/ndjson.md is the contract).

Every test builds a real TCP connection in separate processes (tests/kernel/scenarios.py), so
that the server, the client and the test itself have distinct pids, runs a tracer filtered on
the scenario's server port, and checks the NDJSON it writes.

On loopback a FIN or RST is processed in softirq inside whichever task sent it, i.e. in the
*peer*: the tests make sure that tcpwatch names the owner and never that peer.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import subprocess
import time

import pytest
from scenarios import match

pytestmark = pytest.mark.kernel

STATE_NAMES = {
    "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT", "CLOSE",
    "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV",
}  # fmt: skip
EVENTS = {"start", "state", "close_wait", "leak", "existing", "lost", "summary"}
OUTCOMES = {"closed", "shutdown", "reset", "exit", "error", "unknown"}
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
SK_RE = re.compile(r"^0x[0-9a-f]+$")
HOST_NETNS = os.stat("/proc/self/ns/net").st_ino
TUPLE = ("laddr", "lport", "raddr", "rport")


# ---- helpers ---------------------------------------------------------------------------------


def show(*records) -> str:
    """Records as the NDJSON lines they were, for assertion messages."""
    return "\n".join(json.dumps(r) for r in records)


def when(record: dict, field: str = "ts") -> dt.datetime:
    return dt.datetime.strptime(record[field], "%Y-%m-%dT%H:%M:%S.%fZ")


def server_tuple(setup: dict) -> dict:
    a = setup["addr"]
    return {"laddr": a, "lport": setup["lport"], "raddr": a, "rport": setup["cport"]}


def client_tuple(setup: dict) -> dict:
    a = setup["addr"]
    return {"laddr": a, "lport": setup["cport"], "raddr": a, "rport": setup["lport"]}


def states(records: list[dict], **fields) -> list[dict]:
    return [r for r in records if match("state", **fields)(r)]


def find_sk(records: list[dict], conn: dict) -> str:
    """The sk of the socket with this 4-tuple, from the first state record carrying it."""
    for r in records:
        if r.get("event") == "state" and all(r.get(k) == v for k, v in conn.items()):
            return r["sk"]
    raise AssertionError(f"no state record for {conn}")


def index_of(records: list[dict], sk: str, old: str, new: str) -> int:
    for i, r in enumerate(records):
        if r.get("event") == "state" and r["sk"] == sk and r["old"] == old and r["new"] == new:
            return i
    shown = [f"{r['old']}->{r['new']}" for r in records if match("state", sk=sk)(r)]
    raise AssertionError(f"no state {old}->{new} for sk {sk}; its transitions: {shown}")


def assert_causal(records: list[dict], *steps: tuple[str, str, str]) -> None:
    """The transitions (sk, old, new) appear in this order, in lines and in `ts`."""
    idx = [index_of(records, *s) for s in steps]
    for (a, sa), (b, sb) in zip(zip(idx, steps), zip(idx[1:], steps[1:])):
        assert a < b, f"{sa} printed after {sb}:\n{records[a]}\n{records[b]}"
        assert records[a]["ts"] <= records[b]["ts"], f"{sa} stamped after {sb}"


def check_log(records: list[dict]) -> None:
    """What every log must satisfy (docs/ndjson.md)."""
    events = [r.get("event") for r in records]
    assert set(events) <= EVENTS, f"unknown events {set(events) - EVENTS}"
    for r in records:
        assert TS_RE.match(r.get("ts", "")), f"bad ts: {r}"
    # `existing` lines may come on either side of `start`; anything else comes after it.
    first = next(r for r in records if r["event"] != "existing")
    assert first["event"] == "start" and events.count("start") == 1, events[:5]
    assert first["v"] == 1
    # Every real trace here runs the compiled formatter (scripts/install.sh builds it).
    assert not any("_fastlines" in w for w in first["warnings"]), first["warnings"]
    assert events.count("summary") == 1 and events[-1] == "summary"
    summary = records[-1]
    assert summary["lost"] == 0, show(summary)
    assert all(r["count"] == 0 for r in records if r["event"] == "lost"), "events were lost"
    assert summary["leaks"] == events.count("leak"), show(summary)
    assert summary["close_waits"] == events.count("close_wait"), show(summary)

    last: dict[str, dict] = {}
    for r in records:
        if r["event"] != "state":
            continue
        assert r["old"] in STATE_NAMES and r["new"] in STATE_NAMES, show(r)
        assert r["old"] != r["new"], show(r)
        assert SK_RE.match(r["sk"]), show(r)
        assert r["family"] in ("ipv4", "ipv6"), show(r)
        assert r["duration_s"] is None or r["duration_s"] >= 0, show(r)
        prev = last.get(r["sk"])
        if prev is not None:  # one socket's transitions chain up, in order
            assert prev["new"] == r["old"], (
                f"broken chain for {r['sk']}:\n{prev}\n{r}\nall its records:\n"
                + show(*(x for x in records if x.get("sk") == r["sk"]))
            )
            assert prev["ts"] <= r["ts"], f"out of order:\n{prev}\n{r}"
        # A closed socket's memory can be reused by a new socket: restart the chain.
        last[r["sk"]] = r if r["new"] != "CLOSE" else None
    for r in records:
        if r["event"] == "close_wait":
            assert r["outcome"] in OUTCOMES and r["new"] in ("LAST_ACK", "CLOSE"), show(r)

    leaks = [r for r in records if r["event"] == "leak"]
    ids = [(r["netns"], r["inode"], *(r[k] for k in TUPLE)) for r in leaks]
    twice = [r for r, i in zip(leaks, ids) if ids.count(i) > 1]
    assert not twice, "a socket leaked more than once:\n" + show(*twice)


def check_handshake(records: list[dict], server_sk: str, client_sk: str) -> None:
    assert_causal(
        records,
        (client_sk, "CLOSE", "SYN_SENT"),
        (client_sk, "SYN_SENT", "ESTABLISHED"),
        (server_sk, "SYN_RECV", "ESTABLISHED"),
    )


def ss_close_wait(netns: str | None = None) -> list[dict]:
    """`ss -tanpH state close-wait`, parsed."""
    cmd = ["ss", "-tanpH", "state", "close-wait"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        recvq, _sendq, local, peer, *users = line.split()
        laddr, lport = local.rsplit(":", 1)
        raddr, rport = peer.rsplit(":", 1)
        rows.append(
            {
                "laddr": laddr.strip("[]"),
                "lport": int(lport),
                "raddr": raddr.strip("[]"),
                "rport": int(rport),
                "recv_q": int(recvq),
                "pids": sorted(int(p) for p in re.findall(r"pid=(\d+)", " ".join(users))),
            }
        )
    return rows


def cross_check_ss(leak: dict, unread: int, netns: str | None = None) -> None:
    """The leak agrees with what ss sees for the same socket right now."""
    rows = [r for r in ss_close_wait(netns) if all(r[k] == leak[k] for k in TUPLE)]
    assert len(rows) == 1, f"ss does not show {[leak[k] for k in TUPLE]} in CLOSE-WAIT"
    row = rows[0]
    assert sorted(h["pid"] for h in leak["holders"]) == row["pids"], show(leak, row)
    # The scenario itself: ss (like /proc/net/tcp) counts the unread FIN in Recv-Q.
    assert row["recv_q"] == unread + 1, row


def check_rx_queue(rec: dict, unread: int) -> None:
    """rx_queue is the unread *bytes* (docs/ndjson.md); the FIN is not a byte.

    Checked last in each test, so that every other expectation has been checked by then.
    """
    assert rec["rx_queue"] == unread, (
        f"rx_queue should be the {unread} unread bytes; the kernel's rcv_nxt - copied_seq "
        f"(ss Recv-Q, /proc/net/tcp) also counts the unread FIN\n{show(rec)}"
    )


def not_existing(tr, conn: dict) -> None:
    """A connection made after `start` must not be reported as pre-existing."""
    bad = [r for r in tr.snapshot() if match("existing", **conn)(r)]
    assert not bad, (
        "socket entered CLOSE_WAIT after the start record, yet reported as existing:\n" + show(*bad)
    )


def check_socket_fields(rec: dict, conn: dict, family: str, netns: int) -> None:
    for k, v in conn.items():
        assert rec[k] == v, f"{k}: {rec[k]!r} != {v!r} in {rec}"
    assert rec["family"] == family, show(rec)
    assert rec["netns"] == netns, show(rec)


def no_record(records: list[dict], event: str, conn: dict) -> None:
    bad = [r for r in records if match(event, **conn)(r)]
    assert not bad, f"unexpected {event} records: {bad}"


def sleep_until(t_mono: float) -> None:
    """Let time pass (never used to wait for a condition)."""
    time.sleep(max(0.0, t_mono - time.monotonic()))


def start_connection(tracer, scenario, name: str, leak_after: float, **kwargs):
    """Scenario `name` set up, tracer started on its server port, connection run."""
    sc = scenario(name, **kwargs)
    setup = sc.expect("setup")
    assert setup["server_pid"] == sc.proc.pid  # the Popen pid: no intermediate process
    assert len({os.getpid(), setup["server_pid"], setup["client_pid"]}) == 3
    tr = tracer(leak_after=leak_after, port=setup["lport"])
    sc.send("go")
    return sc, setup, tr


# ---- (a) server leak ------------------------------------------------------------------------


def test_server_leak_names_the_server_not_the_closing_peer(tracer, scenario):
    sc, setup, tr = start_connection(tracer, scenario, "server_leak", 1, unread=5)
    server, client = setup["server_pid"], setup["client_pid"]
    conn = server_tuple(setup)
    ready = sc.expect("ready")
    t_ready = time.monotonic()

    leak = tr.wait_for(match("leak", **conn), 10, "leak of the server socket")
    not_existing(tr, conn)
    assert tr.arrival(leak) - t_ready < 4.0, "leak came late for --leak-after 1"
    check_socket_fields(leak, conn, "ipv4", HOST_NETNS)
    assert leak["pid"] == server and leak["comm"] == "tw-server", show(leak)
    assert leak["holders"] == [{"pid": server, "comm": "tw-server", "fd": ready["fd"]}], show(leak)
    assert leak["owner_pid"] == server and leak["owner_comm"] == "tw-server", show(leak)
    assert leak["inode"] == ready["inode"], show(leak)
    assert leak["eof_read"] is False and leak["preexisting"] is False, show(leak)
    assert 1.0 <= leak["age_s"] < 4.0, show(leak)
    assert SK_RE.match(leak["sk"]), show(leak)

    # The FIN was processed in the client's context (its close()): the owner is still the server.
    cw = tr.wait_for(match("state", old="ESTABLISHED", new="CLOSE_WAIT", **conn), 1, "->CLOSE_WAIT")
    assert cw["sk"] == leak["sk"]
    assert cw["pid"] != client, f"softirq victim named as owner: {cw}"
    assert cw["pid"] == server and cw["tid"] == server and cw["comm"] == "tw-server", show(cw)
    assert cw["owner"] == "socket", show(cw)  # the server recv()d on this very socket
    assert abs((when(leak, "since") - when(cw)).total_seconds()) < 0.01, show(leak, cw)
    cross_check_ss(leak, unread=5)

    # The server closes with 5 bytes unread: CLOSE_WAIT -> CLOSE (RST), in its own close().
    sc.send("close")
    sc.expect("closed")
    left = tr.wait_for(match("close_wait", **conn), 10, "close_wait record")
    assert left["sk"] == leak["sk"] and left["pid"] == server, show(left)
    assert left["outcome"] == "closed" and left["new"] == "CLOSE", show(left)
    assert (left["closer_pid"], left["closer_comm"]) == (server, "tw-server"), show(left)
    assert left["leaked"] is True and left["preexisting"] is False, show(left)
    assert left["eof_read"] is False, show(left)
    assert left["duration_s"] >= leak["age_s"] and left["since"] == leak["since"], show(left)

    records = tr.stop()
    check_log(records)
    client_sk = find_sk(records, client_tuple(setup))
    check_handshake(records, leak["sk"], client_sk)
    assert_causal(
        records,
        (client_sk, "ESTABLISHED", "FIN_WAIT1"),
        (leak["sk"], "ESTABLISHED", "CLOSE_WAIT"),
        (leak["sk"], "CLOSE_WAIT", "CLOSE"),
    )
    assert records.index(cw) < records.index(leak) < records.index(left)
    for r in states(records, sk=client_sk, old="CLOSE", new="SYN_SENT"):
        assert r["pid"] == client, show(r)  # connect() runs in the client
    check_rx_queue(leak, 5)  # the 5 bytes sent after the request, never read


# ---- (b) client leak ------------------------------------------------------------------------


def test_client_leak_names_the_client(tracer, scenario):
    sc, setup, tr = start_connection(tracer, scenario, "client_leak", 1)
    server, client = setup["server_pid"], setup["client_pid"]
    conn = client_tuple(setup)
    ready = sc.expect("ready")

    leak = tr.wait_for(match("leak", **conn), 10, "leak of the client socket")
    not_existing(tr, conn)
    check_socket_fields(leak, conn, "ipv4", HOST_NETNS)
    assert leak["pid"] == client and leak["comm"] == "tw-client", show(leak)
    assert leak["holders"] == [{"pid": client, "comm": "tw-client", "fd": ready["fd"]}], show(leak)
    assert leak["owner_pid"] == client, show(leak)
    assert leak["inode"] == ready["inode"], show(leak)
    assert leak["eof_read"] is False and leak["preexisting"] is False, show(leak)

    # Here the FIN comes from the server's close(): the server is the task interrupted.
    cw = tr.wait_for(match("state", old="ESTABLISHED", new="CLOSE_WAIT", **conn), 1, "->CLOSE_WAIT")
    assert cw["sk"] == leak["sk"]
    assert cw["pid"] != server, f"softirq victim named as owner: {cw}"
    assert cw["pid"] == client and cw["comm"] == "tw-client" and cw["owner"] == "socket", show(cw)
    cross_check_ss(leak, unread=0)

    sc.send("close")
    sc.expect("closed")
    left = tr.wait_for(match("close_wait", **conn), 10, "close_wait record")
    assert left["outcome"] == "closed" and left["new"] == "LAST_ACK", show(left)
    assert left["closer_pid"] == client and left["leaked"] is True, show(left)

    records = tr.stop()
    check_log(records)
    server_sk = find_sk(records, server_tuple(setup))
    check_handshake(records, server_sk, leak["sk"])
    assert_causal(
        records,
        (server_sk, "ESTABLISHED", "FIN_WAIT1"),
        (leak["sk"], "ESTABLISHED", "CLOSE_WAIT"),
        (leak["sk"], "CLOSE_WAIT", "LAST_ACK"),
        (leak["sk"], "LAST_ACK", "CLOSE"),
    )
    check_rx_queue(leak, 0)


# ---- (c) slow close, (d) shutdown: no leak with --leak-after 5 --------------------------------


def test_slow_close_is_measured_and_not_a_leak(tracer, scenario):
    sc, setup, tr = start_connection(tracer, scenario, "slow_close", 5)
    server = setup["server_pid"]
    conn = server_tuple(setup)
    ready = sc.expect("ready", timeout=20)
    t_cw = time.monotonic() - ready["eof_to_close_s"]  # just after the FIN arrived

    left = tr.wait_for(match("close_wait", **conn), 10, "close_wait record")
    check_socket_fields(left, conn, "ipv4", HOST_NETNS)
    assert left["duration_s"] == pytest.approx(2.0, abs=0.2), show(left)
    assert left["outcome"] == "closed" and left["new"] == "LAST_ACK", show(left)
    assert (left["closer_pid"], left["closer_comm"]) == (server, "tw-server"), show(left)
    assert left["pid"] == server, show(left)
    assert left["eof_read"] is True, show(left)  # recv() returned 0 before the close
    assert left["leaked"] is False and left["preexisting"] is False, show(left)

    sleep_until(t_cw + 5.5)  # past --leak-after 5 counted from the FIN
    records = tr.stop()
    check_log(records)
    no_record(records, "leak", conn)
    sk = left["sk"]
    to_last_ack = states(records, sk=sk, old="CLOSE_WAIT", new="LAST_ACK")
    assert len(to_last_ack) == 1 and to_last_ack[0]["pid"] == server, show(to_last_ack)
    assert to_last_ack[0]["duration_s"] == pytest.approx(2.0, abs=0.2), show(to_last_ack)
    check_handshake(records, sk, find_sk(records, client_tuple(setup)))
    assert_causal(
        records,
        (find_sk(records, client_tuple(setup)), "ESTABLISHED", "FIN_WAIT1"),
        (sk, "ESTABLISHED", "CLOSE_WAIT"),
        (sk, "CLOSE_WAIT", "LAST_ACK"),
        (sk, "LAST_ACK", "CLOSE"),
    )


def test_shutdown_leaves_close_wait_and_is_not_a_leak(tracer, scenario):
    sc, setup, tr = start_connection(tracer, scenario, "shutdown", 5)
    server = setup["server_pid"]
    conn = server_tuple(setup)
    sc.expect("ready")  # shut down, the server still holds the descriptor
    t_ready = time.monotonic()

    left = tr.wait_for(match("close_wait", **conn), 10, "close_wait record")
    assert left["outcome"] == "shutdown" and left["new"] == "LAST_ACK", show(left)
    assert (left["closer_pid"], left["closer_comm"]) == (server, "tw-server"), show(left)
    assert left["pid"] == server and left["eof_read"] is True, show(left)
    assert left["leaked"] is False and left["preexisting"] is False, show(left)
    assert 0 <= left["duration_s"] < 1.0, show(left)

    sleep_until(t_ready + 5.5)  # past --leak-after 5; the descriptor is still open
    records = tr.stop()
    check_log(records)
    no_record(records, "leak", conn)
    sk = left["sk"]
    assert_causal(records, (sk, "ESTABLISHED", "CLOSE_WAIT"), (sk, "CLOSE_WAIT", "LAST_ACK"),
                  (sk, "LAST_ACK", "CLOSE"))  # fmt: skip


# ---- (e) reset in CLOSE_WAIT ----------------------------------------------------------------


def test_reset_in_close_wait_has_no_closer(tracer, scenario):
    sc, setup, tr = start_connection(tracer, scenario, "reset", 5)
    server = setup["server_pid"]
    conn = server_tuple(setup)
    sc.expect("close_wait")
    assert [r for r in ss_close_wait() if all(r[k] == conn[k] for k in TUPLE)], "not CLOSE-WAIT"
    cw = tr.wait_for(match("state", old="ESTABLISHED", new="CLOSE_WAIT", **conn), 10, "->CW")
    assert cw["pid"] == server, show(cw)
    sc.send("rst")
    sc.expect("ready")

    left = tr.wait_for(match("close_wait", **conn), 10, "close_wait record")
    assert left["sk"] == cw["sk"], show(left)
    assert left["outcome"] == "reset" and left["new"] == "CLOSE", show(left)
    assert left["closer_pid"] is None and left["closer_tid"] is None, show(left)
    assert left["closer_comm"] is None, show(left)
    assert left["pid"] == server and left["leaked"] is False, show(left)
    assert left["eof_read"] is False and left["preexisting"] is False, show(left)

    records = tr.stop()
    check_log(records)
    no_record(records, "leak", conn)
    client_sk = find_sk(records, client_tuple(setup))
    check_handshake(records, cw["sk"], client_sk)
    assert_causal(
        records,
        (client_sk, "ESTABLISHED", "FIN_WAIT1"),
        (cw["sk"], "ESTABLISHED", "CLOSE_WAIT"),
        (client_sk, "FIN_WAIT2", "CLOSE"),  # close() with SO_LINGER {1, 0}: RST
        (cw["sk"], "CLOSE_WAIT", "CLOSE"),
    )


# ---- (f) IPv6 -------------------------------------------------------------------------------


def test_ipv6_leak(tracer, scenario):
    sc, setup, tr = start_connection(tracer, scenario, "server_leak", 1, addr="::1")
    conn = server_tuple(setup)
    ready = sc.expect("ready")
    leak = tr.wait_for(match("leak", **conn), 10, "IPv6 leak")
    not_existing(tr, conn)
    check_socket_fields(leak, conn, "ipv6", HOST_NETNS)
    assert leak["laddr"] == "::1" and leak["raddr"] == "::1"
    assert leak["pid"] == setup["server_pid"], show(leak)
    assert leak["inode"] == ready["inode"], show(leak)
    cross_check_ss(leak, unread=0)
    records = tr.stop()
    check_log(records)
    for r in states(records, sk=leak["sk"]):
        assert r["family"] == "ipv6" and r["laddr"] == "::1", show(r)
    check_handshake(records, leak["sk"], find_sk(records, client_tuple(setup)))
    check_rx_queue(leak, 0)


# ---- (g) another network namespace ----------------------------------------------------------


def test_leak_in_other_netns(tracer, scenario, netns):
    ns_inode = os.stat(f"/run/netns/{netns}").st_ino
    assert ns_inode != HOST_NETNS
    sc, setup, tr = start_connection(tracer, scenario, "server_leak", 1, netns=netns)
    assert setup["netns"] == ns_inode
    conn = server_tuple(setup)
    ready = sc.expect("ready")
    leak = tr.wait_for(match("leak", **conn), 10, "leak in the other netns")
    not_existing(tr, conn)
    check_socket_fields(leak, conn, "ipv4", ns_inode)
    assert leak["pid"] == setup["server_pid"] == sc.proc.pid, show(leak)  # a host pid
    assert leak["comm"] == "tw-server", show(leak)
    assert leak["holders"] == [{"pid": sc.proc.pid, "comm": "tw-server", "fd": ready["fd"]}]
    assert leak["inode"] == ready["inode"], show(leak)
    cross_check_ss(leak, unread=0, netns=netns)
    assert not [r for r in ss_close_wait() if all(r[k] == conn[k] for k in TUPLE)]
    records = tr.stop()
    check_log(records)
    for r in states(records, sk=leak["sk"]):
        assert r["netns"] == ns_inode, show(r)
    check_rx_queue(leak, 0)


# ---- (h) pre-existing CLOSE_WAIT ------------------------------------------------------------


def test_preexisting_close_wait(tracer, scenario):
    sc = scenario("server_leak")
    setup = sc.expect("setup")
    server = setup["server_pid"]
    conn = server_tuple(setup)
    sc.send("go")
    ready = sc.expect("ready")  # in CLOSE_WAIT before tcpwatch starts

    tr = tracer(leak_after=1, port=setup["lport"])
    ex = tr.wait_for(match("existing", **conn), 5, "existing record")
    check_socket_fields(ex, conn, "ipv4", HOST_NETNS)
    assert ex["state"] == "CLOSE_WAIT" and ex["sk"] is None, show(ex)
    assert ex["pid"] == server and ex["comm"] == "tw-server", show(ex)
    assert ex["holders"] == [{"pid": server, "comm": "tw-server", "fd": ready["fd"]}], show(ex)
    assert ex["inode"] == ready["inode"], show(ex)
    assert ex["preexisting"] is True and ex["eof_read"] is False, show(ex)
    assert "age_s" not in ex and "since" not in ex, show(ex)

    # Known to be in CLOSE_WAIT for at least as long as we have been tracing.
    leak = tr.wait_for(match("leak", **conn), 10, "leak of the pre-existing socket")
    assert leak["preexisting"] is True and leak["since"] is None, show(leak)
    assert leak["pid"] == server and leak["age_s"] >= 1.0, show(leak)

    sc.send("close")
    sc.expect("closed")
    left = tr.wait_for(match("close_wait", **conn), 10, "close_wait record")
    assert left["preexisting"] is True, show(left)
    assert left["duration_s"] is None and left["since"] is None, show(left)
    assert left["outcome"] == "closed" and left["new"] == "LAST_ACK", show(left)
    assert left["closer_pid"] == server and left["pid"] == server, show(left)
    assert left["leaked"] is True, show(left)
    assert SK_RE.match(left["sk"]), show(left)

    records = tr.stop()
    check_log(records)
    assert records.index(ex) < records.index(leak) < records.index(left)
    first = states(records, sk=left["sk"])[0]
    assert (first["old"], first["new"]) == ("CLOSE_WAIT", "LAST_ACK"), show(first)
    assert first["duration_s"] is None, show(first)  # entered CLOSE_WAIT before tracing
    check_rx_queue(ex, 0)
    check_rx_queue(leak, 0)


# ---- (i) the descriptor lives on in a forked child ------------------------------------------


def test_forked_child_holds_the_leak(tracer, scenario):
    sc, setup, tr = start_connection(tracer, scenario, "forked_child", 1)
    parent, client = setup["server_pid"], setup["client_pid"]
    conn = server_tuple(setup)
    ready = sc.expect("ready")
    child = ready["holder_pid"]
    assert len({parent, client, child, os.getpid()}) == 4

    leak = tr.wait_for(match("leak", **conn), 10, "leak held by the child")
    not_existing(tr, conn)
    assert leak["pid"] == child and leak["comm"] == "tw-child", show(leak)
    assert leak["holders"] == [{"pid": child, "comm": "tw-child", "fd": ready["fd"]}], show(leak)
    assert parent not in [h["pid"] for h in leak["holders"]]
    # The hooks only ever saw the parent use the socket (accept, recv, its close of the fd).
    assert leak["owner_pid"] == parent, show(leak)
    cross_check_ss(leak, unread=0)

    sc.send("close")
    sc.expect("closed")
    left = tr.wait_for(match("close_wait", **conn), 10, "close_wait record")
    assert left["outcome"] == "closed" and left["new"] == "LAST_ACK", show(left)
    assert (left["closer_pid"], left["closer_comm"]) == (child, "tw-child"), show(left)
    assert left["leaked"] is True, show(left)

    records = tr.stop()
    check_log(records)
    cw = states(records, sk=leak["sk"], old="ESTABLISHED", new="CLOSE_WAIT")
    assert len(cw) == 1 and cw[0]["pid"] != client, f"softirq victim named as owner: {cw}"
    assert cw[0]["pid"] == parent and cw[0]["owner"] == "socket", show(cw)  # last seen: parent
    check_rx_queue(leak, 0)


def test_port_filter_keeps_that_port_at_either_end_and_nothing_else(tracer):
    """--port P in the kernel: both sockets of a connection to P (the server's local port, the
    client's remote one), and none of a connection to another port made just before."""

    def connection(srv: socket.socket) -> None:
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
        c.close()
        assert s.recv(1) == b""  # the FIN: s is in CLOSE_WAIT
        s.close()

    with socket.create_server(("127.0.0.1", 0)) as want, \
            socket.create_server(("127.0.0.1", 0)) as other:
        port, other_port = want.getsockname()[1], other.getsockname()[1]
        tr = tracer(leak_after=30, port=port)
        connection(other)
        connection(want)
        tr.wait_for(match("close_wait", lport=port), 10, "server's close_wait")
        tr.wait_for(match("state", rport=port, new="CLOSE"), 10, "client's ->CLOSE")
        time.sleep(0.3)  # anything about the other port would have come by now
        recs = tr.snapshot()
    ours = [r for r in recs if r.get("event") == "state"]
    assert {r["lport"] for r in ours if r["rport"] == port}, show(*ours)  # the client's side
    assert {r["rport"] for r in ours if r["lport"] == port}, show(*ours)  # the server's side
    assert all(port in (r["lport"], r["rport"]) for r in ours), show(*ours)
    assert not [r for r in recs if other_port in (r.get("lport"), r.get("rport"))]
