"""Local training the nnU-Net way, as a function the federation can call once per round.

Why a ``LocalTrainer`` with all its state on disk: Flower starts a fresh ClientApp process for
every message, so nothing survives in memory between rounds. Each call of
:meth:`LocalTrainer.train_iterations` therefore reads ``STATE_DIR/checkpoint.pt`` (model,
SGD momentum, RNG, the site's iteration counter), trains ``k`` iterations from the global
weights it is given at the learning rate the GLOBAL progress implies, and writes the state back
atomically (temporary file, fsync, rename: a crash leaves the previous state, never half a
file). The single-site ``fedseg train`` (``fedseg.training.single_site``) is the same trainer
with the checkpoint in the model folder, so an interrupted run resumes where it stopped.

nnU-Net v2 recipe (``nnUNetTrainer``), kept: SGD Nesterov, momentum 0.99, weight decay 3e-5,
initial LR 0.01 with the poly schedule ``lr = 0.01 * (1 - it / total) ** 0.9``, gradient norm
clipped at 12, Dice (background excluded, batch Dice per plan) + cross-entropy, deep
supervision weights ``1 / 2**i`` with the lowest resolution zeroed and normalised, 1/3
foreground oversampling, nnU-Net's augmentations (``fedseg.training.augment``).

Deep supervision: MONAI's ``DynUNet`` upsamples every head's logits to full resolution (nearest)
and stacks them, so a loss on its output costs ``n_heads`` full-resolution Dice+CE passes and
a (B, heads, C, 128^3) tensor. nnU-Net instead DOWNSAMPLES THE TARGET to each head's resolution
(nearest-exact). fedseg does nnU-Net's, which is both the reference behaviour and cheaper:
:class:`DeepSupervisionNet` runs DynUNet's own layers and returns the heads at their native
resolution (a ResEnc plan's ``ResidualEncoderUNet`` does the same itself:
``fedseg.models.resenc``); the loss downsamples the (int) target on the device, which costs
next to nothing. Weights are the network's own (``state_dict`` keys unchanged) so bundles and
aggregation do not see the wrapper.

Labels outside the body (-1 after nnU-Net's crop) and padding (-1) count as background, as in
nnU-Net (``RemoveLabelTansform(-1, 0)``); ``TrainConfig.ignore_outside`` excludes them from the
loss instead.

GPU: bf16 autocast (no grad scaler needed), cuDNN benchmark, optional ``torch.compile`` of the
network (worth ~1.7x on an H100, but compiling costs a minute or more per process: worth it for
long single-site runs, rarely for one short federated round). The loss is accumulated on the
device, so the training loop never waits for the GPU except when it reports.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedseg.errors import FedsegError
from fedseg.models.network import build_network, forward_heads, load_weights, weights_of
from fedseg.planning.plan import Plan
from fedseg.training.augment import AugmentConfig, DeviceAugmenter, spatial_setup
from fedseg.training.losses import (  # noqa: F401 - re-exported: tests and benches use them
    DeepSupervisionLoss,
    DiceCELoss,
    deep_supervision_weights,
    make_loss,
    mark_ignored,
)
from fedseg.training.sampling import DevicePrefetcher, PatchSampler, batch_iterator

STATE_FILE = "checkpoint.pt"
STATE_FORMAT = 1


class TrainConfig(BaseModel):
    """How a site trains; defaults are nnU-Net v2's."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(
        default=None, description="plan configuration to train; None: the plan's default")
    initial_lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.99, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(default=3e-5, ge=0)
    total_iterations: int = Field(
        default=250_000, ge=1, description="poly schedule length (nnU-Net: 1000 epochs x 250)"
    )
    batch_size: int | None = Field(default=None, ge=1, description="default: the plan's")
    patch_size: list[int] | None = Field(default=None, description="default: the plan's")
    oversample_foreground: float = Field(default=0.33, ge=0, le=1)
    augment: bool = True
    deep_supervision: bool = True
    ignore_outside: bool = Field(
        default=False, description="exclude label -1 (outside body / padding) from the loss"
    )
    device: str = Field(default="auto", description='"auto", "cpu", "cuda", "cuda:1", ...')
    amp: bool = Field(default=True, description="bf16 autocast on CUDA (ignored on CPU)")
    compile: bool = Field(default=False, description="torch.compile the network (CUDA only)")
    num_workers: int | None = Field(default=None, ge=0, description="loader processes; None=auto")
    seed: int = Field(default=0, ge=0)
    save_weights: bool = Field(
        default=True, description="keep the network's weights in the saved state; a federated "
        "site does not (the server sends the weights every round: half the state to write)")
    grad_clip: float = Field(default=12.0, gt=0)
    checkpoint_every: int = Field(default=250, ge=1, description="train_local: iterations")


