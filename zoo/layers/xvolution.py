"""X-volution: a 3x3 convolution and an attention branch, summed, and fused into one operator for inference.

Paper: `X-volution: On the Unification of Convolution and Self-attention` - https://arxiv.org/abs/2106.02253
(Chen, Wang, Wang, Guo, Chen, Lu; 2021). No official code or weights were released: this module is a reconstruction
from the paper's text. What the paper fixes and what was chosen here:

- The operator replaces a 3x3 convolution (``in_chs -> out_chs``, stride 1 or 2) and sums two branches: the
  convolution followed by BatchNorm, and an attention branch followed by BatchNorm.
- PSSA ("pixel shift self-attention"), the paper's fusable attention: the element-wise product of a query with the
  key shifted to each of the 8 neighbours (shift length 1, zero fill) and to itself, followed by a learned weighted
  sum. Chosen: 1x1 query / key projections (with bias) to ``attn_chs`` channels (default ``in_chs``), the 9 products
  concatenated (offset-major), the weighted sum a 1x1 conv (no bias, BatchNorm follows) to ``out_chs``, the stride
  applied there (the products are only formed at the output positions, which is the same thing); a dilated
  convolution shifts by its dilation.
- SA, the paper's global self-attention alternative: single head, softmax over all positions, 1x1 q / k / v / output
  projections, ``F.scaled_dot_product_attention``; for stride 2 the queries are the input subsampled like the
  convolution's output positions.
- The attention branch's BatchNorm starts with zero scale (and shift), so a fresh operator equals its convolution
  branch and a fresh network its plain ResNet: an assumption (the paper does not say), made so that the attention is
  learnt as a residual correction of the convolution.
- Inference (``fuse()``, which returns the deploy form as a new module): both BatchNorms are folded. With PSSA both
  branches are sums over the 9 window offsets d of linear maps of per-offset features (the shifted input, and the
  query times the shifted key), so they are one GEMM over the concatenated features with the concatenated weights
  (``PixelShiftConv2d``), the paper's single operator. SA cannot fuse with the convolution; its BatchNorms are folded.
"""
from typing import List, Optional, Tuple

import copy

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import register_notrace_function, register_notrace_module

from ._tracing import is_compiling
from .fusion import fuse_conv_bn, norm_affine

__all__ = ['GlobalSelfAttention', 'PixelShiftAttention', 'PixelShiftConv2d', 'XVolution2d', 'pixel_shift_products']


