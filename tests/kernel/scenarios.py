"""Real-socket scenarios for the kernel end-to-end tests of `tcpwatch trace`.

Each scenario runs in its own process group, started as a script
(``python scenarios.py NAME ...``, or under ``ip netns exec``), so that every role has a
known pid distinct from the test process and from the other roles:

- the *top* process (the ``Popen`` pid) is the server, and the coordinator;
- a forked child is the client (and, for ``forked_child``, a second forked child holds the
  accepted socket).

Every process names itself with ``prctl(PR_SET_NAME)`` (``tw-server``, ``tw-client``,
``tw-child``) so that ``comm`` can be asserted exactly, and dies with its parent.

Protocol, one JSON object per line:

- stdout: ``{"event": "setup", ...}`` once the listener (and the client's socket) are bound,
  so the ports are known before the tracer starts; ``{"event": "ready", ...}`` once the
  intended kernel state has been reached (checked with ``TCP_INFO`` on the socket itself);
  ``{"event": "closed", ...}`` after a ``close`` command; ``{"event": "error", ...}`` on failure.
- stdin: ``go`` (after ``setup``: run the connection), ``rst`` (``reset`` only, after its
  ``close_wait`` line: the client sends the RST), ``close`` (after ``ready``: the holder closes
  the socket it holds). EOF on stdin ends the scenario.

The test side uses :class:`Scenario`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

# include/net/tcp_states.h
ESTABLISHED, FIN_WAIT2, CLOSE, CLOSE_WAIT, LAST_ACK = 1, 5, 7, 8, 9

REQUEST = b"GET /tcpwatch HTTP/1.1\r\nHost: localhost\r\n\r\n"
MAX_LIFE_S = 300  # a scenario never outlives this, whatever happens to the test


# --------------------------------------------------------------------------------------------
# Scenario side (runs in the scenario processes)
# --------------------------------------------------------------------------------------------


def _emit(**record) -> None:
    # One write() per line (< PIPE_BUF): lines of different processes never interleave.
    os.write(1, (json.dumps(record) + "\n").encode())


def _name_process(name: str, *, die_with_parent: bool) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    if die_with_parent:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    signal.alarm(MAX_LIFE_S)  # alarms are not inherited across fork()


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of `sock` (first byte of struct tcp_info)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def wait_state(sock: socket.socket, *wanted: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        state = tcp_state(sock)
        if state in wanted:
            return state
        if time.monotonic() > deadline:
            raise RuntimeError(f"socket stayed in state {state}, wanted {wanted}")
        time.sleep(0.002)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RuntimeError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def sock_info(sock: socket.socket) -> dict:
    """Addresses, ports and inode of a connected socket, as the NDJSON contract names them."""
    laddr, lport = sock.getsockname()[:2]
    raddr, rport = sock.getpeername()[:2]
    return {
        "family": "ipv6" if sock.family == socket.AF_INET6 else "ipv4",
        "laddr": laddr,
        "lport": lport,
        "raddr": raddr,
        "rport": rport,
        "inode": os.fstat(sock.fileno()).st_ino,
        "fd": sock.fileno(),
        "netns": os.stat("/proc/self/ns/net").st_ino,
    }


class Channel:
    """A pair of pipes between the top process and one forked child: JSON lines both ways."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.r = os.fdopen(rfd, "rb", buffering=0)
        self.wfd = wfd
        self._buf = b""

    def send(self, **msg) -> None:
        os.write(self.wfd, (json.dumps(msg) + "\n").encode())

    def recv(self) -> dict:
        while b"\n" not in self._buf:
            chunk = self.r.read(4096)
            if not chunk:
                raise EOFError("channel closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def expect(self, what: str) -> dict:
        msg = self.recv()
        if msg.get("msg") == "error":
            raise RuntimeError(f"child failed: {msg}")
        if msg.get("msg") != what:
            raise RuntimeError(f"expected {what!r} from child, got {msg}")
        return msg


def spawn(name: str, fn, *args, close: tuple = ()) -> tuple[int, Channel]:
    """Fork a child running fn(channel, *args); return (pid, channel to it).

    The child first closes the sockets in `close` (inherited ones it must not hold)."""
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(down_w)
        os.close(up_r)
        chan = Channel(down_r, up_w)
        try:
            for sock in close:
                sock.close()
            _name_process(name, die_with_parent=True)
            fn(chan, *args)
        except BaseException as e:  # noqa: BLE001 - report anything, then die
            try:
                chan.send(msg="error", error=repr(e))
                _emit(event="error", role=name, pid=os.getpid(), error=repr(e))
            finally:
                os._exit(1)
        os._exit(0)
    os.close(down_r)
    os.close(up_w)
    return pid, Channel(up_r, down_w)


def hold_until_told(chan: Channel, sock: socket.socket | None) -> None:
    """Child side: keep `sock` open; on 'close' close it; on EOF (parent gone) exit."""
    while True:
        try:
            msg = chan.recv()
        except EOFError:
            return
        if msg.get("msg") == "close" and sock is not None:
            sock.close()
            sock = None
            chan.send(msg="closed", pid=os.getpid())


def wait_stdin(expected: str) -> None:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit(0)  # the test went away
    if line.strip() != expected:
        raise RuntimeError(f"expected command {expected!r}, got {line!r}")


def serve_commands(close_fn) -> None:
    """Top side after `ready`: 'close' -> close_fn(); EOF on stdin -> exit."""
    for line in sys.stdin:
        if line.strip() == "close":
            info = close_fn() or {}
            _emit(event="closed", **info)
        elif line.strip():
            raise RuntimeError(f"unknown command {line!r}")


def listener(addr: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    lsock = socket.socket(family, socket.SOCK_STREAM)
    lsock.bind((addr, 0))
    lsock.listen(16)
    return lsock


# ---- client roles (forked children) ---------------------------------------------------------


def _client_socket(chan: Channel, addr: str) -> socket.socket:
    """Create and bind the client socket (so its port is known at setup), report, wait for go."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    c = socket.socket(family, socket.SOCK_STREAM)
    c.bind((addr, 0))
    chan.send(msg="bound", pid=os.getpid(), cport=c.getsockname()[1])
    chan.expect("go")
    return c


def client_closer(chan: Channel, addr: str, port: int, unread: int) -> None:
    """Connect, send REQUEST; on 'close': send `unread` more bytes, then close()."""
    c = _client_socket(chan, addr)
    c.connect((addr, port))
    c.sendall(REQUEST)
    chan.expect("close")
    if unread:
        c.sendall(b"u" * unread)
    c.close()
    chan.send(msg="closed")
    hold_until_told(chan, None)


def client_leaker(chan: Channel, addr: str, port: int) -> None:
    """Connect, send REQUEST; the server closes; never close: the client sits in CLOSE_WAIT."""
    c = _client_socket(chan, addr)
    c.connect((addr, port))
    c.sendall(REQUEST)
    wait_state(c, CLOSE_WAIT)
    chan.send(msg="ready", pid=os.getpid(), **sock_info(c))
    hold_until_told(chan, c)


def client_resetter(chan: Channel, addr: str, port: int) -> None:
    """Connect, send REQUEST; on 'fin': shutdown(SHUT_WR); on 'rst': SO_LINGER {1,0} + close()."""
    c = _client_socket(chan, addr)
    c.connect((addr, port))
    c.sendall(REQUEST)
    chan.expect("fin")
    c.shutdown(socket.SHUT_WR)
    wait_state(c, FIN_WAIT2)
    chan.send(msg="fin_sent")
    chan.expect("rst")
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    chan.send(msg="closed")
    hold_until_told(chan, None)


# ---- scenarios (top process = server) -------------------------------------------------------


def _setup(addr: str, client_fn, *client_args):
    lsock = listener(addr)
    port = lsock.getsockname()[1]
    cpid, chan = spawn("tw-client", client_fn, addr, port, *client_args, close=(lsock,))
    bound = chan.expect("bound")
    _emit(
        event="setup",
        server_pid=os.getpid(),
        client_pid=cpid,
        lport=port,
        cport=bound["cport"],
        addr=addr,
        netns=os.stat("/proc/self/ns/net").st_ino,
    )
    wait_stdin("go")
    chan.send(msg="go")
    return lsock, cpid, chan


def _accept_request(lsock: socket.socket) -> socket.socket:
    conn, _ = lsock.accept()
    if recv_exactly(conn, len(REQUEST)) != REQUEST:
        raise RuntimeError("bad request")
    return conn


def scenario_server_leak(addr: str, unread: int = 0) -> None:
    """(a)/(f)/(g)/(h) The server reads the request and never closes; the client closes."""
    lsock, cpid, chan = _setup(addr, client_closer, unread)
    conn = _accept_request(lsock)
    chan.send(msg="close")
    chan.expect("closed")
    wait_state(conn, CLOSE_WAIT)
    # Everything the client sent is in (the FIN comes after it): the queue is exactly `unread`.
    _emit(event="ready", holder_pid=os.getpid(), unread=unread, **sock_info(conn))

    def close():
        conn.close()
        return {"pid": os.getpid()}

    serve_commands(close)


def scenario_client_leak(addr: str) -> None:
    """(b) The server reads the request and closes at once; the client never closes."""
    lsock, cpid, chan = _setup(addr, client_leaker)
    conn = _accept_request(lsock)
    conn.close()
    ready = chan.expect("ready")
    del ready["msg"]
    ready["holder_pid"] = ready.pop("pid")
    _emit(event="ready", **ready)

    def close():
        chan.send(msg="close")
        return {"pid": chan.expect("closed")["pid"]}

    serve_commands(close)


def scenario_slow_close(addr: str, delay: float = 2.0) -> None:
    """(c) The server reads EOF (recv() == 0), sleeps `delay` s, then closes."""
    lsock, cpid, chan = _setup(addr, client_closer, 0)
    conn = _accept_request(lsock)
    info = sock_info(conn)
    chan.send(msg="close")
    if conn.recv(1) != b"":
        raise RuntimeError("expected EOF")
    t_eof = time.monotonic()
    if tcp_state(conn) != CLOSE_WAIT:
        raise RuntimeError(f"not in CLOSE_WAIT after EOF: {tcp_state(conn)}")
    time.sleep(delay)
    t_close = time.monotonic()
    conn.close()
    _emit(event="ready", holder_pid=os.getpid(), eof_to_close_s=t_close - t_eof, **info)
    serve_commands(lambda: None)


def scenario_shutdown(addr: str) -> None:
    """(d) The server reads EOF, calls shutdown(SHUT_WR) and keeps the descriptor."""
    lsock, cpid, chan = _setup(addr, client_closer, 0)
    conn = _accept_request(lsock)
    chan.send(msg="close")
    if conn.recv(1) != b"":
        raise RuntimeError("expected EOF")
    if tcp_state(conn) != CLOSE_WAIT:
        raise RuntimeError(f"not in CLOSE_WAIT after EOF: {tcp_state(conn)}")
    conn.shutdown(socket.SHUT_WR)
    wait_state(conn, CLOSE)  # LAST_ACK, then CLOSE once the client ACKs our FIN
    _emit(event="ready", holder_pid=os.getpid(), **sock_info_fd(conn))
    serve_commands(lambda: None)


def sock_info_fd(sock: socket.socket) -> dict:
    """sock_info() for a socket whose peer may be gone (getpeername fails in CLOSE)."""
    laddr, lport = sock.getsockname()[:2]
    return {
        "family": "ipv6" if sock.family == socket.AF_INET6 else "ipv4",
        "laddr": laddr,
        "lport": lport,
        "inode": os.fstat(sock.fileno()).st_ino,
        "fd": sock.fileno(),
        "netns": os.stat("/proc/self/ns/net").st_ino,
    }


def scenario_reset(addr: str) -> None:
    """(e) The server sits in CLOSE_WAIT (client shutdown(SHUT_WR)), then the client sends RST."""
    lsock, cpid, chan = _setup(addr, client_resetter)
    conn = _accept_request(lsock)
    info = sock_info(conn)
    chan.send(msg="fin")
    chan.expect("fin_sent")
    wait_state(conn, CLOSE_WAIT)
    _emit(event="close_wait", **info)  # the server socket really is in CLOSE_WAIT now
    wait_stdin("rst")  # the test checks the CLOSE_WAIT (ss, tracer) before the RST
    chan.send(msg="rst")
    chan.expect("closed")
    wait_state(conn, CLOSE)
    _emit(event="ready", holder_pid=os.getpid(), **info)
    serve_commands(lambda: None)


def _forked_holder(chan: Channel, conn: socket.socket) -> None:
    chan.expect("parent_closed")
    wait_state(conn, CLOSE_WAIT)
    chan.send(msg="ready", pid=os.getpid(), **sock_info(conn))
    hold_until_told(chan, conn)


def scenario_forked_child(addr: str) -> None:
    """(i) The server accepts, reads, forks; the child keeps the socket, the parent closes it."""
    lsock, cpid, client = _setup(addr, client_closer, 0)
    conn = _accept_request(lsock)
    child_pid, child = spawn("tw-child", _forked_holder, conn, close=(lsock,))
    conn.close()  # the child's descriptor keeps the socket: no FIN is sent
    child.send(msg="parent_closed")
    client.send(msg="close")
    client.expect("closed")
    ready = child.expect("ready")
    del ready["msg"]
    ready["holder_pid"] = ready.pop("pid")
    _emit(event="ready", parent_pid=os.getpid(), **ready)

    def close():
        child.send(msg="close")
        return {"pid": child.expect("closed")["pid"]}

    serve_commands(close)


SCENARIOS = {
    "server_leak": scenario_server_leak,
    "client_leak": scenario_client_leak,
    "slow_close": scenario_slow_close,
    "shutdown": scenario_shutdown,
    "reset": scenario_reset,
    "forked_child": scenario_forked_child,
}


def main(argv: list[str]) -> None:
    name, addr, *rest = argv
    kwargs = dict(arg.split("=", 1) for arg in rest)
    kwargs = {k: (float(v) if "." in v else int(v)) for k, v in kwargs.items()}
    _name_process("tw-server", die_with_parent=False)
    try:
        SCENARIOS[name](addr, **kwargs)
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, SystemExit) and not e.code:
            raise
        _emit(event="error", role="tw-server", pid=os.getpid(), error=repr(e))
        raise


# --------------------------------------------------------------------------------------------
# Test side
# --------------------------------------------------------------------------------------------


def match(event: str, **fields):
    """A predicate for a tracer's wait_for() and for filtering records: an `event` record
    with these field values."""
    def pred(rec: dict) -> bool:
        return rec.get("event") == event and all(rec.get(k) == v for k, v in fields.items())

    pred.__name__ = f"{event}{fields}"
    return pred


class Scenario:
    """A running scenario process group, seen from the test."""

    def __init__(self, name: str, addr: str = "127.0.0.1", netns: str | None = None, **kwargs):
        self.name = name
        cmd = [sys.executable, os.path.abspath(__file__), name, addr]
        cmd += [f"{k}={v}" for k, v in kwargs.items()]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.lines: list[dict] = []
        self.raw_errors: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: killed as one at teardown
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stderr: list[bytes] = []
        self._errreader = threading.Thread(
            target=lambda: self._stderr.extend(self.proc.stderr), daemon=True
        )
        self._errreader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            try:
                rec = json.loads(raw)
            except ValueError:
                rec = {"event": "garbage", "line": raw.decode(errors="replace")}
            with self._cond:
                self.lines.append(rec)
                self._cond.notify_all()
        with self._cond:
            self.lines.append({"event": "eof"})
            self._cond.notify_all()

    def stderr(self) -> str:
        return b"".join(self._stderr).decode(errors="replace")

    def expect(self, event: str, timeout: float = 15.0) -> dict:
        """Wait for the scenario's `event` line; fail on error, garbage or exit."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for rec in self.lines:
                    if rec["event"] == event:
                        return rec
                    if rec["event"] in ("error", "garbage", "eof"):
                        raise AssertionError(
                            f"scenario {self.name} failed waiting for {event!r}: {rec}\n"
                            f"stderr: {self.stderr()}"
                        )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"scenario {self.name}: no {event!r} within {timeout}s; "
                        f"got {self.lines}\nstderr: {self.stderr()}"
                    )
                self._cond.wait(left)

    def send(self, command: str) -> None:
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        # The forked roles are not our children: wait until the whole group is gone.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()



# --- a burst of connections, for tests that overflow a tiny buffer --------------------------

# Per loopback connection closed by the client first: client CLOSE>SYN_SENT>ESTABLISHED>
# FIN_WAIT1>FIN_WAIT2>CLOSE, server child LISTEN>SYN_RECV>ESTABLISHED>CLOSE_WAIT>LAST_ACK>
# CLOSE.
PER_CONNECTION = 10

_BURST = """
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(4096)
print(s.getsockname()[1], flush=True)
sys.stdin.readline()  # wait until the tracer filters on our port
for _ in range(int(sys.argv[1])):
    c = socket.create_connection(s.getsockname())
    a, _ = s.accept()
    c.close()
    a.close()
s.close()
print("done", flush=True)
"""


class Burst:
    """`connections` loopback connections, made as fast as a child process can once go() is
    called. Its listener is bound (and `port` known) from the start, so a tracer can filter on
    it; that listener's LISTEN>CLOSE is one more transition than PER_CONNECTION per connection.
    """

    def __init__(self, connections: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BURST, str(connections)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.port = int(self.proc.stdout.readline())

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def running(self) -> bool:
        return self.proc.poll() is None

    def done(self) -> bool:
        """Waits for the child's last line: True once every connection was made."""
        return self.proc.stdout.readline().strip() == "done"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


if __name__ == "__main__":
    main(sys.argv[1:])


def churn_in(netns: str, churn_bin, seconds: float, port: int, src) -> tuple[dict, int, list]:
    """scripts/churn.c for `seconds` on `port` in network namespace `netns`, draining
    `src` (a KernelSource) meanwhile: (churn's JSON result, its pid, the raw events).

    Its own session: the churn must not share an autogroup with the reader. Its own
    namespace: its ~100,000 TIME_WAIT sockets go with it, not into later tests.
    """
    got: list[bytes] = []
    churn = subprocess.Popen(
        ["ip", "netns", "exec", netns, str(churn_bin), "--seconds", str(seconds), "--port",
         str(port)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    while churn.poll() is None:
        got += src.poll(0.05)
    out = churn.stdout.read()
    assert churn.returncode == 0, out
    return json.loads(out), churn.pid, got
