"""Keep bearer tokens out of a site's logs (``worker.log``): they are masked as they are written.

Why: every bulk transfer (the global model, the site's update, the unmask step) is authorised by
a random 256-bit capability token (``secrets.token_urlsafe(32)``: 43 URL-safe characters) that
travels inside Flower messages; whoever holds one can fetch that round's model or answer for
the site. Error messages carry them (a pydantic error quotes the request it refused, a repr
quotes a whole message), and they reached ``worker.log``, which a hospital's IT reads and ships
to log collectors. The worker's stdout and stderr (and the logging handlers that write there)
go through :class:`RedactingStream`, which replaces every such token by ``<token>``: a pattern
rather than a list of known tokens, so a token the process never registered is masked too.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from typing import TextIO

TOKEN_RE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")
MASK = "<token>"


def redact(text: str) -> str:
    """``text`` with every 43-character URL-safe token replaced by ``<token>``."""
    return TOKEN_RE.sub(MASK, text)


class RedactingStream(io.TextIOBase):
    """A text stream that masks tokens, line by line, before writing to ``inner``. Lines are
    buffered up to their newline so that a token split over two ``write`` calls is masked."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner
        self._pending = ""

    def write(self, s: str) -> int:
        text = self._pending + s
        head, sep, tail = text.rpartition("\n")
        if len(tail) > 4096:  # a very long line without newline: write what cannot hold a token
            head, sep, tail = text[:-64], "", text[-64:]
        if head or sep:
            self.inner.write(redact(head + sep))
        self._pending = tail
        return len(s)

    def flush(self) -> None:
        if self._pending:
            self.inner.write(redact(self._pending))
            self._pending = ""
        self.inner.flush()

    def fileno(self) -> int:
        return self.inner.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.inner, "encoding", "utf-8")


def install() -> None:
    """Route this process's stdout, stderr and the logging handlers bound to them through
    :class:`RedactingStream` (idempotent). Handlers made before (Flower's, at import) hold
    the old streams, so they are re-pointed too."""
    if isinstance(sys.stdout, RedactingStream):
        return
    old = {id(sys.stdout): None, id(sys.stderr): None}
    out, err = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    swap = {id(sys.stdout): out, id(sys.stderr): err}
    sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for lg in loggers:
        for h in lg.handlers:
            stream = getattr(h, "stream", None)
            if isinstance(h, logging.StreamHandler) and id(stream) in old:
                h.setStream(swap[id(stream)])
