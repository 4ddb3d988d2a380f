"""Build of the one compiled module (tcpwatch._fastlines); everything else is in pyproject.toml.

The module is optional: without a C compiler and Python's headers the install goes on and
`tcpwatch trace` runs its pure-Python path (and says so at start).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tcpwatch._fastlines",
            ["agent/tcpwatch/_fastlines.c"],
            include_dirs=["bpf"],  # tcpwatch.h: the event layout the kernel programs write
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