def _window_offsets(dilation: int) -> List[Tuple[int, int]]:
    """Top-left corners, in a map padded by ``dilation``, of the 9 shifted views of a 3x3 window (row-major)."""
    return [(d // 3 * dilation, d % 3 * dilation) for d in range(9)]


def _strided_window(x: torch.Tensor, i: int, j: int, size: Tuple[int, int], stride: int) -> torch.Tensor:
    """``x[..., i:i + H:stride, j:j + W:stride]`` of a padded NCHW map, ``size`` = (H, W) of the unpadded map."""
    return x[:, :, i:i + size[0]:stride, j:j + size[1]:stride]


@register_notrace_function  # shape-dependent slicing
def pixel_shift_products(q: torch.Tensor, k: torch.Tensor, stride: int = 1, dilation: int = 1) -> torch.Tensor:
    """``q * shift_d(k)`` for the 9 offsets d of a 3x3 window (zero fill), at the positions a stride-``stride`` conv
    outputs.

    Args:
        q, k: (B, C, H, W).
    Returns:
        (B, 9 * C, H', W'), channel ``d * C + c`` for offset d = 3 * row + column of the window.
    """
    size = (q.shape[-2], q.shape[-1])
    k = F.pad(k, (dilation, dilation, dilation, dilation))
    q = q[:, :, ::stride, ::stride]
    return torch.cat([q * _strided_window(k, i, j, size, stride) for i, j in _window_offsets(dilation)], dim=1)


class PixelShiftAttention(nn.Module):
    """PSSA branch: 1x1 q / k -> the 9 pixel-shift products -> 1x1 weighted sum (stride) -> BatchNorm."""

    def __init__(self, in_chs: int, out_chs: int, attn_chs: int, stride: int = 1, dilation: int = 1,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.stride, self.dilation = stride, dilation
        self.q = nn.Conv2d(in_chs, attn_chs, 1, **dd)
        self.k = nn.Conv2d(in_chs, attn_chs, 1, **dd)
        self.proj = nn.Conv2d(9 * attn_chs, out_chs, 1, bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = pixel_shift_products(self.q(x), self.k(x), self.stride, self.dilation)
        return self.bn(self.proj(t))


class GlobalSelfAttention(nn.Module):
    """SA branch: single-head softmax attention over all positions, 1x1 q / k / v / output projections, BatchNorm.

    With stride 2 the queries are taken at the conv's output positions.
    """

    def __init__(self, in_chs: int, out_chs: int, attn_chs: int, stride: int = 1,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.stride = stride
        self.q = nn.Conv2d(in_chs, attn_chs, 1, **dd)
        self.k = nn.Conv2d(in_chs, attn_chs, 1, **dd)
        self.v = nn.Conv2d(in_chs, attn_chs, 1, **dd)
        self.proj = nn.Conv2d(attn_chs, out_chs, 1, bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x[:, :, ::self.stride, ::self.stride])
        out_size = (q.shape[-2], q.shape[-1])
        # (B, 1 head, positions, channels)
        q = q.flatten(2).transpose(1, 2).unsqueeze(1)
        k = self.k(x).flatten(2).transpose(1, 2).unsqueeze(1)
        v = self.v(x).flatten(2).transpose(1, 2).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)
        out = out.unflatten(2, out_size)
        return self.bn(self.proj(out))


class XVolution2d(nn.Module):
    """X-volution: ``bn(conv3x3(x)) + attention(x)``, a drop-in for a 3x3 ``nn.Conv2d``; (B, in, H, W) -> (B, out,
    H / stride, W / stride).

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: Stride of the convolution (1 or 2).
        dilation: Dilation of the convolution (the pixel shifts follow it).
        attention: 'pssa' (pixel-shift self-attention, fusable with the convolution) or 'sa' (global self-attention).
        attn_chs: Channels of the attention's projections; ``in_chs`` if None.
        device: Device of the parameters.
        dtype: Data type of the parameters.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            dilation: int = 1,
            attention: str = 'pssa',
            attn_chs: Optional[int] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        attn_chs = attn_chs or in_chs
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=dilation, dilation=dilation, bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)
        if attention == 'pssa':
            self.attn = PixelShiftAttention(in_chs, out_chs, attn_chs, stride, dilation, **dd)
        elif attention == 'sa':
            if dilation != 1:
                raise ValueError('X-volution with global self-attention has no dilated form; use output_stride 32')
            self.attn = GlobalSelfAttention(in_chs, out_chs, attn_chs, stride, **dd)
        else:
            raise ValueError(f"unknown X-volution attention {attention!r}: use 'pssa' or 'sa'")
        # a fresh operator is its convolution branch (see the module docstring)
        nn.init.zeros_(self.attn.bn.weight)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, norm: nn.Module, attention: str = 'pssa') -> 'XVolution2d':
        """An X-volution whose convolution branch is ``conv`` -> ``norm`` (modules taken over, not copied), with
        ``conv``'s geometry: a plain 3x3 conv (one group, no bias, padding = dilation)."""
        if conv.kernel_size != (3, 3) or conv.groups != 1 or conv.bias is not None or conv.padding != conv.dilation:
            raise ValueError(
                f'X-volution replaces plain 3x3 convs (one group, no bias, padding = dilation), not {conv}')
        xvol = cls(conv.in_channels, conv.out_channels, stride=conv.stride[0], dilation=conv.dilation[0],
                   attention=attention, device=conv.weight.device, dtype=conv.weight.dtype)
        xvol.conv, xvol.bn = conv, norm
        return xvol

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.attn(x)

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The inference form, a new module (this one is left as it is): a ``PixelShiftConv2d`` for PSSA, a copy with
        both BatchNorms folded for SA.

        Uses the BatchNorms' running statistics (eval mode). ``timm.utils.reparameterize_model`` calls it.
        """
        if isinstance(self.attn, PixelShiftAttention):
            return PixelShiftConv2d.from_xvolution(self)
        fused = copy.deepcopy(self)
        if isinstance(fused.bn, nn.BatchNorm2d):
            fused.conv, fused.bn = fuse_conv_bn(fused.conv, fused.bn), nn.Identity()
        if isinstance(fused.attn.bn, nn.BatchNorm2d):
            fused.attn.proj, fused.attn.bn = fuse_conv_bn(fused.attn.proj, fused.attn.bn), nn.Identity()
        return fused


@register_notrace_module  # how it runs depends on the batch size
class PixelShiftConv2d(nn.Module):
    """A PSSA X-volution fused into one operator: ``W @ [unfold(x); q * shift(k)] + b`` per output position.

    For every output position the features are the 9 window-shifted input vectors (what a 3x3 conv reads) and the 9
    products of the query with the shifted key; ``weight`` (out, 9 * (in + attn)) holds the conv's weights (BatchNorm
    folded, ordered offset-major like the features) beside the PSSA weighted sum's (BatchNorm folded). The features
    are formed a few samples at a time on CPU, so they stay cache-sized; each slice is one GEMM.
    """

    def __init__(self, in_chs: int, out_chs: int, attn_chs: int, stride: int = 1, dilation: int = 1,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_chs, self.attn_chs, self.stride, self.dilation = in_chs, attn_chs, stride, dilation
        self.qk = nn.Conv2d(in_chs, 2 * attn_chs, 1, **dd)
        self.weight = nn.Parameter(torch.empty(out_chs, 9 * (in_chs + attn_chs), **dd))
        self.bias = nn.Parameter(torch.empty(out_chs, **dd))
        # features formed at a time: ~8 MB of float32
        self.chunk_elements = 1 << 21

    @classmethod
    def from_xvolution(cls, xvol: XVolution2d) -> 'PixelShiftConv2d':
        attn = xvol.attn
        assert isinstance(attn, PixelShiftAttention)
        conv = xvol.conv
        fused = cls(conv.in_channels, conv.out_channels, attn.q.out_channels, attn.stride, attn.dilation,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        conv_scale, conv_shift = norm_affine(xvol.bn, conv.out_channels, conv.weight.device)  # Identity: no norm
        attn_scale, attn_shift = norm_affine(attn.bn, conv.out_channels, conv.weight.device)
        # (out, in, 3, 3) -> (out, 3, 3, in) -> (out, 9 * in): offset-major, as the features
        conv_weight = conv.weight.double().permute(0, 2, 3, 1).flatten(1) * conv_scale[:, None]
        attn_weight = attn.proj.weight.double().flatten(1) * attn_scale[:, None]
        fused.weight.copy_(torch.cat([conv_weight, attn_weight], dim=1))
        fused.bias.copy_(conv_shift + attn_shift)
        fused.qk.weight.copy_(torch.cat([attn.q.weight, attn.k.weight]))
        fused.qk.bias.copy_(torch.cat([attn.q.bias, attn.k.bias]))
        return fused

    def _features(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, H', W', 9 * (in + attn)) for padded NCHW ``x`` and ``k`` and strided ``q``; channels-last."""
        size = (x.shape[-2] - 2 * self.dilation, x.shape[-1] - 2 * self.dilation)
        offsets = _window_offsets(self.dilation)
        shifted = [_strided_window(x, i, j, size, self.stride) for i, j in offsets]
        products = [q * _strided_window(k, i, j, size, self.stride) for i, j in offsets]
        return torch.cat([t.permute(0, 2, 3, 1) for t in shifted + products], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.qk(x).split([self.attn_chs, self.attn_chs], dim=1)
        q = q[:, :, ::self.stride, ::self.stride]
        pad = (self.dilation, self.dilation, self.dilation, self.dilation)
        x, k = F.pad(x, pad), F.pad(k, pad)
        if x.device.type != 'cpu' or is_compiling():  # one graph for any batch size
            return F.linear(self._features(x, q, k), self.weight, self.bias).permute(0, 3, 1, 2)
        samples = max(1, self.chunk_elements // (q.shape[-2] * q.shape[-1] * self.weight.shape[1]))
        outs = [F.linear(self._features(x[s:s + samples], q[s:s + samples], k[s:s + samples]), self.weight, self.bias)
                for s in range(0, x.shape[0], samples)]
        return torch.cat(outs).permute(0, 3, 1, 2)
