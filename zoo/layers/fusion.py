"""Exact folds of per-channel affine maps (eval-mode BatchNorm, layer scale) into adjacent convolutions.

Every deploy-time ``reparameterize()`` in zoo is built from these. The arithmetic runs in float64 and is cast back
to the convolution's dtype, so a fused model matches its training form to float32 rounding.
"""
from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ['batchnorm_affine', 'conv_with_input_affine', 'conv_with_output_affine', 'fuse_conv_bn']


def batchnorm_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``scale * x + shift``; both (C,), float64."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() - bn.running_mean.double() * scale
    return scale, shift


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused


def _bias64(conv: nn.Conv2d) -> torch.Tensor:
    if conv.bias is None:
        return torch.zeros(conv.out_channels, dtype=torch.float64, device=conv.weight.device)
    return conv.bias.double()


def conv_with_output_affine(
        conv: nn.Conv2d, scale: torch.Tensor, shift: Optional[torch.Tensor] = None) -> nn.Conv2d:
    """A new conv computing ``scale * conv(x) + shift`` (per output channel)."""
    scale = scale.double()
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = _bias64(conv) * scale
    if shift is not None:
        bias = bias + shift.double()
    return _conv_like(conv, weight, bias)


def conv_with_input_affine(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Conv2d:
    """A new conv computing ``conv(scale * x + shift)`` (per input channel).

    Only exact for an unpadded, ungrouped conv: zero padding would see ``shift`` inside the image but not outside.
    """
    if any(p != 0 for p in conv.padding) or conv.groups != 1:
        raise ValueError(f'cannot fold an input affine into a padded or grouped conv ({conv})')
    weight = conv.weight.double()
    folded_weight = weight * scale.double().view(1, -1, 1, 1)
    bias = _bias64(conv) + (weight * shift.double().view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    return _conv_like(conv, folded_weight, bias)


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A single conv equal to ``bn(conv(x))`` with ``bn`` in eval mode."""
    return conv_with_output_affine(conv, *batchnorm_affine(bn))
