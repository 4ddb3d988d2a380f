"""scripts/bench's pure parts: output counting, /proc and bpftool parsing, summary and table.

The benchmark itself needs root and minutes; what it concludes rests on these helpers, so they
are checked here on hand-built input and on NDJSON written by the real sink.
"""

from __future__ import annotations

import doctest
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import scriptload

from tcpwatch import schema
from tcpwatch.aggregate import Aggregator
from tcpwatch.sinks.ndjson import NdjsonSink

bench = scriptload.load("bench")
BENCH = scriptload.SCRIPTS / "bench"
PORT = 17999


def test_doctests():
    failures, _ = doctest.testmod(bench, verbose=False)
    assert failures == 0


# ----------------------------------------------------------------------------- NDJSON counting


def _state(sk, lport, rport, old, new, ts):
    return schema.decode(schema.encode(dict(
        kind=1, sk=sk, laddr="127.0.0.1", lport=lport, raddr="127.1.0.1", rport=rport,
        old=old, new=new, ts_ns=ts, flags=1, pid=7, tid=7, comm="churn",
    )))


def _log_bytes() -> bytes:
    """A log as tcpwatch writes it: real aggregator records through the real NDJSON sink."""
    agg = Aggregator(leak_after_s=30, mono_to_wall_ns=1_795_236_980 * 10**9)
    buf = io.BytesIO()
    sink = NdjsonSink(buf)
    sink.write({"event": "start", "ts": "2026-11-21T05:13:00.000000Z", "v": 1,
                "startup_s": 0.61})
    ts = 1_000 * 10**9
    events = [
        _state(0xA, PORT, 0, 7, 10, ts),                 # listener CLOSE>LISTEN
        _state(0xB, 0, PORT, 7, 2, ts + 1),              # client, port in rport
        _state(0xC, PORT, 40000, 10, 3, ts + 2),         # server child
        _state(0xC, PORT, 40000, 1, 8, ts + 3),          # -> CLOSE_WAIT
        _state(0xC, PORT, 40000, 8, 9, ts + 4),          # leaves it: state + close_wait
        _state(0xD, 22, 50000, 1, 4, ts + 5),            # another port
        _state(0xE, 1799, 17990, 1, 4, ts + 6),          # prefixes of PORT do not count
        _state(0xA, PORT, 0, 10, 7, ts + 7),             # listener LISTEN>CLOSE
    ]
    for ev in events:
        for rec in agg.feed(ev):
            sink.write(rec)
    for rec in agg.note_lost(5, ts + 8):
        sink.write(rec)
    sink.write(agg.summary(ts + 9))
    sink.flush()
    return buf.getvalue()


def test_ndjson_counts_agree_with_a_full_parse_of_real_sink_output():
    data = _log_bytes()
    lines = data.splitlines(keepends=True)
    c = bench.ndjson_counts(lines, PORT)

    records = [json.loads(line) for line in lines]
    states = [r for r in records if r["event"] == "state"]
    on_port = [r for r in states if PORT in (r["lport"], r["rport"])]
    assert c["records"] == len(records)
    assert c["bytes"] == len(data)
    assert c["state"] == len(states) == 8
    assert c["state_port"] == len(on_port) == 6
    assert c["listener_port"] == 2
    assert c["lost_records"] == 5
    assert c["start"]["startup_s"] == 0.61
    assert c["summary"]["events"] == 8 and c["summary"]["lost"] == 5
    assert c["events"]["close_wait"] == 1


def test_ndjson_counts_skips_a_torn_last_line():
    data = _log_bytes() + b'{"event":"summ'
    c = bench.ndjson_counts(io.BytesIO(data), PORT)
    assert c["summary"]["transitions"] == 8


def test_ndjson_pairs_by_side():
    pairs = bench.ndjson_pairs(_log_bytes().splitlines(), PORT)
    assert pairs[("server", "CLOSE_WAIT", "LAST_ACK")] == 1
    assert pairs[("client", "CLOSE", "SYN_SENT")] == 1
    assert sum(pairs.values()) == 6


# ------------------------------------------------------------------------------ tcpstates


