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
  columns instead of the kernel, so one static kernel serves the whole batch in one GEMM (or one 1x1 conv over the
  columns). With several kernels, either one GEMM with all of them, mixed per sample afterwards (kernel_num times the
  FLOPs: while the maps are tiny), or one GEMM per sample with its kernel-attention mix of the static kernels, mixed a
  tile of samples x channels at a time;
* everywhere else, per-sample kernels: for kernels smaller than the feature maps, the input- and output-channel
  attentions are folded into them instead of scaling the maps; 1x1 kernels then run as one batched matmul, the others
  as the official conv over the batch; a kernel that varies with nothing (1x1, kernel_num 1) stays one static conv,
  and a batch of one runs a plain conv with its mixed kernel;
* a channels_last input gives a channels_last output without NCHW round trips: the conv over the batch sees the
  samples side by side in the channels of one NHWC image, 1x1 kernels multiply rows of positions.

Which form is faster was measured on CPU at batch 16 over the ResNet-18 layer shapes (the constants below); every form
gives the official numbers (tests compare forward and gradients).

For deployment, :meth:`ODConv2d.fuse_output_affine` folds the BatchNorm that follows the layer into it: its scale into
the static kernels (a per-output-channel scale commutes with every attention), its shift into a bias added last.

The attention's BatchNorm runs on the pooled (B, C) vectors; in training with a batch of one it normalises with its
running statistics, where the official layer raises.
"""
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from timm.layers import register_notrace_module

__all__ = ['ODConv2d', 'OmniAttention', 'odconv_temperature', 'set_temperature']

# Measured on CPU at batch 16 over the ResNet-18 layer shapes with kernel_num 1, 2 and 4: below 28 x 28 output
# positions per-sample kernels cost more than im2col columns; on such maps one GEMM with all kernels beats a GEMM per
# sample while (kernel_num - 1) * positions stays below 100 (7 x 7 maps at kernel_num 2), and below 300 in a training
# step (7 x 7 at kernel_num 4: 0.20 vs 0.36 s), whose backward through per-sample kernels is slow. Mixed kernels are
# made a tile at a time, below glibc's 32 MiB mmap threshold, beyond which every call pays for fresh pages: tiles of a
# few samples and all channels at most 24 MiB (fewer passes over the kernel bank), tiles of all samples and a block of
# channels at most 8 MiB (ResNet-18's last stage at kernel_num 4: 0.6x the time of 24 MiB tiles). Without autograd, a
# static kernel's GEMM runs as oneDNN's 1x1 conv over the columns where they have at least 4 rows per output channel
# (ResNet-18's 14 x 14 stage: 0.92x the time of MKL's GEMM; its 7 x 7 stage, 1.5 rows per channel: 1.1-1.2x).
COLUMNS_MAX_POSITIONS = 28 * 28
STACKED_KERNELS_MAX_EXTRA_POSITIONS = 100
STACKED_KERNELS_MAX_EXTRA_POSITIONS_AUTOGRAD = 300
MIXED_KERNELS_MAX_BYTES = 24 * 2 ** 20
MIXED_KERNEL_BLOCKS_MAX_BYTES = 8 * 2 ** 20
ONE_BY_ONE_CONV_MIN_ROWS_PER_OUTPUT_CHANNEL = 4


class AttentionBatchNorm(nn.BatchNorm1d):
    """BatchNorm over pooled (B, C) features that also runs in training with a batch of one.

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
    """The four ODConv attentions of a (B, C_in, H, W) input; see the module docstring.

    The 1x1 convs keep the official parameter shapes but run as linear layers on the pooled vectors, the heads as one
    GEMM: on (B, C, 1, 1) tensors a conv call costs far more than its arithmetic.
    """

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
        self.temperature = 1.0
        self.fc = nn.Conv2d(in_chs, attn_chs, 1, bias=False)
        self.bn = AttentionBatchNorm(attn_chs)
        self.act = nn.ReLU(inplace=True)
        self.channel_fc = nn.Conv2d(attn_chs, in_chs, 1)
        is_depthwise = in_chs == groups == out_chs
        self.filter_fc = None if is_depthwise else nn.Conv2d(attn_chs, out_chs, 1)
        self.spatial_fc = nn.Conv2d(attn_chs, kernel_size * kernel_size, 1) if kernel_size > 1 else None
        self.kernel_fc = nn.Conv2d(attn_chs, kernel_num, 1) if kernel_num > 1 else None
        # widths of the heads' outputs in the merged GEMM, absent heads 0: channel, filter, spatial, kernel
        self.head_chs = [in_chs, 0 if is_depthwise else out_chs, kernel_size * kernel_size if kernel_size > 1 else 0,
                         kernel_num if kernel_num > 1 else 0]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _head_parameters(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The present heads' weights (sum of widths, attn_chs) and biases, in ``head_chs`` order."""
        weights, biases = [self.channel_fc.weight], [self.channel_fc.bias]
        if self.filter_fc is not None:
            weights.append(self.filter_fc.weight)
            biases.append(self.filter_fc.bias)
        if self.spatial_fc is not None:
            weights.append(self.spatial_fc.weight)
            biases.append(self.spatial_fc.bias)
        if self.kernel_fc is not None:
            weights.append(self.kernel_fc.weight)
            biases.append(self.kernel_fc.bias)
        present: List[torch.Tensor] = []
        for bias in biases:  # every head has a bias; Optional only to the type checker
            if bias is not None:
                present.append(bias)
        return torch.cat(weights).flatten(1), torch.cat(present)

    def forward(self, x: torch.Tensor) -> Tuple[
            torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Attentions over input channels (B, C_in, 1, 1), output channels (B, C_out, 1, 1) or None, kernel
        positions (B, k * k) or None, and kernels (B, kernel_num) or None."""
        b, _, h, w = x.shape
        pooled = x.sum((2, 3)) / (h * w)  # the mean; mean's backward writes a full-size gradient, sum's broadcasts
        context = self.act(self.bn(F.linear(pooled, self.fc.weight.flatten(1))))
        weight, bias = self._head_parameters()
        logits = F.linear(context, weight, bias) / self.temperature
        channel_chs, filter_chs, spatial_chs, kernel_chs = self.head_chs
        sigmoid_chs = channel_chs + filter_chs + spatial_chs
        gates = torch.sigmoid(logits[:, :sigmoid_chs])
        channel = gates[:, :channel_chs].reshape(b, channel_chs, 1, 1)
        filters: Optional[torch.Tensor] = None
        if filter_chs:
            filters = gates[:, channel_chs:channel_chs + filter_chs].reshape(b, filter_chs, 1, 1)
        spatial: Optional[torch.Tensor] = None
        if spatial_chs:
            spatial = gates[:, channel_chs + filter_chs:sigmoid_chs]
        kernels: Optional[torch.Tensor] = None
        if kernel_chs:
            kernels = torch.softmax(logits[:, sigmoid_chs:], dim=1)
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
        self.stacked_kernels_max_extra_positions_autograd = STACKED_KERNELS_MAX_EXTRA_POSITIONS_AUTOGRAD
        self.mixed_kernels_max_bytes = MIXED_KERNELS_MAX_BYTES
        self.mixed_kernel_blocks_max_bytes = MIXED_KERNEL_BLOCKS_MAX_BYTES
        self.one_by_one_conv_min_rows_per_output_channel = ONE_BY_ONE_CONV_MIN_ROWS_PER_OUTPUT_CHANNEL
        self.attention = OmniAttention(
            in_chs, out_chs, kernel_size, groups=groups, reduction=reduction, kernel_num=kernel_num,
            min_channels=min_channels)
        self.weight = nn.Parameter(torch.empty(kernel_num, out_chs, in_chs // groups, kernel_size, kernel_size))
        self.register_parameter('bias', None)  # only a deploy form has one (see fuse_output_affine)
        for kernel in self.weight.data:
            nn.init.kaiming_normal_(kernel, mode='fan_out', nonlinearity='relu')

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> 'ODConv2d':
        # nn.Module.to(memory_format=torch.channels_last) (timm's --channels-last) converts 4-D and 5-D tensors alike
        # and fails on 5-D ones: the kernel bank (and its gradient) goes through it as (kernel_num * C_out, ...).
        def fn_4d(t: torch.Tensor) -> torch.Tensor:
            return fn(t.flatten(0, 1)).view(t.shape) if t.dim() == 5 else fn(t)
        return super()._apply(fn_4d, recurse)

    def extra_repr(self) -> str:
        return (f'{self.in_chs}, {self.out_chs}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, groups={self.groups}, kernel_num={self.kernel_num}, '
                f'bias={self.bias is not None}')

    @torch.no_grad()
    def fuse_output_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold ``scale * out + shift`` per output channel (C_out,) into this layer, e.g. the eval-mode BatchNorm
        that follows it: the scale goes into the static kernels (it commutes with every attention), the shift
        becomes a bias added after the output-channel attention."""
        scale64, shift64 = scale.double(), shift.double()
        self.weight.copy_(self.weight.double() * scale64.view(1, -1, 1, 1, 1))
        bias = shift64 if self.bias is None else self.bias.double() * scale64 + shift64
        self.bias = nn.Parameter(bias.to(self.weight.dtype))

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
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if not reference and self.groups == 1 and self.kernel_size > 1 and self._is_small_map(x):
            return self._scale_and_shift(self._columns_conv(x, channel, spatial, kernels), filters)
        if not reference and self._fold_attentions(x):
            return self._conv(x, self.mixed_weight(spatial, kernels, channel, filters), reference, self.bias)
        return self._scale_and_shift(self._conv(x * channel, self.mixed_weight(spatial, kernels), reference), filters)

    def _scale_and_shift(self, out: torch.Tensor, filters: Optional[torch.Tensor]) -> torch.Tensor:
        """``out`` times the output-channel attention (B, C_out, 1, 1), plus the bias; one pass over ``out``."""
        if self.bias is None:
            return out if filters is None else out * filters
        bias = self.bias.view(1, -1, 1, 1)
        return out + bias if filters is None else torch.addcmul(bias, out, filters)

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
            weight = self._scaled(weight, spatial.view(-1, 1, 1, self.kernel_size, self.kernel_size))
        # the channel attentions are combined first: (B, C_out, C_in / groups) is k * k times smaller than the kernels
        scale: Optional[torch.Tensor] = None
        if channel is not None:
            b, g = channel.shape[0], self.groups
            per_group = channel.view(b, g, 1, self.in_chs // g).expand(b, g, self.out_chs // g, self.in_chs // g)
            scale = per_group.reshape(b, self.out_chs, self.in_chs // g)
        if filters is not None:
            per_output = filters.view(-1, self.out_chs, 1)
            scale = per_output if scale is None else scale * per_output
        if scale is not None:
            weight = self._scaled(weight, scale.view(scale.shape[0], self.out_chs, -1, 1, 1))
        return weight

    def _scaled(self, weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``weight * factor``, in place once ``weight`` is this call's own per-sample buffer: allocating a second one
        doubled the time of the two multiplies (CPU, batch 16)."""
        return weight * factor if weight is self.weight else weight.mul_(factor)

    def _out_size(self, size: int) -> int:
        return (size + 2 * self.padding - self.dilation * (self.kernel_size - 1) - 1) // self.stride + 1

    def _positions(self, x: torch.Tensor) -> int:
        return self._out_size(x.shape[-2]) * self._out_size(x.shape[-1])

    def _is_small_map(self, x: torch.Tensor) -> bool:
        """Small maps: per-sample kernels cost more than k * k copies of the input."""
        return self._positions(x) < self.columns_max_positions

    def _stacked_kernels_pay_off(self, x: torch.Tensor) -> bool:
        """On a small map with several kernels, whether one GEMM with all of them (kernel_num times the FLOPs) beats
        mixing a kernel per sample."""
        limit = self.stacked_kernels_max_extra_positions_autograd if torch.is_grad_enabled() \
            else self.stacked_kernels_max_extra_positions
        return (self.kernel_num - 1) * self._positions(x) < limit

    def _fold_attentions(self, x: torch.Tensor) -> bool:
        """Whether to scale the per-sample kernels by the channel attentions rather than the input and output:
        when a kernel is smaller than the two feature maps."""
        return self.weight[0].numel() < x[0].numel() + self.out_chs * self._positions(x)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, reference: bool,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, C_in, H, W) convolved with static (1, ...) or per-sample (B, ...) kernels, plus ``bias``."""
        b, c, h, w = x.shape
        if weight.shape[0] == 1:
            return F.conv2d(x, weight[0], bias, self.stride, self.padding, self.dilation, self.groups)
        if not reference and self.kernel_size == 1 and self.groups == 1 and self.padding == 0:
            return self._pointwise_bmm(x, weight, bias)
        if not reference and _is_channels_last(x):
            return self._conv_over_batch_channels_last(x, weight, bias)
        weight = weight.reshape(b * self.out_chs, c // self.groups, self.kernel_size, self.kernel_size).contiguous()
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, None if bias is None else bias.repeat(b), self.stride,
                       self.padding, self.dilation, self.groups * b)
        return out.view(b, self.out_chs, out.shape[-2], out.shape[-1])

    def _pointwise_bmm(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """A 1x1 conv with per-sample kernels (B, C_out, C_in, 1, 1) as one batched matmul, in x's memory format."""
        channels_last = _is_channels_last(x)
        x = x[:, :, ::self.stride, ::self.stride]
        b, c, ho, wo = x.shape
        weight = weight.view(b, self.out_chs, c)
        if channels_last:  # rows of positions (B, H' * W', C_in) times the transposed kernels: channels_last out
            rows, kernels = x.permute(0, 2, 3, 1).reshape(b, ho * wo, c), weight.transpose(1, 2)
            out = torch.bmm(rows, kernels) if bias is None else torch.baddbmm(bias.view(1, 1, -1), rows, kernels)
            return out.view(b, ho, wo, self.out_chs).permute(0, 3, 1, 2)
        x = x.reshape(b, c, ho * wo)
        out = torch.bmm(weight, x) if bias is None else torch.baddbmm(bias.view(1, -1, 1), weight, x)
        return out.view(b, self.out_chs, ho, wo)

    def _conv_over_batch_channels_last(self, x: torch.Tensor, weight: torch.Tensor,
                                       bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The conv over the batch for a channels_last x: the samples lie side by side in the channels of one
        (1, B * C_in, H, W) image in channels_last memory (H, W, B, C_in), and the output goes back the same way;
        each move copies whole channel vectors (NCHW round trips: 1.3x the time, CPU)."""
        b, c = x.shape[0], x.shape[1]
        if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_scripting():
            image = _samples_into_channels_with_grad(x)
        else:
            image = _samples_into_channels(x)
        weight = weight.reshape(b * self.out_chs, c // self.groups, self.kernel_size, self.kernel_size)
        out = F.conv2d(image, weight.contiguous(memory_format=torch.channels_last),
                       None if bias is None else bias.repeat(b), self.stride, self.padding, self.dilation,
                       self.groups * b)
        return _channels_into_samples(out, b)

    def _columns_conv(self, x: torch.Tensor, channel: torch.Tensor, spatial: Optional[torch.Tensor],
                      kernels: Optional[torch.Tensor]) -> torch.Tensor:
        """A dense k x k ODConv as GEMMs over im2col columns: (B, C_in, H, W) -> (B, C_out, H', W') in
        channels-last memory.

        The spatial and input-channel attentions scale the columns instead of the kernel, so a static kernel serves the
        whole batch. With several kernels: one GEMM with all of them, whose kernel_num outputs each sample mixes with
        its kernel attention, or, where that many FLOPs cost more, a GEMM per sample with its own mixed kernel.
        """
        b = x.shape[0]
        ho, wo = self._out_size(x.shape[-2]), self._out_size(x.shape[-1])
        columns = self._columns(x, channel, spatial)
        if kernels is None:
            kernel = _taps_outermost(self.weight)[0]
            if self._one_by_one_conv_pays_off(b * ho * wo):
                # the columns (B, H', W', k * k * C_in) are an image of k * k * C_in channels in channels-last memory
                return F.conv2d(columns.view(b, ho, wo, -1).permute(0, 3, 1, 2), kernel.view(self.out_chs, -1, 1, 1))
            rows = F.linear(columns, kernel)
        elif self._stacked_kernels_pay_off(x):
            rows = F.linear(columns, _taps_outermost(self.weight).view(self.kernel_num * self.out_chs, -1))
            rows = (rows.view(b, ho * wo, self.kernel_num, self.out_chs) * kernels.view(b, 1, -1, 1)).sum(dim=2)
        else:
            rows = self._per_sample_gemm(columns, kernels)
        return rows.view(b, ho, wo, self.out_chs).permute(0, 3, 1, 2)  # channels_last memory, no copy

    def _columns(self, x: torch.Tensor, channel: torch.Tensor, spatial: Optional[torch.Tensor]) -> torch.Tensor:
        """im2col columns (B, H' * W', k * k * C_in), taps outermost within a row, scaled by the input-channel and
        spatial attentions."""
        b, c = x.shape[:2]
        k, d, s = self.kernel_size, self.dilation, self.stride
        ho, wo = self._out_size(x.shape[-2]), self._out_size(x.shape[-1])
        padded = self._padded_channels_last(x)
        gate = channel.view(b, 1, 1, 1, 1, c)
        if spatial is not None:
            gate = gate * spatial.view(b, 1, 1, k, k, 1)
        sb, sh, sw = padded.stride(0), padded.stride(1), padded.stride(2)
        # the overlapping k x k windows of the input, a strided view (B, H', W', k, k, C_in)
        windows = padded.as_strided((b, ho, wo, k, k, c), (sb, s * sh, s * sw, d * sh, d * sw, 1))
        if not torch.is_grad_enabled():
            columns = _windows_times_gate(windows, gate)
        elif torch.jit.is_scripting() or torch.compiler.is_compiling():
            # autograd through the overlapping view: exact, slower; the Function's in-place backward into overlapping
            # views of one buffer is beyond TorchScript and mis-traced by torch.compile (wrong input gradient)
            columns = (windows * gate).contiguous()
        else:
            columns = _windows_times_gate_with_grad(padded, windows, gate)
        return columns.view(b, ho * wo, k * k * c)

    def _one_by_one_conv_pays_off(self, rows: int) -> bool:
        """Whether the static kernel's GEMM over ``rows`` columns runs faster as oneDNN's 1x1 conv than as MKL's GEMM:
        without autograd, where the columns outweigh the kernel."""
        return not torch.is_grad_enabled() and rows >= self.one_by_one_conv_min_rows_per_output_channel * self.out_chs

    def _padded_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) zero-padded, (B, H + 2p, W + 2p, C) contiguous: every tap of a window is then a run of
        contiguous channel vectors. One copy whatever x's memory format, and only the border zeroed."""
        b, c, h, w = x.shape
        p = self.padding
        padded = x.new_empty((b, h + 2 * p, w + 2 * p, c))
        padded[:, :p].zero_()
        padded[:, p + h:].zero_()
        padded[:, p:p + h, :p].zero_()
        padded[:, p:p + h, p + w:].zero_()
        padded[:, p:p + h, p:p + w].copy_(x.permute(0, 2, 3, 1))
        return padded

    def _per_sample_gemm(self, columns: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """Rows (B, H' * W', C_out): each sample's columns (B, H' * W', k * k * C_in) times its kernel-attention mix
        (B, kernel_num) of the static kernels.

        The mixed kernels are made a tile of samples x output channels at a time. Each tile re-reads its samples'
        columns and its channels' static kernels, so the tiles span all the samples when the static kernels outweigh
        the columns (kernel_num * C_out > B * H' * W'; ``mixed_kernel_blocks_max_bytes``), all the channels otherwise
        (``mixed_kernels_max_bytes``).
        """
        b, positions, width = columns.shape
        row_bytes = width * columns.element_size()
        if self.kernel_num * self.out_chs > b * positions:
            samples, block = b, max(1, self.mixed_kernel_blocks_max_bytes // (b * row_bytes))
        else:
            samples, block = max(1, self.mixed_kernels_max_bytes // (self.out_chs * row_bytes)), self.out_chs
        rows: List[torch.Tensor] = []
        for start in range(0, self.out_chs, block):
            bank = _taps_outermost(self.weight[:, start:start + block]).view(self.kernel_num, -1)
            tile_rows: List[torch.Tensor] = []
            for first in range(0, b, samples):
                mixed = torch.mm(kernels[first:first + samples], bank).view(-1, bank.shape[1] // width, width)
                tile_rows.append(torch.bmm(columns[first:first + samples], mixed.transpose(1, 2)))
            rows.append(torch.cat(tile_rows))
        return torch.cat(rows, dim=2)


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether x (B, C, H, W) lies in channels_last memory and not also in NCHW (a 1 x 1 map is both)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _samples_into_channels(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) as one image (1, B * C, H, W) in channels_last memory (H, W, B, C): one copy."""
    b, c, h, w = x.shape
    return x.permute(2, 3, 0, 1).reshape(1, h, w, b * c).permute(0, 3, 1, 2)


def _channels_into_samples(image: torch.Tensor, b: int) -> torch.Tensor:
    """The inverse of :func:`_samples_into_channels`: (1, B * C, H, W) -> (B, C, H, W) in channels_last memory."""
    _, bc, h, w = image.shape
    per_position = image.permute(0, 2, 3, 1).reshape(h, w, b, bc // b)
    return per_position.permute(2, 3, 0, 1).contiguous(memory_format=torch.channels_last)


class _SamplesIntoChannels(torch.autograd.Function):
    """:func:`_samples_into_channels` whose backward hands back a channels_last gradient: autograd's own is a
    permuted view of the (H, W, B, C) one, on which the BatchNorm backward before this layer took 5-10x its time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.batch = x.shape[0]
        return _samples_into_channels(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _channels_into_samples(grad, ctx.batch)


@torch.jit.unused  # TorchScript cannot run an autograd.Function: scripted models take autograd's gradient
def _samples_into_channels_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _SamplesIntoChannels.apply(x)


def _windows_times_gate(windows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``windows * gate`` as a new contiguous tensor, written in one pass."""
    if torch.compiler.is_compiling():  # inductor fuses the copy into the multiply, and loses track of out='s strides
        return (windows * gate).contiguous()
    columns = torch.empty(windows.shape, dtype=windows.dtype, device=windows.device)
    return torch.mul(windows, gate, out=columns)


class _WindowsTimesGate(torch.autograd.Function):
    """``windows * gate`` with autograd, ``windows`` being an overlapping strided view of ``padded`` from its first
    element: the backward adds each of the k * k taps' gradients into one buffer in place (autograd would zero-pad a
    copy per tap, or take the slow general path of a view whose elements overlap)."""

    @staticmethod
    def forward(ctx, padded: torch.Tensor, windows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(padded, gate)
        ctx.geometry = windows.shape, windows.stride()
        return _windows_times_gate(windows, gate)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, Optional[torch.Tensor]]:
        padded, gate = ctx.saved_tensors
        size, stride = ctx.geometry
        grad_padded = grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_padded = torch.zeros_like(padded)
            tap_size, tap_stride = size[:3] + size[-1:], stride[:3] + stride[-1:]
            for i in range(size[3]):
                for j in range(size[4]):
                    tap = grad_padded.as_strided(tap_size, tap_stride, i * stride[3] + j * stride[4])
                    tap.addcmul_(grad[:, :, :, i, j], gate[:, :, :, i, j])
        if ctx.needs_input_grad[2]:
            windows = padded.as_strided(size, stride)
            grad_gate = (grad * windows).sum((1, 2), keepdim=True).sum_to_size(gate.shape)
        return grad_padded, None, grad_gate


@torch.jit.unused  # TorchScript cannot run an autograd.Function: scripted models take the plain multiply
def _windows_times_gate_with_grad(padded: torch.Tensor, windows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return _WindowsTimesGate.apply(padded, windows, gate)


def _taps_outermost(weight: torch.Tensor) -> torch.Tensor:
    """Kernels (N, C_out, C_in, k, k) as rows (N, C_out, k * k * C_in), taps outermost like the im2col columns."""
    return weight.permute(0, 1, 3, 4, 2).reshape(weight.shape[0], weight.shape[1], -1)


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
