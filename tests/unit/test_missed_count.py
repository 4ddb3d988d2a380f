"""KernelSource's `missed` count: the state program's skips less the rescue program's rescues,
both counted from the moment tracing began.

The kernel counts a skip a moment before tw_rescue handles that firing, so a reading can show a
skip without its rescue. Reported totals never go down: such a reading must not become a lost
event for good, while a true miss must still show. The kernel here is scripted: each read of a
count returns the next value of its script.
"""

from __future__ import annotations

from tcpwatch import loader
from tcpwatch.loader import KernelSource, Options


def source(monkeypatch, skips: list[int], rescued: list[int]) -> KernelSource:
    src = KernelSource(Options())
    skip_reads, rescue_reads = iter(skips), iter(rescued)
    monkeypatch.setattr(src, "_skips_total", lambda: next(skip_reads))
    monkeypatch.setattr(src, "_count", lambda name: next(rescue_reads))
    monkeypatch.setattr(loader.time, "sleep", lambda s: None)
    return src


def test_a_skip_read_before_its_rescue_ran_is_not_a_miss(monkeypatch):
    # 1st reading: 4 skips, 3 rescues (the 4th firing's rescue had not run yet); 1 ms later
    # both 4. Then a steady 4/4.
    src = source(monkeypatch, skips=[4, 4, 4], rescued=[3, 4, 4])
    assert src._missed() == (0, 4)
    assert src._missed() == (0, 4)


def test_a_true_miss_shows_in_both_readings_and_stays(monkeypatch):
    # 5 skips, 4 rescues, twice: one firing neither ran nor was rescued. It stays missed
    # while later skips are rescued; a second true miss adds to it.
    src = source(monkeypatch, skips=[5, 5, 6, 7, 7], rescued=[4, 4, 5, 5, 5])
    assert src._missed() == (1, 4)
    assert src._missed() == (1, 5)
    assert src._missed() == (2, 5)


def test_skips_before_tracing_began_are_not_misses(monkeypatch):
    # During the start-up 7 skips, 4 rescued (the rescue program does not take over before
    # the calibration): nothing was to be sent then. A rescue ran between the first two reads
    # of the baseline, which is read again. Afterwards 3 more skips, all rescued.
    src = source(monkeypatch, skips=[6, 7, 10], rescued=[3, 4, 4, 4, 7])
    src._count_skips_from_here()
    assert (src._skips_from, src._rescued_from) == (7, 4)
    assert src._missed() == (0, 3)
