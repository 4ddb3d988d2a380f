"""--port in the kernel: the loader's `port_bits` words, read as the C's port_bit() reads them."""

from __future__ import annotations

import doctest
import random

from tcpwatch import loader


def port_bit(words: dict[int, int], port: int) -> bool:
    """bpf/tcpwatch.bpf.c's port_bit(): bit port & 63 of word port >> 6 (absent words are 0)."""
    return bool((words.get(port >> 6, 0) >> (port & 63)) & 1)


def test_exactly_the_chosen_ports_are_set():
    rng = random.Random(7)
    for chosen in ([0], [65535], [63, 64], [80, 443, 8080], rng.sample(range(65536), 300)):
        words = loader.port_words(chosen)
        assert all(0 <= w < 1024 and 0 < bits < 1 << 64 for w, bits in words.items())
        assert {p for p in range(65536) if port_bit(words, p)} == set(chosen)


def test_repeated_ports_and_no_ports():
    assert loader.port_words([8080, 8080]) == loader.port_words([8080])
    assert loader.port_words([]) == {}


def test_doctest():
    finder = doctest.DocTestFinder()
    (test,) = [t for t in finder.find(loader.port_words, "port_words") if t.examples]
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.failures == 0 and runner.tries == 1
