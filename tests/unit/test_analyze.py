"""`tcpwatch analyze`: golden analyses of recorded logs, and every kind of bad input.

The recorded logs (tests/unit/fixtures/logs/recorded*.ndjson*) were written by a real
`tcpwatch trace -o` (fixtures/logs/record.py, root). To regenerate the golden files after an
intended change of output, run

    TCPWATCH_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_analyze.py

then read `git diff tests/unit/golden/` line by line before committing it.
"""

from __future__ import annotations

import doctest
import gzip
import io
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import goldens
import orjson
import pytest

from tcpwatch import cli
from tcpwatch.analyze import engine, inputs, report, sketch, timeparse
from tcpwatch.analyze.engine import Analyzer, Options

HERE = Path(__file__).parent
LOGS = HERE / "fixtures" / "logs"
RECORDED = LOGS / "recorded.ndjson"
ROTATED = str(LOGS / "recorded-rotated.ndjson*")
SYNTHETIC = LOGS / "synthetic.ndjson"  # a copy of the NDJSON sink golden: every record kind

START = b'{"event":"start","ts":"2026-11-21T05:13:00.000000Z","v":1,"hostname":"h","pid":1,' \
        b'"leak_after_s":30.0}'


def run(args: list[str], capsys, stdin: bytes | None = None, monkeypatch=None):
    """(exit status, stdout, stderr) of `tcpwatch analyze ARGS`."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as exc:
        cli.main(["analyze", *args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def golden(name: str, text: str) -> None:
    goldens.check_golden(name, text, __file__)


def state(ts: str, sk: str, old: str, new: str, lport=8080, rport=50000, pid=7) -> bytes:
    return orjson.dumps({
        "event": "state", "ts": f"2026-11-21T05:13:{ts}Z", "sk": sk, "family": "ipv4",
        "laddr": "10.0.0.1", "lport": lport, "raddr": "10.0.0.2", "rport": rport,
        "netns": None, "pid": pid, "tid": pid, "comm": "api", "old": old, "new": new,
        "duration_s": 0.1, "owner": "socket",
    })


def close_wait(ts: str, sk: str, dur: float, lport=8080, rport=50000, pid=7) -> bytes:
    return orjson.dumps({
        "event": "close_wait", "ts": f"2026-11-21T05:13:{ts}Z", "sk": sk, "family": "ipv4",
        "laddr": "10.0.0.1", "lport": lport, "raddr": "10.0.0.2", "rport": rport,
        "netns": None, "pid": pid, "tid": pid, "comm": "api", "duration_s": dur,
        "since": None, "new": "LAST_ACK", "outcome": "closed", "closer_pid": pid,
        "closer_tid": pid, "closer_comm": "api", "eof_read": True, "leaked": False,
        "preexisting": False,
    })


def small_log() -> bytes:
    """Two sockets: one closes after 2 s, one stays in CLOSE_WAIT to the end (40 s)."""
    return b"\n".join([
        START,
        state("01.000000", "0x1", "ESTABLISHED", "CLOSE_WAIT"),
        state("02.000000", "0x2", "ESTABLISHED", "CLOSE_WAIT", rport=50001, pid=9),
        state("03.000000", "0x1", "CLOSE_WAIT", "LAST_ACK"),
        close_wait("03.000000", "0x1", 2.0),
        state("42.000000", "0x3", "SYN_RECV", "ESTABLISHED"),
    ]) + b"\n"


# ------------------------------------------------------------------------------ golden files


@pytest.mark.parametrize(
    ("logs", "name"),
    [(["recorded.ndjson"], "analyze_recorded"), (["recorded-rotated.ndjson*"], "analyze_rotated"),
     (["synthetic.ndjson"], "analyze_synthetic")],
)
def test_golden_analyses(logs, name, capsys, monkeypatch):
    # Relative paths: the report names its files, and a checkout can live anywhere.
    monkeypatch.chdir(LOGS)
    code, out, err = run(logs, capsys)
    assert code == 0 and err == ""
    golden(f"{name}.txt", out)
    code, out, err = run([*logs, "--format", "json"], capsys)
    assert code == 0
    golden(f"{name}.json", out)


def test_recorded_log_facts(capsys):
    """What record.py did, independent of the golden text: 9 sockets in CLOSE_WAIT, 6 closed
    (one by a reset), 3 never closed, all owned by the recording process."""
    data = orjson.loads(run([str(RECORDED), "--format", "json"], capsys)[1])
    assert data["totals"]["cw"] == 9 and data["totals"]["closed"] == 6
    assert data["totals"]["open"] == 3 and data["totals"]["untracked"] == 0
    assert data["outcomes"].get("reset") == 1
    assert all(o["leaked"] for o in data["open"])
    assert {o["comm"] for o in data["open"]} == {"python"}
    assert data["input"]["corrupt"] == 0


def test_a_rotated_log_reads_as_one(capsys):
    """Every file of a rotated log starts with the same run's `start`: one run, no gap."""
    data = orjson.loads(run([ROTATED, "--format", "json"], capsys)[1])
    assert len(data["input"]["files"]) > 2 and len(data["runs"]) == 1
    assert data["totals"]["cw"] == 9 and data["totals"]["untracked"] == 0
    assert data["input"]["files"][-1].endswith("recorded-rotated.ndjson")  # oldest first


