"""The computations of ODConv (``ODConv2d``; :meth:`ODConv2d.computation` chooses one per call).

Each takes a (B, C_in, H, W) input, the four attentions of :class:`Attentions` and the static kernels ``weight``
(kernel_num, C_out, C_in / groups, k, k), and returns ``filters * conv(channel * x, sum_n kernels_n * spatial *
weight_n) + bias`` (B, C_out, H', W') in the input's memory format:

* :func:`grouped` (every device): each sample's kernel mixed from the static ones with all four attentions, then one
  conv over the batch with ``groups = B * groups``: the paper's form.
* :func:`gated_columns` (CPU): Eq. 2 by linearity on the input's im2col columns: the input-channel and spatial
  attentions scale the columns (a 1x1 kernel's columns are the input itself), which then meet each sample's
  kernel-attention mix of the static kernels; with one static kernel that is a single GEMM for the whole batch.
* :func:`stacked_columns` (CPU, training on the smallest maps): the scaled columns times all the static kernels in
  one GEMM, each sample's outputs mixed by its kernel attention afterwards.
* :func:`per_sample_columns` (CPU, export, TorchScript): each sample's mixed kernel times its im2col columns, one
  batched matmul; no op depends on the batch size, so a captured graph serves every batch.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ['Attentions', 'ConvGeometry', 'gated_columns', 'grouped', 'is_channels_last', 'mixed_kernels', 'out_size',
           'per_sample_columns', 'stacked_columns']


class Attentions(NamedTuple):
    """The attentions of a batch of B inputs (``OmniAttention``); None where the layer has no such variation."""
    channel: torch.Tensor  # input channels (B, C_in, 1, 1)
    filters: Optional[torch.Tensor]  # output channels (B, C_out, 1, 1); None for depthwise convs
    spatial: Optional[torch.Tensor]  # kernel positions (B, k * k); None for 1x1 kernels
    kernels: Optional[torch.Tensor]  # static kernels (B, kernel_num); None for kernel_num 1


class ConvGeometry(NamedTuple):
    """The convolution's square kernel size, stride, padding, dilation and groups."""
    kernel_size: int
    stride: int
    padding: int
    dilation: int
    groups: int


