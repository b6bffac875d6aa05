"""fedseg's weights are DynUNet's state dict WITHOUT its aliased entries (``skip_layers`` holds
the very modules of the encoder/decoder again): half the bytes in every message, checkpoint and
sum, and loading them (or an older bundle's full state dict) gives the same network."""

from __future__ import annotations

import torch
from test_trainer import tiny_plan

from fedseg.models.network import aliases, build_network, load_weights, num_parameters, weights_of


def test_weights_have_no_aliases_and_load_back_exactly() -> None:
    plan = tiny_plan(features=(4, 8, 16, 32))
    torch.manual_seed(0)
    net = build_network(plan)
    w = weights_of(net)
    assert aliases(net), "DynUNet repeats its modules under skip_layers"
    assert not any(k.startswith("skip_layers.") for k in w)
    # every parameter once: as many values as the network has parameters (+ small buffers)
    n_params = sum(v.numel() for k, v in w.items() if v.is_floating_point())
    assert n_params == num_parameters(net)
    assert sum(v.numel() for v in net.state_dict().values()) > 1.9 * n_params
    torch.manual_seed(1)
    other = build_network(plan)
    load_weights(other, {k: v.clone() for k, v in w.items()})
    for k, v in other.state_dict().items():  # aliases included: they are the same tensors
        assert torch.equal(v, net.state_dict()[k]), k
    # a full state dict (bundles written before) loads too
    torch.manual_seed(2)
    third = build_network(plan)
    load_weights(third, net.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    net.eval(), third.eval()
    with torch.no_grad():
        assert torch.equal(net(x), third(x))
