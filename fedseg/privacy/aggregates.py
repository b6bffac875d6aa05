"""What the federation sums securely, and how both ends lay it out.

Model update (one training round). Site i masks, as SecAgg's float part (clipped to [-C, C],
fixed point), its weighted delta

    v_i = (n_i / s) · delta_i          n_i = its training cases, s = ``case_scale``

and, as exact integer fields, ``sites`` = 1 (a canary: its sum must equal the number of
survivors, ``server/plausibility.py``) and ``loss`` = [round(n_i·max(l_i, 0)·1e3),
round(n_i·max(-l_i, 0)·1e3)]. The server unmasks only Σ v_i and Σ n_i·l_i and takes
    mean delta = s · Σ v_i / N            N = Σ n_i summed ONCE, with the secure fingerprint
    pooled loss = Σ n_i l_i / N           (only when every fingerprinted site survived)
With all sites this is the case-weighted FedAvg mean, as without SecAgg; when sites drop it is
the fixed-denominator estimator (McMahan et al. 2018, DP-FedAvg): the step shrinks by the
dropped sites' share instead of the server learning Σ n_i over the survivors — which, over two
rounds with different survivors, would give away a site's n_i by differencing (issue #13).
Only a job without a fingerprint (``plan_file``) still sums ``num_samples`` = n_i per round
(``with_counts``: N is unknown there) and divides by it.
Why the public scale s: the value clip C must bound every coordinate of what is masked. Masking
n_i·delta_i would tie C to the (unknown) site sizes; with s = the mean number of training cases
per site (the server knows Σ n from the secure fingerprint sum, not any n_i), n_i/s is about 1
and C bounds the delta itself: choose C above the largest per-coordinate update (a few times
the typical one; the unmasked ``num_clipped`` says how many values were clipped in a round — it
should be 0), knowing the resolution is Δ = C·n/2^31 (``masking``): C = 10, n = 5 gives
Δ ≈ 2.3e-8, far below the size of a useful update. A site with many more cases than s has its
weight's share of the clip.

Evaluation (optional, ``per_site_metrics = false``): instead of sending its Dice/HD95 in clear,
the site adds to the same secure sum ``eval_cases`` = m_i validation cases, ``dice`` =
round(m_i·dice_c·2^16) per class, ``hd95`` = round(m_i·hd95_c·100) and ``hd95_cases`` = m_i per
class where HD95 is finite; the server gets the case-weighted pooled means only — the same
numbers the per-site path pools.

Fingerprint: ``Fingerprint.to_vector()`` exactly encoded (:mod:`fedseg.privacy.exact_sum`) as
the integer field ``fingerprint``, next to ``train_cases`` = n_i (N, released once) and the
``sites`` canary.

Integers are clamped to SecAgg's per-site maximum ⌊(2^32 - 1)/n⌋ (with n = roster size; far
above any realistic value at these scales).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

LOSS_SCALE = 1000.0
DICE_SCALE = float(1 << 16)
HD_SCALE = 100.0
FINGERPRINT_FIELD = "fingerprint"
SITES_FIELD = "sites"  # the canary: every site adds exactly 1
TRAIN_CASES_FIELD = "train_cases"  # summed once, with the fingerprint: N, the fixed denominator


# ---- layouts (the server sends them in the MaskRequest; the site fills them) --------------


def train_int_fields(eval_classes: Sequence[str] = (), with_counts: bool = False) -> dict[str, int]:
    """A training round's integer fields; ``with_counts`` adds ``num_samples`` (module docstring)."""
    fields = {"num_samples": 1} if with_counts else {}
    fields.update({SITES_FIELD: 1, "loss": 2})
    if eval_classes:
        fields.update(eval_int_fields(eval_classes))
    return fields


def eval_int_fields(eval_classes: Sequence[str]) -> dict[str, int]:
    k = len(eval_classes)
    return {SITES_FIELD: 1, "eval_cases": 1, "dice": k, "hd95": k, "hd95_cases": k}


def flat_length(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return int(sum(math.prod(s) for s in shapes.values()))


# ---- site side ---------------------------------------------------------------------------


def _clamp(x: float, int_max: int) -> int:
    return int(min(max(round(x), 0), int_max))


def sum_of_squares(a: np.ndarray, chunk: int = 1 << 20) -> float:
    """Σ a² in float64, chunk by chunk (no full-size float64 copy); NaN or Inf anywhere makes
    the result non-finite, so ``math.isfinite`` of it is also the finiteness check."""
    flat = np.asarray(a).reshape(-1)
    sq = 0.0
    for i in range(0, flat.size, chunk):
        c = flat[i:i + chunk].astype(np.float64)
        sq += float(np.dot(c, c))
    return sq


def eval_ints(
    num_cases: int, dice: Mapping[str, float], hd95: Mapping[str, float],
    eval_classes: Sequence[str], int_max: int,
) -> dict[str, list[int]]:
    d, h, hc = [], [], []
    for c in eval_classes:
        dv = float(dice.get(c, float("nan")))
        d.append(_clamp(num_cases * dv * DICE_SCALE, int_max) if math.isfinite(dv) else 0)
        hv = float(hd95.get(c, float("nan")))
        ok = math.isfinite(hv)
        h.append(_clamp(num_cases * hv * HD_SCALE, int_max) if ok else 0)
        hc.append(num_cases if ok else 0)
    return {SITES_FIELD: [1], "eval_cases": [min(num_cases, int_max)], "dice": d, "hd95": h,
            "hd95_cases": hc}


def train_ints(num_cases: int, loss: float, int_max: int,
               with_counts: bool = False) -> dict[str, list[int]]:
    lo = num_cases * float(loss) * LOSS_SCALE if math.isfinite(loss) else 0.0
    out = {"num_samples": [min(num_cases, int_max)]} if with_counts else {}
    out.update({SITES_FIELD: [1], "loss": [_clamp(lo, int_max), _clamp(-lo, int_max)]})
    return out


# ---- server side -------------------------------------------------------------------------


def unflatten(flat: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for k in sorted(shapes):
        n = math.prod(shapes[k])
        out[k] = np.asarray(flat[pos : pos + n]).reshape(shapes[k])
        pos += n
    if pos != flat.size:
        raise ValueError(f"the summed vector has {flat.size} values, the model {pos}")
    return out


def pooled_loss(ints: Mapping[str, np.ndarray], n: int | None = None) -> float:
    """Σ n_i l_i / n; ``n`` defaults to the summed ``num_samples``."""
    n = int(ints["num_samples"].sum()) if n is None else int(n)
    if n <= 0:
        return float("nan")
    return float((int(ints["loss"][0]) - int(ints["loss"][1])) / LOSS_SCALE / n)


def pooled_eval(ints: Mapping[str, np.ndarray], eval_classes: Sequence[str]) -> dict | None:
    """Case-weighted pooled Dice/HD95 per class from the summed eval fields (None: no cases)."""
    m = int(ints["eval_cases"][0])
    if m <= 0:
        return None
    dice = {c: float(ints["dice"][i]) / DICE_SCALE / m for i, c in enumerate(eval_classes)}
    hd = {}
    for i, c in enumerate(eval_classes):
        k = int(ints["hd95_cases"][i])
        hd[c] = float(ints["hd95"][i]) / HD_SCALE / k if k > 0 else float("nan")
    return {"cases": m, "dice": dice, "hd95": hd}
