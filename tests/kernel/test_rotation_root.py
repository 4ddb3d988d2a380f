"""Root-only log-file cases: a real full disk (small tmpfs), a read-only file system, and a
real `tcpwatch trace -o` rotating under load and reopening on SIGHUP.

The trace runs with `--format ndjson` too, so its stdout is the ground truth: every record
it printed must be in the log files, whole, once, in order (the files add only their
repeated `start` headers).
"""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tcpwatch.sinks.ndjson import LogFile, rotated_files

REPO = Path(__file__).resolve().parents[2]
PORT = 7311


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 KiB tmpfs: a disk that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def lines_of(path: Path) -> list[dict]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"{path} ends in a partial line"
    return [orjson.loads(x) for x in data.splitlines()]


def test_full_disk_keeps_whole_lines_counts_the_rest_and_recovers(tmpfs):
    warnings: list[str] = []
    filler = tmpfs / "filler"
    log = LogFile(str(tmpfs / "t.ndjson"), warn=warnings.append)
    log.write({"event": "start", "ts": "2026-11-21T05:13:00.000000Z", "v": 1})
    rec = {"event": "state", "ts": "2026-11-21T05:13:00.000000Z", "pad": "x" * 200}
    for i in range(600):  # ~140 KB into 64 KB
        log.write({**rec, "seq": i})
        if i % 50 == 0:
            log.flush()
    log.flush()
    assert log.unwritten > 0
    assert any("No space left on device (disk full)" in w for w in warnings)
    written = lines_of(tmpfs / "t.ndjson")  # whole lines only
    seqs = [r["seq"] for r in written if r["event"] == "state"]
    assert seqs == list(range(len(seqs))) and len(seqs) + log.unwritten == 600
    filler.write_bytes(b"")  # make room: nothing to remove but the log itself
    os.truncate(tmpfs / "t.ndjson", 0)
    log.write({**rec, "seq": 600})
    log.write({"event": "summary", "events": 601})
    log.close()
    after = lines_of(tmpfs / "t.ndjson")
    assert after[-1]["event"] == "summary" and after[-1]["unwritten"] == log.unwritten
    assert any(w.startswith("writing ") and "again" in w for w in warnings)


def test_read_only_file_system_is_said_and_counted(tmpfs):
    warnings: list[str] = []
    logs = tmpfs / "logs"
    logs.mkdir()
    log = LogFile(str(logs / "t.ndjson"), warn=warnings.append)
    log.write({"event": "start", "ts": "2026-11-21T05:13:00.000000Z", "v": 1})
    log.flush()
    # A read-only file system over the log's directory: PATH cannot be opened again.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=4k", "tmpfs", str(logs)], check=True)
    try:
        log.request_reopen()
        log.flush()  # the reopen fails: nowhere to write from now on
        log.write({"event": "state", "ts": "2026-11-21T05:13:01.000000Z"})
        log.close()
    finally:
        subprocess.run(["umount", "-l", str(logs)], check=False)
    assert log.unwritten == 1
    assert any("Read-only file system (not writable)" in w for w in warnings)


def test_trace_says_when_the_path_is_not_writable(tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    proc = subprocess.run(
        [sys.executable, "-m", "tcpwatch", "trace", "-o", str(tmpfs / "t.ndjson"),
         "--duration", "1"], cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "t.ndjson" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def _connections(n: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", PORT))
    srv.listen(128)
    for _ in range(n):
        cli = socket.create_connection(("127.0.0.1", PORT))
        conn, _ = srv.accept()
        cli.close()
        conn.close()
    srv.close()


def test_trace_rotates_under_load_and_reopens_on_sighup(tmp_path):
    log = tmp_path / "trace.ndjson"
    cmd = [sys.executable, "-m", "tcpwatch", "trace", "--format", "ndjson", "--port", str(PORT),
           "-o", str(log), "--rotate-size", "16k", "--keep", "1000"]
    out = tmp_path / "stdout.ndjson"
    with out.open("wb") as stdout:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=stdout, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not out.stat().st_size and time.monotonic() < deadline:
                time.sleep(0.1)  # the `start` record: attached
            _connections(300)
            time.sleep(1.5)
            moved = tmp_path / "moved.ndjson"
            os.rename(log, moved)  # as logrotate does
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            _connections(300)
            time.sleep(1.5)
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    printed = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    files = [Path(p) for p in rotated_files(str(log))] + [moved, log]
    files.sort(key=lambda p: lines_of(p)[0].get("part", 1))
    logged = [lines_of(p) for p in files]
    assert len(logged) > 5, "rotation under load: expected many files"
    for part, recs in enumerate(logged, start=1):
        assert recs[0]["event"] == "start" and recs[0].get("part", 1) == part
        assert recs[0]["ts"] == printed[0]["ts"]
    body = [r for recs in logged for r in recs[1:]]
    assert [printed[0], *body] == printed  # nothing lost, split, doubled or reordered
    summary = printed[-1]
    assert summary["event"] == "summary" and "unwritten" not in summary
    states = sum(1 for r in body if r["event"] == "state")
    assert states == summary["transitions"] > 600 * 4
