"""Omni-Dimensional Dynamic Convolution (ODConv).

Paper: `Omni-Dimensional Dynamic Convolution` (Li, Zhou, Yao; ICLR 2022) - https://openreview.net/forum?id=DmpCfq6Mg39
Official code: https://github.com/OSVAI/ODConv

``kernel_num`` static kernels of shape (C_out, C_in / groups, k, k) are mixed per sample by four attentions computed
from the globally pooled input (pool -> 1x1 conv to max(int(C_in * reduction), 16) channels -> BatchNorm -> ReLU ->
one 1x1 conv head each, divided by the temperature): over input channels (sigmoid), output channels (sigmoid; not for
depthwise convs), the k x k kernel positions (sigmoid; not for 1x1 kernels) and the kernels (softmax; not for
kernel_num 1). Parameters and their names map 1:1 onto the official ``ODConv2d``.

The arithmetic is the official one, reorganised for speed: the input-channel attention scales the input and the
output-channel attention the output (as the official code does); what remains is a convolution with per-sample
weights, computed per case (see :meth:`ODConv2d.forward`):

* 1x1 kernel, kernel_num 1: the weights are static, one plain conv;
* 1x1 kernel, several kernels: one batched matmul with the per-sample mixed weights;
* k x k dense kernel on small feature maps, kernel_num 1: the per-sample weights differ only by the spatial attention,
  which scales the k * k shifted copies of the input instead; one 1x1 conv with the static weights follows;
* k x k dense kernel on small feature maps, several kernels: a batched matmul of the mixed weights with the unfolded
  input;
* anything else (large feature maps, grouped and depthwise convs): the official convolution over the batch, with
  ``groups = batch * groups`` and per-sample mixed weights, which is also :meth:`ODConv2d.forward_reference`.

The attention's BatchNorm runs on (B, C, 1, 1) tensors; in training with a batch of one it normalises with its running
statistics, where the official layer raises.
"""
from typing import Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F
from timm.models import register_notrace_module

__all__ = ['ODConv2d', 'OmniAttention', 'odconv_temperature', 'set_temperature']

# below this many output positions a dense conv's per-sample work is done by GEMMs over columns; from it on the
# official conv over the batch is faster (CPU, batch 16, ResNet-18 layer shapes)
BATCH_CONV_MIN_POSITIONS = 28 * 28


