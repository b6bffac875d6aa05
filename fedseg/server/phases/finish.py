"""The job's end: the final global model as a model bundle (``RUN_DIR/model``, what
``fedseg predict`` reads) and the run report (``server/report.py``). With cross-validation each
fold's model is a bundle of its own (``RUN_DIR/folds/fold_K``) and ``RUN_DIR/model`` is their
ensemble (``phases/crossval.py``)."""

from __future__ import annotations

from pathlib import Path

from fedseg.server.job_context import JobContext
from fedseg.server.report import write_report


def save_model(ctx: JobContext, folder: Path, note: str) -> Path:
    """The current global weights with the plan and dataset.json as a bundle in ``folder``."""
    # imported here: the ServerApp loads torch only now, for the bundle (phases/initial_model.py)
    import torch

    from fedseg.models.bundle import BundleInfo, save_bundle

    assert ctx.plan is not None
    ds = ctx.plan.dataset_json()
    state = {k: torch.from_numpy(v) for k, v in ctx.state.weights.items()}
    _, local = ctx.cfg.fold_of(ctx.state.round) if ctx.state.round else (0, 0)
    return save_bundle(folder, ctx.plan, ds, state,
                       BundleInfo(trained_iterations=local * ctx.cfg.local_iterations, note=note))


def export(ctx: JobContext) -> None:
    """One model (``folds`` 1): its bundle and the report. (Cross-validation: crossval.finish.)"""
    save_model(ctx, ctx.run.model_dir,
               f"federated job {ctx.cfg.job_id}, {ctx.state.round} rounds")
    write_report(ctx.run)
