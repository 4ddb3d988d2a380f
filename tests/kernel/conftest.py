"""Fixtures for the real-kernel end-to-end tests: a running `tcpwatch trace`, scenarios, netns.

Every test under tests/kernel/ is marked `kernel`; tests/conftest.py skips those (a failure
under CI) unless root, bcc and the `sock:inet_sock_set_state` tracepoint are available.
The scenarios also need iproute2 (`ip`, `ss`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scenarios import Scenario  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
START_TIMEOUT_S = 20.0


class Tracer:
    """`python -m tcpwatch trace --format ndjson ARGS` with its stdout parsed as it comes."""

    def __init__(self, args: list[str]) -> None:
        self.cmd = [PYTHON, "-m", "tcpwatch", "trace", "--format", "ndjson", *args]
        self.records: list[dict] = []
        self.arrivals: list[float] = []  # time.monotonic() at which each record was read
        self.garbage: list[bytes] = []  # stdout lines that are not JSON objects
        self.returncode: int | None = None
        self._cond = threading.Condition()
        self._eof = False
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by kill()
        # Unbuffered stdout, as under PYTHONUNBUFFERED=1 (containers, CI, this project's dev
        # machines): whatever tcpwatch writes is visible at once, so `start` must not be
        # written before the pre-existing sockets have been scanned; the contract does not
        # rely on buffering, and the tests must not depend on the caller's environment.
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            now = time.monotonic()
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError
            except ValueError:
                with self._cond:
                    self.garbage.append(raw)
                continue
            with self._cond:
                self.records.append(rec)
                self.arrivals.append(now)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-4000:]

    def describe(self) -> str:
        with self._cond:
            recs = "\n".join(json.dumps(r) for r in self.records[-40:])
        return f"cmd: {' '.join(self.cmd)}\nrecords (last 40):\n{recs}\nstderr:\n{self.stderr()}"

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "record") -> dict:
        """The first record satisfying `predicate`, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for rec in self.records[seen:]:
                    if predicate(rec):
                        return rec
                seen = len(self.records)
                if self._eof:
                    raise AssertionError(
                        f"tracer ended (rc={self.proc.poll()}) without {what}\n{self.describe()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} within {timeout}s\n{self.describe()}")
                self._cond.wait(min(left, 0.2))

    def arrival(self, record: dict) -> float:
        with self._cond:
            for rec, t in zip(self.records, self.arrivals):
                if rec is record:
                    return t
        raise KeyError("record not from this tracer")

    def snapshot(self) -> list[dict]:
        with self._cond:
            return list(self.records)

    def stop(self, timeout: float = 15.0) -> list[dict]:
        """SIGINT, wait for exit 0, return every record (the last one must be `summary`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"tracer did not exit within {timeout}s of SIGINT\n{self.describe()}"
            ) from None
        self._reader.join(timeout=5)
        assert self.returncode == 0, f"tracer exited {self.returncode}\n{self.describe()}"
        assert not self.garbage, f"non-JSON lines on stdout: {self.garbage[:5]}"
        records = self.snapshot()
        assert records and records[-1].get("event") == "summary", (
            f"last record is not a summary\n{self.describe()}"
        )
        return records

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        finally:
            self._reader.join(timeout=5)
            self.proc.stdout.close()
            self._stderr.close()


@pytest.fixture(scope="session")
def churn_bin(tmp_path_factory) -> Path:
    """scripts/churn.c built (the benchmark's saturating loopback load)."""
    exe = tmp_path_factory.mktemp("churn") / "churn"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(REPO / "scripts/churn.c")],
                   check=True, capture_output=True)
    return exe


@pytest.fixture(params=["ring", "perf"])
def buffer_kind(request, monkeypatch):
    """Run a test with the ring buffer (5.8+) and again with the perf buffer that older
    kernels get, forced here by TCPWATCH_PERF_BUFFER=1."""
    if request.param == "perf":
        monkeypatch.setenv("TCPWATCH_PERF_BUFFER", "1")
    else:
        monkeypatch.delenv("TCPWATCH_PERF_BUFFER", raising=False)
    return request.param


@pytest.fixture
def tracer(buffer_kind):
    """Factory: tracer(leak_after=1, port=None, extra=(), duration=120) -> a started Tracer.

    Returns once the `start` record has been read (hooks attached, existing sockets reported).
    """
    started: list[Tracer] = []

    def start(*, leak_after: float = 1, port: int | None = None, extra=(), duration=120):
        args = ["--leak-after", str(leak_after), "--duration", str(duration)]
        if port is not None:
            args += ["--port", str(port)]
        tr = Tracer(args + list(extra))
        started.append(tr)
        is_start = lambda r: r.get("event") == "start"  # noqa: E731
        start_rec = tr.wait_for(is_start, START_TIMEOUT_S, "start record")
        # The buffer the test asked for (buffer_kind fixture) is the one tcpwatch used.
        wanted = "perf" if os.environ.get("TCPWATCH_PERF_BUFFER") == "1" else "ring"
        assert start_rec["hooks"]["buffer"] == wanted, start_rec["hooks"]
        return tr

    yield start
    for tr in started:
        tr.kill()


@pytest.fixture
def scenario():
    """Factory: scenario(name, addr="127.0.0.1", netns=None, **kw) -> a running Scenario."""
    running: list[Scenario] = []

    def start(name: str, addr: str = "127.0.0.1", netns: str | None = None, **kwargs):
        sc = Scenario(name, addr, netns=netns, **kwargs)
        running.append(sc)
        return sc

    yield start
    for sc in running:
        sc.kill()


@pytest.fixture
def netns():
    """A fresh network namespace `tw-<random>` with lo up; deleted afterwards."""
    name = f"tw-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        # Whatever this test started in the namespace must go before the namespace does.
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=False)
