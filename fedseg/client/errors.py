"""How a failure at the site is told to the server: one ``ErrorReply``, never a traceback.

Why a module of its own: the ClientApp's handlers (``client/app.py``) and the secure-aggregation
step listener that answers from a background thread (``client/secure.py``) must answer a failure
identically, and the refusals they raise are classified here; with these in either of the two
modules, each would have to import the other.
"""

from __future__ import annotations

import traceback

from fedseg.errors import FedsegError
from fedseg.privacy.keys import SecAggAbort
from fedseg.protocol import messages as pm


class PlainRequestRefused(FedsegError):
    """Node config ``require-secure-aggregation`` (on unless set false: ``fedseg-client``'s
    ``require_secure_aggregation``): the request would make the site send its fingerprint, model
    update or case counts UNMASKED, so the site does not answer it."""


class UpdateRefused(FedsegError):
    """The site's own update failed validation; it is not masked nor sent."""


def error_reply(site: str, err: Exception) -> pm.ErrorReply:
    """What the server is told of a failure at the site: one clear line for what the site can
    fix (its kind names which), the exception's repr otherwise (its traceback is printed here)."""
    if isinstance(err, (FedsegError, pm.ProtocolError)):
        print(f"[fedseg-client {site}] {err}", flush=True)
        kind = ("refused" if isinstance(err, PlainRequestRefused) else
                "secagg" if isinstance(err, SecAggAbort) else
                "rejected" if isinstance(err, UpdateRefused) else "data")
        return pm.ErrorReply(site=site, kind=kind, message=str(err))
    # report, don't hide: the server logs it in metrics.jsonl
    traceback.print_exception(err)
    return pm.ErrorReply(site=site, kind="internal", message=" ".join(repr(err).split())[:500])
