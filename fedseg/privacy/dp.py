"""Client-level (site-level) differential privacy for federated rounds; off by default.

What is protected. Each SITE's whole dataset is one "record": the released aggregates (and so
every model derived from them) change little whether or not one site's data took part. This is
user-level DP with user = site, on the model updates. It says nothing about single patients
beyond that (it is stronger: it covers the whole site), nor about anything released outside
the DP aggregate: per-site metrics (e.g. logged Dice), fingerprint histograms and the exact
sum of case counts that SecAgg appends in the clear are NOT covered.

Neighbouring relation (``DPConfig.adjacency``):
- ``"zero_out"`` (default; Kairouz et al. 2021, "Practical and private (deep) learning without
  sampling or shuffling", Def. 1.1): one site's contribution is replaced by the zero vector
  (as if the site had no data). In a cross-silo federation the server knows which sites
  answered, so this, not add/remove of a site, is the meaningful notion; for a sum of clipped
  contributions its L2 sensitivity is S, and it is accounted like add/remove (same RDP, and
  Poisson subsampling of sites is supported).
- ``"replace"``: one site's dataset is replaced by ANY other dataset. Sensitivity 2S, so it is
  accounted with half the noise multiplier; only without site sampling (sample rate 1).

The mechanism (DP-FedAvg, McMahan et al. 2018, "Learning differentially private recurrent
language models"; distributed noise as in Kairouz et al. 2021, "The distributed discrete
Gaussian mechanism"):
1. each site clips its CONTRIBUTION c_k (the vector it masks, i.e. after any weighting) to
   global L2 norm ≤ S (``clip_delta``). Sample-weighting must happen BEFORE the clip (or use
   uniform weights, the server dividing the sum by the number of contributors m): a weight
   applied after the clip would multiply the sensitivity;
2. each site adds N(0, σ_site² I), σ_site = z·S/√n (``add_site_noise``; ``privatize`` does 1+2);
3. SecAgg reveals only Σ_{k∈U} (c_k + N_k) to the server (``secagg.py``).
The noise of the m = |U| surviving sites sums to N(0, m·(zS)²/n · I) — independent Gaussians
add variances — i.e. std zS·√(m/n). Relative to the sensitivity S that is a Gaussian mechanism
with EFFECTIVE noise multiplier
    z_eff = z · √(m / n)                                          (``effective_noise_multiplier``)
which equals z when every site contributes and is LOWER when sites drop out: the server must
account each round with the number of sites that actually contributed (the SecAgg survivors).
A site cannot know m in advance; splitting by the SecAgg threshold t instead of the roster
size n (pass ``n_sites=t``) guarantees z_eff = z·√(m/t) ≥ z for every round that unmasks
(SecAgg needs m ≥ t), at the price of more noise when more than t sites survive.

Trust assumptions:
- Sites are honest: each adds its share of the noise with fresh randomness from the OS CSPRNG
  (never from a server-supplied seed). If c sites collude with the server, their noise is known
  to it and only the others' protects the victim: z_eff = z·√((m − c)/n) (``n_colluding``).
- All sites must use the same S, z and split count. In the federation (``[job.dp]``, see
  :class:`DPSettings`) the SERVER proposes them in each round's ``TrainRequest.dp`` so that all
  sites agree, with n = the number of sites asked in that round; under SecAgg a site refuses an
  n above its own roster's size (a server could otherwise shrink every share of the noise).
  The guarantee is therefore against an honest-but-curious server and against everyone who
  gets the model or the logged aggregates; a server that sets z = 0 on purpose is not
  prevented (a site-side floor read from the site's own configuration would be).
- The guarantee needs the sum to be released through SecAgg: a site's single noisy update has
  only noise std z·S/√n, i.e. multiplier z/√n — much weaker — if anyone sees it alone. Without
  secure aggregation (``secure_aggregation = false``) the server sees exactly that, so the ε
  logged then holds for the model and the pooled records only, with the server trusted.

Weighting. A DP round uses the UNWEIGHTED mean of the clipped, noised deltas: each site masks
(or sends) clip_S(delta) + noise with weight 1 and the server divides the sum by the number m of
contributions, which it knows (the SecAgg survivors). The case-weighted FedAvg mean would break
the analysis twice: a weight n_i/s applied after the clip multiplies site i's sensitivity by
n_i/s (unbounded, and unknown to the accountant), and dividing by Σ n_i makes the normaliser
itself depend on one site's private case count.

Site sampling. Every round asks all connected sites; which sites answer is decided by
availability, not by a secret random draw, and the server sees who answered. Amplification by
subsampling does not apply, so the server accounts every round with sample rate q = 1.0 (the
sites asked over the roster would be an unjustified discount).

What the accountant counts: one step per released aggregate (each successful SecAgg unmask of
a DP-noised update). A round that aborts before unmasking releases nothing. Rounds are
composed with Rényi DP (Mironov 2017) by Google's ``dp-accounting`` library and converted to
(ε, δ); with site sampling (the server picks each site independently with probability q) the
subsampled-Gaussian RDP is used. Picking a fixed number m of N sites is not Poisson sampling:
accounting it as q = m/N is the usual approximation, not a proof.

Caveats of the real-valued analysis (the accountant's ε is that of the idealised mechanism):
- SecAgg clips every value to [-C, C] before fixed-point quantisation. A coordinate of a
  clipped contribution has |c_i| ≤ S, so choosing C from ``secagg_clip_bound`` makes the value
  clip inactive except with probability ``failure_prob`` per round (add it to δ per round);
  the aggregate's ``num_clipped`` must then be 0 in practice.
- Fixed-point rounding (error ≤ m·Δ/2 per coordinate, ~1e-8 of the noise std) is not formally
  accounted; a discrete-noise construction with a proof is in Kairouz, Liu & Steinke 2021.
- Floating-point Gaussian samplers have known precision side channels on a single release
  (Jin et al. 2022); here only sums of several sites' noise, quantised, are ever seen.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.special import ndtri

__all__ = [
    "AccountantState",
    "AccountantStep",
    "DPConfig",
    "DPSettings",
    "JobAccountant",
    "PrivacyAccountant",
    "PrivatizeInfo",
    "add_site_noise",
    "clip_delta",
    "effective_noise_multiplier",
    "noise_multiplier_for_epsilon",
    "privatize",
    "secagg_clip_bound",
    "secure_rng",
    "site_noise_std",
]

Adjacency = Literal["zero_out", "replace"]


class DPConfig(BaseModel):
    """Consortium-wide DP settings (every site reads them from its own configuration)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    clip_norm: float | None = Field(
        default=None, gt=0, description="S: L2 bound on each site's contribution (global over tensors)"
    )
    noise_multiplier: float = Field(
        default=1.0, ge=0, description="z: the SUM over all n sites carries noise std z·S"
    )
    target_delta: float = Field(default=1e-5, gt=0, lt=1, description="δ for the reported ε")
    adjacency: Adjacency = Field(default="zero_out", description="neighbouring relation (module docs)")

    @model_validator(mode="after")
    def _check(self) -> DPConfig:
        if self.clip_norm is not None and not math.isfinite(self.clip_norm):
            raise ValueError("clip_norm must be finite")
        if not math.isfinite(self.noise_multiplier):
            raise ValueError("noise_multiplier must be finite")
        if self.enabled and self.clip_norm is None:
            raise ValueError("clip_norm must be set when differential privacy is enabled")
        return self


