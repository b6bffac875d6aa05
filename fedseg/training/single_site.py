"""``fedseg train``: one site's whole training run — preprocess (cached), train with
checkpoints (resumed), snapshots for learning curves, the model bundle at the end.

Kept apart from :mod:`fedseg.training.trainer` (the per-round trainer the federation calls) so
that each module has one job: this one is the single-site driver around it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fedseg.errors import FedsegError
from fedseg.planning.plan import Plan
from fedseg.training.trainer import LocalTrainer, TrainConfig, TrainResult

SNAPSHOT_DIR = "snapshots"


def snapshot_dir(out_dir: str | Path, iteration: int) -> Path:
    """Where ``fedseg train --snapshot-every`` puts the bundle of ``iteration``."""
    return Path(out_dir) / SNAPSHOT_DIR / f"it_{iteration:07d}"


def _init_weights(trainer: LocalTrainer, bundle_dir: Path, plan: Plan) -> None:
    """Start from another bundle's weights (fine-tuning a federated model at one site)."""
    from fedseg.models.bundle import load_bundle

    if not bundle_dir.is_dir():
        raise FedsegError(f"--init-from {bundle_dir}: no such folder; give a model bundle folder")
    init_plan, _, state, _ = load_bundle(bundle_dir)
    if init_plan.hash() != plan.hash():
        raise FedsegError(
            f"--init-from {bundle_dir}: its plan ({init_plan.hash()}) is not --plan's "
            f"({plan.hash()}); pass --plan {bundle_dir / 'plan.json'}"
        )
    trainer.set_weights({k.removeprefix("_orig_mod."): v for k, v in state.items()})


def train_local(
    data_dir: str | Path,
    plan_path: str | Path,
    iterations: int,
    out_dir: str | Path,
    cache_root: str | Path | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
    init_from: str | Path | None = None,
    snapshot_every: int | None = None,
) -> TrainResult:
    """``fedseg train``: preprocess (cached), train ``iterations`` steps with checkpoints in
    ``out_dir/checkpoint.pt`` (resumed if present), then write the model bundle to ``out_dir``.

    ``init_from``: a bundle whose weights the training starts from (only when there is no
    checkpoint to resume: a resumed run already holds them), e.g. the federated model that a
    site fine-tunes on its own cases. ``snapshot_every``: also write a bundle every that many
    iterations to ``out_dir/snapshots/it_NNNNNNN`` (learning curves), each the state of an
    uninterrupted run with the full schedule."""
    from tqdm import tqdm

    from fedseg.data.dataset import read_dataset_json
    from fedseg.models.bundle import BundleInfo, save_bundle
    from fedseg.training.preprocess import preprocess_dataset

    if iterations < 1:
        raise FedsegError(f"--iterations must be at least 1, got {iterations}")
    if snapshot_every is not None and snapshot_every < 1:
        raise FedsegError(f"--snapshot-every must be at least 1, got {snapshot_every}")
    plan = Plan.load(plan_path)
    ds = read_dataset_json(data_dir)
    plan.check_dataset(plan_path, Path(data_dir) / "dataset.json", ds.channel_names, ds.labels,
                       ds.file_ending)
    cfg = (config or TrainConfig()).model_copy(update={"total_iterations": iterations})
    root = Path(cache_root) if cache_root is not None else Path(data_dir) / ".fedseg_cache"

    tty = sys.stderr.isatty()  # a log file gets one line per tenth of the run, not a bar
    bar = tqdm(desc="preprocessing", unit="case", disable=not (progress and tty), leave=False)

    def on_case(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    folder = preprocess_dataset(data_dir, plan, root, cfg.config, progress=on_case)
    bar.close()

    trainer = LocalTrainer(plan, folder, out_dir, cfg)
    if init_from is not None and not trainer.state_path.is_file():
        _init_weights(trainer, Path(init_from), plan)
    note = "fedseg train" + (f", from {init_from}" if init_from is not None else "")
    start = trainer.iteration
    tbar = tqdm(
        total=iterations, initial=min(start, iterations), desc="training", unit="it",
        disable=not (progress and tty), dynamic_ncols=True,
    )
    every = max(1, iterations // 10)
    t_start, last_loss = time.perf_counter(), float("nan")

    def on_step(done: int, loss: float | None) -> None:
        nonlocal last_loss
        tbar.update(1)
        if loss is not None:
            last_loss = loss
            tbar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        it = trainer.iteration
        if progress and not tty and (it % every == 0 or it == iterations):
            rate = (it - start) / max(time.perf_counter() - t_start, 1e-9)
            print(f"training: {it}/{iterations} iterations, loss {last_loss:.4f} "
                  f"({rate:.2f} it/s)", file=sys.stderr, flush=True)

    # train up to each snapshot point in turn (one call when there are none): the schedule is
    # the full run's either way, so snapshots change nothing about the final model
    stops = list(range(snapshot_every, iterations, snapshot_every)) if snapshot_every else []
    result = None
    for stop in [s for s in stops if s > trainer.iteration] + [iterations]:
        result = trainer.run(
            max(0, stop - trainer.iteration), trainer.iteration, iterations,
            checkpoint_every=cfg.checkpoint_every, progress=on_step,
        )
        if stop < iterations:
            save_bundle(snapshot_dir(out_dir, stop), plan, ds, result.weights,
                        BundleInfo(config=trainer.config_name, trained_iterations=stop, note=note))
    tbar.close()
    assert result is not None
    save_bundle(
        out_dir, plan, ds, result.weights,
        BundleInfo(config=trainer.config_name, trained_iterations=trainer.iteration, note=note),
    )
    return result
