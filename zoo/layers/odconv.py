"""Omni-Dimensional Dynamic Convolution (ODConv).

Paper: `Omni-Dimensional Dynamic Convolution` (Li, Zhou, Yao; ICLR 2022) - https://openreview.net/forum?id=DmpCfq6Mg39
Official code: https://github.com/OSVAI/ODConv

``kernel_num`` static kernels of shape (C_out, C_in / groups, k, k) are mixed per sample by four attentions computed
from the globally pooled input (pool -> 1x1 conv to max(int(C_in * reduction), 16) channels -> BatchNorm -> ReLU ->
one 1x1 conv head each, divided by the temperature): over input channels (sigmoid), output channels (sigmoid; not for
depthwise convs), the k x k kernel positions (sigmoid; not for 1x1 kernels) and the kernels (softmax; not for
kernel_num 1). Parameters and their names map 1:1 onto the official ``ODConv2d``.

The arithmetic is the official one, reorganised for speed (:meth:`ODConv2d.forward_reference` keeps the official
order: attentions on input and output, per-sample mixed kernels, one conv with ``groups = batch * groups``):

* dense k x k kernels on small maps: GEMMs over im2col columns. The spatial and input-channel attentions scale the
  columns instead of the kernel, so the static kernels serve the whole batch (with several kernels, one GEMM with all
  of them, mixed per sample afterwards); no per-sample kernels, which dominate the cost on small maps. Where the
  kernel_num-fold FLOPs of that outweigh it, one conv per sample, its kernel mixed just before (still in cache);
* everywhere else, per-sample kernels: for kernels smaller than the feature maps, the input- and output-channel
  attentions are folded into them instead of scaling the maps; 1x1 kernels then run as one batched matmul, the others
  as the official conv over the batch; a kernel that varies with nothing (1x1, kernel_num 1) stays one static conv,
  and a batch of one runs a plain conv with its mixed kernel.

Which form is faster was measured on CPU at batch 16 over the ResNet-18 layer shapes (``COLUMNS_MAX_POSITIONS``,
``STACKED_KERNELS_MAX_EXTRA_POSITIONS``); every form gives the official numbers (tests compare forward and gradients).

The attention's BatchNorm runs on (B, C, 1, 1) tensors; in training with a batch of one it normalises with its running
statistics, where the official layer raises.
"""
from typing import Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

__all__ = ['ODConv2d', 'OmniAttention', 'odconv_temperature', 'set_temperature']