# --------------------------------------------------------------------------- site side


def _global_norm(delta: Mapping[str, np.ndarray]) -> float:
    sq = 0.0
    for name, v in delta.items():
        a = np.asarray(v)
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"'{name}' has dtype {a.dtype}; DP needs floating-point tensors")
        f = a.ravel().astype(np.float64, copy=False)
        sq += float(np.dot(f, f))
    return math.sqrt(sq)


def clip_delta(
    delta: Mapping[str, np.ndarray], clip_norm: float
) -> tuple[dict[str, np.ndarray], float, float]:
    """Scale ``delta`` so its global L2 norm (over all tensors) is ≤ ``clip_norm``.

    Returns ``(clipped, scale, original_norm)`` with ``scale = min(1, clip_norm / norm)``;
    ``clipped`` holds new arrays in the input dtypes (unchanged values when ``scale == 1``).
    Raises ``ValueError`` on a non-finite norm (NaN/Inf in the update).
    """
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm must be finite and > 0, got {clip_norm}")
    norm = _global_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("the update holds NaN or Inf; it cannot be clipped")
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    if scale == 1.0:
        return {k: np.array(v, copy=True) for k, v in delta.items()}, 1.0, norm
    out: dict[str, np.ndarray] = {}
    for k, v in delta.items():
        a = np.asarray(v)
        out[k] = (a.astype(np.float64) * scale).astype(a.dtype)
    # float rounding may leave the norm a hair above the bound: shrink once more if so
    n2 = _global_norm(out)
    if n2 > clip_norm:
        fix = clip_norm / n2 * (1 - 1e-7)
        out = {k: (v.astype(np.float64) * fix).astype(v.dtype) for k, v in out.items()}
        scale *= fix
    return out, scale, norm


