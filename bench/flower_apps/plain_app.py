"""Flower's FedAvg (Message API, default settings) with no-training clients.

ServerApp ``app``: ``flwr.serverapp.strategy.FedAvg`` as Flower's users run it (fraction_train =
fraction_evaluate = 1, so each round is a train exchange then an evaluate exchange), waiting for
all ``sites`` nodes, starting from ``model_arrays(params)``. A round is timed from
``configure_train`` to the end of ``aggregate_evaluate`` and written to run config
``timing-file``.

ClientApp ``client``: ``train`` returns the received arrays plus N(0, noise-std²) noise and
``num-examples``; ``evaluate`` returns a loss (and ``num-examples``, which FedAvg's default metric
aggregation requires in every reply).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from bench.common import model_arrays
from bench.flower_apps.timing import RoundClock, check_update

NUM_EXAMPLES = 100

app = ServerApp()
client = ClientApp()


class TimedFedAvg(FedAvg):
    """FedAvg with a wall clock around each round (train + evaluate exchange)."""

    def __init__(self, clock: RoundClock, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock = clock
        self._sent: ArrayRecord | None = None
        self._aggregate: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.clock.start(server_round)
        self._sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        out = super().aggregate_train(server_round, replies)
        self.clock.mark(server_round, "train_aggregated")
        self._aggregate = out[0]
        return out

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        out = super().aggregate_evaluate(server_round, replies)
        self.clock.end(server_round)
        if self._sent is not None and self._aggregate is not None:  # outside the timed span
            check_update(self.clock, self._sent.to_numpy_ndarrays(),
                         self._aggregate.to_numpy_ndarrays())
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    params, sites, rounds = int(rc["params"]), int(rc["sites"]), int(rc["num-server-rounds"])
    clock = RoundClock(str(rc["timing-file"]) or None,
                       {"system": "flower-fedavg", "params": params, "sites": sites,
                        "rounds": rounds})
    t0 = time.monotonic()
    arrays = ArrayRecord({k: Array(v) for k, v in model_arrays(params, int(rc["seed"])).items()})
    clock.extra["model_build_seconds"] = time.monotonic() - t0
    strategy = TimedFedAvg(clock, min_available_nodes=sites)
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds)
    clock.extra["completed"] = True
    clock.write()


def _noise_std(context: Context) -> np.float32:
    return np.float32(float(context.run_config.get("noise-std", 1e-3)))


@client.train()
def train(msg: Message, context: Context) -> Message:
    rng = np.random.default_rng()
    std = _noise_std(context)
    received = msg.content["arrays"]
    out = {}
    for key, arr in received.items():
        x = arr.numpy()
        noise = rng.standard_normal(x.shape, dtype=np.float32)
        noise *= std
        out[key] = Array((x + noise).astype(x.dtype, copy=False))
    metrics = MetricRecord({"num-examples": NUM_EXAMPLES, "train-loss": float(rng.random())})
    return Message(content=RecordDict({"arrays": ArrayRecord(out), "metrics": metrics}),
                   reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    metrics = MetricRecord({"num-examples": NUM_EXAMPLES,
                            "eval-loss": float(np.random.default_rng().random())})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