# ---------------------------------------------------------------------------- inputs


def test_gz_stdin_and_plain_give_the_same_analysis(tmp_path, capsys, monkeypatch):
    plain = tmp_path / "a.ndjson"
    plain.write_bytes(small_log())
    gz = tmp_path / "a.ndjson.gz"
    gz.write_bytes(gzip.compress(small_log()))
    outs = [run([str(plain), "--format", "json"], capsys)[1],
            run([str(gz), "--format", "json"], capsys)[1],
            run(["-", "--format", "json"], capsys, small_log(), monkeypatch)[1]]
    totals = [orjson.loads(o)["totals"] for o in outs]
    assert totals[0] == totals[1] == totals[2] == {
        "cw": 2, "closed": 1, "leaks": 1, "open": 1, "untracked": 0
    }


def test_zst_works_or_says_what_to_install(tmp_path, capsys):
    path = tmp_path / "a.ndjson.zst"
    try:
        import zstandard
    except ImportError:
        path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 20)
        code, out, err = run([str(path)], capsys)
        assert code == 1
        assert "zstd-compressed: install the 'zstd' extra" in err
        assert "Traceback" not in err
        return
    path.write_bytes(zstandard.ZstdCompressor().compress(small_log()))
    code, out, _ = run([str(path), "--format", "json"], capsys)
    assert code == 0 and orjson.loads(out)["totals"]["cw"] == 2


def test_corrupt_lines_are_counted_named_and_skipped(tmp_path, capsys):
    lines = small_log().split(b"\n")
    lines[2:2] = [b"garbage", b"[1, 2]", b'{"event":"state"}', b"\xff\xfe binary"]
    lines[7:7] = [b"{"] * 4
    path = tmp_path / "c.ndjson"
    path.write_bytes(b"\n".join(lines))
    code, out, err = run([str(path), "--format", "json"], capsys)
    assert code == 0
    data = orjson.loads(out)
    assert data["input"]["corrupt"] == 8 and data["totals"]["cw"] == 2
    examples = data["input"]["corrupt_examples"]
    assert [e.split(" (")[0] for e in examples] == [
        f"{path}:3: not JSON",
        f"{path}:4: not a tcpwatch record",
        f"{path}:5: record without 'new'",
        f"{path}:6: not JSON",
        f"{path}:8: not JSON",
    ]
    assert "tcpwatch: warning: 8 corrupt lines skipped; the first:" in err
    assert f"  {path}:3: not JSON" in err


def test_truncated_last_line_is_named(tmp_path, capsys):
    path = tmp_path / "t.ndjson"
    path.write_bytes(small_log() + b'{"event":"state","ts":"2026-11-2')
    code, out, err = run([str(path)], capsys)
    assert code == 0
    assert f"{path}:7: truncated: the last line has no newline and is not complete JSON" in err


def test_huge_line_is_skipped_without_being_held(tmp_path, capsys):
    path = tmp_path / "h.ndjson"
    with path.open("wb") as f:
        f.write(START + b"\n")
        f.write(b'{"event":"state","comm":"' + b"x" * (3 * inputs.MAX_LINE) + b'"}\n')
        f.write(small_log().split(b"\n", 1)[1])
    code, out, err = run([str(path), "--format", "json"], capsys)
    assert code == 0
    data = orjson.loads(out)
    assert data["input"]["corrupt"] == 1 and data["totals"]["cw"] == 2
    assert data["input"]["corrupt_examples"] == [f"{path}:2: line longer than 1 MiB"]


def test_batches_count_lines_across_reads_and_huge_lines():
    data = b"a\n" + b"y" * 100 + b"\nb\nc"
    got = [(n, list(ls), u) for n, ls, u in inputs.batches(io.BytesIO(data), chunk=7,
                                                            max_line=20)]
    flat = [(n + k, line) for n, ls, _ in got for k, line in enumerate(ls)]
    assert [(n, line) for n, line in flat if line is not inputs.OVERLONG] == [
        (1, b"a"), (3, b"b"), (4, b"c")
    ]
    assert [n for n, line in flat if line is inputs.OVERLONG] == [2]
    assert got[-1][2] is True  # "c" had no newline


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "nothing usable read from"),
        (os.urandom(4096).replace(b"\n", b"") + b"\n" + os.urandom(100), "nothing usable"),
        (b"\n\n\n", "nothing usable read from"),
    ],
    ids=["empty", "binary", "blank"],
)
def test_nothing_usable_exits_1_in_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "x.ndjson"
    path.write_bytes(content)
    code, out, err = run([str(path)], capsys)
    assert code == 1 and out == ""
    assert err.splitlines()[-1].startswith(f"tcpwatch: error: {needle}")
    assert "Traceback" not in err