def secure_rng() -> np.random.Generator:
    """A NumPy generator seeded with 256 bits from the OS CSPRNG (``secrets``).

    PCG64 is not itself a CSPRNG, but its outputs never leave the site unmasked (the server
    sees only SecAgg sums), and the seed is never stored or sent.
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(secrets.randbits(256))))


def site_noise_std(cfg: DPConfig, n_sites: int) -> float:
    """σ_site = z·S/√n_sites: the per-coordinate noise std each site adds."""
    if cfg.clip_norm is None:
        raise ValueError("clip_norm is not set")
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    return cfg.noise_multiplier * cfg.clip_norm / math.sqrt(n_sites)


def add_site_noise(
    delta: Mapping[str, np.ndarray],
    cfg: DPConfig,
    n_sites: int,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Add this site's share of the Gaussian noise: N(0, σ_site²) per coordinate,
    σ_site = z·S/√n_sites, so the sum over ``n_sites`` sites carries std z·S.

    ``n_sites`` is the split count: the roster size n, or the SecAgg threshold t for a noise
    floor that holds under any dropout (module docs). ``rng=None`` (production) draws a fresh
    generator from the OS CSPRNG; pass a generator only in tests. Applies the numbers of
    ``cfg`` whether or not ``cfg.enabled`` — the gate is in :func:`privatize`.
    """
    std = site_noise_std(cfg, n_sites)
    gen = secure_rng() if rng is None else rng
    out: dict[str, np.ndarray] = {}
    for k, v in delta.items():
        a = np.asarray(v)
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"'{k}' has dtype {a.dtype}; DP needs floating-point tensors")
        dt = a.dtype if a.dtype in (np.float32, np.float64) else np.dtype(np.float64)
        noise = gen.standard_normal(a.shape, dtype=dt)
        noise *= dt.type(std)
        out[k] = np.asarray(a + noise).astype(a.dtype, copy=False)
    return out


class PrivatizeInfo(BaseModel):
    """What a site may log about its own DP step (kept on the site: the norm is sensitive)."""

    model_config = ConfigDict(frozen=True)

    original_norm: float
    scale: float
    clipped: bool
    noise_std: float


def privatize(
    contribution: Mapping[str, np.ndarray],
    cfg: DPConfig,
    n_sites: int,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, np.ndarray], PrivatizeInfo | None]:
    """Site entry point: clip the contribution to S, add the site's noise share.

    ``contribution`` is exactly what the site will mask (after any weighting). When DP is
    disabled returns the input unchanged (same arrays) and ``None``.
    """
    if not cfg.enabled:
        return dict(contribution), None
    assert cfg.clip_norm is not None  # guaranteed by DPConfig when enabled
    clipped, scale, norm = clip_delta(contribution, cfg.clip_norm)
    noisy = add_site_noise(clipped, cfg, n_sites, rng)
    return noisy, PrivatizeInfo(
        original_norm=norm, scale=scale, clipped=scale < 1.0, noise_std=site_noise_std(cfg, n_sites)
    )


