"""scripts/bench_data's pure parts and its load, scripts/pingpong.c (no root needed for either)."""

from __future__ import annotations

import doctest
import json
import shutil
import subprocess

import pytest
import scriptload
from scriptload import SCRIPTS

bd = scriptload.load("bench_data")


def test_doctests():
    failures, tried = doctest.testmod(bd, verbose=False)
    assert tried > 0 and failures == 0


def test_rounds_without_their_baseline_are_left_out_of_the_per_round_ratios():
    runs = [{"mode": "baseline", "round": 1, "rate": 200.0},
            {"mode": "trace", "round": 1, "rate": 150.0, "round_trips": 600, "seconds": 4.0,
             "cpu_s": 0.2, "bpf_runs": {"recv": 1200, "exit": 1}, "bpf_ns": {"recv": 140.0}},
            {"mode": "trace", "round": 2, "rate": 170.0, "round_trips": 680, "seconds": 4.0,
             "cpu_s": 0.4, "bpf_runs": {"recv": 1360}, "bpf_ns": {"recv": 160.0}}]
    base, trace = bd.summarize(runs, ["baseline", "trace"])
    assert base["round_ratios"] == [1.0]
    assert trace["rate"] == 160.0 and trace["ratio"] == 0.8
    assert trace["round_ratios"] == [0.75]  # round 2 had no baseline
    assert trace["cpu_pct"] == pytest.approx(7.5)
    # 2 recv runs a round trip; the one stray exit run (1/600) is not a per-trip hook
    assert trace["runs_per_trip"] == {"recv": 2.0}
    assert trace["bpf_ns"]["recv"] == 150.0
    table = bd.format_table([base, trace])
    assert table.splitlines()[2].split()[:4] == ["trace", "160", "80.0%", "75.0"]


def test_no_baseline_gives_no_ratio():
    (row,) = bd.summarize([{"mode": "top", "round": 1, "rate": 10.0}], ["top"])
    assert row["ratio"] is None and row["round_ratios"] == []
    assert "top" in bd.format_table([row])


@pytest.fixture(scope="module")
def pingpong(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("pp") / "pingpong"
    subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-pthread", "-o", str(exe),
                    str(SCRIPTS / "pingpong.c")], check=True)
    return exe


def test_pingpong_counts_round_trips_over_its_connections(pingpong):
    res = subprocess.run([str(pingpong), "--pairs", "3", "--seconds", "0.3", "--bytes", "100",
                          "--port", "0"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2  # port 0 is refused: the pingers must know where to connect
    res = subprocess.run([str(pingpong), "--pairs", "3", "--seconds", "0.3", "--bytes", "100",
                          "--port", "18557"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["pairs"] == 3 and out["bytes"] == 100
    assert 0.3 <= out["seconds"] < 5
    assert out["round_trips"] > 100
    assert out["rate"] == pytest.approx(out["round_trips"] / out["seconds"], rel=1e-3)


@pytest.mark.parametrize("args", [["--pairs", "0"], ["--bytes", "0"], ["--seconds", "0"],
                                  ["--pairs", "65"], ["--bogus", "1"], ["--pairs"]])
def test_pingpong_refuses_bad_arguments(pingpong, args):
    res = subprocess.run([str(pingpong), *args], capture_output=True, text=True, timeout=10)
    assert res.returncode == 2 and res.stderr.startswith("usage: pingpong")


def test_bench_data_refuses_bad_values_with_one_line():
    with pytest.raises(SystemExit) as exc:
        bd.parse_args(["--pairs", "0"])
    assert exc.value.code == 2