def test_damaged_gz_keeps_what_it_could_read(tmp_path, capsys):
    path = tmp_path / "d.ndjson.gz"
    path.write_bytes(gzip.compress(small_log() * 5000)[:-30])  # > one 1 MiB read
    code, out, err = run([str(path), "--format", "json"], capsys)
    assert code == 0
    assert "compressed data cut short or damaged" in err
    assert orjson.loads(out)["input"]["records"] > 0


def test_incompatible_schema_version_is_refused(tmp_path, capsys):
    path = tmp_path / "v2.ndjson"
    path.write_bytes(small_log().replace(b'"v":1', b'"v":2'))
    code, out, err = run([str(path)], capsys)
    assert code == 1 and out == ""
    assert err == (f"tcpwatch: error: {path}:1: written with NDJSON schema version 2; this "
                   "tcpwatch reads version 1: analyse it with a matching tcpwatch\n")


def test_missing_files_and_empty_globs_are_named(tmp_path, capsys):
    good = tmp_path / "a.ndjson"
    good.write_bytes(small_log())
    code, out, err = run([str(good), str(tmp_path / "nope.ndjson"),
                          str(tmp_path / "*.gz")], capsys)
    assert code == 0
    assert f"tcpwatch: warning: no file matches {tmp_path}/*.gz" in err
    assert f"tcpwatch: warning: cannot read {tmp_path}/nope.ndjson: No such file" in err
    code, _, err = run([str(tmp_path / "nope.ndjson")], capsys)
    assert code == 1 and "nothing usable read from" in err


def test_bad_flags_give_one_line_and_exit_2(capsys):
    for args, needle in [
        (["--since", "yesterday-ish", "x"], "is not a time"),
        (["--format", "xml", "x"], "'xml' is not one of"),
        (["--state", "SLEEPY", "x"], "not a TCP state"),
        ([], "Missing argument 'LOG...'"),
    ]:
        code, _, err = run(args, capsys)
        assert code == 2 and needle in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------- analysis


def analyse(data: bytes, **opts) -> engine.Result:
    a = Analyzer(Options(**opts))
    for n, lines, unterminated in inputs.batches(io.BytesIO(data)):
        a.feed_lines("mem", n, lines, unterminated)
    return a.finish()


def test_open_sockets_age_and_leak_at_the_end():
    r = analyse(small_log())
    assert r.totals == {"cw": 2, "closed": 1, "leaks": 1, "open": 1, "untracked": 0}
    (o,) = r.open
    assert o["sk"] == "0x2" and o["age_s"] == 40.0 and o["leaked"] and o["pid"] == 9
    assert r.durations.n == 1 and r.durations.max == 2.0


def test_filters_port_pid_since_until():
    log = small_log()
    assert analyse(log, ports=frozenset({50001})).totals["cw"] == 1
    assert analyse(log, pids=frozenset({7})).totals["cw"] == 1
    assert analyse(log, pids=frozenset({9})).open[0]["sk"] == "0x2"
    t = timeparse.epoch("2026-11-21T05:13:02.500000Z")
    after = analyse(log, since=t)
    assert after.totals["cw"] == 2 and after.first_ts == "2026-11-21T05:13:03.000000Z"
    before = analyse(log, until=t)  # 0x1 had not left CLOSE_WAIT yet: open then
    assert before.totals == {"cw": 2, "closed": 0, "leaks": 0, "open": 2, "untracked": 0}
    states = analyse(log, states=frozenset({"SYN_RECV"}))
    assert states.totals["cw"] == 0 and states.transitions == {("SYN_RECV", "ESTABLISHED"): 1}


def test_leak_records_add_owner_cause_and_stacks():
    leak = orjson.dumps({
        "event": "leak", "ts": "2026-11-21T05:13:40.000000Z", "sk": "0x2", "family": "ipv4",
        "laddr": "10.0.0.1", "lport": 8080, "raddr": "10.0.0.2", "rport": 50001,
        "netns": None, "pid": 11, "tid": None, "comm": "worker", "age_s": 38.0,
        "since": "2026-11-21T05:13:02.000000Z", "holders": [{"pid": 11, "comm": "worker",
                                                             "fd": 4}],
        "owner_pid": 9, "owner_comm": "api", "rx_queue": 5, "inode": 9, "eof_read": False,
        "preexisting": False, "cause": "no-close-after-eof", "ustack": ["handle+0x12"],
    })
    r = analyse(small_log() + leak + b"\n")
    (o,) = r.open
    assert (o["pid"], o["comm"], o["rx_queue"]) == (11, "worker", 5)
    assert o["cause"] == "no-close-after-eof"
    assert o["ustack"] == ["handle+0x12"]
    text = report.as_text(r)
    assert "no-close-af~" in text
    assert "u handle+0x12" in text


