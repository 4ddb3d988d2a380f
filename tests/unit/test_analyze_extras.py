"""The optional extras of `tcpwatch analyze`: `.zst` logs (zstandard) and `--plot` (matplotlib).

scripts/install.sh installs both into the venv (pip extras `plot` and `zstd`), so these tests
run; where a library is missing they skip with the reason, which tests/conftest.py turns into a
failure under CI=true.
"""

from __future__ import annotations

import gzip
import io
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import orjson
import pytest

from tcpwatch import cli

LOGS = Path(__file__).parent / "fixtures" / "logs"
RECORDED = LOGS / "recorded.ndjson"
SYNTHETIC = LOGS / "synthetic.ndjson"
ROTATED = sorted(LOGS.glob("recorded-rotated.ndjson*"))


def zstandard():
    return pytest.importorskip(
        "zstandard", reason="zstandard is not installed: the 'zstd' extra "
        "(scripts/install.sh installs it; pip install -e '.[zstd]')")


def matplotlib():
    return pytest.importorskip(
        "matplotlib", reason="matplotlib is not installed: the 'plot' extra "
        "(scripts/install.sh installs it; pip install -e '.[plot]')")


def run(args: list[str], capsys, stdin: bytes | None = None, monkeypatch=None):
    """(exit status, stdout, stderr) of `tcpwatch ARGS`."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def analysis(paths: list[Path], capsys) -> dict:
    """The JSON analysis of `paths`, without the file names (they differ by design)."""
    code, out, err = run(["analyze", *map(str, paths), "--format", "json"], capsys)
    assert code == 0 and err == "", err
    data = orjson.loads(out)
    data["input"].pop("files")
    return data


# ------------------------------------------------------------------------------------- zstd


@pytest.mark.parametrize("log", [RECORDED, SYNTHETIC], ids=["recorded", "synthetic"])
def test_zst_log_gives_the_same_analysis_as_the_plain_one(tmp_path, capsys, log):
    zstd = zstandard()
    plain = log.read_bytes()
    one_frame = tmp_path / "one.ndjson.zst"
    one_frame.write_bytes(zstd.ZstdCompressor(level=3).compress(plain))
    # as the zstd tool writes a pipe: streamed, no content size in the frame header
    streamed = tmp_path / "streamed.ndjson.zst"
    buf = io.BytesIO()
    with zstd.ZstdCompressor().stream_writer(buf, closefd=False) as w:
        for k in range(0, len(plain), 4096):
            w.write(plain[k:k + 4096])
    streamed.write_bytes(buf.getvalue())
    # several frames end to end (`cat a.zst b.zst`, pzstd): every frame must be read
    half = plain.index(b"\n", len(plain) // 2) + 1
    frames = tmp_path / "frames.ndjson.zst"
    frames.write_bytes(zstd.ZstdCompressor().compress(plain[:half])
                       + zstd.ZstdCompressor().compress(plain[half:]))
    want = analysis([log], capsys)
    assert want["input"]["records"] > 20
    for path in (one_frame, streamed, frames):
        assert analysis([path], capsys) == want, path.name


def test_rotated_zst_files_are_read_oldest_first_whatever_their_names(tmp_path, capsys):
    """Order comes from each file's first record (its `start`'s ts and part): here the names
    sort the other way round, so reading in name order would give another analysis."""
    zstd = zstandard()
    want = analysis(ROTATED, capsys)
    parts = []
    for n, path in enumerate(ROTATED):  # oldest first (timestamped names), plain last
        data = path.read_bytes()
        data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        parts.append(tmp_path / f"log.{len(ROTATED) - n}.zst")  # log.1.zst is the newest
        parts[-1].write_bytes(zstd.ZstdCompressor().compress(data))
    got = analysis(sorted(parts), capsys)
    assert got == want and got["totals"]["cw"] == 9 and got["totals"]["untracked"] == 0


def test_zst_mixed_with_gz_files_of_one_rotated_log(tmp_path, capsys):
    zstd = zstandard()
    want = analysis(ROTATED, capsys)
    mixed = []
    for path in ROTATED:  # the rotated files stay .gz, the newest (plain) one becomes .zst
        if path.suffix == ".gz":
            mixed.append(path)
        else:
            mixed.append(tmp_path / "newest.ndjson.zst")
            mixed[-1].write_bytes(zstd.ZstdCompressor().compress(path.read_bytes()))
    assert analysis(list(reversed(mixed)), capsys) == want


def test_damaged_zst_keeps_the_lines_before_the_damage(tmp_path, capsys):
    zstd = zstandard()
    lines = SYNTHETIC.read_bytes() * 4000  # several MiB: some of it comes out before the cut
    path = tmp_path / "cut.ndjson.zst"
    path.write_bytes(zstd.ZstdCompressor().compress(lines)[:-100])
    code, out, err = run(["analyze", str(path), "--format", "json"], capsys)
    assert code == 0 and "Traceback" not in err
    assert "compressed data cut short or damaged" in err
    assert 0 < orjson.loads(out)["input"]["records"] < 30 * 4000


def test_top_replay_reads_zst(tmp_path, capsys):
    zstd = zstandard()
    path = tmp_path / "recorded.ndjson.zst"
    path.write_bytes(zstd.ZstdCompressor().compress(RECORDED.read_bytes()))
    frames = []
    for log in (RECORDED, path):
        code, out, err = run(["top", "--replay", str(log), "--at", "1s", "--format", "json"],
                             capsys)
        assert code == 0, err
        frame = orjson.loads(out)
        frame["replay"].pop("files")
        frames.append(frame)
    assert frames[0] == frames[1] and frames[0]["states"] == {"CLOSE_WAIT": 3}


# ------------------------------------------------------------------------------------- plot


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("log", [RECORDED, SYNTHETIC], ids=["recorded", "synthetic"])
def test_plot_writes_a_real_png_and_svg(tmp_path, capsys, log):
    matplotlib()
    png, svg = tmp_path / "cw.png", tmp_path / "cw.svg"
    for path in (png, svg):
        code, out, err = run(["analyze", str(log), "--plot", str(path)], capsys)
        assert code == 0 and err == "" and "CLOSE_WAIT" in out  # the report is printed too
    data = png.read_bytes()
    width, height = png_size(data)
    assert (width, height) == (1000, 700)  # figsize 10x7 in at 100 dpi
    assert len(data) > 20_000 and data.endswith(b"IEND\xaeB`\x82")
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    paths = root.iter("{http://www.w3.org/2000/svg}path")
    assert sum(1 for _ in paths) > 50  # bars, the timeline, axes, glyphs: not an empty canvas
    text = svg.read_text()
    # matplotlib writes titles as glyph paths, with the text itself in a comment
    assert "Time in CLOSE_WAIT" in text and "Sockets in CLOSE_WAIT over time" in text


def test_plot_of_a_log_without_close_wait_and_from_stdin(tmp_path, capsys, monkeypatch):
    matplotlib()
    start = (b'{"event":"start","ts":"2026-11-21T05:13:00.000000Z","v":1,"hostname":"h",'
             b'"pid":1,"leak_after_s":30.0}\n')
    png = tmp_path / "empty.png"
    code, out, err = run(["analyze", "-", "--plot", str(png)], capsys, start, monkeypatch)
    assert code == 0, err
    assert png_size(png.read_bytes()) == (1000, 700)


def test_plot_errors_are_one_line_before_reading(tmp_path, capsys):
    matplotlib()
    code, out, err = run(["analyze", str(RECORDED), "--plot", str(tmp_path / "cw.pdf")], capsys)
    assert (code, out) == (1, "")
    assert err == f"tcpwatch: error: --plot writes .png or .svg, not '{tmp_path}/cw.pdf'\n"
    code, out, err = run(["analyze", str(RECORDED), "--plot",
                          str(tmp_path / "nodir" / "cw.png")], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"tcpwatch: error: cannot write {tmp_path}/nodir/cw.png")
