"""Omni-Dimensional Dynamic Convolution (ODConv).

Paper: `Omni-Dimensional Dynamic Convolution` (Li, Zhou, Yao; ICLR 2022) - https://openreview.net/forum?id=DmpCfq6Mg39
Official code: https://github.com/OSVAI/ODConv

``kernel_num`` static kernels W_i of shape (C_out, C_in / groups, k, k) are mixed per sample (Eq. 2 of the paper):

    y = (a_k1 * a_f * a_c * a_s * W_1 + ... + a_kn * a_f * a_c * a_s * W_n) conv x

by four attentions computed from the globally pooled input (pool -> 1x1 conv to max(int(C_in * reduction), 16)
channels -> BatchNorm -> ReLU -> one 1x1 conv head each, divided by the temperature): over the input channels a_c
(sigmoid), the output channels a_f (sigmoid; not for depthwise convs), the k x k kernel positions a_s (sigmoid; not
for 1x1 kernels) and the kernels a_k (softmax; not for kernel_num 1). Parameters and their names map 1:1 onto the
official ``ODConv2d``. :class:`ODConv2d` computes Eq. 2 in one of four
ways (its docstring), all equal to float rounding.

The attention's BatchNorm runs on the pooled (B, C) vectors; in training with a batch of one it normalises with its
running statistics, where the official layer raises.
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from ._tracing import is_exporting
from .odconv_fast import (Attentions, ConvGeometry, gated_columns, grouped, out_size, per_sample_columns,
                          stacked_columns)

__all__ = ['ODConv2d', 'OmniAttention', 'odconv_temperature', 'set_temperature']


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

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, attn_chs: int, groups: int = 1, kernel_num: int = 4,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        """
        Args:
            in_chs: Input channels C_in of the ODConv.
            out_chs: Output channels C_out of the ODConv.
            kernel_size: Its square kernel size k.
            attn_chs: Width of the hidden layer.
            groups: Its convolution groups (``groups == C_in == C_out`` is depthwise: no output-channel head).
            kernel_num: Its number of static kernels (1: no kernel head).
            device: Device of the parameters.
            dtype: Data type of the parameters.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.temperature = 1.0
        self.fc = nn.Conv2d(in_chs, attn_chs, 1, bias=False, **dd)
        self.bn = AttentionBatchNorm(attn_chs, **dd)
        self.act = nn.ReLU(inplace=True)
        self.channel_fc = nn.Conv2d(attn_chs, in_chs, 1, **dd)
        is_depthwise = in_chs == groups == out_chs
        self.filter_fc = None if is_depthwise else nn.Conv2d(attn_chs, out_chs, 1, **dd)
        self.spatial_fc = nn.Conv2d(attn_chs, kernel_size * kernel_size, 1, **dd) if kernel_size > 1 else None
        self.kernel_fc = nn.Conv2d(attn_chs, kernel_num, 1, **dd) if kernel_num > 1 else None
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

    def forward(self, x: torch.Tensor) -> Attentions:
        """The attentions of x, in x's dtype."""
        h, w = x.shape[-2:]
        if torch.jit.is_scripting():
            return self._attentions(x.sum((2, 3)) / (h * w))
        if not (torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)):
            return self._attentions(x.sum((2, 3)) / (h * w))  # the mean; mean's backward writes a full-size gradient
        # float32 under mixed precision: the BatchNorm divides by variances far smaller than the means it removes
        # (0.01 against 5), which turns the rounding of a bfloat16 mean or layer into 10% errors of the attentions
        with torch.autocast(x.device.type, enabled=False):
            attentions = self._attentions(x.sum((2, 3), dtype=torch.float32) / (h * w))
        return Attentions(attentions.channel.to(x.dtype), _cast(attentions.filters, x.dtype),
                          _cast(attentions.spatial, x.dtype), _cast(attentions.kernels, x.dtype))

    def _attentions(self, pooled: torch.Tensor) -> Attentions:
        """The four attentions of the pooled input (B, C_in)."""
        b = pooled.shape[0]
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
        return Attentions(channel, filters, spatial, kernels)


