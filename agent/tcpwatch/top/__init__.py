"""`tcpwatch top`: a live CLOSE_WAIT leaderboard that says why each socket is stuck.

Rooms, each small and importable on its own (nothing here imports rich or bcc at import time).
The cause rules live one level up, in tcpwatch/classify.py, shared with `trace`.

    model.py     sockets + counters -> grouped, sorted rows and header figures (a Frame)
    hostinfo.py  what /proc says about the host: state counts, port ranges, cgroups
    collect.py   where the data comes from: the kernel (root) or /proc snapshots (no root)
    view.py      Frame -> rich renderables, plain text and JSON
    command.py   the click command `top` and its live loop (keys, redraws)
"""