def secagg_clip_bound(cfg: DPConfig, n_sites: int, num_values: int, failure_prob: float = 1e-12) -> float:
    """A SecAgg value clip C under which no noisy coordinate is clipped except with probability
    ≤ ``failure_prob`` per round (over ``n_sites`` sites × ``num_values`` coordinates):
    C = S + σ_site·Φ⁻¹(1 − failure_prob / (2·n_sites·num_values)), since |c_i| ≤ S.
    Add ``failure_prob`` to δ for each round."""
    if cfg.clip_norm is None:
        raise ValueError("clip_norm is not set")
    if num_values < 1 or not (0 < failure_prob < 1):
        raise ValueError("num_values must be >= 1 and 0 < failure_prob < 1")
    tail = failure_prob / (2.0 * n_sites * num_values)
    return cfg.clip_norm + site_noise_std(cfg, n_sites) * float(-ndtri(tail))


# --------------------------------------------------------------------------- server side


def effective_noise_multiplier(
    noise_multiplier: float, n_split: int, n_contributed: int, n_colluding: int = 0
) -> float:
    """z_eff = z·√((m − c)/n): the noise multiplier of the released sum when each of the
    ``n_split`` = n shares was sized for n sites, m = ``n_contributed`` sites' inputs are in the
    sum and c = ``n_colluding`` of them are assumed to collude with the server (their noise is
    known to it). Sum of m − c independent N(0, (zS)²/n) has variance (m − c)(zS)²/n."""
    if n_split < 1 or n_contributed < 0 or n_colluding < 0:
        raise ValueError("n_split must be >= 1, n_contributed and n_colluding >= 0")
    if noise_multiplier < 0:
        raise ValueError("noise_multiplier must be >= 0")
    honest = max(n_contributed - n_colluding, 0)
    return noise_multiplier * math.sqrt(honest / n_split)


