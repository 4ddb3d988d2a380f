"""The Python decoder must agree with the C compiler about the header's structs."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tcpwatch import schema


def _c_layout(tmp_path, name: str) -> dict[str, tuple[int, int]]:
    """Offsets and sizes of every field as gcc lays them out, plus sizeof."""
    lay = schema.layout_of(name)
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/types.h>",
        '#include "tcpwatch.h"',
        "int main(void) {",
        f'  printf("SIZE %zu 0\\n", sizeof(struct {name}));',
    ]
    for field in lay.names:
        lines.append(
            f'  printf("{field} %zu %zu\\n", offsetof(struct {name}, {field}),'
            f" sizeof(((struct {name} *)0)->{field}));"
        )
    lines.append("  return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run(
        ["gcc", f"-I{schema.bpf_dir()}", "-o", str(exe), str(src)], check=True, capture_output=True
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {n: (int(a), int(b)) for n, a, b in (line.split() for line in out.splitlines())}


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to compile the header")
@pytest.mark.parametrize("name", ["tw_event", "tw_cw", "tw_calib", "tw_exit_key",
                                  "tw_exit_agg"])
def test_python_layout_matches_gcc(tmp_path, name):
    c = _c_layout(tmp_path, name)
    lay = schema.layout_of(name)
    assert lay.size == c.pop("SIZE")[0]
    assert {name: (off, size) for name, off, size in lay.fields} == c


def test_exit_histogram_constants_agree():
    c = schema.layout().consts
    assert c["TW_EXIT_SUB"] == 1 << c["TW_EXIT_SUB_BITS"]
    assert c["TW_EXIT_BUCKETS"] == (c["TW_EXIT_MAX_LOG"] - c["TW_EXIT_SUB_BITS"] + 1) * c[
        "TW_EXIT_SUB"]
    # every bucket's middle is filed in that bucket, and the middle is within 1/16 of any
    # stay filed there
    for ns in (0, 999, 1024 * 7, 1024 * 8, 2_000_000, 10**9, 10**12):
        mid = schema.exit_bucket_ns(schema.exit_bucket(ns))
        assert abs(mid - ns) <= max(512, ns / (2 * c["TW_EXIT_SUB"])), ns


def test_constants_come_from_the_header():
    consts = schema.layout().consts
    assert consts["TW_KIND_STATE"] == 1
    assert consts["TW_COMM_LEN"] == 16
    assert set(schema.OUTCOMES) == {
        consts[k] for k in consts if k.startswith("TW_OUT_")
    }


@pytest.mark.parametrize(
    "family,laddr,raddr",
    [(4, "127.0.0.1", "10.1.2.3"), (6, "::1", "2001:db8::7"), (6, "::ffff:127.0.0.1", "::1")],
)
def test_round_trip(family, laddr, raddr):
    ev = {
        "kind": 1, "ts_ns": 123456789, "sk": 0xFFFF888102C99BC0, "prev_ns": 5, "cw_ns": 7,
        "fin_read_ns": 9, "laddr": laddr, "raddr": raddr, "pid": 42, "tid": 43, "actor_pid": 44,
        "actor_tid": 45, "netns": 4026531833, "kstack_id": 3, "ustack_id": -1, "family": family,
        "lport": 8080, "rport": 51000, "old": 1, "new": 8, "outcome": 2, "flags": 9,
        "comm": "nginx", "actor_comm": "worker",
    }
    assert schema.decode(schema.encode(ev)) == ev


def test_decode_known_bytes():
    """Hand-built bytes, laid out as the kernel writes them (x86-64, little endian)."""
    import struct

    raw = bytearray(schema.layout().size)
    struct.pack_into("<QQQQQ", raw, 0, 10, 0xABC, 20, 30, 0)
    raw[40:44] = bytes([127, 0, 0, 1])
    raw[56:60] = bytes([192, 0, 2, 9])
    struct.pack_into("<IIIIIii", raw, 72, 1000, 1001, 0, 0, 4026531833, -1, -1)
    struct.pack_into("<HHH", raw, 100, 2, 80, 40000)
    raw[106:110] = bytes([1, 1, 8, 0])
    raw[112:117] = b"httpd"
    ev = schema.decode(bytes(raw))
    ends = (ev["laddr"], ev["lport"], ev["raddr"], ev["rport"])
    assert ends == ("127.0.0.1", 80, "192.0.2.9", 40000)
    assert (ev["old"], ev["new"], ev["pid"], ev["comm"], ev["sk"]) == (1, 8, 1000, "httpd", 0xABC)
    assert ev["family"] == 4 and ev["netns"] == 4026531833


def test_state_names_follow_tcp_states_h():
    assert schema.state_name(8) == "CLOSE_WAIT"
    assert schema.STATE_NUMBERS["LAST_ACK"] == 9
    assert schema.state_name(99) == "STATE_99"
