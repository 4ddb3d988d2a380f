"""Which mappings the loader pages out after compiling: only the compiler's libraries."""

from __future__ import annotations

from tcpwatch import loader

MAPS = """\
55d0-55e0 r--p 00000000 08:01 1 /usr/bin/python3.11
7f00-7f80 r-xp 00000000 08:01 5 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f80-7f90 r--p 00000000 08:01 6 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
7f90-7fa0 r-xp 00000000 08:01 7 /usr/lib/x86_64-linux-gnu/libclang-cpp.so.14
7fa0-7fb0 r--p 00000000 08:01 8 /usr/lib/x86_64-linux-gnu/libicudata.so.72.1
7fb0-7fc0 r-xp 00000000 08:01 9 /usr/lib/x86_64-linux-gnu/libz3.so.4
7fc0-7fd0 rw-p 00000000 00:00 0 [heap]
7fd0-7fe0 rw-s 00000000 00:0e 10 anon_inode:bpf-map
7fe0-7ff0 r-xp 00000000 08:01 11 /opt/libLLVM-stuff/libc.so.6
"""


def test_only_the_compilers_libraries_are_paged_out():
    assert loader.compiler_ranges(MAPS) == [
        (0x7F00, 0x7F80), (0x7F90, 0x7FA0), (0x7FA0, 0x7FB0), (0x7FB0, 0x7FC0)]

