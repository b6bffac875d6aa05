"""The job's end: the final global model as a model bundle (``RUN_DIR/model``, what
``fedseg predict`` reads) and the run report (``server/report.py``)."""

from __future__ import annotations

from fedseg.server.job_context import JobContext
from fedseg.server.report import write_report


def export(ctx: JobContext) -> None:
    # imported here: the ServerApp loads torch only now, for the bundle (phases/initial_model.py)
    import torch

    from fedseg.models.bundle import BundleInfo, save_bundle

    assert ctx.plan is not None
    ds = ctx.plan.dataset_json()
    state = {k: torch.from_numpy(v) for k, v in ctx.state.weights.items()}
    save_bundle(ctx.run.model_dir, ctx.plan, ds, state,
                BundleInfo(trained_iterations=ctx.state.round * ctx.cfg.local_iterations,
                           note=f"federated job {ctx.cfg.job_id}, {ctx.state.round} rounds"))
    write_report(ctx.run)
