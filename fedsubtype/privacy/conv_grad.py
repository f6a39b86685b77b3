"""Per-case gradients of 3D convolutions for Opacus, without materialising the unfolded input.

Opacus computes a Conv3d's per-case weight gradient by unfolding the input into a
[batch, C_in·k³, positions] matrix (`opacus.utils.tensor_utils.unfold3d`): at 64³ that is the largest
tensor of a DP step and most of its extra time. The same gradients come out of one grouped
convolution backward (PyTorch's native kernel) with the batch folded into the channels. Registered
through Opacus's own extension point (`register_grad_sampler`) for Conv3d layers with numeric zero
padding; any other convolution keeps Opacus's implementation. `bench/bench_dp.py` and
`tests/test_privacy_engine.py` check it against per-case reference gradients.
"""

from __future__ import annotations

import torch
from torch import nn


def conv3d_per_case_grads(layer: nn.Conv3d, activations: torch.Tensor, backprops: torch.Tensor
                          ) -> dict[nn.Parameter, torch.Tensor]:
    """{weight: [B, *weight.shape], bias: [B, C_out]} for a Conv3d with numeric padding.

    The batch is folded into the channels and the layer into a grouped convolution with one group per
    case (× the layer's own groups), whose weight gradient, from PyTorch's native convolution backward,
    is every case's gradient side by side.
    """
    a = activations.to(backprops.dtype)
    n = a.shape[0]
    c_out = backprops.shape[1]
    weight = layer.weight
    grads: dict[nn.Parameter, torch.Tensor] = {}
    if weight.requires_grad:
        _, per_case, _ = torch.ops.aten.convolution_backward(
            backprops.reshape(1, n * c_out, *backprops.shape[2:]), a.reshape(1, -1, *a.shape[2:]),
            weight.detach().repeat(n, 1, 1, 1, 1), None, list(layer.stride), list(layer.padding),
            list(layer.dilation), False, [0, 0, 0], n * layer.groups, [False, True, False])
        grads[weight] = per_case.view(n, *weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.reshape(n, c_out, -1).sum(-1)
    return grads


def _applies(layer: nn.Module) -> bool:
    return type(layer) is nn.Conv3d and isinstance(layer.padding, tuple) and layer.padding_mode == "zeros"


def register(native: bool = True) -> None:
    """Make Opacus use `conv3d_per_case_grads` for plain Conv3d layers (idempotent); `native=False`
    restores Opacus's own unfold-based sampler (for benchmarks). Opacus looks samplers up at each backward."""
    from opacus.grad_sample.conv import compute_conv_grad_sample
    from opacus.grad_sample.utils import register_grad_sampler

    if not native:
        register_grad_sampler(nn.Conv3d)(compute_conv_grad_sample)
        return

    @register_grad_sampler(nn.Conv3d)
    def conv3d_grad_sampler(layer: nn.Conv3d, activations: list[torch.Tensor], backprops: torch.Tensor
                            ) -> dict[nn.Parameter, torch.Tensor]:
        if not _applies(layer) or activations[0].shape[0] == 0:
            return compute_conv_grad_sample(layer, activations, backprops)
        return conv3d_per_case_grads(layer, activations[0], backprops)
