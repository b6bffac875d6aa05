"""What the server checks on the unmasked SUMS of a secure round before it applies them.

Why: under secure aggregation the server never sees one site's update, so ``check_update``
(NaN, shape, norm) cannot run per site any more, and each site's own check (``client/secure.py``)
binds only honest sites. A registered site that skips it — or uploads something that is not a
masked update of this round at all (a replayed vector, random bytes) — was applied as it came
(issue #13: a delta x1e6 took the global weight norm from 25.8 to 1482 in one round). Here the
server checks what it CAN check on the sums, and a round that fails is refused: nothing is
applied, the event is logged, the job retries the round with the model unchanged (``job.py``).

Checks (each names itself in the refusal's reason):

1. **Canary** (``sites`` field, :mod:`fedseg.privacy.aggregates`): every site adds exactly 1,
   masked like everything else, so the unmasked sum must equal the number of survivors. A vector
   not masked for THIS round with THIS round's keys (a replay of last round's upload under this
   round's metadata, a forgery) leaves a uniformly random ring value there: caught with
   probability 1 - 2^-32. It does NOT catch a site that masks a bad update correctly.
2. **Counters**: the summed clip count cannot exceed survivors x values (it did, in the replay),
   and honest rounds clip (almost) nothing (C is chosen far above a coordinate's update): more
   than ``max_clipped_fraction`` of the values clipped means some site sent far more than an
   update. Where case counts are still summed per round (a ``plan_file`` job) they must lie in
   [survivors, ...]. Evaluation sums must be consistent (Dice <= 1 per case, HD95 cases <=
   cases).
3. **The step**: the mean update's L2 norm (a) <= ``max_update_norm`` when the job sets it — every
   honest site checks its own update against it and the mean of vectors with norm <= B has norm
   <= B, so exceeding it proves some site cheated; (b) <= ``max_step_ratio`` x the global
   weights' norm; (c) <= ``max_norm_growth`` x the median of the last accepted rounds' mean
   norms. With differential privacy (a) and (b) become "<= S + the noise's expected norm".

What these checks cannot do (docs/security-notes.md §9): bound ONE site's update. A site that
masks correctly may still contribute anything whose effect on the mean stays under the bounds,
every round. A per-site L2 proof needs zero-knowledge range proofs on committed inputs (RoFL,
Lycklama et al. 2023; ACORN, Bell et al. 2023) or secret-shared proofs between sites (EIFFeL,
Roy Chowdhury et al. 2022) — not built: see the notes for why.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedseg.privacy import aggregates as agg

MAX_ABS_LOSS = 1e4  # |pooled training loss| above this is no training loss of a U-Net
NOISE_SLACK = 6.0  # standard deviations of a chi distribution allowed above its mean


class RobustConfig(BaseModel):
    """``[job.robust]``: the plausibility checks on secure sums and the binding of sites to keys."""

    model_config = ConfigDict(extra="forbid")

    checks: bool = Field(default=True, description="check the unmasked sums before applying them")
    max_clipped_fraction: float = Field(
        default=0.01, ge=0, le=1,
        description="refuse a round whose sites together clipped more than this fraction of "
        "the model's values (honest rounds clip none: secagg_clip is far above an update)")
    max_step_ratio: float = Field(
        default=1.0, gt=0,
        description="refuse a mean update whose L2 norm exceeds this multiple of the global "
        "weights' L2 norm")
    max_norm_growth: float = Field(
        default=10.0, ge=0,
        description="refuse a mean update whose norm exceeds this multiple of the median of "
        "the last `history` accepted rounds (0: off); needs 2 accepted rounds first")
    history: int = Field(default=5, ge=1, description="accepted rounds the growth check uses")
    refused_retries: int = Field(
        default=3, ge=0,
        description="a refused round is retried this often with the model unchanged, then "
        "on_too_few_sites decides")
    require_site_keys: bool = Field(
        default=False,
        description="refuse a node whose authenticated key is not a roster site's (fedseg-server "
        "sets it whenever SuperNode authentication is on); off only for plain-HTTP trials, "
        "whose SuperNodes have throw-away keys")


def robust_config(cfg: object) -> RobustConfig:
    """The job's ``robust`` settings (defaults for a stand-in config without them)."""
    rc = getattr(cfg, "robust", None)
    return rc if isinstance(rc, RobustConfig) else RobustConfig()


