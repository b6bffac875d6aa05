"""Build the segmentation network a plan describes.

MONAI's ``DynUNet`` is nnU-Net's plain U-Net (two conv-norm-lrelu per stage, strided-conv
downsampling, transposed-conv upsampling, deep-supervision heads), so fedseg builds it from the
plan's per-stage kernel sizes, strides and feature counts instead of writing its own network.
"""

from __future__ import annotations

from monai.networks.nets import DynUNet

from fedseg.planning.plan import Plan


def build_network(plan: Plan, config: str = "3d_fullres", deep_supervision: bool = True) -> DynUNet:
    """DynUNet for ``plan.configurations[config]``.

    Deep supervision heads: every decoder stage except the two lowest resolutions gets one,
    as in nnU-Net (``deep_supr_num = n_stages - 2``, at least 1 when the net is that shallow).
    In training mode the network returns a tensor stacked as (B, 1 + deep_supr_num, C, ...);
    in eval mode only the full-resolution output.
    """
    cfg = plan.config(config)
    spatial_dims = len(cfg.patch_size)
    n_supr = max(1, cfg.n_stages - 2)
    return DynUNet(
        spatial_dims=spatial_dims,
        in_channels=len(plan.channel_names),
        out_channels=plan.num_classes,
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


def num_parameters(net) -> int:
    return sum(p.numel() for p in net.parameters())