class AttentionBatchNorm(nn.BatchNorm2d):
    """BatchNorm over pooled (B, C, 1, 1) features that also runs in training with a batch of one.

    With one sample, batch statistics do not exist: the running statistics normalise it and are left unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_statistics = self.training and x.shape[0] > 1
        momentum = 0.
        if use_batch_statistics:
            self.num_batches_tracked.add_(1)
            momentum = 1. / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, use_batch_statistics,
                            momentum, self.eps)


class OmniAttention(nn.Module):
    """The four ODConv attentions of a (B, C_in, H, W) input; see the module docstring."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            groups: int = 1,
            reduction: float = 0.0625,
            kernel_num: int = 4,
            min_channels: int = 16,
    ) -> None:
        super().__init__()
        attn_chs = max(int(in_chs * reduction), min_channels)
        self.kernel_size = kernel_size
        self.kernel_num = kernel_num
        self.temperature = 1.0
        self.fc = nn.Conv2d(in_chs, attn_chs, 1, bias=False)
        self.bn = AttentionBatchNorm(attn_chs)
        self.act = nn.ReLU(inplace=True)
        self.channel_fc = nn.Conv2d(attn_chs, in_chs, 1)
        is_depthwise = in_chs == groups == out_chs
        self.filter_fc = None if is_depthwise else nn.Conv2d(attn_chs, out_chs, 1)
        self.spatial_fc = nn.Conv2d(attn_chs, kernel_size * kernel_size, 1) if kernel_size > 1 else None
        self.kernel_fc = nn.Conv2d(attn_chs, kernel_num, 1) if kernel_num > 1 else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> Tuple[
            torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Attentions over input channels (B, C_in, 1, 1), output channels (B, C_out, 1, 1) or None, kernel
        positions (B, k * k) or None, and kernels (B, kernel_num) or None."""
        context = self.act(self.bn(self.fc(x.mean((2, 3), keepdim=True))))
        t = self.temperature
        channel = torch.sigmoid(self.channel_fc(context) / t)
        filters: Optional[torch.Tensor] = None
        if self.filter_fc is not None:
            filters = torch.sigmoid(self.filter_fc(context) / t)
        spatial: Optional[torch.Tensor] = None
        if self.spatial_fc is not None:
            spatial = torch.sigmoid(self.spatial_fc(context).flatten(1) / t)
        kernels: Optional[torch.Tensor] = None
        if self.kernel_fc is not None:
            kernels = torch.softmax(self.kernel_fc(context).flatten(1) / t, dim=1)
        return channel, filters, spatial, kernels


@register_notrace_module  # the computation is chosen from the input's shape: a leaf for torch.fx
class ODConv2d(nn.Module):
    """Drop-in for ``nn.Conv2d`` (no bias): (B, C_in, H, W) -> (B, C_out, H', W') with per-sample dynamic kernels."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            stride: int = 1,
            padding: Optional[int] = None,
            dilation: int = 1,
            groups: int = 1,
            reduction: float = 0.0625,
            kernel_num: int = 4,
            min_channels: int = 16,
    ) -> None:
        """
        Args:
            in_chs: Input channels C_in.
            out_chs: Output channels C_out.
            kernel_size: Square kernel size k.
            stride: Convolution stride.
            padding: Zero padding; ``dilation * (k // 2)`` (same size at stride 1) if None.
            dilation: Convolution dilation.
            groups: Convolution groups (``groups == C_in == C_out`` is depthwise).
            reduction: Width of the attention's hidden layer as a fraction of C_in.
            kernel_num: Number of static kernels mixed per sample.
            min_channels: Smallest width of the attention's hidden layer.
        """
        super().__init__()
        self.in_chs, self.out_chs, self.kernel_size = in_chs, out_chs, kernel_size
        self.stride, self.dilation, self.groups, self.kernel_num = stride, dilation, groups, kernel_num
        self.padding = dilation * (kernel_size // 2) if padding is None else padding
        self.batch_conv_min_positions = BATCH_CONV_MIN_POSITIONS
        self.attention = OmniAttention(
            in_chs, out_chs, kernel_size, groups=groups, reduction=reduction, kernel_num=kernel_num,
            min_channels=min_channels)
        self.weight = nn.Parameter(torch.empty(kernel_num, out_chs, in_chs // groups, kernel_size, kernel_size))
        for kernel in self.weight.data:
            nn.init.kaiming_normal_(kernel, mode='fan_out', nonlinearity='relu')

    def extra_repr(self) -> str:
        return (f'{self.in_chs}, {self.out_chs}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, groups={self.groups}, kernel_num={self.kernel_num}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, reference=False)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The official computation (mixed kernels, one conv with ``groups = batch * groups``), for comparison."""
        return self._forward(x, reference=True)

    def _forward(self, x: torch.Tensor, reference: bool) -> torch.Tensor:
        channel, filters, spatial, kernels = self.attention(x)
        x = x * channel
        if reference:
            out = self._conv_over_batch(x, spatial, kernels)
        elif self.kernel_size == 1 and kernels is None:
            out = F.conv2d(x, self.weight[0], None, self.stride, self.padding, self.dilation, self.groups)
        elif self.kernel_size == 1 and self.groups == 1:
            out = self._pointwise_per_sample(x, kernels)
        elif self.groups == 1 and self._positions(x) < self.batch_conv_min_positions:
            out = self._tap_columns(x, spatial) if kernels is None else self._unfolded_per_sample(x, spatial, kernels)
        else:
            out = self._conv_over_batch(x, spatial, kernels)
        if filters is not None:
            out = out * filters
        return out

    def mixed_weight(self, spatial: Optional[torch.Tensor], kernels: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-sample kernels (B or 1, C_out, C_in / groups, k, k): the attention-weighted sum of the static ones,
        scaled by the spatial attention."""
        if kernels is None:
            weight = self.weight
        else:
            weight = torch.einsum('bn,noikl->boikl', kernels, self.weight)
        if spatial is not None:
            weight = weight * spatial.view(-1, 1, 1, self.kernel_size, self.kernel_size)
        return weight

    def _out_size(self, size: int) -> int:
        return (size + 2 * self.padding - self.dilation * (self.kernel_size - 1) - 1) // self.stride + 1

    def _positions(self, x: torch.Tensor) -> int:
        return self._out_size(x.shape[-2]) * self._out_size(x.shape[-1])

    def _pointwise_per_sample(self, x: torch.Tensor, kernels: Optional[torch.Tensor]) -> torch.Tensor:
        assert kernels is not None
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        b, c, h, w = x.shape
        weight = self.mixed_weight(None, kernels).view(b, self.out_chs, c)
        return torch.bmm(weight, x.reshape(b, c, h * w)).view(b, self.out_chs, h, w)

    def _tap_columns(self, x: torch.Tensor, spatial: Optional[torch.Tensor]) -> torch.Tensor:
        """kernel_num 1: the spatial attention scales each tap's shifted input, then one 1x1 conv with the static
        kernel applies all taps at once (im2col by slicing, in the input's memory format)."""
        assert spatial is not None
        b, _, h, w = x.shape
        k, d, s = self.kernel_size, self.dilation, self.stride
        ho, wo = self._out_size(h), self._out_size(w)
        padded = F.pad(x, (self.padding, self.padding, self.padding, self.padding))
        taps = []
        for i in range(k):
            for j in range(k):
                tap = padded[:, :, i * d:i * d + s * (ho - 1) + 1:s, j * d:j * d + s * (wo - 1) + 1:s]
                taps.append(tap * spatial[:, i * k + j].view(b, 1, 1, 1))
        weight = self.weight[0].permute(0, 2, 3, 1).reshape(self.out_chs, -1, 1, 1)  # tap-major, as the columns
        return F.conv2d(torch.cat(taps, dim=1), weight)

    def _unfolded_per_sample(self, x: torch.Tensor, spatial: Optional[torch.Tensor],
                             kernels: Optional[torch.Tensor]) -> torch.Tensor:
        b, c, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, C * k * k, L)
        weight = self.mixed_weight(spatial, kernels).reshape(b, self.out_chs, -1)
        return torch.bmm(weight, cols).view(b, self.out_chs, self._out_size(h), self._out_size(w))

    def _conv_over_batch(self, x: torch.Tensor, spatial: Optional[torch.Tensor],
                         kernels: Optional[torch.Tensor]) -> torch.Tensor:
        b, c, h, w = x.shape
        weight = self.mixed_weight(spatial, kernels).expand(b, -1, -1, -1, -1)
        weight = weight.reshape(b * self.out_chs, c // self.groups, self.kernel_size, self.kernel_size)
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, None, self.stride, self.padding, self.dilation,
                       self.groups * b)
        return out.view(b, self.out_chs, out.shape[-2], out.shape[-1])


def odconv_temperature(epoch: float, initial: float = 30., final: float = 1., anneal_epochs: float = 10.) -> float:
    """The official temperature schedule: linear from ``initial`` to ``final`` over the first ``anneal_epochs``,
    then ``final``. ``epoch`` is fractional (iteration / iterations per epoch): the recipe updates every iteration."""
    progress = min(max(epoch / anneal_epochs, 0.), 1.)
    return initial + (final - initial) * progress


def set_temperature(model: nn.Module, temperature: float) -> None:
    """Set the softmax / sigmoid temperature of every ODConv attention in ``model`` (1.0 for inference)."""
    for module in model.modules():
        if isinstance(module, OmniAttention):
            module.temperature = float(temperature)