def check_sums(
    ints: Mapping[str, np.ndarray], num_clipped: int, survivors: int, float_length: int,
    rc: RobustConfig, dp: bool = False,
) -> list[str]:
    """Problems with the unmasked integer sums (empty: plausible). ``dp``: differential
    privacy on (its clip to S happens before the value clip, which then clips nothing)."""
    problems = []
    if agg.SITES_FIELD in ints:
        got = int(ints[agg.SITES_FIELD][0])
        if got != survivors:
            problems.append(
                f"canary: the masked site counter sums to {got}, not to the {survivors} "
                "survivors; some upload was not masked for this round (a replayed or forged "
                "vector)")
    total = survivors * float_length
    if num_clipped > total:
        problems.append(f"clip count: {num_clipped} clipped values, more than the "
                        f"{survivors} x {float_length} values uploaded")
    elif float_length and num_clipped > rc.max_clipped_fraction * float_length:
        problems.append(
            f"clip count: {num_clipped} of {float_length} values clipped "
            f"({num_clipped / float_length:.1%} > max_clipped_fraction "
            f"{rc.max_clipped_fraction:g}); an honest update clips none")
    if "num_samples" in ints and not dp:
        n = int(ints["num_samples"][0])
        if n < survivors:
            problems.append(f"case count: {n} cases summed over {survivors} sites")
    if "loss" in ints and "num_samples" in ints:  # without counts: check_loss, by the caller
        lo = agg.pooled_loss(ints, int(ints["num_samples"][0]))
        if not math.isfinite(lo) or abs(lo) > MAX_ABS_LOSS:
            problems.append(f"loss: pooled training loss {lo:.4g} is no training loss")
    if "eval_cases" in ints:
        m = int(ints["eval_cases"][0])
        if any(int(d) > m * agg.DICE_SCALE for d in ints["dice"]):
            problems.append("evaluation: a summed Dice exceeds 1 per validation case")
        if any(int(k) > m for k in ints["hd95_cases"]):
            problems.append("evaluation: more HD95 cases than validation cases")
    return problems


def check_loss(loss_sum: float, case_total: int, survivors: int) -> list[str]:
    """Fixed-denominator rounds: Σ n_i·l_i must fit ``case_total`` cases of a plausible loss."""
    if not math.isfinite(loss_sum) or abs(loss_sum) > MAX_ABS_LOSS * max(case_total, survivors):
        return [f"loss: the summed case-weighted loss {loss_sum:.4g} is not that of "
                f"{case_total} cases"]
    return []


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm, in float64, of a dict of tensors (non-finite if any value is)."""
    return float(math.sqrt(sum(agg.sum_of_squares(a) for a in arrays.values())))


def check_step(
    step_norm: float, weight_norm: float, history: Sequence[float], rc: RobustConfig,
    max_update_norm: float | None, dp_bound: float | None = None,
) -> list[str]:
    """Problems with the mean update's norm (module docstring, check 3). ``dp_bound``: with
    differential privacy the only norm check, S plus the noise's expected norm."""
    if not math.isfinite(step_norm):
        return ["step: the mean update is not finite"]
    if dp_bound is not None:
        if step_norm > dp_bound:
            return [f"step: mean update norm {step_norm:.4g} exceeds clip + noise "
                    f"{dp_bound:.4g} (differential privacy)"]
        return []
    problems = []
    if max_update_norm is not None and step_norm > max_update_norm * (1 + 1e-6) + 1e-6:
        problems.append(
            f"step: mean update norm {step_norm:.4g} exceeds max_update_norm "
            f"{max_update_norm:.4g}, which every honest site checks its own update against")
    if weight_norm > 0 and step_norm > rc.max_step_ratio * weight_norm:
        problems.append(
            f"step: mean update norm {step_norm:.4g} exceeds {rc.max_step_ratio:g} x the global "
            f"weights' norm {weight_norm:.4g}")
    recent = list(history)[-rc.history:]
    if rc.max_norm_growth > 0 and len(recent) >= 2:
        med = float(np.median(recent))
        if med > 0 and step_norm > rc.max_norm_growth * med:
            problems.append(
                f"step: mean update norm {step_norm:.4g} is more than {rc.max_norm_growth:g} x "
                f"the median {med:.4g} of the last {len(recent)} accepted rounds")
    return problems


def dp_step_bound(clip_norm: float, noise_std_sum: float, survivors: int, length: int) -> float:
    """Largest plausible norm of an unweighted DP mean: S (the clipped mean) plus the norm of
    the summed noise N(0, σ²I_L) divided by m, with ``NOISE_SLACK`` standard deviations."""
    m = max(1, survivors)
    return clip_norm + noise_std_sum * (math.sqrt(length) + NOISE_SLACK) / m


def model_digest(weights: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the tensors in sorted-key order (name, shape, dtype, bytes): what the test of
    a refused round compares with the checkpoint before it."""
    h = hashlib.sha256()
    for k in sorted(weights):
        a = np.ascontiguousarray(weights[k])
        h.update(f"{k}|{a.shape}|{a.dtype.str}|".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()
