"""check_rescue_layout(): when the rescue program may read tuples from struct sock_common.

The dumps are synthetic struct tw_calib records laid out like the kernel's: what the loader's
calibration connection (127.0.0.2 -> 127.0.0.1:PORT, and the same through v4-mapped IPv6)
shows in the state program, next to the tracepoint's own view of the same socket.
"""

from __future__ import annotations

import socket
import struct

from tcpwatch.loader import SKC_PROT_OFFSET, check_rescue_layout

PORT, CLIENT_PORT = 40123, 51000
TCP_PROT, TCPV6_PROT = 0xFFFFFFFF82A0B000, 0xFFFFFFFF82A0C800
V4_SERVER, V4_CLIENT = socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.2")
V6_SERVER = socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1")
V6_CLIENT = socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.2")
V6_OFF = 56  # skc_v6_daddr on 6.x x86_64


def sock_head(family: int, daddr: bytes, saddr: bytes, dport: int, num: int, prot: int,
              v6: tuple[bytes, bytes] | None = None) -> bytes:
    head = bytearray(96)
    struct.pack_into("=4s4sIHHH", head, 0, daddr, saddr, 0xABCD, socket.htons(dport), num, family)
    struct.pack_into("=Q", head, SKC_PROT_OFFSET, prot)
    if v6:
        head[V6_OFF:V6_OFF + 32] = v6[0] + v6[1]
    return bytes(head)


def calib(family: int, head: bytes, saddr: bytes, daddr: bytes, sport: int, dport: int) -> dict:
    return {"net": 0, "sock": head, "bytes": b"", "saddr": saddr.ljust(16, b"\0"),
            "daddr": daddr.ljust(16, b"\0"), "family": family, "sport": sport, "dport": dport,
            "pad": 0}


def v4_pair(prot: int = TCP_PROT, listener_prot: int | None = None, **head) -> tuple[dict, dict]:
    fields = {"daddr": V4_CLIENT, "saddr": V4_SERVER, "dport": CLIENT_PORT, "num": PORT,
              "family": socket.AF_INET} | head
    lprot = TCP_PROT if listener_prot is None else listener_prot
    listener = calib(socket.AF_INET, sock_head(socket.AF_INET, bytes(4), V4_SERVER, 0, PORT, lprot),
                     V4_SERVER, bytes(4), PORT, 0)
    child = calib(socket.AF_INET, sock_head(fields["family"], fields["daddr"], fields["saddr"],
                                            fields["dport"], fields["num"], prot),
                  V4_SERVER, V4_CLIENT, PORT, CLIENT_PORT)
    return listener, child


def v6_pair(prot: int = TCPV6_PROT, addrs=(V6_CLIENT, V6_SERVER)) -> tuple[dict, dict]:
    listener = calib(socket.AF_INET6, sock_head(socket.AF_INET6, bytes(4), V4_SERVER, 0, PORT,
                                                TCPV6_PROT), V6_SERVER, bytes(16), PORT, 0)
    child = calib(socket.AF_INET6, sock_head(socket.AF_INET6, V4_CLIENT, V4_SERVER, CLIENT_PORT,
                                             PORT, prot, addrs), V6_SERVER, V6_CLIENT, PORT,
                  CLIENT_PORT)
    return listener, child


def test_both_families_checked():
    out = check_rescue_layout(v4_pair(), v6_pair())
    assert (out.mode, out.tcp_prot, out.tcpv6_prot, out.v6_off, out.problems) == (
        3, TCP_PROT, TCPV6_PROT, V6_OFF, [])


def test_ipv4_only_when_the_host_has_no_ipv6():
    out = check_rescue_layout(v4_pair(), None)
    assert (out.mode, out.tcp_prot, out.problems) == (1, TCP_PROT, [])


def test_nothing_without_the_calibration_connection():
    out = check_rescue_layout(None, v6_pair())
    assert out.mode == 0 and "never seen" in out.problems[0]


def test_moved_fields_disable_the_rescue():
    for head in ({"dport": CLIENT_PORT + 1}, {"num": PORT + 1}, {"family": socket.AF_INET6},
                 {"daddr": V4_SERVER, "saddr": V4_CLIENT}):
        out = check_rescue_layout(v4_pair(**head), v6_pair())
        assert out.mode == 0, head
        assert out.problems == ["struct sock_common does not hold the IPv4 tuple where expected"]


def test_prot_must_be_one_kernel_pointer():
    assert check_rescue_layout(v4_pair(prot=0x1234), None).mode == 0
    assert check_rescue_layout(v4_pair(listener_prot=TCP_PROT + 8), None).mode == 0
    # IPv6: the same pointer as IPv4's tcp_prot cannot be tcpv6_prot.
    out = check_rescue_layout(v4_pair(), v6_pair(prot=TCP_PROT))
    assert out.mode == 1 and "IPv6" in out.problems[0]


def test_ipv6_addresses_must_be_found_once():
    # Swapped (daddr, rcv_saddr): not the layout the C reads.
    out = check_rescue_layout(v4_pair(), v6_pair(addrs=(V6_SERVER, V6_CLIENT)))
    assert out.mode == 1
    assert out.problems == ["the IPv6 addresses found 0 times in struct sock_common"]


# --------------------------------------------------------------------- find_inet_sport()

def inet_dump(port: int, at: int, noise: dict[int, int] | None = None) -> dict:
    """A calibration dump whose `inet` bytes hold `port` (network order) at offset `at`."""
    from tcpwatch import schema

    inet = bytearray(schema.layout().consts["TW_CALIB_INET"])
    struct.pack_into("!H", inet, at, port)
    for off, value in (noise or {}).items():
        struct.pack_into("!H", inet, off, value)
    return {"sport": port, "inet": bytes(inet)}


def test_inet_sport_is_where_every_calibration_socket_has_its_port():
    from tcpwatch import schema
    from tcpwatch.loader import find_inet_sport

    start = schema.layout().consts["TW_CALIB_INET_AT"]
    v4 = (inet_dump(PORT, 302, {40: PORT}), inet_dump(PORT, 302, {600: PORT}))
    v6 = (inet_dump(PORT + 1, 302, {40: PORT + 1}), inet_dump(PORT + 1, 302))
    assert find_inet_sport([v4, v6]) == start + 302
    assert find_inet_sport([v4]) == start + 302  # no IPv6 here: the one pair decides
    # The port twice in every dump (another field holds it too): no single answer.
    both = (inet_dump(PORT, 302, {40: PORT}), inet_dump(PORT, 302, {40: PORT}))
    assert find_inet_sport([both]) is None
    assert find_inet_sport([both, v6]) == start + 302  # the other port settles it
    # Not at the same place in every dump, or nowhere: None (trace keeps the classic program).
    assert find_inet_sport([v4, (inet_dump(PORT + 1, 304), inet_dump(PORT + 1, 304))]) is None
    assert find_inet_sport([({"sport": PORT, "inet": bytes(1024)},) * 2]) is None
    assert find_inet_sport([]) is None
    # Two pairs on the same port prove nothing more than one.
    assert find_inet_sport([both, both]) is None