def test_a_new_run_rediscovers_sockets_still_in_close_wait():
    second = START.replace(b'"pid":1', b'"pid":2').replace(b"00.000000Z", b"50.000000Z")
    existing = orjson.dumps({
        "event": "existing", "ts": "2026-11-21T05:13:50.000000Z", "sk": None,
        "family": "ipv4", "laddr": "10.0.0.1", "lport": 8080, "raddr": "10.0.0.2",
        "rport": 50001, "netns": None, "pid": 9, "tid": None, "comm": "api",
        "state": "CLOSE_WAIT", "holders": [], "owner_pid": None, "owner_comm": None,
        "rx_queue": 0, "inode": 5, "eof_read": False, "preexisting": True,
    })
    r = analyse(small_log() + second + b"\n" + existing + b"\n")
    (o,) = r.open
    assert o["since"] == "2026-11-21T05:13:02.000000Z" and o["age_s"] == 48.0  # true age kept
    assert len(r.sessions) == 2 and r.totals["untracked"] == 0


def test_memory_is_bounded_by_open_sockets_and_groups(monkeypatch):
    monkeypatch.setattr(engine, "MAX_GROUPS", 5)
    lines = [START]
    for i in range(200):
        sk = f"{i:#x}"
        lines.append(state("01.000000", sk, "ESTABLISHED", "CLOSE_WAIT", pid=i + 1))
        lines.append(close_wait("02.000000", sk, 1.0, pid=i + 1))
    a = Analyzer(Options())
    a.feed_lines("mem", 1, lines, False)
    assert a.open == {} and a.by_tuple == {}
    r = a.finish()
    assert len(r.by_process) <= 6 and r.by_process[engine.OTHER].cw >= 195
    assert r.totals["cw"] == 200


def test_quantiles_are_within_the_stated_error():
    rng = random.Random(5)
    values = [rng.lognormvariate(-3, 2) for _ in range(20000)]
    d = sketch.Durations()
    for v in values:
        d.add(v)
    values.sort()
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = values[max(0, math.ceil(q * len(values)) - 1)]
        assert abs(d.quantile(q) - exact) <= exact / (2 * sketch.SUB) + 1e-12, q


def test_timeline_merges_bins_to_stay_bounded():
    t = sketch.Timeline(start=0.0)
    for s in range(0, 100000, 7):
        t.set(float(s), s % 13)
    t.finish(100000.0)
    assert len(t.bins) <= sketch.MAX_BINS and t.bin_s >= 100000 / sketch.MAX_BINS
    assert max(t.bins) == 12


def test_text_report_fits_100_columns(capsys):
    for logs in ([str(RECORDED)], [str(SYNTHETIC)]):
        out = run(logs, capsys)[1]
        assert max(len(line) for line in out.splitlines()) <= report.WIDTH


def test_plot_draws_or_says_what_to_install(tmp_path, capsys):
    png = tmp_path / "cw.png"
    code, out, err = run([str(RECORDED), "--plot", str(png)], capsys)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 1 and out == ""
        assert err == ("tcpwatch: error: --plot needs matplotlib: pip install "
                       "'tcpwatch[plot]' (or python3-matplotlib)\n")
        return
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run([str(RECORDED), "--plot", str(tmp_path / "cw.pdf")], capsys)
    assert code == 1 and "--plot writes .png or .svg" in err


def test_analyze_needs_no_root_and_prints_no_traceback(tmp_path):
    path = tmp_path / "x.ndjson"
    path.write_bytes(b"\x00\x01garbage")
    env = dict(os.environ)
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
         "tcpwatch", "analyze", str(RECORDED), str(path)],
        capture_output=True, text=True, env=env, check=False,
    ) if os.geteuid() == 0 else subprocess.run(
        [sys.executable, "-m", "tcpwatch", "analyze", str(RECORDED), str(path)],
        capture_output=True, text=True, check=False,
    )
    assert "Traceback" not in proc.stderr
    if os.geteuid() == 0 and "Permission denied" in proc.stderr:
        return  # the fixture is 0640 root: nobody cannot read it, said in one line
    assert proc.returncode == 0, proc.stderr


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["analyze", "-h"])
    out = capsys.readouterr().out
    assert "Examples:" in out and "--since" in out and "--plot" in out


@pytest.mark.parametrize("module", [engine, inputs, report, sketch, timeparse])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0
