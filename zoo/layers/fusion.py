"""Exact folds of per-channel affine maps (eval-mode BatchNorm, LayerNorm's affine, layer scale) into the adjacent
convolutions (plain and ODConv) and linear layers.

Every deploy-time ``reparameterize()`` in zoo is built from these. The arithmetic runs in float64 and is cast back
to the layer's dtype, so a fused model matches its training form to float32 rounding.
"""
from typing import Optional, Tuple, TypeVar, Union

import torch
from torch import nn

from .odconv import ODConv2d

__all__ = ['batchnorm_affine', 'fuse_conv_bn', 'fuse_norm', 'with_input_affine', 'with_output_affine']

Layer = TypeVar('Layer', nn.Conv2d, nn.Linear)


def batchnorm_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``scale * x + shift``; both (C,), float64."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() - bn.running_mean.double() * scale
    return scale, shift


def _layer_like(layer: Layer, weight: torch.Tensor, bias: torch.Tensor) -> Layer:
    """A copy of ``layer`` (with a bias) holding ``weight`` and ``bias`` in its own dtype and device."""
    factory = dict(device=layer.weight.device, dtype=layer.weight.dtype)
    if isinstance(layer, nn.Linear):
        fused = nn.Linear(layer.in_features, layer.out_features, bias=True, **factory)
    else:
        fused = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=layer.groups, bias=True, padding_mode=layer.padding_mode, **factory)
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused


def _bias64(layer: Union[nn.Conv2d, nn.Linear]) -> torch.Tensor:
    if layer.bias is None:
        return torch.zeros(layer.weight.shape[0], dtype=torch.float64, device=layer.weight.device)
    return layer.bias.double()


def _along(values: torch.Tensor, dim: int, like: torch.Tensor) -> torch.Tensor:
    """``values`` (C,) shaped to broadcast along dimension ``dim`` of ``like``."""
    shape = [1] * like.dim()
    shape[dim] = -1
    return values.double().view(shape)


def with_output_affine(layer: Layer, scale: torch.Tensor, shift: Optional[torch.Tensor] = None) -> Layer:
    """A new conv / linear layer computing ``scale * layer(x) + shift`` (per output channel)."""
    weight = layer.weight.double() * _along(scale, 0, layer.weight)
    bias = _bias64(layer) * scale.double()
    if shift is not None:
        bias = bias + shift.double()
    return _layer_like(layer, weight, bias)


def with_input_affine(layer: Layer, scale: torch.Tensor, shift: torch.Tensor) -> Layer:
    """A new conv / linear layer computing ``layer(scale * x + shift)`` (per input channel).

    Only exact for an unpadded, ungrouped conv: zero padding would see ``shift`` inside the image but not outside.
    """
    if isinstance(layer, nn.Conv2d) and (any(p != 0 for p in layer.padding) or layer.groups != 1):
        raise ValueError(f'cannot fold an input affine into a padded or grouped conv ({layer})')
    weight = layer.weight.double()
    folded_weight = weight * _along(scale, 1, weight)
    bias = _bias64(layer) + (weight * _along(shift, 1, weight)).flatten(1).sum(dim=1)
    return _layer_like(layer, folded_weight, bias)


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A single conv equal to ``bn(conv(x))`` with ``bn`` in eval mode."""
    return with_output_affine(conv, *batchnorm_affine(bn))


def fuse_norm(conv: Optional[nn.Module], norm: Optional[nn.Module]) -> Optional[nn.Module]:
    """The module computing ``norm(conv(x))`` with ``norm`` an eval-mode BatchNorm: a new ``nn.Conv2d`` for a plain
    conv, ``conv`` itself for an ``ODConv2d`` (folded in place); None where either is something else."""
    if not isinstance(norm, nn.BatchNorm2d):
        return None
    if type(conv) is nn.Conv2d:
        return fuse_conv_bn(conv, norm)
    if isinstance(conv, ODConv2d):
        conv.fuse_output_affine(*batchnorm_affine(norm))
        return conv
    return None