def out_size(size: int, conv: ConvGeometry) -> int:
    """Output length of an input side of ``size``."""
    return (size + 2 * conv.padding - conv.dilation * (conv.kernel_size - 1) - 1) // conv.stride + 1


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x (B, C, H, W) lies in channels_last memory and not also in NCHW (a 1 x 1 map is both)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def mixed_kernels(weight: torch.Tensor, attn: Attentions) -> torch.Tensor:
    """Per-sample kernels (B, C_out, C_in / groups, k, k): the kernel-attention mix of the static kernels ``weight``
    (kernel_num, C_out, C_in / groups, k, k) times the spatial, input-channel and output-channel attentions."""
    b, out_chs, in_per_group, k = attn.channel.shape[0], weight.shape[1], weight.shape[2], weight.shape[-1]
    kernels, spatial, filters = attn.kernels, attn.spatial, attn.filters  # locals: TorchScript refines Optionals
    mixed = weight[:1] if kernels is None else torch.mm(kernels, weight.flatten(1)).view(b, out_chs, in_per_group, k, k)
    if spatial is not None:
        mixed = mixed * spatial.view(-1, 1, 1, k, k)
    # the channel attentions meet first: (B, C_out, C_in / groups) is k * k times smaller than the kernels
    groups = attn.channel.shape[1] // in_per_group
    scale = attn.channel.view(b, groups, 1, in_per_group).expand(b, groups, out_chs // groups, in_per_group)
    scale = scale.reshape(b, out_chs, in_per_group)
    if filters is not None:
        scale = scale * filters.view(b, out_chs, 1)
    return mixed * scale.view(b, out_chs, in_per_group, 1, 1)


def grouped(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], attn: Attentions,
            conv: ConvGeometry) -> torch.Tensor:
    """The paper's computation: every sample's kernel with all four attentions mixed in, then one conv over the batch
    (the batch as one image of B * C_in channels, ``groups = B * groups``)."""
    b, c, h, w = x.shape
    mixed = mixed_kernels(weight, attn).expand(b, -1, -1, -1, -1)
    out_chs, k = mixed.shape[1], mixed.shape[-1]
    bias = None if bias is None else bias.repeat(b)
    if is_channels_last(x):
        # the samples side by side in the channels of one channels_last image: each move copies whole channel
        # vectors (NCHW round trips: 1.3x the time, CPU)
        image = _samples_into_channels(x) if torch.jit.is_scripting() else _SamplesIntoChannels.apply(x)
        out = F.conv2d(image, mixed.reshape(b * out_chs, c // conv.groups, k, k), bias, conv.stride, conv.padding,
                       conv.dilation, b * conv.groups)
        return _channels_into_samples(out, b)
    out = F.conv2d(x.reshape(1, b * c, h, w), mixed.reshape(b * out_chs, c // conv.groups, k, k), bias, conv.stride,
                   conv.padding, conv.dilation, b * conv.groups)
    return out.view(b, out_chs, out.shape[-2], out.shape[-1])


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
    permuted view of the (H, W, B, C) one, on which the BatchNorm backward before the layer is far slower
    (benchmarks/RESULTS.md, 2026-12-04)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.batch = x.shape[0]
        return _samples_into_channels(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _channels_into_samples(grad, ctx.batch)


def gated_columns(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], attn: Attentions,
                  conv: ConvGeometry, tile_bytes: int, conv_min_rows: int) -> torch.Tensor:
    """A dense conv (groups 1) as GEMMs over im2col columns scaled by the input-channel and spatial attentions, the
    output-channel attention and the bias after. The columns meet the static kernel (kernel_num 1: one GEMM for the
    whole batch, without autograd run as a 1x1 conv from ``conv_min_rows`` rows per output channel) or each sample's
    kernel-attention mix of the static kernels, made for a block of output channels at a time whose mixed kernels for
    the batch take at most ``tile_bytes`` (a 1x1 conv with kernel_num 1 only: its columns are the input, one conv in
    x's own memory format)."""
    b, kernel_num = x.shape[0], weight.shape[0]
    if conv.kernel_size == 1 and kernel_num == 1:
        x = x if conv.stride == 1 else x[:, :, ::conv.stride, ::conv.stride]
        return _scale_and_shift(F.conv2d(x * attn.channel, weight[0]), attn.filters, bias)
    ho, wo = out_size(x.shape[-2], conv), out_size(x.shape[-1], conv)
    columns = _scaled_columns(x, attn, conv)  # (B, H' * W', k * k * C_in)
    kernels = attn.kernels
    if kernels is None:
        rows = _static_kernel_rows(columns, weight[0], (b, ho, wo), conv_min_rows)
    else:
        rows = _mixed_kernel_rows(columns, weight, kernels, tile_bytes)
    return _rows_as_output(rows, x, ho, wo, attn.filters, bias)


def _static_kernel_rows(columns: torch.Tensor, kernel: torch.Tensor, size: Tuple[int, int, int],
                        conv_min_rows: int) -> torch.Tensor:
    """Rows (B, H' * W', C_out): the columns (B, H' * W', k * k * C_in) of a batch of ``size`` (B, H', W') times one
    static kernel (C_out, C_in, k, k) in one GEMM; without autograd, from ``conv_min_rows`` rows per output channel,
    as oneDNN's 1x1 conv over the columns seen as an NHWC image (faster than MKL's GEMM once its reorder of the
    kernel, on every call, is spread over enough rows)."""
    b, ho, wo = size
    rows_kernel = _taps_outermost(kernel)
    if torch.is_grad_enabled() or b * ho * wo < conv_min_rows * kernel.shape[0]:
        return F.linear(columns, rows_kernel)
    image = columns.view(b, ho, wo, -1).permute(0, 3, 1, 2)
    return F.conv2d(image, rows_kernel[..., None, None]).permute(0, 2, 3, 1).flatten(1, 2)


def _mixed_kernel_rows(columns: torch.Tensor, weight: torch.Tensor, kernels: torch.Tensor,
                       tile_bytes: int) -> torch.Tensor:
    """Rows (B, H' * W', C_out): each sample's columns times its kernel-attention mix (B, kernel_num) of the static
    kernels (kernel_num, C_out, C_in, k, k), mixed for a block of output channels at a time whose kernels for the
    whole batch take at most ``tile_bytes``."""
    b, width = columns.shape[0], columns.shape[-1]
    block = max(1, tile_bytes // (b * width * columns.element_size()))
    blocks = []
    for start in range(0, weight.shape[1], block):
        mixed = torch.mm(kernels, _taps_outermost(weight[:, start:start + block]).flatten(1)).view(b, -1, width)
        blocks.append(torch.bmm(columns, mixed.transpose(1, 2)))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)


def stacked_columns(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], attn: Attentions,
                    conv: ConvGeometry) -> torch.Tensor:
    """A dense conv (groups 1) with several static kernels as one GEMM of the scaled im2col columns (as in
    :func:`gated_columns`) with all the static kernels, each sample's outputs then mixed by its kernel attention:
    kernel_num times the FLOPs, all in one large GEMM and its backward."""
    b, kernel_num, out_chs = x.shape[0], weight.shape[0], weight.shape[1]
    ho, wo = out_size(x.shape[-2], conv), out_size(x.shape[-1], conv)
    columns = _scaled_columns(x, attn, conv)
    rows = F.linear(columns, _taps_outermost(weight).flatten(0, 1)).view(b, ho * wo, kernel_num, out_chs)
    kernels = attn.kernels
    assert kernels is not None, 'stacked_columns needs the kernel attention of kernel_num > 1'
    rows = torch.matmul(kernels.view(b, 1, 1, kernel_num), rows).view(b, ho * wo, out_chs)
    return _rows_as_output(rows, x, ho, wo, attn.filters, bias)


def _rows_as_output(rows: torch.Tensor, x: torch.Tensor, ho: int, wo: int, filters: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Output rows (B, H' * W', C_out) as (B, C_out, H', W') in x's memory format, times the output-channel
    attention, plus the bias."""
    out = rows.view(rows.shape[0], ho, wo, rows.shape[-1]).permute(0, 3, 1, 2)  # channels_last memory, no copy
    return _scale_and_shift(out if is_channels_last(x) else out.contiguous(), filters, bias)


def _taps_outermost(kernels: torch.Tensor) -> torch.Tensor:
    """Kernels (..., C_out, C_in, k, k) as rows (..., C_out, k * k * C_in), taps outermost like the columns."""
    return kernels.movedim(-3, -1).flatten(-3)


def _scaled_columns(x: torch.Tensor, attn: Attentions, conv: ConvGeometry) -> torch.Tensor:
    """im2col columns (B, H' * W', k * k * C_in) of x, taps outermost within a row, scaled by the input-channel and
    spatial attentions."""
    b, c, k, p = x.shape[0], x.shape[1], conv.kernel_size, conv.padding
    ho, wo = out_size(x.shape[-2], conv), out_size(x.shape[-1], conv)
    padded = _padded_channels_last(x, p)
    gate = attn.channel.view(b, 1, 1, 1, 1, c)
    if attn.spatial is not None:
        gate = gate * attn.spatial.view(b, 1, 1, k, k, 1)
    sb, sh, sw = padded.stride(0), padded.stride(1), padded.stride(2)
    # the overlapping k x k windows of the input, a strided view (B, H', W', k, k, C_in)
    windows = padded.as_strided((b, ho, wo, k, k, c), (sb, conv.stride * sh, conv.stride * sw, conv.dilation * sh,
                                                       conv.dilation * sw, 1))
    if torch.compiler.is_compiling():  # inductor derives its own backward; it mis-traces the in-place one below
        columns = (windows * gate).contiguous()
    else:
        columns = _WindowsTimesGate.apply(padded, windows, gate)
    return columns.view(b, ho * wo, k * k * c)


class _WindowsTimesGate(torch.autograd.Function):
    """``windows * gate`` into a contiguous buffer, ``windows`` being an overlapping strided view of ``padded`` from
    its first element. Autograd's own backward takes the slow general path of a view whose elements overlap: this one
    adds each of the k * k taps' gradients into one buffer in place (1.5x faster ODConv layers on 14 x 14 maps in
    training, benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx, padded: torch.Tensor, windows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(padded, gate)
        ctx.geometry = windows.shape, windows.stride()
        return torch.mul(windows, gate, out=torch.empty(windows.shape, dtype=windows.dtype, device=windows.device))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, Optional[torch.Tensor]]:
        padded, gate = ctx.saved_tensors
        size, stride = ctx.geometry
        grad_padded = grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_padded = torch.zeros_like(padded)
            tap_size, tap_stride = size[:3] + size[-1:], stride[:3] + stride[-1:]  # (B, H', W', C_in) of one tap
            for i in range(size[3]):
                for j in range(size[4]):
                    tap = grad_padded.as_strided(tap_size, tap_stride, i * stride[3] + j * stride[4])
                    tap.addcmul_(grad[:, :, :, i, j], gate[:, :, :, i, j])
        if ctx.needs_input_grad[2]:
            windows = padded.as_strided(size, stride)
            grad_gate = (grad * windows).sum((1, 2), keepdim=True).sum_to_size(gate.shape)
        return grad_padded, None, grad_gate


def _padded_channels_last(x: torch.Tensor, p: int) -> torch.Tensor:
    """x (B, C, H, W) zero-padded by ``p``, (B, H + 2p, W + 2p, C) contiguous: every tap of a window is then a run of
    contiguous channel vectors. One copy whatever x's memory format, and only the border zeroed."""
    b, c, h, w = x.shape
    padded = x.new_empty((b, h + 2 * p, w + 2 * p, c))
    padded[:, :p].zero_()
    padded[:, p + h:].zero_()
    padded[:, p:p + h, :p].zero_()
    padded[:, p:p + h, p + w:].zero_()
    padded[:, p:p + h, p:p + w].copy_(x.permute(0, 2, 3, 1))
    return padded


def per_sample_columns(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], attn: Attentions,
                       conv: ConvGeometry) -> torch.Tensor:
    """Each sample's kernel, all four attentions mixed in, times its im2col columns in one batched matmul (for a 1x1
    kernel the columns are the input itself), in ops whose captured graph serves every batch size."""
    b, out_chs, k = x.shape[0], weight.shape[1], conv.kernel_size
    ho, wo = out_size(x.shape[-2], conv), out_size(x.shape[-1], conv)
    # per-sample kernels (B, g, C_out / g, C_in / g * k * k)
    mixed = mixed_kernels(weight, attn).flatten(2).unflatten(1, (conv.groups, -1))
    channels_last = is_channels_last(x)
    if k == 1 and conv.padding == 0:
        x = x[:, :, ::conv.stride, ::conv.stride]
        columns = x.flatten(2) if not channels_last else x.permute(0, 2, 3, 1).flatten(1, 2).transpose(1, 2)
    else:
        columns = F.unfold(x, k, conv.dilation, conv.padding, conv.stride)  # (B, C_in * k * k, H' * W')
    columns = columns.unflatten(1, (conv.groups, -1))  # (B, g, C_in / g * k * k, H' * W')
    if channels_last:  # rows of positions times the transposed kernels: (B, g, H' * W', C_out / g)
        out = torch.matmul(columns.transpose(-1, -2), mixed.transpose(-1, -2))
        out = out.permute(0, 2, 1, 3).reshape(b, ho, wo, out_chs).permute(0, 3, 1, 2)
        out = out.contiguous(memory_format=torch.channels_last)  # a copy only where groups > 1 left it NCHW
    else:
        out = torch.matmul(mixed, columns).reshape(b, out_chs, ho, wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _scale_and_shift(out: torch.Tensor, filters: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``out`` times the output-channel attention (B, C_out, 1, 1), plus the bias; one pass over ``out``."""
    if bias is None:
        return out if filters is None else out * filters
    shift = bias.view(1, -1, 1, 1)
    return out + shift if filters is None else torch.addcmul(shift, out, filters)