class AccountantStep(BaseModel):
    """``count`` consecutive identical releases."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: float = Field(ge=0, description="z_eff of the released sum")
    sample_rate: float = Field(default=1.0, gt=0, le=1, description="q: P(site is in a round)")
    count: int = Field(default=1, ge=1)


class AccountantState(BaseModel):
    """Serialisable accountant state (checkpoint with the run: ``model_dump_json``)."""

    model_config = ConfigDict(extra="forbid")

    adjacency: Adjacency = "zero_out"
    steps: list[AccountantStep] = Field(default_factory=list)


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    # dp-accounting logs a warning per fractional RDP order it drops for subsampled Gaussians
    # (the order is excluded; the bound stays valid). Keep the run log readable.
    log = logging.getLogger("absl")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


class PrivacyAccountant:
    """(ε, δ) of all released DP aggregates so far, via ``dp_accounting``'s RDP accountant.

    ``step(z_eff, q)`` once per released aggregate (z_eff from
    :func:`effective_noise_multiplier` with the survivors' count); ``epsilon(δ)`` at any time.
    ``state()`` / ``from_state()`` round-trip through :class:`AccountantState`.
    """

    def __init__(self, adjacency: Adjacency = "zero_out") -> None:
        self._state = AccountantState(adjacency=adjacency)
        self._rdp = None  # lazily built dp_accounting RdpAccountant mirroring _state

    # -- bookkeeping
    @property
    def adjacency(self) -> Adjacency:
        return self._state.adjacency

    @property
    def rounds(self) -> int:
        """Number of releases accounted."""
        return sum(s.count for s in self._state.steps)

    def step(self, noise_multiplier_effective: float, sample_rate: float = 1.0, count: int = 1) -> None:
        """Account ``count`` releases of a Gaussian sum with noise multiplier z_eff, each site
        having taken part with probability ``sample_rate`` (1 = all sites every round)."""
        st = AccountantStep(noise_multiplier=noise_multiplier_effective, sample_rate=sample_rate, count=count)
        if not math.isfinite(st.noise_multiplier):
            raise ValueError("noise_multiplier_effective must be finite")
        if self.adjacency == "replace" and st.sample_rate < 1.0:
            raise ValueError("adjacency 'replace' is accounted only without site sampling (sample_rate 1)")
        steps = self._state.steps
        if steps and (steps[-1].noise_multiplier, steps[-1].sample_rate) == (
            st.noise_multiplier,
            st.sample_rate,
        ):
            steps[-1] = steps[-1].model_copy(update={"count": steps[-1].count + st.count})
        else:
            steps.append(st)
        if self._rdp is not None:
            self._compose(self._rdp, st)

    def state(self) -> AccountantState:
        return self._state.model_copy(deep=True)

    @classmethod
    def from_state(cls, state: AccountantState | Mapping | str) -> PrivacyAccountant:
        if isinstance(state, str):
            state = AccountantState.model_validate_json(state)
        elif not isinstance(state, AccountantState):
            state = AccountantState.model_validate(state)
        acc = cls(adjacency=state.adjacency)
        for s in state.steps:
            acc.step(s.noise_multiplier, s.sample_rate, s.count)
        return acc

    # -- accounting
    def _event(self, st: AccountantStep):  # -> dp_accounting.DpEvent
        import dp_accounting as dpa

        z = st.noise_multiplier / 2.0 if self.adjacency == "replace" else st.noise_multiplier
        if z == 0.0:
            return dpa.NonPrivateDpEvent()
        ev = dpa.GaussianDpEvent(z)
        if st.sample_rate < 1.0:
            ev = dpa.PoissonSampledDpEvent(st.sample_rate, ev)
        return dpa.SelfComposedDpEvent(ev, st.count)

    def _compose(self, rdp, st: AccountantStep) -> None:
        with _quiet_absl():
            rdp.compose(self._event(st))

    def _accountant(self):
        if self._rdp is None:
            from dp_accounting import NeighboringRelation
            from dp_accounting.rdp import RdpAccountant

            rel = (
                NeighboringRelation.REPLACE_ONE
                if self.adjacency == "replace"
                else NeighboringRelation.REPLACE_SPECIAL
            )
            rdp = RdpAccountant(neighboring_relation=rel)
            for st in self._state.steps:
                self._compose(rdp, st)
            self._rdp = rdp
        return self._rdp

    def epsilon(self, delta: float) -> float:
        """ε such that all releases so far are (ε, δ)-DP (site level); 0 before any release,
        ``inf`` if any release had no noise."""
        if not (0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self._state.steps:
            return 0.0
        with _quiet_absl():
            return float(self._accountant().get_epsilon(delta))


# --------------------------------------------------------------------------- job level


@functools.lru_cache(maxsize=64)
def noise_multiplier_for_epsilon(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sample_rate: float = 1.0,
    adjacency: Adjacency = "zero_out",
    max_multiplier: float = 1e4,
) -> float:
    """The smallest noise multiplier z (to 0.1 %) for which ``rounds`` releases, accounted by
    :class:`PrivacyAccountant`, stay within (``target_epsilon``, ``delta``). ValueError when no
    z up to ``max_multiplier`` does."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")

    def eps(z: float) -> float:
        acc = PrivacyAccountant(adjacency)
        acc.step(z, sample_rate=sample_rate, count=rounds)
        return acc.epsilon(delta)

    if eps(max_multiplier) > target_epsilon:
        raise ValueError(
            f"target_epsilon {target_epsilon:g} at delta {delta:g} over {rounds} round(s) needs a "
            f"noise multiplier above {max_multiplier:g}; raise target_epsilon or lower rounds"
        )
    lo, hi = 1e-3, max_multiplier  # ε(lo) is astronomically large for any sensible target
    if eps(lo) <= target_epsilon:
        return lo
    while hi / lo > 1.001:  # geometric bisection; ε falls as z grows; keep ε(hi) <= target
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


