"""Build the segmentation network a plan describes.

MONAI's ``DynUNet`` is nnU-Net's plain U-Net (two conv-norm-lrelu per stage, strided-conv
downsampling, transposed-conv upsampling, deep-supervision heads), so fedseg builds it from the
plan's per-stage kernel sizes, strides and feature counts instead of writing its own network.
A configuration whose ``architecture`` is ``ResidualEncoderUNet`` (the ResEnc presets) gets
nnU-Net's own residual-encoder network instead (``fedseg.models.resenc``).

What the trainer, the loss, prediction and the weights transport use of a network — all a
network built here provides: ``net(x)`` in eval mode (full-resolution logits),
:func:`forward_heads` (deep-supervision outputs at their own resolutions),
``net.deep_supervision`` / ``net.deep_supr_num``, and its ``state_dict`` (:func:`weights_of`,
:func:`load_weights`).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet

from fedseg.planning.plan import Plan


def build_network(plan: Plan, config: str | None = None,
                  deep_supervision: bool = True) -> torch.nn.Module:
    """DynUNet (or, for a ResidualEncoderUNet configuration, ``resenc.ResEncUNet``) for
    ``plan.configurations[config]``.

    Deep supervision heads: every decoder stage except the two lowest resolutions gets one,
    as in nnU-Net (``deep_supr_num = n_stages - 2``, at least 1 when the net is that shallow).
    In training mode the network returns a tensor stacked as (B, 1 + deep_supr_num, C, ...);
    in eval mode only the full-resolution output.
    """
    cfg = plan.config(config)
    if cfg.architecture == "ResidualEncoderUNet":
        from fedseg.models.resenc import ResEncUNet  # the package only where it is used

        return ResEncUNet(cfg, len(plan.channel_names), plan.num_outputs, deep_supervision)
    spatial_dims = len(cfg.patch_size)
    n_supr = max(1, cfg.n_stages - 2)
    return DynUNet(
        spatial_dims=spatial_dims,
        in_channels=len(plan.channel_names),
        out_channels=plan.num_outputs,
        kernel_size=cfg.kernel_sizes,
        strides=cfg.strides,
        upsample_kernel_size=cfg.strides[1:],
        filters=cfg.features_per_stage,
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=deep_supervision and cfg.n_stages > 2,
        deep_supr_num=n_supr,
        res_block=False,
    )


def forward_heads(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(full-resolution logits, head 1, head 2, ...) in training mode with deep supervision,
    each head at its own resolution; ``(logits,)`` otherwise.

    DynUNet: its own layers run without its forward, which would upsample every head to full
    resolution and stack them (nnU-Net downsamples the target instead, see
    ``fedseg.training.trainer``). Other networks provide ``forward_heads`` themselves."""
    if not isinstance(net, DynUNet):
        return net.forward_heads(x)
    out = net.output_block(net.skip_layers(x))
    if net.deep_supervision and net.training:
        return (out, *net.heads)
    return (out,)


def num_parameters(net) -> int:
    return sum(p.numel() for p in net.parameters())


def aliases(net) -> dict[str, str]:
    """``state_dict`` keys whose tensor IS an earlier key's tensor → that key.

    Why: DynUNet keeps its encoder/decoder twice in the module tree (``skip_layers`` holds the
    very modules of ``input_block``/``downsamples``/``bottleneck``/``upsamples``), so its
    ``state_dict`` lists every weight twice — 2× the bytes in every model and update sent, in
    checkpoints and in the server's sums. fedseg's weights are the state dict WITHOUT these
    aliases (:func:`weights_of`); :func:`load_weights` puts them back before loading."""
    seen: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for k, v in net.state_dict(keep_vars=True).items():
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if v.numel() and ident in seen:
            out[k] = seen[ident]
        else:
            seen[ident] = k
    return out


def weights_of(net) -> dict:
    """The network's state dict without aliased entries (tensors, not copied)."""
    skip = aliases(net)
    return {k: v for k, v in net.state_dict().items() if k not in skip}


def load_weights(net, weights) -> None:
    """``net.load_state_dict(weights, strict=True)`` for weights with or without the aliased
    entries (bundles written before fedseg dropped them have both)."""
    full = dict(weights)
    for alias, key in aliases(net).items():
        if alias not in full and key in full:
            full[alias] = full[key]
    net.load_state_dict(full, strict=True)
