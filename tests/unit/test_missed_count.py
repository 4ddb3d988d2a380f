"""KernelSource's `missed` count: the state program's skips less the rescue program's rescues.

The kernel counts a skip a moment before tw_rescue handles that firing, so a reading can show a
skip without its rescue. Reported totals never go down: such a reading must not become a lost
event for good, while a true miss must still show. The kernel here is scripted: each read of a
counter returns the next value of its script.
"""

from __future__ import annotations

import pytest

from tcpwatch import loader
from tcpwatch.loader import KernelSource, Options


def source(monkeypatch, skips: list[int], rescued: list[int], raw: bool) -> KernelSource:
    src = KernelSource(Options())
    src.raw_state = raw
    src._raw_fd = 7
    skip_reads, rescue_reads = iter(skips), iter(rescued)
    monkeypatch.setattr(loader, "recursion_misses", lambda fd: next(skip_reads))
    monkeypatch.setattr(src, "_state_fds", lambda: [5])
    monkeypatch.setattr(src, "_count", lambda name: next(rescue_reads))
    monkeypatch.setattr(loader.time, "sleep", lambda s: None)
    return src


@pytest.mark.parametrize("raw", [False, True])
def test_a_skip_read_before_its_rescue_ran_is_not_a_miss(monkeypatch, raw):
    # 1st reading: 4 skips, 3 rescues (the 4th firing's rescue had not run yet); 1 ms later
    # both 4. Then a steady 4/4.
    src = source(monkeypatch, skips=[4, 4, 4], rescued=[3, 4, 4], raw=raw)
    assert src._missed() == (0, 4)
    assert src._missed() == (0, 4)


@pytest.mark.parametrize("raw", [False, True])
def test_a_true_miss_shows_in_both_readings_and_stays(monkeypatch, raw):
    # 5 skips, 4 rescues, twice: one firing neither ran nor was rescued. It stays missed
    # while later skips are rescued; a second true miss adds to it.
    src = source(monkeypatch, skips=[5, 5, 6, 7, 7], rescued=[4, 4, 5, 5, 5], raw=raw)
    assert src._missed() == (1, 4)
    assert src._missed() == (1, 5)
    assert src._missed() == (2, 5)


def test_raw_baselines_count_only_what_came_after_the_switch(monkeypatch):
    # At the switch: 10 classic skips of which 9 rescued; the raw program had 2 misses of
    # its own already. Afterwards 3 more raw skips, all rescued: 1 missed in all.
    src = source(monkeypatch, skips=[5, 5], rescued=[12, 12], raw=True)
    src._missed_before, src._raw_misses_from, src._rescued_from = 1, 2, 9
    assert src._missed() == (1, 12)
