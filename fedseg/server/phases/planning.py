"""The job's one plan: nnU-Net v2's plan from the federated fingerprint sum, or the job's
``plan_file`` checked against what the sites declared. Either is saved as the run's plan.
"""

from __future__ import annotations

from pathlib import Path

from fedseg.config_io import load_json_model
from fedseg.data.dataset_json import DatasetJson
from fedseg.errors import FedsegError
from fedseg.planning.federated import plan_from_fingerprint_sum
from fedseg.planning.plan import Plan, with_configuration
from fedseg.server.job_context import JobContext
from fedseg.server.phases.fingerprint import fingerprint_sum


def federated_plan(ctx: JobContext, secure_round: str = "") -> Plan:
    """The plan from the sum of every site's fingerprint (``secure_round``: the secure sum's
    round id); the GPU budget is the job's, else the smallest GPU a site reported."""
    nodes = list(ctx.sites)
    ctx.run.set_status(phase="fingerprint")
    total = fingerprint_sum(ctx, secure_round)
    info = ctx.sites[nodes[0]].info
    ds = DatasetJson(channel_names=info.channel_names, labels=info.labels,
                     file_ending=info.file_ending,
                     regions_class_order=info.regions_class_order)
    gpus = [s.info.gpu_memory_gb for s in ctx.sites.values() if s.info.gpu_memory_gb > 0]
    budget = ctx.cfg.gpu_memory_gb or (min(gpus) if gpus else 8.0)
    plan = plan_from_fingerprint_sum(total, ds, gpu_memory_gb=budget,
                                     dataset_name=Path(ctx.cfg.run_dir).name,
                                     preset=ctx.cfg.plan_preset)
    plan = with_configuration(plan, ctx.cfg.configuration)
    plan.save(ctx.run.plan_path)
    ctx.run.log({"phase": "plan", "plan_hash": plan.hash(), "sites": len(nodes),
                 "gpu_memory_gb": budget, "secure_aggregation": ctx.secure is not None})
    return plan


def fixed_plan(ctx: JobContext, path: Path) -> Plan:
    """The job's ``plan_file``: checked against what the sites declared, saved as the run's
    plan. No fingerprint leaves the sites."""
    plan = load_json_model(path, Plan, "no such plan file; fix the job's 'plan_file'")
    plan = with_configuration(plan, ctx.cfg.configuration)
    for s in ctx.sites.values():
        if s.info.channel_names != plan.channel_names or s.info.labels != plan.labels:
            raise FedsegError(
                f"{path}: the plan's channels {plan.channel_names} / labels {plan.labels} "
                f"differ from site '{s.info.site}' ({s.info.channel_names} / {s.info.labels}); "
                "use a plan made for this data"
            )
    plan.save(ctx.run.plan_path)
    ctx.run.log({"phase": "plan", "plan_hash": plan.hash(), "sites": len(ctx.sites),
                 "plan_file": str(path), "secure_aggregation": ctx.secure is not None})
    return plan