class DPSettings(BaseModel):
    """``[job.dp]``: differential privacy of a federated job (off by default; module docs).

    Set ``clip_norm`` (S, the L2 bound of each site's update) and either ``noise_multiplier``
    (z: the noise in the SUM of a round has std z·S) or ``target_epsilon`` (z is then the
    smallest one that keeps ``rounds`` full rounds within (target_epsilon, delta), sample rate
    1; rounds with dropouts carry less noise, so the logged ε can end above the target).

    Under secure aggregation every value a site masks is clipped to [-secagg_clip, secagg_clip]
    first: keep ``secagg_clip`` above S plus several per-site noise stds z·S/√n
    (:func:`secagg_clip_bound`); the pooled record's ``secagg.num_clipped`` must stay 0."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    clip_norm: float | None = Field(default=None, gt=0, description="S: L2 bound per site update")
    noise_multiplier: float | None = Field(
        default=None, gt=0, description="z: noise std of each round's sum is z·S")
    target_epsilon: float | None = Field(
        default=None, gt=0, description="instead of noise_multiplier: ε after all rounds")
    delta: float = Field(default=1e-5, gt=0, lt=1, description="δ of the reported ε")
    adjacency: Adjacency = Field(default="zero_out", description="neighbouring relation")

    @model_validator(mode="after")
    def _check(self) -> DPSettings:
        for name in ("clip_norm", "noise_multiplier", "target_epsilon"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"dp.{name} must be finite")
        if not self.enabled:
            return self
        if self.clip_norm is None:
            raise ValueError("dp.clip_norm must be set when dp.enabled is true: it is the L2 "
                             "norm each site clips its update to")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("with dp.enabled set exactly one of dp.noise_multiplier and "
                             "dp.target_epsilon")
        return self

    def resolve(self, rounds: int) -> DPConfig:
        """The :class:`DPConfig` the job runs with (``target_epsilon`` turned into z)."""
        if not self.enabled:
            return DPConfig()
        z = self.noise_multiplier
        if z is None:
            assert self.target_epsilon is not None
            z = noise_multiplier_for_epsilon(self.target_epsilon, self.delta, rounds, 1.0,
                                             self.adjacency)
        return DPConfig(enabled=True, clip_norm=self.clip_norm, noise_multiplier=z,
                        target_delta=self.delta, adjacency=self.adjacency)


class JobAccountant:
    """The server's DP bookkeeping for one job: one accountant step per released aggregate and
    the fields of the pooled train record (``record``). The state is written to ``path`` after
    every step, so a resumed job goes on composing (a round released before a crash and run
    again after it is counted twice: conservative, since the first sum was seen)."""

    def __init__(self, cfg: DPConfig, path: Path | None = None, resume: bool = False) -> None:
        if not cfg.enabled or cfg.clip_norm is None:
            raise ValueError("JobAccountant needs an enabled DPConfig")
        self.config = cfg
        self.path = Path(path) if path is not None else None
        self.accountant = PrivacyAccountant(cfg.adjacency)
        if resume and self.path is not None and self.path.is_file():
            saved = json.loads(self.path.read_text())
            state = AccountantState.model_validate(saved["accountant"])
            if state.adjacency != cfg.adjacency:
                raise ValueError(f"{self.path}: accounted with adjacency {state.adjacency!r}, "
                                 f"the job now says {cfg.adjacency!r}; cannot resume")
            self.accountant = PrivacyAccountant.from_state(state)
        self.epsilon = self.accountant.epsilon(cfg.target_delta)

    def release(self, n_split: int, n_contributed: int) -> dict[str, float | int]:
        """Account one released sum of ``n_contributed`` sites' updates, each noised for a split
        over ``n_split`` sites; returns the record fields: ``dp_epsilon`` (cumulative, at
        ``dp_delta``), ``dp_sigma`` (z_eff, the noise multiplier of this sum relative to the
        clip norm), ``dp_noise_std`` (z_eff·S, per value of the sum) and ``dp_releases``."""
        z_eff = effective_noise_multiplier(self.config.noise_multiplier, n_split, n_contributed)
        self.accountant.step(z_eff, sample_rate=1.0)
        self.epsilon = self.accountant.epsilon(self.config.target_delta)
        self._save()
        assert self.config.clip_norm is not None
        return {**self.record(), "dp_sigma": z_eff, "dp_noise_std": z_eff * self.config.clip_norm}

    def record(self) -> dict[str, float | int]:
        """Fields of a pooled record that released nothing new (ε so far)."""
        return {"dp_epsilon": self.epsilon, "dp_delta": self.config.target_delta,
                "dp_releases": self.accountant.rounds}

    def _save(self) -> None:
        if self.path is None:
            return
        text = json.dumps({"config": self.config.model_dump(),
                           "accountant": self.accountant.state().model_dump()}, indent=1)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, self.path)
