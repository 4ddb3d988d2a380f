"""`tcpwatch top` against the real kernel: every stuck cause produced for real, checked from
`top --once --format json`, and the live view driven in tmux.

Each leak comes from its own process (this file run as a script: `python test_top_causes.py
leak CAUSE N NAME`), so rows can be told apart by pid and comm:

- not_accepted: the listener never accepts; the peer sends a request and its FIN.
- eof_ignored: the server reads up to EOF (recv() == b"") and keeps the socket.
- not_reading: the server accepts and never reads (request + FIN stay queued).
- held_elsewhere: the server reads the request, forks a child that keeps the sockets, and
  closes its own descriptors (no FIN goes out: the child still holds them).

Protocol on the leaker's stdout, one JSON line each: `setup` (port and pid known, waiting for
`go` on stdin), `ready` (every server-side socket is in CLOSE_WAIT: the peer's sockets reached
FIN_WAIT2, checked with TCP_INFO), `error`. EOF on stdin ends it (and its children).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
REQUEST = b"GET /leak HTTP/1.1\r\nHost: localhost\r\n\r\n"
UNREAD = b"x" * 100  # what not_reading leaves in each receive queue
FIN_WAIT2 = 5
MAX_LIFE_S = 300


# --------------------------------------------------------------------------- leaker (script)


def _emit(**rec) -> None:
    os.write(1, (json.dumps(rec) + "\n").encode())


def _name(name: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME: comm as the rows show it
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: never outlive the parent
    signal.alarm(MAX_LIFE_S)


def _wait_state(sock: socket.socket, state: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != state:
        if time.monotonic() > deadline:
            raise RuntimeError(f"socket never reached state {state}")
        time.sleep(0.005)


def _peer(port: int, n: int, payload: bytes, ready_w: int) -> None:
    """Child: n connections, send payload, shutdown(SHUT_WR), wait for FIN_WAIT2, keep them."""
    _name("tw-peer")
    conns = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        conns.append(c)
    for c in conns:
        _wait_state(c, FIN_WAIT2)  # our FIN was ACKed: the server side is in CLOSE_WAIT
    os.write(ready_w, b"r")
    signal.pause()


def _recv_exactly(c: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = c.recv(n - len(data))
        if not chunk:
            raise RuntimeError("early EOF")
        data += chunk
    return data


def leaker(cause: str, n: int, name: str) -> None:
    _name(name)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(n + 8)
    port = lsock.getsockname()[1]
    _emit(event="setup", port=port, pid=os.getpid())
    if sys.stdin.readline().strip() != "go":
        return
    payload = REQUEST + (UNREAD if cause == "not_reading" else b"")
    ready_r, ready_w = os.pipe()
    if os.fork() == 0:
        try:
            lsock.close()
            _peer(port, n, payload, ready_w)
        finally:
            os._exit(1)
    holder = os.getpid()
    conns = [] if cause == "not_accepted" else [lsock.accept()[0] for _ in range(n)]
    if cause == "eof_ignored":
        for c in conns:
            while c.recv(4096):
                pass
    elif cause == "held_elsewhere":
        for c in conns:
            _recv_exactly(c, len(REQUEST))  # the kernel learns that we own it
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                _name("tw-heldchild")
                os.write(w, b"k")
                signal.pause()
            finally:
                os._exit(1)
        os.read(r, 1)
        for c in conns:
            c.close()  # the child's copy keeps each socket open: no FIN goes out
        holder = child
    os.read(ready_r, 1)
    _emit(event="ready", pid=os.getpid(), holder=holder, port=port)
    sys.stdin.read()  # until the test goes away


# ----------------------------------------------------------------------------- test side


class Leaker:
    def __init__(self, cause: str, n: int, name: str) -> None:
        self.cause = cause
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "leak", cause, str(n), name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.setup = self._line("setup")

    def _line(self, event: str) -> dict:
        line = self.proc.stdout.readline()
        rec = json.loads(line) if line else {"event": "eof"}
        if rec.get("event") != event:
            raise AssertionError(f"{self.cause}: wanted {event}, got {rec}: "
                                 f"{self.proc.stderr.read1(4000) if not line else ''}")
        return rec

    def go(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def ready(self) -> dict:
        return self._line("ready")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for s in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def leakers():
    made: list[Leaker] = []

    def make(cause: str, n: int = 3, name: str | None = None) -> Leaker:
        lk = Leaker(cause, n, name or f"tw-{cause[:11]}")
        made.append(lk)
        return lk

    yield make
    for lk in made:
        lk.kill()


def _top_once(ports: list[int], interval: float, extra: tuple = ()) -> subprocess.Popen:
    args = [sys.executable, "-m", "tcpwatch", "top", "--once", "--interval", str(interval),
            "--format", "json", *extra]
    for p in ports:
        args += ["--port", str(p)]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _wait_collecting(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """The stderr line top prints once it collects; the workload may start after it."""
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(proc.stderr.readline()), daemon=True)
    t.start()
    t.join(timeout)
    line = got[0].decode() if got else ""
    assert "collecting" in line, f"top did not start: {line!r} rc={proc.poll()}"
    return line


CAUSES = ("not_accepted", "eof_ignored", "not_reading", "held_elsewhere")


def test_each_cause_for_real_from_once_json(leakers):
    lks = {cause: leakers(cause) for cause in CAUSES}
    top = _top_once([lk.setup["port"] for lk in lks.values()], interval=6)
    try:
        assert "kernel mode" in _wait_collecting(top)
        started = time.monotonic()
        for lk in lks.values():
            lk.go()
        ready = {cause: lk.ready() for cause, lk in lks.items()}
        assert time.monotonic() - started < 4, "leaks took too long to set up for the interval"
        out, err = top.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(top.pid, signal.SIGKILL)
    assert top.returncode == 0, err.decode()
    frame = json.loads(out)
    assert frame["mode"] == "kernel" and "EOF read (sock:sock_recv_length)" in frame["signals"]
    rows = {r["pid"]: r for r in frame["rows"]}
    for cause, rd in ready.items():
        row = rows.get(rd["holder"])
        assert row is not None, f"{cause}: no row for pid {rd['holder']}: {frame['rows']}"
        assert (row["close_wait"], row["cause"], row["causes"]) == (3, cause, {cause: 3}), row
        assert row["comm"] == ("tw-heldchild" if cause == "held_elsewhere" else f"tw-{cause[:11]}")
        assert 0 <= row["oldest_age_s"] < 10 and row["leaks"] == 0
        assert row["new_per_s"] == pytest.approx(3 / frame["window_s"], abs=0.002), row
    assert rows[ready["not_reading"]["holder"]]["unread_bytes"] == 3 * (len(REQUEST) + len(UNREAD))
    assert rows[ready["eof_ignored"]["holder"]]["unread_bytes"] == 0


def test_preexisting_causes_from_proc_only(leakers):
    """Leaks made before top starts: the kernel knows nothing of them, /proc still tells the
    accept queue, a consumed FIN and an unconsumed one apart."""
    lks = {cause: leakers(cause) for cause in ("not_accepted", "eof_ignored", "not_reading")}
    for lk in lks.values():
        lk.go()
    ready = {cause: lk.ready() for cause, lk in lks.items()}
    top = _top_once([lk.setup["port"] for lk in lks.values()], interval=1)
    out, err = top.communicate(timeout=60)
    assert top.returncode == 0, err.decode()
    rows = {r["pid"]: r for r in json.loads(out)["rows"]}
    assert rows[ready["eof_ignored"]["holder"]]["cause"] == "eof_ignored"
    assert rows[ready["not_reading"]["holder"]]["cause"] == "not_reading"
    # Never accepted: no descriptor of its own; charged to the process holding the listener.
    row = rows[ready["not_accepted"]["holder"]]
    assert (row["cause"], row["close_wait"], row["comm"]) == ("not_accepted", 3, "tw-not_accepte")


def test_snapshot_mode_as_unprivileged_user(leakers):
    """Without root top does not fail: snapshot mode, clearly labelled."""
    lk = leakers("not_reading")
    lk.go()
    lk.ready()
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
         "tcpwatch", "top", "--once", "--interval", "1", "--by", "port", "--format", "json",
         "--port", str(lk.setup["port"])],
        cwd="/", capture_output=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    frame = json.loads(proc.stdout)
    assert frame["mode"] == "snapshot" and any("not root" in w for w in frame["warnings"])
    (row,) = frame["rows"]
    # Owners are not visible to nobody; /proc still shows the queued FIN.
    assert (row["group"], row["close_wait"], row["cause"]) == (
        f":{lk.setup['port']}", 3, "not_reading")
    assert row["pid"] is None


# ------------------------------------------------------------------------------ live view


def _tmux(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=10)


def _screen(session: str) -> str:
    return _tmux("capture-pane", "-p", "-t", session).stdout


def _wait_screen(session: str, pred, what: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = _screen(session)
        if pred(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"no {what} on screen within {timeout}s:\n{text}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_live_view_in_tmux_ranks_leakers_by_count(leakers):
    few, many = leakers("not_reading", 2, "tw-few"), leakers("not_reading", 5, "tw-many")
    session = f"tw-top-{uuid.uuid4().hex[:8]}"
    cmd = (f"{sys.executable} -m tcpwatch top --interval 0.5 --port {few.setup['port']} "
           f"--port {many.setup['port']}")
    assert _tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", "-c", str(REPO),
                 cmd).returncode == 0
    try:
        _wait_screen(session, lambda t: "GROUP" in t and "kernel" in t, "live view", 40)
        for lk in (few, many):
            lk.go()
            lk.ready()

        def ranked(text: str) -> bool:
            lines = text.splitlines()
            rows = [i for i, line in enumerate(lines) if "tw-many[" in line or "tw-few[" in line]
            return (len(rows) == 2 and "tw-many[" in lines[rows[0]]
                    and lines[rows[0]].split()[1] == "5" and lines[rows[1]].split()[1] == "2")

        text = _wait_screen(session, ranked, "tw-many (5) above tw-few (2)")
        assert "not_reading" in text and "by process" in text
        _tmux("send-keys", "-t", session, "g")
        _wait_screen(session, lambda t: "by remote" in t and "127.0.0.1:" in t, "remote grouping")
        _tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 10
        while _tmux("has-session", "-t", session).returncode == 0:
            assert time.monotonic() < deadline, "q did not quit:\n" + _screen(session)
            time.sleep(0.1)
    finally:
        _tmux("kill-session", "-t", session)


if __name__ == "__main__":
    if sys.argv[1] == "leak":
        try:
            leaker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        except Exception as e:  # noqa: BLE001 - report anything to the test
            _emit(event="error", error=repr(e))
            raise


def test_exits_and_entries_from_the_kernel_map():
    """top keeps sockets in CLOSE_WAIT in the kernel's map and gets only their exits: sockets
    that come and go within the interval are counted as entered and ended, with durations, and
    the ones still open are shown as CLOSE_WAIT, all under the process that made them."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(64)
        port = lsock.getsockname()[1]
        top = _top_once([port], interval=4)
        try:
            assert "kernel mode" in _wait_collecting(top)
            closed, kept = [], []
            for i in range(22):
                c = socket.create_connection(("127.0.0.1", port))
                a, _ = lsock.accept()
                c.close()
                (kept if i < 2 else closed).append((a, c))
            time.sleep(0.3)
            for a, _ in closed:
                a.close()
            out, err = top.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(top.pid, signal.SIGKILL)
        assert top.returncode == 0, err.decode()
        frame = json.loads(out)
        rows = [r for r in frame["rows"] if r["pid"] == os.getpid()]
        assert len(rows) == 1, frame["rows"]
        row = rows[0]
        assert (row["close_wait"], row["closed"], row["causes"]) == (
            2, 20, {"not_reading": 2}), row
        assert 0.25 <= row["p50_s"] < 2.0, row
        assert row["new_per_s"] == pytest.approx(22 / frame["window_s"], abs=0.002), row
        for a, _ in kept:
            a.close()
