"""BackgroundPoll: a source drained on a thread (top's frames no longer stall the kernel buffer)."""

from __future__ import annotations

import threading
import time

import pytest

from tcpwatch.background import BackgroundPoll


class Feed:
    """A source whose buffer the test fills; poll() takes all of it, like a ring drain."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffer: list[bytes] = []
        self.pollers: set[str] = set()
        self.closed = False
        self.fail: BaseException | None = None

    def put(self, *records: bytes) -> None:
        with self.lock:
            self.buffer.extend(records)

    def poll(self, timeout_s: float) -> list[bytes]:
        self.pollers.add(threading.current_thread().name)
        if self.fail is not None:
            raise self.fail
        with self.lock:
            out, self.buffer = self.buffer, []
        if not out:
            time.sleep(timeout_s)
        return out

    def counters(self) -> dict[str, int]:
        return {"lost": 7}

    def close(self) -> None:
        self.closed = True


def test_records_come_out_in_order_and_the_rest_is_the_source_s():
    feed = Feed()
    bg = BackgroundPoll(feed, max_held=1 << 20)
    try:
        got: list[bytes] = []
        for i in range(200):
            feed.put(*(b"%d.%d" % (i, j) for j in range(5)))
            if i % 7 == 0:
                got += bg.poll(0.01)
        got += bg.poll(0)  # waits for a drain begun after the call: everything put is in
        assert got == [b"%d.%d" % (i, j) for i in range(200) for j in range(5)]
        assert feed.pollers == {"tcpwatch-drain"}  # only the thread consumes the buffer
        assert bg.counters() == {"lost": 7}
    finally:
        bg.close()
    assert feed.closed and not bg._thread.is_alive()


def test_a_caller_that_falls_behind_leaves_the_rest_in_the_buffer():
    # Bounded: past max_held bytes waiting, the thread stops draining (the kernel buffer
    # fills and counts losses, as without the thread).
    feed = Feed()
    bg = BackgroundPoll(feed, max_held=100)
    try:
        feed.put(*[b"x" * 10] * 30)  # 300 bytes: all taken in one drain (as a ring's is)
        deadline = time.monotonic() + 5
        while bg._held < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        feed.put(b"later")
        time.sleep(0.2)
        assert feed.buffer == [b"later"]  # not drained while the caller is behind
        assert len(bg.poll(0)) == 30
        assert bg.poll(0) == [b"later"]
    finally:
        bg.close()


def test_an_error_on_the_thread_reaches_the_caller():
    feed = Feed()
    feed.fail = OSError("ring gone")
    bg = BackgroundPoll(feed, max_held=1 << 20)
    try:
        with pytest.raises(OSError, match="ring gone"):
            bg.poll(1.0)
    finally:
        bg.close()
