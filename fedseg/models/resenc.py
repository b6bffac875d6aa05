"""nnU-Net's ``ResidualEncoderUNet`` (the ResEnc presets' network) behind fedseg's network API.

The network is ``dynamic_network_architectures``' own class — nnU-Net's reference
implementation, with nnU-Net's arguments (``nnUNetPlannerResEncM``'s ``arch_kwargs``: conv
bias, InstanceNorm eps 1e-5 affine, LeakyReLU 0.01 in place) and nnU-Net's initialisation
(He 1e-2, the last norm of every residual block zeroed) — so its ``state_dict`` keys are
nnU-Net's too. This module only adds what fedseg's trainer and predictor read from a network
(``fedseg.models.network``):

- ``forward(x)``: the full-resolution logits (what sliding-window prediction calls);
- ``forward_heads(x)``: in training mode with deep supervision, (full-resolution logits,
  head 1, head 2, ...) at the heads' own resolutions, else ``(logits,)`` — the order and
  resolutions MONAI's DynUNet heads have in fedseg, so ``DeepSupervisionLoss`` is unchanged;
- ``deep_supervision`` and ``deep_supr_num`` (heads besides the full-resolution output):
  nnU-Net's decoder supervises every decoder stage, i.e. ``n_stages - 2`` heads, DynUNet's
  count in ``build_network``.

Weights transport needs nothing here: the decoder holds the encoder as a submodule (its
weights appear twice in ``state_dict``), which ``network.aliases`` finds like DynUNet's.
"""

from __future__ import annotations

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from fedseg.planning.plan import ConfigurationPlan


class ResEncUNet(ResidualEncoderUNet):
    """``ResidualEncoderUNet`` for one plan configuration, with fedseg's network API."""

    def __init__(self, cfg: ConfigurationPlan, in_channels: int, out_channels: int,
                 deep_supervision: bool = True) -> None:
        if cfg.n_blocks_per_stage is None:  # a PlainConvUNet configuration
            raise ValueError("ResEncUNet needs a ResidualEncoderUNet configuration")
        dim = len(cfg.patch_size)
        super().__init__(
            input_channels=in_channels,
            n_stages=cfg.n_stages,
            features_per_stage=cfg.features_per_stage,
            conv_op=nn.Conv3d if dim == 3 else nn.Conv2d,
            kernel_sizes=cfg.kernel_sizes,
            strides=cfg.strides,
            n_blocks_per_stage=cfg.n_blocks_per_stage,
            num_classes=out_channels,
            n_conv_per_stage_decoder=cfg.n_conv_per_stage_decoder,
            conv_bias=True,
            norm_op=nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d,
            norm_op_kwargs={"eps": 1e-5, "affine": True},
            dropout_op=None,
            dropout_op_kwargs=None,
            nonlin=nn.LeakyReLU,
            nonlin_kwargs={"inplace": True},
            deep_supervision=False,
        )
        self.apply(self.initialize)
        self.deep_supervision = deep_supervision and cfg.n_stages > 2
        self.deep_supr_num = max(1, cfg.n_stages - 2)

    def _decode(self, x: torch.Tensor, heads: bool) -> torch.Tensor | list[torch.Tensor]:
        self.decoder.deep_supervision = heads  # the package's switch: all stages or the last
        return self.decoder(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._decode(x, heads=False)
        assert isinstance(out, torch.Tensor)
        return out

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.deep_supervision and self.training:
            return tuple(self._decode(x, heads=True))
        return (self.forward(x),)