TCPSTATES_OUT = """\
SKADDR           C-PID C-COMM     LADDR           LPORT RADDR           RPORT OLDSTATE    -> NEWSTATE    MS
ffff888130dfdc80 32486 churn      127.0.0.1       17999 0.0.0.0         0     CLOSE       -> LISTEN      0.000
ffff88813d1bae40 0     swapper/1  127.0.0.1       17999 127.1.0.11      40114 LAST_ACK    -> CLOSE       0.011
ffff88813d1bae41 0     my worker  127.1.0.11      40114 127.0.0.1       17999 FIN_WAIT2   -> CLOSE       0.011
ffff88813d1bae42 9     sshd       10.0.0.1        22    10.0.0.2        17999x ESTABLISHED -> CLOSE      0.011
ffff888130dfdc80 32486 churn      127.0.0.1       17999 0.0.0.0         0     LISTEN      -> CLOSE       2006.321
"""  # noqa: E501


def test_tcpstates_counts_fields_from_the_right():
    c = bench.tcpstates_counts(io.StringIO(TCPSTATES_OUT), PORT)
    assert c["lines"] == 5
    assert c["port"] == 4  # "17999x" is not the port
    assert c["listener_port"] == 2


def test_perf_lost_sums_bcc_messages():
    assert bench.perf_lost("Possibly lost 7 samples\nnoise\nPossibly lost 3 samples\n") == 10
    assert bench.perf_lost("") == 0


# ------------------------------------------------------------------------- /proc and bpftool


def test_proc_stat_with_a_hostile_comm():
    text = "4242 (py) (x) S 1 4242 4242 0 -1 4194560 100 0 0 0 321 54 0 0 20 0 1 0 9 0 0"
    assert bench.proc_stat_cpu_ticks(text) == 375


def test_fdinfo_of_a_prog_and_a_ringbuf():
    prog = bench.fdinfo_fields("prog_type:\t5\nprog_id:\t2226\nrun_time_ns:\t900\n"
                               "run_cnt:\t3\nrecursion_misses:\t2\nprog_tag:\tb50b048de26f3003\n")
    assert (prog["prog_id"], prog["run_cnt"], prog["recursion_misses"]) == (2226, 3, 2)
    ring = bench.fdinfo_fields("map_type:\t27\nmax_entries:\t4096\nmap_id:\t1797\n")
    assert ring == {"map_type": 27, "max_entries": 4096, "map_id": 1797}


def test_counters_from_bpftool_dump_formatted_and_raw():
    formatted = [
        {"key": ["0x00", "0x00", "0x00", "0x00"],
         "formatted": {"key": 0, "values": [{"cpu": 0, "value": 28}, {"cpu": 1, "value": 16}]}},
        {"key": ["0x01", "0x00", "0x00", "0x00"],
         "formatted": {"key": 1, "values": [{"cpu": 0, "value": 0}, {"cpu": 1, "value": 5}]}},
    ]
    raw = [  # bpftool without BTF: little-endian byte lists only
        {"key": ["0x01", "0x00", "0x00", "0x00"],
         "values": [{"cpu": 0, "value": ["0x01", "0x01", "0", "0", "0", "0", "0", "0"]},
                    {"cpu": 1, "value": ["0x02", "0", "0", "0", "0", "0", "0", "0"]}]},
    ]
    assert bench.counters_from_dump(formatted) == {
        "events": 44, "lost": 5, "sock_miss": 0, "sock_full": 0, "filtered": 0,
        "transitions": 0, "rescued": 0, "exit_agg": 0, "stale_ran": 0}
    assert bench.counters_from_dump(raw)["lost"] == 259


def test_counter_slots_are_the_headers():
    from tcpwatch import schema

    consts = schema.layout().consts
    assert {name: consts["TW_CNT_" + name.upper()] for name in bench.CNT_SLOTS} == \
        bench.CNT_SLOTS


def test_find_numbers_in_top_json():
    doc = {"mode": "kernel", "events_per_s": 5657.0, "lost": 69333,
           "rows": [{"close_wait": 27, "lost": 1}]}
    assert bench.find_numbers(doc) == {"lost": 69333}


def test_collapsed_profile_self_and_total():
    lines = [
        "run (pipeline.py:90);_drain (pipeline.py:74);feed (aggregate.py:200) 6",
        "run (pipeline.py:90);_drain (pipeline.py:74);write (ndjson.py:50) 3",
        "run (pipeline.py:90);poll (loader.py:330) 1",
        "garbage",
    ]
    p = bench.collapsed_profile(lines, top=2)
    assert p["samples"] == 10
    assert p["self"] == [("feed (aggregate.py:200)", 6, 60.0), ("write (ndjson.py:50)", 3, 30.0)]
    assert p["total"][0] == ("run (pipeline.py:90)", 10, 100.0)


