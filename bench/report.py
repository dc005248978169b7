"""Write one benchmark's section of docs/benchmarks.md, leaving the others as they are."""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Every table below is written by the command named in its section (`make bench`
runs them all). Figures are medians of interleaved runs on one shared 2-core
machine; compare the ratios within a table, not absolute numbers across tables.
"""


def write_section(name: str, markdown: str, command: str) -> Path:
    """Replace (or append) the section ``name`` of docs/benchmarks.md."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else HEADER
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = (
        f"<!-- {name}:start -->\n{markdown.strip()}\n\n"
        f"_Produced by `{command}` on {stamp} ({platform.machine()}, "
        f"Python {platform.python_version()})._\n<!-- {name}:end -->"
    )
    pattern = re.compile(
        rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: body, text)
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    DOC.write_text(text)
    return DOC


def publish(name: str, text: str, module: str, argv: list[str] | None, write: bool) -> None:
    """Print a benchmark's section and, with ``write``, put it in docs/benchmarks.md under
    the command that produced it (``python -m MODULE ARGS``; ``argv`` None: this process's)."""
    import sys

    print(text + "\n")
    if write:
        given = argv if argv is not None else sys.argv[1:]
        write_section(name, text, " ".join(["python -m " + module, *given]))
