"""`tcpwatch analyze`: questions answered from NDJSON logs, streaming, without root.

    inputs.py    files, globs, .gz/.zst, stdin -> batches of lines (corrupt and over-long
                 lines named by file and line number)
    timeparse.py --since/--until text and record timestamps -> seconds
    sketch.py    bounded aggregates: log-linear duration histogram, adaptive timeline
    engine.py    records -> per-socket state (open sockets only) and per-group totals
    report.py    the result as terminal text or JSON
    plot.py      the same as a PNG/SVG picture (optional: matplotlib)
    command.py   the click command

>>> from tcpwatch.analyze.engine import Analyzer, Options        # doctest: +SKIP
>>> result = Analyzer(Options()).run(["/var/log/tcpwatch.ndjson"])  # doctest: +SKIP
"""