# ----------------------------------------------------------------------- summary and table


def _run(mode, rnd, rate, **kw):
    return {"mode": mode, "round": rnd, "rate": rate, **kw}


RUNS = [
    _run("baseline", 1, 30000.0), _run("baseline", 2, 34000.0), _run("baseline", 3, 32000.0),
    _run("trace-port", 1, 30400.0, expected=300002, seen=300002, lost=0, kernel_lost=0,
         cpu_s=1.5, events=330002, bytes=99_000_600, rss_peak_kb=240_000, rss_kb=190_000,
         startup_s=0.6, ready_s=1.1, lag_s=0.1, seconds=5.0, cpu_load_s=1.4, missed=0),
    _run("trace-port", 2, 28800.0, expected=288002, seen=288000, lost=2, kernel_lost=3,
         cpu_s=1.6, events=316800, bytes=95_000_000, rss_peak_kb=250_000, rss_kb=180_000,
         startup_s=0.7, ready_s=1.3, lag_s=0.3, seconds=5.0, cpu_load_s=1.6, missed=1),
    {"mode": "top", "round": 1, "rate": None, "na": "n/a (top not available)"},
]


def test_summarize_medians_ratios_and_exactness():
    rows = {r["mode"]: r for r in bench.summarize(RUNS, ["baseline", "top", "trace-port"], {})}
    base, trace, top = rows["baseline"], rows["trace-port"], rows["top"]
    assert base["rate"] == 32000.0 and base["ratio"] == 1.0
    assert trace["rate"] == pytest.approx(29600.0)
    assert trace["ratio"] == pytest.approx(29600.0 / 32000.0)
    # Paired with each round's own baseline: 30400/30000 and 28800/34000.
    assert trace["round_ratios"] == pytest.approx([30400 / 30000, 28800 / 34000])
    assert trace["round_ratio"] == pytest.approx((30400 / 30000 + 28800 / 34000) / 2)
    assert (trace["expected"], trace["seen"], trace["exact"]) == (588004, 588002, False)
    assert (trace["lost"], trace["kernel_lost"], trace["missed"]) == (2, 3, 1)
    assert trace["cpu_per_m"] == pytest.approx((1.5 / 330002 + 1.6 / 316800) / 2 * 1e6)
    assert trace["rss_peak_mb"] == pytest.approx(250_000 / 1024)
    assert trace["startup_s"] == pytest.approx(0.65)
    assert top["na"] == "n/a (top not available)" and top["rate"] is None


def test_format_table_marks_mismatch_and_na():
    text = bench.format_table(bench.summarize(RUNS, ["baseline", "top", "trace-port"], {}))
    lines = text.splitlines()
    assert lines[0].startswith("mode")
    assert lines[1].split()[:3] == ["baseline", "32000", "100.0%"]
    assert lines[2].split() == ["top", "n/a", "(top", "not", "available)"]
    trace = lines[3]
    assert "92.5%" in trace and "588004/588002 MISMATCH" in trace
    assert "93.0 (85-101)" in trace
    assert "2 (kernel 3)" in trace
    assert "0.65 (1.20)" in trace


def test_foreign_cpu_counts_other_processes_only():
    before = {10: (1, 10, 100), 11: (10, 10, 50), 20: (1, 20, 1000), 30: (1, 30, 5)}
    after = {10: (1, 10, 400), 11: (10, 10, 90), 20: (1, 20, 1100), 40: (1, 40, 7),
             50: (77, 77, 900)}
    # ours: the bench (10; its child 11 too) and a tracer in its own session (77); 20 grew by
    # 100 ticks, 40 is new (7 ticks), 30 went away.
    ticks = 107
    expected = ticks / bench.os.sysconf("SC_CLK_TCK")
    assert bench.foreign_cpu_s(before, after, {10, 77}) == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["trace-o", "ndjson", "table"])
