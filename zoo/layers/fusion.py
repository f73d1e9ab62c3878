"""Exact folds of per-channel affine maps (eval-mode BatchNorm, layer scale) into the adjacent convolutions (plain and
ODConv) and linear layers, for the deploy forms of zoo's models.

Every fold returns a new layer and leaves its arguments as they were. The arithmetic runs in float64 and is cast back
to the layer's dtype, so a folded model matches its training form to float32 rounding.
"""
import copy
from collections import OrderedDict
from typing import Optional, Tuple, TypeVar, Union

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .odconv import ODConv2d

__all__ = ['ConvNorm', 'batchnorm_affine', 'fuse_conv_bn', 'norm_affine', 'with_input_affine', 'with_output_affine']

BatchNorm = Union[nn.BatchNorm2d, FrozenBatchNorm2d]

Layer = TypeVar('Layer', nn.Conv2d, nn.Linear, ODConv2d)


def batchnorm_affine(bn: BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm (or torchvision's FrozenBatchNorm2d) as ``scale * x + shift``; both (C,), float64."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() - bn.running_mean.double() * scale
    return scale, shift


def norm_affine(norm: Union[BatchNorm, nn.Identity], channels: int,
                device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`batchnorm_affine`, or for an ``nn.Identity`` (no norm) the scale 1 and shift 0 of ``channels``."""
    if isinstance(norm, nn.Identity):
        ones = torch.ones(channels, dtype=torch.float64, device=device)
        return ones, torch.zeros_like(ones)
    return batchnorm_affine(norm)


def _per_weight_row(layer: Union[nn.Conv2d, nn.Linear, ODConv2d], values: torch.Tensor) -> torch.Tensor:
    """Per-output-channel ``values`` (C_out,) for each row of the weight: an ODConv2d's holds kernel_num * C_out."""
    return values.repeat(layer.kernel_num) if isinstance(layer, ODConv2d) else values


def _layer_like(layer: Layer, weight: torch.Tensor, bias: torch.Tensor) -> Layer:
    """A copy of ``layer`` (with a bias) holding ``weight`` and ``bias`` in its own dtype and device."""
    factory = dict(device=layer.weight.device, dtype=layer.weight.dtype)
    if isinstance(layer, ODConv2d):
        fused = copy.deepcopy(layer)  # the attention comes along; an ODConv2d's bias is added after it
        fused.bias = nn.Parameter(torch.empty(layer.out_chs, **factory))
    elif isinstance(layer, nn.Linear):
        fused = nn.Linear(layer.in_features, layer.out_features, bias=True, **factory)
    else:
        fused = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=layer.groups, bias=True, padding_mode=layer.padding_mode, **factory)
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused


def _bias64(layer: Union[nn.Conv2d, nn.Linear, ODConv2d]) -> torch.Tensor:
    if layer.bias is None:
        channels = layer.out_chs if isinstance(layer, ODConv2d) else layer.weight.shape[0]
        return torch.zeros(channels, dtype=torch.float64, device=layer.weight.device)
    return layer.bias.double()


def _along(values: torch.Tensor, dim: int, like: torch.Tensor) -> torch.Tensor:
    """``values`` (C,) shaped to broadcast along dimension ``dim`` of ``like``."""
    shape = [1] * like.dim()
    shape[dim] = -1
    return values.double().view(shape)


@torch.no_grad()
def with_output_affine(layer: Layer, scale: torch.Tensor, shift: Optional[torch.Tensor] = None) -> Layer:
    """A new conv / linear / ODConv layer computing ``scale * layer(x) + shift`` (per output channel).

    For an ODConv2d the scale goes into the static kernels (a per-output-channel scale commutes with every attention)
    and the shift into the bias added after the output-channel attention.
    """
    weight = layer.weight.double() * _along(_per_weight_row(layer, scale), 0, layer.weight)
    bias = _bias64(layer) * scale.double()
    if shift is not None:
        bias = bias + shift.double()
    return _layer_like(layer, weight, bias)


@torch.no_grad()
def with_input_affine(layer: Union[nn.Conv2d, nn.Linear], scale: torch.Tensor,
                      shift: torch.Tensor) -> Union[nn.Conv2d, nn.Linear]:
    """A new conv / linear layer computing ``layer(scale * x + shift)`` (per input channel).

    Only exact for an unpadded, ungrouped conv: zero padding would see ``shift`` inside the image but not outside.
    """
    if isinstance(layer, nn.Conv2d) and (any(p != 0 for p in layer.padding) or layer.groups != 1):
        raise ValueError(f'cannot fold an input affine into a padded or grouped conv ({layer})')
    weight = layer.weight.double()
    folded_weight = weight * _along(scale, 1, weight)
    bias = _bias64(layer) + (weight * _along(shift, 1, weight)).flatten(1).sum(dim=1)
    return _layer_like(layer, folded_weight, bias)


def fuse_conv_bn(conv: Union[nn.Conv2d, ODConv2d], bn: BatchNorm) -> Union[nn.Conv2d, ODConv2d]:
    """A new layer equal to ``bn(conv(x))`` with ``bn`` in eval mode: the one BatchNorm fold of zoo's deploy forms."""
    if not isinstance(conv, (nn.Conv2d, ODConv2d)) or not isinstance(bn, (nn.BatchNorm2d, FrozenBatchNorm2d)):
        raise TypeError(f'fuse_conv_bn folds a BatchNorm2d into an nn.Conv2d or ODConv2d, not {type(bn).__name__} '
                        f'into {type(conv).__name__}')
    return with_output_affine(conv, *batchnorm_affine(bn))


class ConvNorm(nn.Sequential):
    """A conv (``nn.Conv2d`` or ``ODConv2d``) and the BatchNorm after it, which ``reparameterize()`` folds into the
    conv (``timm.utils.reparameterize_model`` calls it)."""

    def __init__(self, conv: Union[nn.Conv2d, ODConv2d], norm: BatchNorm) -> None:
        super().__init__(OrderedDict(conv=conv, norm=norm))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if not isinstance(self.norm, nn.Identity):
            self.conv, self.norm = fuse_conv_bn(self.conv, self.norm), nn.Identity()
