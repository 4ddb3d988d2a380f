"""tcpwatch: find TCP sockets stuck in CLOSE_WAIT and the process that leaked them."""

__version__ = "0.1.0"