def test_bench_agent_runs(mode):
    """scripts/bench_agent (no root) still drives the trace loop as the agent does: it once
    broke unseen when the ring scanner gained an argument."""
    script = BENCH.parent / "bench_agent"
    res = subprocess.run([sys.executable, str(script), "--mode", mode, "--connections", "300",
                          "--repeat", "1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    reads = [line.split()[0] for line in res.stdout.splitlines() if "CPU us/event" in line]
    assert "python" in reads and "list" in reads, res.stdout


def test_every_mode_has_a_command_and_floors_attach_their_count(tmp_path):
    import argparse

    b = bench.Bench.__new__(bench.Bench)
    b.args = argparse.Namespace(port=PORT, seconds=5.0, top_margin=3.0, loss_pages=1)
    b.tcpwatch, b.tcpstates = ["tcpwatch"], "tcpstates-bpfcc"
    assert set(bench.DEFAULT_MODES) <= set(bench.ALL_MODES)
    for mode in bench.ALL_MODES:
        spec = b.tracer_argv(mode, tmp_path / "out")
        assert (spec is None) == (mode == "baseline"), mode
    for mode in bench.TOP_MODES:
        # top must still be running when the bench reads its kernel figures, after the churn
        # and up to TAIL_LIMIT_S of waiting for its last sockets; it is stopped with SIGINT.
        argv = b.tracer_argv(mode, tmp_path / "out")[0]
        interval = float(argv[argv.index("--interval") + 1])
        assert interval >= b.args.seconds + bench.TAIL_LIMIT_S + b.args.top_margin - 1, argv
    for mode, n in bench.FLOOR_MODES.items():
        argv, out, env = b.tracer_argv(mode, tmp_path / "out")
        assert argv[1].endswith("scripts/bpf_floor") and argv[-2:] == ["--programs", str(n)]
        assert out == tmp_path / "out" and env is None


def test_scale_is_opt_in_and_takes_a_socket_count():
    assert bench.parse_args([]).scale is None
    assert bench.parse_args(["--scale"]).scale == 100_000
    assert bench.parse_args(["--scale", "300000"]).scale == 300_000
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--scale", "0"])
    assert exc.value.code == 2


class _Quiet:
    """The part of scripts/bench's Bench that run_scale() uses."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def log(self, msg: str) -> None:
        pass


def _fake_scale(tmp_path: Path, monkeypatch, body: str) -> _Quiet:
    """A stand-in scripts/bench_scale with this body, where run_scale() looks for it."""
    script = tmp_path / "scripts" / "bench_scale"
    script.parent.mkdir()
    script.write_text(body)
    monkeypatch.setattr(bench, "REPO", tmp_path)
    return _Quiet(tmp_path)


def test_run_scale_reports_a_failed_scale_check_in_one_line(tmp_path, monkeypatch):
    b = _fake_scale(tmp_path, monkeypatch, "import sys\nprint('held 10/20 sockets')\n"
                    "print('tracer exited: boom')\nsys.exit(3)\n")
    with pytest.raises(RuntimeError, match=r"exited 3: tracer exited: boom$"):
        bench.run_scale(b, 20)


def test_run_scale_returns_the_lines_and_figures(tmp_path, monkeypatch):
    b = _fake_scale(tmp_path, monkeypatch, "import json, sys\nprint('held 20/20 sockets')\n"
                    "out = sys.argv[sys.argv.index('--json') + 1]\n"
                    "open(out, 'w').write(json.dumps({'sockets': int(sys.argv[2])}))\n")
    assert bench.run_scale(b, 20) == {"lines": ["held 20/20 sockets"],
                                      "figures": {"sockets": 20}}


@pytest.mark.skipif(bench.shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_port_socket_states_names_what_is_still_open():
    import socket

    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        port = lst.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as c:
            s, _ = lst.accept()
            c.shutdown(socket.SHUT_WR)  # the server side passes to CLOSE_WAIT
            s.recv(1)
            # The ACK of the FIN may be delayed (the server side enters pingpong mode), so
            # the client side shows FIN-WAIT-1 for up to ~40 ms before FIN-WAIT-2.
            want = {"LISTEN": 1, "CLOSE-WAIT": 1, "FIN-WAIT-2": 1}
            deadline = time.monotonic() + 2
            while (got := bench.port_socket_states(port)) != want and time.monotonic() < deadline:
                time.sleep(0.01)
            assert got == want
            assert bench.port_sockets(port) == 3
            s.close()
    deadline = time.monotonic() + 2
    while bench.port_sockets(port) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bench.port_sockets(port) == 0  # the client's side is in TIME_WAIT, left out
