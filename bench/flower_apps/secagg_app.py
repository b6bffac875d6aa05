"""Flower's SecAgg+ (legacy API, as Flower ships it) with no-training clients.

ServerApp ``app``: ``LegacyContext`` + ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``
around the legacy ``flwr.server.strategy.FedAvg`` (defaults: fraction_fit = fraction_evaluate = 1,
so each round is the four SecAgg+ exchanges - setup, share keys, collect masked vectors, unmask -
then an evaluate exchange), waiting for all ``sites`` clients, starting from
``model_arrays(params)``. ``num_shares`` = sites (every client is every other's neighbour),
``reconstruction_threshold`` = sites // 2 + 1. A round is timed from the start of the fit
workflow to the end of the evaluate workflow (written to run config ``timing-file``).

ClientApp ``client``: a NumPyClient behind ``secaggplus_mod`` whose ``fit`` returns the received
parameters plus N(0, noise-std²) noise; ``evaluate`` returns a loss.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_evaluate_workflow
from flwr.serverapp import Grid, ServerApp

from bench.common import model_arrays
from bench.flower_apps.timing import RoundClock, check_update

NUM_EXAMPLES = 100

app = ServerApp()


def _round(context: LegacyContext) -> int:
    return int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])


class TimedFedAvg(FedAvg):
    """Legacy FedAvg that counts the results and failures of each SecAgg+ aggregation."""

    def __init__(self, clock: RoundClock, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock = clock

    def aggregate_fit(self, server_round, results, failures):
        out = super().aggregate_fit(server_round, results, failures)
        self.clock.extra.setdefault("fit_results_per_round", []).append(len(results))
        self.clock.extra.setdefault("fit_failures_per_round", []).append(len(failures))
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    params, sites, rounds = int(rc["params"]), int(rc["sites"]), int(rc["num-server-rounds"])
    if sites < 3:
        raise ValueError("Flower's SecAgg+ needs num_shares > 2: run it with 3 or more sites")
    shares, threshold = sites, sites // 2 + 1
    clock = RoundClock(str(rc["timing-file"]) or None,
                       {"system": "flower-secagg+", "params": params, "sites": sites,
                        "rounds": rounds, "num_shares": shares,
                        "reconstruction_threshold": threshold})
    t0 = time.monotonic()
    initial = ndarrays_to_parameters(list(model_arrays(params, int(rc["seed"])).values()))
    clock.extra["model_build_seconds"] = time.monotonic() - t0
    strategy = TimedFedAvg(clock, min_fit_clients=sites, min_evaluate_clients=sites,
                           min_available_clients=sites, initial_parameters=initial)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds),
                           strategy=strategy)
    secagg = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold)

    sent: dict = {}

    def fit_workflow(grid: Grid, ctx: Context) -> None:
        rnd = _round(ctx)  # type: ignore[arg-type]
        clock.start(rnd)
        sent["arrays"] = ctx.state.array_records[MAIN_PARAMS_RECORD]
        secagg(grid, ctx)
        clock.mark(rnd, "train_aggregated")

    def evaluate_workflow(grid: Grid, ctx: Context) -> None:
        default_evaluate_workflow(grid, ctx)
        clock.end(_round(ctx))  # type: ignore[arg-type]
        new = ctx.state.array_records[MAIN_PARAMS_RECORD]  # outside the timed span
        check_update(clock, sent["arrays"].to_numpy_ndarrays(), new.to_numpy_ndarrays())

    DefaultWorkflow(fit_workflow=fit_workflow, evaluate_workflow=evaluate_workflow)(grid, legacy)
    clock.extra["completed"] = True
    clock.write()


class NoTrainClient(NumPyClient):
    def __init__(self, noise_std: float) -> None:
        self.noise_std = np.float32(noise_std)

    def fit(self, parameters, config):
        rng = np.random.default_rng()
        out = []
        for x in parameters:
            noise = rng.standard_normal(x.shape, dtype=np.float32)
            noise *= self.noise_std
            out.append((x + noise).astype(x.dtype, copy=False))
        return out, NUM_EXAMPLES, {}

    def evaluate(self, parameters, config):
        loss = float(np.random.default_rng().random())
        return loss, NUM_EXAMPLES, {"eval-loss": loss}


def client_fn(context: Context):
    return NoTrainClient(float(context.run_config.get("noise-std", 1e-3))).to_client()


client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