class TrainResult(BaseModel):
    """What one call of :meth:`LocalTrainer.train_iterations` reports (weights on the CPU)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    weights: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)
    loss: float
    iterations: int
    iteration: int = Field(description="the site's iteration counter after this call")
    num_cases: int
    seconds: float
    iterations_per_s: float
    lr_first: float
    lr_last: float


# --------------------------------------------------------------------------------------------
# schedule and loss


def poly_lr(initial_lr: float, iteration: int, total_iterations: int, exponent: float = 0.9) -> float:
    """nnU-Net's ``PolyLRScheduler``: ``initial * (1 - it / total) ** 0.9`` (0 past the end)."""
    frac = min(max(iteration, 0), total_iterations) / total_iterations
    return initial_lr * (1 - frac) ** exponent


class DeepSupervisionNet(torch.nn.Module):
    """Returns (full-res logits, head 1, head 2, ...) at the heads' own resolutions
    (``network.forward_heads``; DynUNet's forward would upsample and stack them)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return forward_heads(self.net, x)


# --------------------------------------------------------------------------------------------
# helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise FedsegError(f"device '{name}': not a torch device (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FedsegError(f"device '{name}': CUDA is not available here; use --device cpu")
    return dev


def _auto_workers(device: torch.device) -> int:
    if device.type != "cuda":
        return 0  # a background thread; worker processes would fight the CPU step for cores
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 2
    return max(1, min(8, cpus - 2))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name, fsync, rename: readers see the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable where possible
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# the trainer


class LocalTrainer:
    """One site's trainer; all state between calls lives in ``state_dir/checkpoint.pt``."""

    def __init__(
        self,
        plan: Plan,
        preprocessed_dir: str | Path,
        state_dir: str | Path,
        config: TrainConfig | None = None,
        case_ids: Sequence[str] | None = None,
    ) -> None:
        """``case_ids``: train on these cached cases only (a split); default all of them."""
        self.plan = plan
        self.cfg = cfg = config or TrainConfig()
        self.device = resolve_device(cfg.device)
        self.config_name = cfg.config or plan.default_configuration
        cplan = plan.config(self.config_name)
        self.patch_size = list(cfg.patch_size or cplan.patch_size)
        self.batch_size = int(cfg.batch_size or cplan.batch_size)
        if len(self.patch_size) != len(cplan.patch_size):
            raise FedsegError(
                f"patch size {self.patch_size}: configuration '{self.config_name}' is "
                f"{len(cplan.patch_size)}D; give {len(cplan.patch_size)} values"
            )
        # a 2d configuration samples (1, y, x) boxes from the stored (C, z, y, x) arrays — one
        # slice — which nnU-Net's "dummy 2D" augmentation then treats in-plane; the slice axis
        # is dropped before the network (fedseg.training.spatial has the whole rule)
        self.slices = len(self.patch_size) == 2
        sample_patch = [1, *self.patch_size] if self.slices else self.patch_size
        for ax, p in enumerate(self.patch_size):
            div = math.prod(s[ax] if isinstance(s, list) else s for s in cplan.strides)
            if p % div:
                raise FedsegError(
                    f"patch size {self.patch_size}: axis {ax} must be a multiple of {div} "
                    "(the network's total downsampling)"
                )
        self.state_dir = Path(state_dir)
        self.state_path = self.state_dir / STATE_FILE
        self.cuda = self.device.type == "cuda"
        self.amp = cfg.amp and self.cuda
        if self.cuda:
            torch.backends.cudnn.benchmark = True

        torch.manual_seed(cfg.seed)  # the same initial weights at every site with this seed
        self.net = build_network(plan, self.config_name, cfg.deep_supervision).to(self.device)
        self.model = DeepSupervisionNet(self.net)
        self.model.train()
        n_out = (1 + self.net.deep_supr_num) if self.net.deep_supervision else 1
        self.layout = plan.layout
        ignore = cfg.ignore_outside or self.layout.ignore_label is not None
        self.loss_fn = DeepSupervisionLoss(
            make_loss(self.layout, cplan.batch_dice, ignore), deep_supervision_weights(n_out)
        )
        self.optimizer = torch.optim.SGD(
            self.net.parameters(), lr=cfg.initial_lr, momentum=cfg.momentum,
            nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
        )
        aug = AugmentConfig() if cfg.augment else None
        self.setup = spatial_setup(sample_patch, AugmentConfig(), cfg.augment)
        self.sampler = PatchSampler(
            preprocessed_dir, self.setup, self.batch_size, cfg.oversample_foreground, aug, cfg.seed,
            case_ids=case_ids,
        )
        # the warp one-hot encodes label VALUES 0..max (the ignore label included; values need
        # not be consecutive), not the network's outputs
        max_value = max(v for val in plan.labels.values()
                        for v in (val if isinstance(val, list) else [val]))
        self.augmenter = DeviceAugmenter(
            self.setup, max_value + 1, self.device,
            mask_channels=[c for c, m in enumerate(cplan.use_mask_for_norm) if m],
        )
        self.num_workers = cfg.num_workers if cfg.num_workers is not None else _auto_workers(
            self.device
        )
        self.iteration = 0
        self._forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = self.model
        self._compiled = False
        self._compile_checked = False
        if cfg.compile and self.cuda:
            self._forward = torch.compile(self.model)
            self._compiled = True
        self.load_state()

    # ---- state on disk

    @property
    def num_cases(self) -> int:
        return len(self.sampler.case_ids)

    def load_state(self) -> bool:
        """Restore model, optimiser, RNG and counter from ``checkpoint.pt``; False if none."""
        if not self.state_path.is_file():
            return False
        try:
            st = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user problem
            raise FedsegError(
                f"{self.state_path}: unreadable training state ({type(err).__name__}); "
                "delete it to start over"
            ) from None
        if st.get("plan_hash") != self.plan.hash():
            raise FedsegError(
                f"{self.state_path}: made with a different plan; use a new folder or delete it"
            )
        if st.get("model") is not None:
            load_weights(self.net, st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.iteration = int(st["iteration"])
        torch.set_rng_state(st["rng_cpu"])
        if self.cuda and st.get("rng_cuda") is not None:
            with contextlib.suppress(RuntimeError):
                torch.cuda.set_rng_state(st["rng_cuda"], self.device)
        return True

    def save_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        opt = self.optimizer.state_dict()
        opt["state"] = {
            k: {n: (t.detach().cpu() if torch.is_tensor(t) else t) for n, t in v.items()}
            for k, v in opt["state"].items()
        }
        atomic_torch_save(
            {
                "format": STATE_FORMAT,
                "plan_hash": self.plan.hash(),
                "config": self.config_name,
                "iteration": self.iteration,
                "model": self.weights() if self.cfg.save_weights else None,
                "optimizer": opt,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(self.device) if self.cuda else None,
            },
            self.state_path,
        )

    def weights(self) -> dict[str, torch.Tensor]:
        """The network's weights copied to the CPU (DynUNet's own keys, without the aliased
        ``skip_layers`` entries: ``models/network.py``)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in weights_of(self.net).items()}

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        try:
            load_weights(self.net, weights)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise FedsegError(f"weights do not fit the plan's network: {first}") from None

    # ---- training

    def _step(
        self, image: torch.Tensor, seg: torch.Tensor, lr: float,
        prox: list[torch.Tensor] | None = None, mu: float = 0.0,
    ) -> torch.Tensor:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            outputs = self._forward(image)
            loss = self.loss_fn(outputs, seg)
        if prox is not None:
            loss = loss + 0.5 * mu * sum(
                (p.float() - q).pow(2).sum()
                for p, q in zip(self.net.parameters(), prox, strict=True)
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        return loss.detach()

    def train_step(
        self, image: torch.Tensor, seg: torch.Tensor, lr: float,
        prox: list[torch.Tensor] | None = None, mu: float = 0.0,
    ) -> torch.Tensor:
        """One SGD step on a batch already on the device (seg: -1 handled per config).
        Returns the loss as a device tensor (no sync). The first compiled step falls back to
        eager, with a warning, if ``torch.compile`` fails."""
        if self._compiled and not self._compile_checked:
            self._compile_checked = True
            try:
                return self._step(image, seg, lr, prox, mu)
            except Exception as err:  # noqa: BLE001 - dynamo/inductor raise many types
                warnings.warn(
                    f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); "
                    "training eager",
                    stacklevel=2,
                )
                self._forward = self.model
                self._compiled = False
        return self._step(image, seg, lr, prox, mu)

    def run(
        self,
        iterations: int,
        global_iteration_start: int,
        global_total_iterations: int,
        checkpoint_every: int | None = None,
        progress: Callable[[int, float | None], None] | None = None,
        proximal_mu: float = 0.0,
        report_every: int | None = 10,
    ) -> TrainResult:
        """Train ``iterations`` steps; step ``j`` uses the LR of global iteration
        ``global_iteration_start + j``. Saves state every ``checkpoint_every`` steps and at the end.
        ``progress(steps_done, loss)`` is called after every step; ``loss`` is the mean over the
        last ``report_every`` steps on those steps (reading it waits for the GPU), else None."""
        if iterations < 0:
            raise FedsegError(f"iterations must be >= 0, got {iterations}")
        if global_total_iterations < 1:
            raise FedsegError(f"total iterations must be >= 1, got {global_total_iterations}")
        lrs = [
            poly_lr(self.cfg.initial_lr, global_iteration_start + j, global_total_iterations)
            for j in range(iterations)
        ]
        prox = None
        if proximal_mu > 0:
            prox = [p.detach().float().clone() for p in self.net.parameters()]
        self.model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        since_report = torch.zeros((), device=self.device)
        if iterations > 0:
            batches = DevicePrefetcher(
                batch_iterator(
                    self.sampler, self.iteration, iterations, self.num_workers,
                    pin_memory=self.cuda,
                ),
                self.device,
            )
            for j, batch in enumerate(batches):
                image, seg = self.augmenter(batch, augment=self.cfg.augment)
                seg = mark_ignored(seg, self.layout, self.cfg.ignore_outside)
                if self.slices:
                    image, seg = image[:, :, 0], seg[:, :, 0]
                loss = self.train_step(image, seg, lrs[j], prox, proximal_mu)
                loss_sum += loss
                since_report += loss
                self.iteration += 1
                if checkpoint_every and (j + 1) % checkpoint_every == 0 and j + 1 < iterations:
                    self.save_state()
                if progress is not None:
                    k = report_every or 0
                    report = k > 0 and ((j + 1) % k == 0 or j + 1 == iterations)
                    n = ((j + 1) % k or k) if k else 1  # steps summed in since_report
                    progress(j + 1, float(since_report) / n if report else None)
                    if report:
                        since_report.zero_()
        mean_loss = float(loss_sum) / iterations if iterations else float("nan")
        if self.cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.save_state()
        return TrainResult(
            weights=self.weights(),
            loss=mean_loss,
            iterations=iterations,
            iteration=self.iteration,
            num_cases=self.num_cases,
            seconds=seconds,
            iterations_per_s=iterations / seconds if seconds > 0 and iterations else 0.0,
            lr_first=lrs[0] if lrs else 0.0,
            lr_last=lrs[-1] if lrs else 0.0,
        )

    def train_iterations(
        self,
        weights: dict[str, torch.Tensor] | None,
        iterations: int,
        global_iteration_start: int,
        global_total_iterations: int,
        proximal_mu: float = 0.0,
        reset_momentum: bool = False,
    ) -> TrainResult:
        """One federated round at this site: ``iterations`` steps from ``weights`` (None: keep
        the current ones) with the poly LR of the global progress; state saved to disk.
        ``proximal_mu > 0`` adds FedProx's ``mu/2 * ||w - w_global||^2``; ``reset_momentum``
        starts the round with empty SGD momentum buffers."""
        if weights is not None:
            self.set_weights(weights)
        if reset_momentum:
            self.optimizer.state.clear()
        return self.run(
            iterations, global_iteration_start, global_total_iterations,
            proximal_mu=proximal_mu,
        )