def _cast(attention: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if attention is None else attention.to(dtype)


@register_notrace_module  # the computation is chosen from the input's shape: a leaf for torch.fx
class ODConv2d(nn.Module):
    """Drop-in for ``nn.Conv2d`` (no bias): (B, C_in, H, W) -> (B, C_out, H', W') with per-sample dynamic kernels,
    in the input's memory format.

    Four computations of the same numbers (``zoo/layers/odconv_fast.py``), one per call, as :meth:`computation` says:

    * ``grouped``: each sample's kernel mixed from the static ones with all four attentions, then one conv over the
      batch with ``groups = B * groups`` (the paper's and the official form). The default on every device.
    * ``gated_columns`` (CPU): the input-channel and spatial attentions scale the input's im2col columns, which meet
      the static kernel in one GEMM for the whole batch (kernel_num 1) or each sample's kernel-attention mix of the
      static kernels, a block of output channels at a time. For the dense k x k convs on small maps, and the 1x1
      convs with one static kernel that outweighs the maps.
    * ``stacked_columns`` (CPU, with autograd): the scaled columns times all the static kernels in one GEMM, each
      sample's outputs mixed by its kernel attention afterwards; kernel_num times the FLOPs, but in large GEMMs, whose
      backward beats that of the per-sample ones on the smallest maps.
    * ``per_sample_columns``: each sample's mixed kernel times its im2col columns, one batched matmul. On CPU for
      the other dense 1x1 convs; under export (torch.onnx, torch.jit.trace) and TorchScript for every conv, since
      no op in it depends on the batch size.

    Attributes:
        columns_device: Device type on which the column computations run (GEMMs over columns beat oneDNN's grouped
            conv over the batch there: benchmarks/RESULTS.md); any other device runs ``grouped``.
        columns_max_positions: On ``columns_device``, a dense k x k conv (k > 1) with fewer output positions than
            this runs ``gated_columns`` (their k * k copies of the input stay small), a larger one ``grouped``.
        stacked_max_extra_positions: With autograd on ``columns_device``, a dense k x k conv with several static
            kernels runs ``stacked_columns`` while (kernel_num - 1) * output positions (the GEMM rows it adds per
            sample) stay below this.
        columns_conv_min_rows: Without autograd, ``gated_columns`` with one static kernel runs its GEMM as oneDNN's
            1x1 conv over the columns from this many rows (batch x output positions) per output channel, as MKL's
            GEMM below (oneDNN reorders the kernel on every call).
        columns_tile_bytes: ``gated_columns`` with several static kernels mixes them for a block of output channels
            at a time, the block's mixed kernels for the whole batch taking at most this many bytes: a fresh buffer
            above glibc's mmap threshold (32 MiB) pays its page faults on every call.

    The static kernels are one parameter ``weight`` of kernel_num * C_out kernels (kernel_num * C_out, C_in / groups,
    k, k), which ``nn.Module.to(memory_format=...)`` converts like any conv weight; :meth:`kernel_bank` views it as
    (kernel_num, C_out, C_in / groups, k, k), the official layout, which is also the state dict's: a state-dict hook
    writes it and a load pre-hook reads it (or the parameter's own layout), so official checkpoints load as they are.

    A deploy form (``zoo.layers.fuse_conv_bn``) has a bias, added after the output-channel attention.
    """

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
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
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
            device: Device of the parameters.
            dtype: Data type of the parameters.
        """
        super().__init__()
        self.in_chs, self.out_chs, self.kernel_size = in_chs, out_chs, kernel_size
        self.stride, self.dilation, self.groups, self.kernel_num = stride, dilation, groups, kernel_num
        self.padding = dilation * (kernel_size // 2) if padding is None else padding
        self.columns_device = 'cpu'
        self.columns_max_positions = 28 * 28
        self.stacked_max_extra_positions = 300
        self.columns_conv_min_rows = 4
        self.columns_tile_bytes = 16 * 2 ** 20
        self.attention = OmniAttention(
            in_chs, out_chs, kernel_size, max(int(in_chs * reduction), min_channels), groups=groups,
            kernel_num=kernel_num, device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(
            kernel_num * out_chs, in_chs // groups, kernel_size, kernel_size, device=device, dtype=dtype))
        self.register_parameter('bias', None)
        for kernel in self.kernel_bank().detach():
            nn.init.kaiming_normal_(kernel, mode='fan_out', nonlinearity='relu')
        self.register_state_dict_post_hook(_bank_to_state_dict)
        self.register_load_state_dict_pre_hook(_bank_from_state_dict)

    def kernel_bank(self) -> torch.Tensor:
        """The static kernels as (kernel_num, C_out, C_in / groups, k, k), a view of ``weight``."""
        k = self.kernel_size
        return self.weight.view(self.kernel_num, self.out_chs, self.in_chs // self.groups, k, k)

    def extra_repr(self) -> str:
        return (f'{self.in_chs}, {self.out_chs}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, groups={self.groups}, kernel_num={self.kernel_num}, '
                f'bias={self.bias is not None}')

    def computation(self, x: torch.Tensor) -> str:
        """The computation for input x (B, C_in, H, W): ``per_sample_columns`` under export and TorchScript;
        ``grouped`` off ``columns_device`` and for grouped convs. On ``columns_device``, a dense k x k conv runs
        ``grouped`` from ``columns_max_positions`` output positions, else ``stacked_columns`` with autograd within
        ``stacked_max_extra_positions``, else ``gated_columns``; a dense 1x1 conv runs ``gated_columns`` where its
        one static kernel (kernel_num 1) outweighs the maps it would scale, else ``per_sample_columns``."""
        if torch.jit.is_scripting() or is_exporting():
            return 'per_sample_columns'
        if x.device.type != self.columns_device or self.groups != 1:
            return 'grouped'
        conv = self._geometry()
        positions = out_size(x.shape[-2], conv) * out_size(x.shape[-1], conv)
        if self.kernel_size > 1:
            if positions >= self.columns_max_positions:
                return 'grouped'
            stacked = self.kernel_num > 1 and (self.kernel_num - 1) * positions < self.stacked_max_extra_positions
            return 'stacked_columns' if stacked and torch.is_grad_enabled() else 'gated_columns'
        if self.kernel_num == 1 and self.weight.numel() >= x[0].numel() + self.out_chs * positions:
            return 'gated_columns'
        return 'per_sample_columns'

    def _geometry(self) -> ConvGeometry:
        return ConvGeometry(self.kernel_size, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, bank, conv = self.attention(x), self.kernel_bank(), self._geometry()
        if torch.jit.is_scripting():  # TorchScript compiles no other branch: it cannot run an autograd Function
            return per_sample_columns(x, bank, self.bias, attn, conv)
        else:
            computation = self.computation(x)
            if computation == 'gated_columns':
                return gated_columns(x, bank, self.bias, attn, conv, self.columns_tile_bytes,
                                     self.columns_conv_min_rows)
            if computation == 'stacked_columns':
                return stacked_columns(x, bank, self.bias, attn, conv)
            if computation == 'per_sample_columns':
                return per_sample_columns(x, bank, self.bias, attn, conv)
            return grouped(x, bank, self.bias, attn, conv)


def _bank_to_state_dict(module: ODConv2d, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """The state dict holds the kernel bank in the official (kernel_num, C_out, C_in / groups, k, k) layout."""
    if prefix + 'weight' in state_dict:
        state_dict[prefix + 'weight'] = state_dict[prefix + 'weight'].view(module.kernel_bank().shape)


def _bank_from_state_dict(module: ODConv2d, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    """A kernel bank in the official layout loads into the (kernel_num * C_out, ...) parameter; other shapes go on
    to load_state_dict's own check."""
    weight = state_dict.get(prefix + 'weight')
    if isinstance(weight, torch.Tensor) and weight.shape == module.kernel_bank().shape:
        state_dict[prefix + 'weight'] = weight.reshape(module.weight.shape)


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
