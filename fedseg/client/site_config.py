"""A site's settings (from its SuperNode's node config) and how a ClientApp handler runs.

Why a module of its own: every handler of the ClientApp (``client/app.py``) and the job-end
handler (``client/job_end.py``, which ``fedseg-client`` imports without the ClientApp) run the
same way — settings rebuilt from the node config, failures answered as one ``ErrorReply``
(``client/errors.py``) — and ``app.py`` imports ``job_end.py``'s handler.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Message

from fedseg.client.bulk_client import BulkEndpoint, endpoint_of
from fedseg.client.errors import error_reply
from fedseg.errors import FedsegError
from fedseg.protocol.records import pack_error


@dataclass
class SiteConfig:
    site: str
    data_dir: Path
    cache_dir: Path
    device: str
    gpu_memory_gb: float | None
    node_config: dict = field(default_factory=dict)  # identity-key / roster (secure aggregation)

    @property
    def bulk(self) -> BulkEndpoint:
        """How this site reaches the server's bulk transfers (``client/bulk_client.py``)."""
        return endpoint_of(self.node_config)

    @classmethod
    def from_context(cls, context: Context) -> SiteConfig:
        return cls.from_node_config(dict(context.node_config))

    @classmethod
    def from_node_config(cls, nc: dict) -> SiteConfig:
        if "data-dir" not in nc:
            raise FedsegError("node config has no 'data-dir'; start the site with fedseg-client")
        data = Path(str(nc["data-dir"]))
        cache = Path(str(nc.get("cache-dir", data / ".fedseg_cache")))
        gpu = nc.get("gpu-memory-gb")
        return cls(
            site=str(nc.get("site", data.name)),
            data_dir=data,
            cache_dir=cache,
            device=str(nc.get("device", "auto")),
            gpu_memory_gb=float(gpu) if gpu not in (None, "", 0) else None,
            node_config=dict(nc),
        )

    @property
    def preprocessed_root(self) -> Path:
        return self.cache_dir / "preprocessed"


def handler(fn: Callable[[Message, SiteConfig], Message]) -> Callable[[Message, Context], Message]:
    @functools.wraps(fn)
    def wrapper(msg: Message, context: Context) -> Message:
        return run_local(fn, msg, dict(context.node_config))

    return wrapper


def run_local(fn: Callable[[Message, SiteConfig], Message], msg: Message, node_config: dict) -> Message:
    """``fn`` in this process; errors become an ``ErrorReply`` (one clear line for what the site
    can fix, the exception's repr otherwise), never a remote traceback."""
    site = str(node_config.get("site", "?"))
    try:
        cfg = SiteConfig.from_node_config(node_config)
        return fn(msg, cfg)
    except Exception as err:
        return Message(pack_error(error_reply(site, err)), reply_to=msg)
