"""Benchmark of fedseg's SecAgg(+) crypto at nnU-Net size, in one process (no transport).

Why: Flower's SecAgg+ costs minutes per round at 30M parameters; ours must cost about a second
of CPU per site and at the server. This measures, for n sites (default 5: 4 peers each) and an
L-element model delta (default 30M, the 3d_fullres DynUNet):
- site: masking one update as the ClientApp does it (the delta's tensors, weighted, quantised and
  masked block by block into a buffer reused between rounds: decrypt shares + AES-CTR self mask
  + 4 pairwise masks), and the primitives on one vector; key advertisement and share-key steps;
- server: accumulating the n masked uploads (into a reused buffer), unmasking (Shamir
  reconstruction + removing the masks) and the mean update as float32 tensors, with everyone
  surviving and with one site dropped before upload. Each case runs ``--rounds`` times with the
  same buffers, as a federation does; the figures are of the last round (the first pays the
  buffers' page faults once);
- accuracy: the unmasked mean vs the float64 mean of the clipped deltas, relative to the deltas'
  scale σ (target ≤ 1e-6) and to the clip bound C.

    python bench/secagg_crypto.py --json secagg_bench.json          # 30M × 5, ~1 min on 2 cores
    python bench/secagg_crypto.py --length 1000000 --sites 3 --threshold 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from fedseg.privacy import masking
from fedseg.privacy.buffers import BufferPool
from fedseg.privacy.secagg import (
    SecAggConfig,
    SecAggServer,
    SecAggSite,
    generate_identity_key,
    identity_public_pem,
)


def _t(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=30_000_000)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--threshold", type=int, default=None, help="default: majority")
    ap.add_argument("--sigma", type=float, default=1e-3, help="std of the synthetic deltas")
    ap.add_argument("--clip", type=float, default=1e-2, help="C (default 10 sigma)")
    ap.add_argument("--tensors", type=int, default=30, help="the delta in this many tensors")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per case (last one reported)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    n, L = args.sites, args.length
    t = args.threshold or n // 2 + 1
    names = [f"site{i}" for i in range(n)]
    ids = {s: generate_identity_key() for s in names}
    cfg = SecAggConfig(
        roster={s: identity_public_pem(k) for s, k in ids.items()}, threshold=t, clip=args.clip
    )
    rng = np.random.default_rng(0)  # synthetic data only
    deltas = {s: (rng.standard_normal(L, dtype=np.float32) * np.float32(args.sigma)) for s in names}
    cuts = np.linspace(0, L, args.tensors + 1).astype(int)
    shapes = [(f"t{i:03d}", (int(b - a),)) for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))]
    tensors = {s: {k: deltas[s][a:b] for (k, _), a, b in zip(shapes, cuts[:-1], cuts[1:], strict=True)}
               for s in names}  # views: the same values, as the site's per-tensor delta
    site_pool, server_pool = BufferPool(1), BufferPool(2)
    res: dict = {
        "length": L,
        "sites": n,
        "threshold": t,
        "sigma": args.sigma,
        "clip": args.clip,
        "quantization_step": cfg.quantization_step,
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
    }

    # primitives on one vector
    q = np.empty(L, np.uint32)
    _, res["quantize_s"] = _t(lambda: masking.quantize_into(deltas[names[0]], q, cfg.clip, n))
    _, res["expand_one_mask_s"] = _t(lambda: masking.apply_masks(q, [(bytes(range(32)), 1)]))
    q = None  # free it

    def one_round(round_id: str, uploaders: list[str]) -> dict:
        sites = {s: SecAggSite(cfg, s, ids[s]) for s in names}
        srv = SecAggServer(cfg, round_id, L, pool=server_pool)
        advs, ta = _t(lambda: [sites[s].advertise(round_id) for s in names])
        req = srv.advertisements(advs)
        replies, tk = _t(lambda: [sites[s].share_keys(req) for s in names])
        mreqs = srv.relay_shares(replies)
        mask_s, add_s = [], 0.0
        for s in uploaders:
            buf = site_pool.take(L + 2)
            (meta, vec), dt = _t(lambda s=s, buf=buf: sites[s].mask(
                mreqs[s], tensors[s], {"num_samples": 100}, out=buf))
            mask_s.append(dt)
            _, da = _t(lambda meta=meta, vec=vec: srv.add_masked(meta, vec))
            add_s += da
            del vec
            site_pool.give(buf)
        ureq = srv.unmask_request()
        ureplies = [sites[s].unmask(ureq) for s in uploaders[:t]]
        agg, tu = _t(lambda: srv.unmask(ureplies))
        _, tm = _t(lambda: agg.mean_parts(1.0 / len(uploaders), shapes))
        ref = np.zeros(L, np.float64)
        for s in uploaders:
            ref += np.clip(deltas[s].astype(np.float64), -cfg.clip, cfg.clip)
        err = (agg.float_sum - ref) / len(uploaders)  # error of the mean
        exact = bool(np.abs(agg.float_sum - ref).max() <= agg.error_bound)
        agg.release()
        return {
            "advertise_s_per_site": ta / n,
            "share_keys_s_per_site": tk / n,
            "mask_s_per_site": sorted(mask_s),
            "server_accumulate_s": add_s,
            "server_unmask_s": tu,
            "server_mean_tensors_s": tm,
            "dropped": agg.dropped,
            "num_samples": agg.num_samples,
            "mean_max_abs_err": float(np.abs(err).max()),
            "mean_rms_err": float(np.sqrt(np.mean(err**2))),
            "mean_max_err_rel_sigma": float(np.abs(err).max() / args.sigma),
            "mean_max_err_rel_clip": float(np.abs(err).max() / args.clip),
            "mean_err_bound_rel_sigma": cfg.quantization_step / 2 / args.sigma,
            "exact_within_bound": exact,
        }

    for r in range(args.rounds):
        res["all_survive"] = one_round(f"bench/a{r}", names)
    for r in range(args.rounds):
        res["one_dropped_before_upload"] = one_round(f"bench/d{r}", names[:-1])
    res["rounds"] = args.rounds
    res["tensors"] = args.tensors
    res["masked_upload_bytes"] = 4 * (L + 2)
    res["fp32_bytes"] = 4 * L
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
