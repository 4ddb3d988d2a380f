"""The NDJSON log file: rotation by size and age, compression, --keep, reopen (SIGHUP), whole
lines only, and what happens when the disk is full or the path is not writable.

Root-only cases (a real full tmpfs, SIGHUP to a real `tcpwatch trace`) are in
tests/kernel/test_rotation_root.py.
"""

from __future__ import annotations

import errno
import gzip
import os
import stat
from pathlib import Path

import orjson
import pytest

from tcpwatch import cli
from tcpwatch.sinks import ndjson
from tcpwatch.sinks.ndjson import LogFile, Rotation, open_ndjson, rotated_files

START = {"event": "start", "ts": "2026-11-21T05:13:00.000000Z", "v": 1, "pid": 42,
         "hostname": "web-1"}


class Clock:
    """A settable clock for flush intervals and rotation by age."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def record(i: int, pad: int = 0) -> dict:
    return {"event": "state", "ts": "2026-11-21T05:13:00.000000Z", "sk": f"{i:#x}", "seq": i,
            "comm": "x" * pad}


def read_log(path: Path) -> list[list[dict]]:
    """Every file of a log, oldest first (rotated ones, then PATH), as parsed lines. Fails
    if any line is not complete JSON."""
    files = [Path(p) for p in rotated_files(str(path))] + [path]
    out = []
    for f in files:
        if not f.exists():
            continue
        data = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{f} ends in a partial line"
        out.append([orjson.loads(line) for line in data.splitlines()])
    return out


def test_size_rotation_keeps_every_line_whole_and_in_order(tmp_path):
    path = tmp_path / "t.ndjson"
    log = LogFile(str(path), rotation=Rotation(size=4096))
    log.write(START)
    n = 3000
    for i in range(n):
        log.write(record(i, pad=i % 97))  # lines of many lengths
        if i % 100 == 0:
            log.maybe_flush()
    log.close()
    files = read_log(path)
    assert len(files) > 10
    seqs = [r["seq"] for f in files for r in f if r["event"] == "state"]
    assert seqs == list(range(n))  # none lost, none doubled, in order
    for part, f in enumerate(files, start=1):
        assert f[0]["event"] == "start" and f[0]["ts"] == START["ts"]  # self-describing
        assert f[0].get("part", 1) == part
    for name in rotated_files(str(path)):
        assert name.endswith(".gz")
        assert len(gzip.decompress(Path(name).read_bytes())) <= 4096


def test_a_line_longer_than_the_limit_gets_a_file_of_its_own(tmp_path):
    path = tmp_path / "t.ndjson"
    log = LogFile(str(path), rotation=Rotation(size=300, compress=False))
    log.write(START)
    log.write(record(1))
    log.write(record(2, pad=1000))
    log.write(record(3))
    log.close()
    files = read_log(path)
    assert [[r["event"] for r in f] for f in files] == [
        ["start", "state"], ["start", "state"], ["start", "state"]
    ]
    assert len(files[1][1]["comm"]) == 1000


def test_keep_deletes_the_oldest_rotated_files(tmp_path):
    path = tmp_path / "t.ndjson"
    log = LogFile(str(path), rotation=Rotation(size=200, keep=2))
    log.write(START)
    for i in range(30):
        log.write(record(i))
    log.close()
    kept = rotated_files(str(path))
    assert len(kept) == 2 and all(k.endswith(".gz") for k in kept)
    last = [r["seq"] for f in read_log(path) for r in f if r["event"] == "state"]
    assert last == sorted(last) and last[-1] == 29  # the newest survive


def test_rotation_by_age(tmp_path):
    clock = Clock()
    path = tmp_path / "t.ndjson"
    log = LogFile(str(path), rotation=Rotation(age_s=60, compress=False), clock=clock)
    log.write(START)
    log.write(record(1))
    clock.t += 59
    log.maybe_flush()
    assert rotated_files(str(path)) == []
    clock.t += 1
    log.maybe_flush()
    assert len(rotated_files(str(path))) == 1
    clock.t += 120
    log.maybe_flush()  # nothing but the header since: no empty rotation
    assert len(rotated_files(str(path))) == 1
    log.write(record(2))
    log.close()
    assert [[r["event"] for r in f] for f in read_log(path)] == [
        ["start", "state"], ["start", "state"]
    ]


def test_files_are_mode_0640(tmp_path):
    old = os.umask(0)
    try:
        path = tmp_path / "t.ndjson"
        log = LogFile(str(path), rotation=Rotation(size=100))
        log.write(START)
        for i in range(5):
            log.write(record(i))
        log.close()
    finally:
        os.umask(old)
    for name in [*rotated_files(str(path)), str(path)]:
        assert stat.S_IMODE(os.stat(name).st_mode) == 0o640, name


def test_reopen_after_logrotate_moved_the_file(tmp_path):
    path = tmp_path / "t.ndjson"
    log = open_ndjson(str(path))
    log.write(START)
    log.write(record(1))
    log.flush()
    os.rename(path, tmp_path / "t.ndjson.1")  # logrotate's "create" mode, then SIGHUP
    log.request_reopen()
    log.write(record(2))  # still buffered for the old file until the reopen
    log.maybe_flush(10**9)
    log.write(record(3))
    log.close()
    old = [orjson.loads(x) for x in (tmp_path / "t.ndjson.1").read_bytes().splitlines()]
    new = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert [r.get("seq") for r in old] == [None, 1, 2]
    assert new[0]["event"] == "start" and new[0]["part"] == 2
    assert [r.get("seq") for r in new[1:]] == [3]


def test_reopen_appends_to_a_file_someone_else_created(tmp_path):
    path = tmp_path / "t.ndjson"
    log = open_ndjson(str(path))
    log.write(START)
    log.flush()
    path.write_bytes(b'{"event":"other"}\n')  # copytruncate-like: PATH exists, not empty
    log.request_reopen()
    log.write(record(1))
    log.close()
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"event":"other"}' and orjson.loads(lines[1])["seq"] == 1


def test_disk_full_counts_what_it_cannot_write_and_says_so_once():
    warnings: list[str] = []
    log = LogFile("/dev/full", rotation=Rotation(size=1000), warn=warnings.append)
    assert warnings == ["/dev/full is not a regular file: not rotating it"]
    log.write(START)
    for i in range(10):
        log.write(record(i))
        log.flush()
    log.write({"event": "summary", "events": 10})
    log.close()
    assert log.unwritten == 12
    full = [w for w in warnings if "cannot write /dev/full" in w]
    assert len(full) == 1 and "No space left on device (disk full)" in full[0]
    assert warnings[-1] == "12 records could not be written to /dev/full"


def test_a_write_cut_short_leaves_only_whole_lines(tmp_path, monkeypatch):
    path = tmp_path / "t.ndjson"
    log = LogFile(str(path), warn=lambda m: None)
    log.write(START)
    log.flush()
    real_write = os.write
    calls = []

    def short_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:150]))  # 1.5 records fit, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ndjson.os, "write", short_then_full)
    for i in range(5):
        log.write(record(i))
    log.flush()
    monkeypatch.setattr(ndjson.os, "write", real_write)
    log.write(record(5))  # space again: writing resumes
    log.write({"event": "summary", "events": 6})
    log.close()
    recs = [orjson.loads(x) for x in path.read_bytes().splitlines()]  # all whole lines
    seqs = [r.get("seq") for r in recs if r["event"] == "state"]
    assert seqs[-1] == 5 and len(seqs) + log.unwritten == 6
    assert recs[-1]["event"] == "summary" and recs[-1]["unwritten"] == log.unwritten


def test_path_not_writable_at_reopen_is_retried_and_counted(tmp_path, monkeypatch):
    path = tmp_path / "t.ndjson"
    warnings: list[str] = []
    clock = Clock()
    log = LogFile(str(path), warn=warnings.append, clock=clock)
    log.write(START)
    log.flush()
    real_open = ndjson._open_fd

    def refuse(p, truncate):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ndjson, "_open_fd", refuse)
    log.request_reopen()
    log.flush()  # the reopen fails: nowhere to write from now on
    log.write(record(1))
    log.flush()
    assert log.unwritten == 1
    assert any("Permission denied (not writable)" in w for w in warnings)
    monkeypatch.setattr(ndjson, "_open_fd", real_open)
    log.write(record(2))
    log.flush()  # within REOPEN_RETRY_S: not tried yet
    assert log.unwritten == 2
    clock.t += ndjson.REOPEN_RETRY_S
    log.write(record(3))
    log.close()
    recs = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert [r.get("seq") for r in recs if r["event"] == "state"] == [3]
    assert any(w.startswith(f"writing {path} again") for w in warnings)


def test_stdout_sink_ignores_reopen():
    import io

    sink = ndjson.NdjsonSink(io.BytesIO())
    sink.request_reopen()  # nothing to do, nothing raised


@pytest.mark.parametrize(
    ("text", "size"), [("100M", 100 << 20), ("512k", 512 << 10), ("1GiB", 1 << 30), ("77", 77)]
)
def test_parse_size(text, size):
    assert ndjson.parse_size(text) == size


@pytest.mark.parametrize(("text", "age"), [("1h", 3600), ("15m", 900), ("1d", 86400), ("90", 90)])
def test_parse_age(text, age):
    assert ndjson.parse_age(text) == age


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rotate-size", "10Q", "-o", "x"], "'10Q' is not a size"),
        (["--rotate-age", "soon", "-o", "x"], "'soon' is not a duration"),
        (["--rotate-size", "10M"], "need -o PATH"),
        (["-o", "x", "--keep", "3"], "--keep needs --rotate-size or --rotate-age"),
    ],
)
def test_rotation_flags_errors_are_one_line(args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["trace", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_docstring_examples():
    import doctest

    assert doctest.testmod(ndjson).failed == 0