# Measured on CPU at batch 16 over the ResNet-18 layer shapes with kernel_num 1, 2 and 4: below 28 x 28 output
# positions per-sample kernels cost more than im2col columns; on such maps one GEMM with all kernels beats one conv
# per sample while (kernel_num - 1) * positions stays below 300 (7 x 7 maps at kernel_num 4, 14 x 14 at 2). Where the
# two are close in inference, the GEMM wins a training step: it keeps no per-sample kernels for the backward pass.
COLUMNS_MAX_POSITIONS = 28 * 28
STACKED_KERNELS_MAX_EXTRA_POSITIONS = 300


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
        self.columns_max_positions = COLUMNS_MAX_POSITIONS
        self.stacked_kernels_max_extra_positions = STACKED_KERNELS_MAX_EXTRA_POSITIONS
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
        """The official computation (attentions on input and output, mixed kernels, one conv with
        ``groups = batch * groups``), for comparison."""
        return self._forward(x, reference=True)

    def _forward(self, x: torch.Tensor, reference: bool) -> torch.Tensor:
        channel, filters, spatial, kernels = self.attention(x)
        if not reference and x.shape[0] == 1:  # a batch of one: its mixed kernel is just a kernel
            weight = self.mixed_weight(spatial, kernels, channel, filters)[0]
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)
        if not reference and self.groups == 1 and self.kernel_size > 1 and self._is_small_map(x):
            if self._columns_pay_off(x, kernels):
                out = self._columns_conv(x, channel, spatial, kernels)
            else:
                out = self._convs_per_sample(x * channel, spatial, kernels)
            return out if filters is None else out * filters
        fold = not reference and self._fold_attentions(x)
        if fold:
            weight = self.mixed_weight(spatial, kernels, channel, filters)
        else:
            x = x * channel
            weight = self.mixed_weight(spatial, kernels)
        out = self._conv(x, weight, reference)
        return out if fold or filters is None else out * filters

    def mixed_weight(
            self,
            spatial: Optional[torch.Tensor],
            kernels: Optional[torch.Tensor],
            channel: Optional[torch.Tensor] = None,
            filters: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-sample kernels (B, or 1 when nothing varies, C_out, C_in / groups, k, k): the kernel-attention
        weighted sum of the static kernels, scaled by the spatial attention and, where given, by the input- and
        output-channel attentions."""
        weight = self.weight if kernels is None else torch.einsum('bn,noikl->boikl', kernels, self.weight)
        if spatial is not None:
            weight = weight * spatial.view(-1, 1, 1, self.kernel_size, self.kernel_size)
        if filters is not None:
            weight = weight * filters.view(-1, self.out_chs, 1, 1, 1)
        if channel is not None:
            b, g = channel.shape[0], self.groups
            per_group = channel.view(b, g, 1, self.in_chs // g).expand(b, g, self.out_chs // g, self.in_chs // g)
            weight = weight * per_group.reshape(b, self.out_chs, self.in_chs // g, 1, 1)
        return weight

    def _out_size(self, size: int) -> int:
        return (size + 2 * self.padding - self.dilation * (self.kernel_size - 1) - 1) // self.stride + 1

    def _positions(self, x: torch.Tensor) -> int:
        return self._out_size(x.shape[-2]) * self._out_size(x.shape[-1])

    def _is_small_map(self, x: torch.Tensor) -> bool:
        """Small maps: per-sample kernels cost more than k * k copies of the input."""
        return self._positions(x) < self.columns_max_positions

    def _columns_pay_off(self, x: torch.Tensor, kernels: Optional[torch.Tensor]) -> bool:
        """On a small map, whether GEMMs over im2col columns beat one conv per sample: always with one kernel; with
        several, while kernel_num times the FLOPs stay cheaper than mixing a kernel per sample."""
        if kernels is None:
            return True
        return (self.kernel_num - 1) * self._positions(x) < self.stacked_kernels_max_extra_positions

    def _fold_attentions(self, x: torch.Tensor) -> bool:
        """Whether to scale the per-sample kernels by the channel attentions rather than the input and output:
        when a kernel is smaller than the two feature maps."""
        return self.weight[0].numel() < x[0].numel() + self.out_chs * self._positions(x)

    def _convs_per_sample(self, x: torch.Tensor, spatial: Optional[torch.Tensor],
                          kernels: Optional[torch.Tensor]) -> torch.Tensor:
        """One conv per sample, each kernel mixed just before its conv, while it is still in cache."""
        outs = []
        for i in range(x.shape[0]):
            sample_spatial: Optional[torch.Tensor] = None if spatial is None else spatial[i:i + 1]
            sample_kernels: Optional[torch.Tensor] = None if kernels is None else kernels[i:i + 1]
            weight = self.mixed_weight(sample_spatial, sample_kernels)[0]
            outs.append(F.conv2d(x[i:i + 1], weight, None, self.stride, self.padding, self.dilation, self.groups))
        return torch.cat(outs)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, reference: bool) -> torch.Tensor:
        """x (B, C_in, H, W) convolved with static (1, ...) or per-sample (B, ...) kernels."""
        b, c, h, w = x.shape
        if weight.shape[0] == 1:
            return F.conv2d(x, weight[0], None, self.stride, self.padding, self.dilation, self.groups)
        if not reference and self.kernel_size == 1 and self.groups == 1 and self.padding == 0:
            x = x[:, :, ::self.stride, ::self.stride]
            out = torch.bmm(weight.view(b, self.out_chs, c), x.reshape(b, c, -1))
            return out.view(b, self.out_chs, x.shape[-2], x.shape[-1])
        weight = weight.reshape(b * self.out_chs, c // self.groups, self.kernel_size, self.kernel_size)
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, None, self.stride, self.padding, self.dilation,
                       self.groups * b)
        return out.view(b, self.out_chs, out.shape[-2], out.shape[-1])

    def _columns_conv(self, x: torch.Tensor, channel: torch.Tensor, spatial: Optional[torch.Tensor],
                      kernels: Optional[torch.Tensor]) -> torch.Tensor:
        """A dense k x k ODConv as GEMMs over im2col columns, built by slicing in channels-last order.

        The spatial and input-channel attentions scale the columns instead of the kernel, so the static kernels serve
        the whole batch: one GEMM for kernel_num 1; with several kernels one GEMM with all of them, whose kernel_num
        outputs each sample mixes with its kernel attention (kernel_num times the FLOPs, no per-sample kernels).
        """
        b, c, h, w = x.shape
        k, d, s = self.kernel_size, self.dilation, self.stride
        ho, wo = self._out_size(h), self._out_size(w)
        padded = F.pad(x, (self.padding, self.padding, self.padding, self.padding)).permute(0, 2, 3, 1)
        channel = channel.view(b, 1, 1, c)
        taps = []
        for i in range(k):
            for j in range(k):
                scale = channel if spatial is None else channel * spatial[:, i * k + j].view(b, 1, 1, 1)
                taps.append(padded[:, i * d:i * d + s * (ho - 1) + 1:s, j * d:j * d + s * (wo - 1) + 1:s, :] * scale)
        columns = torch.stack(taps, dim=3).view(b * ho * wo, k * k * c)  # tap-major, channel-minor
        weight = self.weight.permute(0, 1, 3, 4, 2).reshape(self.kernel_num * self.out_chs, k * k * c)
        rows = F.linear(columns, weight)
        if kernels is not None:
            rows = (rows.view(b, ho * wo, self.kernel_num, self.out_chs) * kernels.view(b, 1, -1, 1)).sum(dim=2)
        return rows.view(b, ho, wo, self.out_chs).permute(0, 3, 1, 2)  # channels_last memory, no copy


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
