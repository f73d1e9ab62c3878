"""Fast computations of ODConv, each equal to the paper's (``ODConv2d.forward_reference``), and the one place that
chooses among them (:func:`plan_odconv`).

Every function takes the four attentions of a (B, C_in, H, W) input, computed by ``OmniAttention``: over input
channels ``channel`` (B, C_in, 1, 1), output channels ``filters`` (B, C_out, 1, 1) or None (depthwise), kernel
positions ``spatial`` (B, k * k) or None (1x1 kernels), and kernels ``kernels`` (B, kernel_num) or None
(kernel_num 1), and the static kernels ``weight`` (kernel_num, C_out, C_in / groups, k, k). The output is
``filters * conv(channel * x, sum_n kernels_n * spatial * weight_n) + bias``, in the input's memory format.

What they exploit:

* a kernel that varies with nothing (1x1, kernel_num 1) is one static conv; a batch of one has one mixed kernel;
* on small maps (CPU), the spatial and input-channel attentions scale im2col columns instead of the kernels, so one
  static kernel serves the whole batch in one GEMM; with several kernels either one GEMM with all of them, mixed per
  sample afterwards (kernel_num times the FLOPs: while the maps are tiny), or a GEMM per sample with its own mixed
  kernel, made a tile at a time;
* elsewhere, per-sample kernels run as one conv over the batch (``groups = B * groups``, the official form), as a
  batched matmul for 1x1 kernels, or for a channels_last input as one NHWC conv with the samples side by side in the
  channels; where a kernel is smaller than the feature maps the channel attentions scale the kernels instead of the
  maps.

The tuning constants below are CPU measurements at batch 16 over the ResNet-18 layer shapes (benchmarks/RESULTS.md);
tests monkeypatch them to reach every path. On CUDA the im2col forms are never chosen: they multiply the memory traffic
of the input by k * k, which a GPU pays in bandwidth while cuDNN's grouped conv reads the input once.
"""
from enum import Enum
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._tracing import is_compiling, is_exporting

__all__ = ['ConvForm', 'ODConvPath', 'ODConvPlan', 'conv_over_batch', 'mixed_kernels', 'odconv', 'plan_odconv']

# output positions below which im2col columns beat per-sample kernels
COLUMNS_MAX_POSITIONS = 28 * 28
# one GEMM with all kernels beats a GEMM per sample while (kernel_num - 1) * positions stays below these
STACKED_KERNELS_MAX_EXTRA_POSITIONS = 100
STACKED_KERNELS_MAX_EXTRA_POSITIONS_AUTOGRAD = 300  # the backward through per-sample kernels is slow
# mixed-kernel tiles stay below glibc's 32 MiB mmap threshold, beyond which every call pays for fresh pages
MIXED_KERNELS_MAX_BYTES = 24 * 2 ** 20  # tiles of a few samples x all channels
MIXED_KERNEL_BLOCKS_MAX_BYTES = 8 * 2 ** 20  # tiles of all samples x a block of channels
# without autograd, a static kernel's GEMM over the columns runs as oneDNN's 1x1 conv from this many rows per
# output channel on (MKL's GEMM below)
ONE_BY_ONE_CONV_MIN_ROWS_PER_OUTPUT_CHANNEL = 4



class ODConvPath(Enum):
    """How the kernels meet the input."""
    SHARED_KERNEL = 'shared_kernel'  # one static kernel; the channel attentions scale the maps
    SINGLE_SAMPLE = 'single_sample'  # a batch of one: its mixed kernel
    COLUMNS_SHARED_KERNEL = 'columns_shared_kernel'  # im2col columns times one static kernel
    COLUMNS_STACKED_KERNELS = 'columns_stacked_kernels'  # im2col columns times all kernels, mixed afterwards
    COLUMNS_MIXED_KERNELS = 'columns_mixed_kernels'  # im2col columns times each sample's mixed kernel
    PER_SAMPLE_FOLDED = 'per_sample_folded'  # per-sample kernels with the channel attentions folded in
    PER_SAMPLE = 'per_sample'  # per-sample kernels; the channel attentions scale the maps
    PORTABLE = 'portable'  # im2col + matmul in ops whose graph serves every batch size


class ConvForm(Enum):
    """How a conv with per-sample kernels runs."""
    MATMUL = 'matmul'  # 1x1 kernels: a batched matmul
    GROUPED = 'grouped'  # NCHW: one conv with groups = B * groups
    GROUPED_CHANNELS_LAST = 'grouped_channels_last'  # channels_last: the samples side by side in the channels


class ODConvPlan(NamedTuple):
    """How one ODConv call runs.

    Attributes:
        path: How the kernels meet the input.
        conv: How a conv with per-sample kernels runs.
        in_place: Autograd is off: results may be written into fresh buffers and overwritten.
        custom_backward: Autograd is on in eager mode: the hand-written backwards may run (TorchScript cannot run
            them, and torch.compile mis-traces the in-place one).
        columns_as_conv: A static kernel times the columns runs as oneDNN's 1x1 conv rather than MKL's GEMM.
    """
    path: ODConvPath
    conv: ConvForm
    in_place: bool
    custom_backward: bool
    columns_as_conv: bool


def _out_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether x (B, C, H, W) lies in channels_last memory and not also in NCHW (a 1 x 1 map is both)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def plan_odconv(
        x: torch.Tensor,
        weight: torch.Tensor,
        spatial: Optional[torch.Tensor],
        kernels: Optional[torch.Tensor],
        kernel_size: int,
        stride: int,
        padding: int,
        dilation: int,
        groups: int,
) -> ODConvPlan:
    """The computation for this call: from the kernel's variation, the capture mode (tracing, exporting,
    scripting, compiling), the grad mode, the device and the shape."""
    grad = torch.is_grad_enabled()
    compiling = is_compiling()
    varies = spatial is not None or kernels is not None  # else (1x1, kernel_num 1) only the channel attentions do
    if kernel_size == 1 and groups == 1 and padding == 0:
        conv = ConvForm.MATMUL
    elif _is_channels_last(x):
        conv = ConvForm.GROUPED_CHANNELS_LAST
    else:
        conv = ConvForm.GROUPED
    if is_exporting():  # one graph for every batch size
        path = ODConvPath.PORTABLE if varies else ODConvPath.SHARED_KERNEL
        return ODConvPlan(path, conv, in_place=False, custom_backward=False, columns_as_conv=False)
    out_chs = weight.shape[1]
    positions = (_out_size(x.shape[-2], kernel_size, stride, padding, dilation)
                 * _out_size(x.shape[-1], kernel_size, stride, padding, dilation))
    if torch.jit.is_scripting():  # TorchScript reads no module-level tuning constants: it runs no im2col form
        columns: Optional[ODConvPath] = None
        columns_as_conv = False
    else:
        columns = _columns_path(x, kernels, kernel_size, weight.shape[0], positions, groups, grad)
        columns_as_conv = not grad and x.shape[0] * positions >= ONE_BY_ONE_CONV_MIN_ROWS_PER_OUTPUT_CHANNEL * out_chs
    if x.shape[0] == 1:
        path = ODConvPath.SINGLE_SAMPLE
    elif columns is not None:
        path = columns
    elif weight[0].numel() < x[0].numel() + out_chs * positions:  # kernels smaller than the maps they would scale
        path = ODConvPath.PER_SAMPLE_FOLDED
    else:
        path = ODConvPath.PER_SAMPLE if varies else ODConvPath.SHARED_KERNEL
    return ODConvPlan(path, conv, in_place=not grad and not compiling,
                      custom_backward=grad and not torch.jit.is_scripting() and not compiling,
                      columns_as_conv=columns_as_conv)


def _columns_path(x: torch.Tensor, kernels: Optional[torch.Tensor], kernel_size: int, kernel_num: int, positions: int,
                  groups: int, grad: bool) -> Optional[ODConvPath]:
    """The im2col form for a dense k x k conv on a small map on CPU, else None."""
    if x.device.type != 'cpu' or groups != 1 or kernel_size == 1 or positions >= COLUMNS_MAX_POSITIONS:
        return None
    if kernels is None:
        return ODConvPath.COLUMNS_SHARED_KERNEL
    extra_limit = STACKED_KERNELS_MAX_EXTRA_POSITIONS_AUTOGRAD if grad else STACKED_KERNELS_MAX_EXTRA_POSITIONS
    if (kernel_num - 1) * positions < extra_limit:
        return ODConvPath.COLUMNS_STACKED_KERNELS
    return ODConvPath.COLUMNS_MIXED_KERNELS


def odconv(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        channel: torch.Tensor,
        filters: Optional[torch.Tensor],
        spatial: Optional[torch.Tensor],
        kernels: Optional[torch.Tensor],
        kernel_size: int,
        stride: int,
        padding: int,
        dilation: int,
        groups: int,
) -> torch.Tensor:
    """ODConv of x (B, C_in, H, W) with the given attentions -> (B, C_out, H', W'), computed as
    :func:`plan_odconv` says."""
    plan = plan_odconv(x, weight, spatial, kernels, kernel_size, stride, padding, dilation, groups)
    if plan.path == ODConvPath.SHARED_KERNEL:
        out = F.conv2d(x * channel, weight[0], None, stride, padding, dilation, groups)
        return _scale_and_shift(out, filters, bias)
    if plan.path == ODConvPath.PORTABLE:
        return _portable(x, weight, bias, channel, filters, spatial, kernels, kernel_size, stride, padding, dilation,
                         groups)
    if plan.path == ODConvPath.SINGLE_SAMPLE:
        mixed = mixed_kernels(weight, kernels, spatial, channel, filters)[0]
        return F.conv2d(x, mixed, bias, stride, padding, dilation, groups)
    if plan.path == ODConvPath.PER_SAMPLE_FOLDED:
        mixed = mixed_kernels(weight, kernels, spatial, channel, filters)
        return _conv_per_sample(x, mixed, bias, stride, padding, dilation, groups, plan)
    if plan.path == ODConvPath.PER_SAMPLE:
        mixed = mixed_kernels(weight, kernels, spatial)
        return _scale_and_shift(_conv_per_sample(x * channel, mixed, None, stride, padding, dilation, groups, plan),
                                filters, bias)
    if torch.jit.is_scripting():  # never planned there (see plan_odconv)
        raise RuntimeError('ODConv: im2col forms do not run under TorchScript')
    out = _columns_conv(x, weight, channel, spatial, kernels, stride, padding, dilation, plan)
    return _scale_and_shift(out if _is_channels_last(x) else out.contiguous(), filters, bias)


def _scale_and_shift(out: torch.Tensor, filters: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``out`` times the output-channel attention (B, C_out, 1, 1), plus the bias; one pass over ``out``."""
    if bias is None:
        return out if filters is None else out * filters
    shift = bias.view(1, -1, 1, 1)
    return out + shift if filters is None else torch.addcmul(shift, out, filters)


def mixed_kernels(
        weight: torch.Tensor,
        kernels: Optional[torch.Tensor],
        spatial: Optional[torch.Tensor],
        channel: Optional[torch.Tensor] = None,
        filters: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample kernels (B, or 1 when nothing varies, C_out, C_in / groups, k, k): the kernel-attention weighted
    sum of the static kernels ``weight`` (kernel_num, C_out, C_in / groups, k, k), scaled by the spatial attention
    and, where given, by the input- and output-channel attentions.
    """
    out_chs, in_per_group, k = weight.shape[1], weight.shape[2], weight.shape[-1]
    mixed = weight if kernels is None else torch.einsum('bn,noikl->boikl', kernels, weight)
    if spatial is not None:
        mixed = _scaled(mixed, spatial.view(-1, 1, 1, k, k), weight)
    # the channel attentions are combined first: (B, C_out, C_in / groups) is k * k times smaller than the kernels
    scale: Optional[torch.Tensor] = None
    if channel is not None:
        b, in_chs = channel.shape[0], channel.shape[1]
        groups = in_chs // in_per_group
        per_group = channel.view(b, groups, 1, in_per_group).expand(b, groups, out_chs // groups, in_per_group)
        scale = per_group.reshape(b, out_chs, in_per_group)
    if filters is not None:
        per_output = filters.view(-1, out_chs, 1)
        scale = per_output if scale is None else scale * per_output
    if scale is not None:
        mixed = _scaled(mixed, scale.view(scale.shape[0], out_chs, -1, 1, 1), weight)
    return mixed


def _scaled(mixed: torch.Tensor, factor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``mixed * factor``, in place once ``mixed`` is this call's own buffer rather than the static ``weight``:
    allocating a second one doubled the time of the two multiplies (CPU, batch 16)."""
    return mixed * factor if mixed is weight else mixed.mul_(factor)


def _conv_per_sample(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int,
                     dilation: int, groups: int, plan: ODConvPlan) -> torch.Tensor:
    """x (B, C_in, H, W) convolved with per-sample kernels (B, C_out, C_in / groups, k, k), plus ``bias``."""
    if plan.conv == ConvForm.MATMUL:
        return _pointwise_matmul(x, weight, bias, stride)
    if plan.conv == ConvForm.GROUPED_CHANNELS_LAST:
        return _conv_over_batch_channels_last(x, weight, bias, stride, padding, dilation, groups,
                                              plan.custom_backward)
    return conv_over_batch(x, weight, bias, stride, padding, dilation, groups)


def conv_over_batch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int,
                    dilation: int, groups: int) -> torch.Tensor:
    """The official computation of a conv with per-sample kernels (B, C_out, C_in / groups, k, k): the batch as one
    image of B * C_in channels and one conv with ``groups = B * groups``."""
    b, c, h, w = x.shape
    out_chs = weight.shape[1]
    weight = weight.reshape(b * out_chs, c // groups, weight.shape[-2], weight.shape[-1]).contiguous()
    out = F.conv2d(x.reshape(1, b * c, h, w), weight, None if bias is None else bias.repeat(b), stride, padding,
                   dilation, groups * b)
    return out.view(b, out_chs, out.shape[-2], out.shape[-1])


def _pointwise_matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      stride: int) -> torch.Tensor:
    """A 1x1 conv with per-sample kernels (B, C_out, C_in, 1, 1) as one batched matmul, in x's memory format."""
    channels_last = _is_channels_last(x)
    x = x[:, :, ::stride, ::stride]
    b, c, ho, wo = x.shape
    out_chs = weight.shape[1]
    weight = weight.view(b, out_chs, c)
    if channels_last:  # rows of positions (B, H' * W', C_in) times the transposed kernels: channels_last out
        rows, kernels = x.permute(0, 2, 3, 1).reshape(b, ho * wo, c), weight.transpose(1, 2)
        out = torch.bmm(rows, kernels) if bias is None else torch.baddbmm(bias.view(1, 1, -1), rows, kernels)
        return out.view(b, ho, wo, out_chs).permute(0, 3, 1, 2)
    x = x.reshape(b, c, ho * wo)
    out = torch.bmm(weight, x) if bias is None else torch.baddbmm(bias.view(1, -1, 1), weight, x)
    return out.view(b, out_chs, ho, wo)


def _conv_over_batch_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                                   padding: int, dilation: int, groups: int, custom_backward: bool) -> torch.Tensor:
    """The conv over the batch for a channels_last x: the samples lie side by side in the channels of one
    (1, B * C_in, H, W) image in channels_last memory (H, W, B, C_in), and the output goes back the same way;
    each move copies whole channel vectors (NCHW round trips: 1.3x the time, CPU)."""
    b, c = x.shape[0], x.shape[1]
    out_chs, k = weight.shape[1], weight.shape[-1]
    image = _samples_into_channels_with_grad(x) if custom_backward else _samples_into_channels(x)
    weight = weight.reshape(b * out_chs, c // groups, k, k)
    out = F.conv2d(image, weight.contiguous(memory_format=torch.channels_last),
                   None if bias is None else bias.repeat(b), stride, padding, dilation, groups * b)
    return _channels_into_samples(out, b)


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
    permuted view of the (H, W, B, C) one, on which the BatchNorm backward before the layer took 5-10x its time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.batch = x.shape[0]
        return _samples_into_channels(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _channels_into_samples(grad, ctx.batch)


@torch.jit.unused  # TorchScript cannot run an autograd.Function
def _samples_into_channels_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _SamplesIntoChannels.apply(x)


def _columns_conv(x: torch.Tensor, weight: torch.Tensor, channel: torch.Tensor, spatial: Optional[torch.Tensor],
                  kernels: Optional[torch.Tensor], stride: int, padding: int, dilation: int,
                  plan: ODConvPlan) -> torch.Tensor:
    """A dense k x k ODConv as GEMMs over im2col columns: (B, C_in, H, W) -> (B, C_out, H', W') in channels_last
    memory, before the output-channel attention.

    The spatial and input-channel attentions scale the columns instead of the kernel, so a static kernel serves the
    whole batch. With several kernels: one GEMM with all of them, whose kernel_num outputs each sample mixes with its
    kernel attention, or a GEMM per sample with its own mixed kernel.
    """
    b = x.shape[0]
    kernel_num, out_chs, k = weight.shape[0], weight.shape[1], weight.shape[-1]
    ho, wo = _out_size(x.shape[-2], k, stride, padding, dilation), _out_size(x.shape[-1], k, stride, padding, dilation)
    columns = _columns(x, channel, spatial, k, stride, padding, dilation, plan)
    if plan.path == ODConvPath.COLUMNS_SHARED_KERNEL:
        kernel = _taps_outermost(weight)[0]
        if plan.columns_as_conv:
            # the columns (B, H', W', k * k * C_in) are an image of k * k * C_in channels in channels_last memory
            return F.conv2d(columns.view(b, ho, wo, -1).permute(0, 3, 1, 2), kernel.view(out_chs, -1, 1, 1))
        rows = F.linear(columns, kernel)
    elif plan.path == ODConvPath.COLUMNS_STACKED_KERNELS:
        assert kernels is not None
        rows = F.linear(columns, _taps_outermost(weight).view(kernel_num * out_chs, -1))
        rows = (rows.view(b, ho * wo, kernel_num, out_chs) * kernels.view(b, 1, -1, 1)).sum(dim=2)
    else:
        assert kernels is not None
        rows = _per_sample_gemm(columns, weight, kernels)
    return rows.view(b, ho, wo, out_chs).permute(0, 3, 1, 2)  # channels_last memory, no copy


def _columns(x: torch.Tensor, channel: torch.Tensor, spatial: Optional[torch.Tensor], k: int, stride: int,
             padding: int, dilation: int, plan: ODConvPlan) -> torch.Tensor:
    """im2col columns (B, H' * W', k * k * C_in), taps outermost within a row, scaled by the input-channel and
    spatial attentions."""
    b, c = x.shape[0], x.shape[1]
    ho, wo = _out_size(x.shape[-2], k, stride, padding, dilation), _out_size(x.shape[-1], k, stride, padding, dilation)
    padded = _padded_channels_last(x, padding)
    gate = channel.view(b, 1, 1, 1, 1, c)
    if spatial is not None:
        gate = gate * spatial.view(b, 1, 1, k, k, 1)
    sb, sh, sw = padded.stride(0), padded.stride(1), padded.stride(2)
    # the overlapping k x k windows of the input, a strided view (B, H', W', k, k, C_in)
    windows = padded.as_strided((b, ho, wo, k, k, c), (sb, stride * sh, stride * sw, dilation * sh, dilation * sw, 1))
    if plan.in_place:
        columns = torch.mul(windows, gate, out=torch.empty(windows.shape, dtype=x.dtype, device=x.device))
    elif plan.custom_backward:
        columns = _windows_times_gate_with_grad(padded, windows, gate)
    else:  # autograd through the overlapping view: exact, slower
        columns = (windows * gate).contiguous()
    return columns.view(b, ho * wo, k * k * c)


def _padded_channels_last(x: torch.Tensor, padding: int) -> torch.Tensor:
    """x (B, C, H, W) zero-padded, (B, H + 2p, W + 2p, C) contiguous: every tap of a window is then a run of
    contiguous channel vectors. One copy whatever x's memory format, and only the border zeroed."""
    b, c, h, w = x.shape
    p = padding
    padded = x.new_empty((b, h + 2 * p, w + 2 * p, c))
    padded[:, :p].zero_()
    padded[:, p + h:].zero_()
    padded[:, p:p + h, :p].zero_()
    padded[:, p:p + h, p + w:].zero_()
    padded[:, p:p + h, p:p + w].copy_(x.permute(0, 2, 3, 1))
    return padded


class _WindowsTimesGate(torch.autograd.Function):
    """``windows * gate`` with autograd, ``windows`` being an overlapping strided view of ``padded`` from its first
    element: the backward adds each of the k * k taps' gradients into one buffer in place (autograd would zero-pad a
    copy per tap, or take the slow general path of a view whose elements overlap)."""

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
            tap_size, tap_stride = size[:3] + size[-1:], stride[:3] + stride[-1:]
            for i in range(size[3]):
                for j in range(size[4]):
                    tap = grad_padded.as_strided(tap_size, tap_stride, i * stride[3] + j * stride[4])
                    tap.addcmul_(grad[:, :, :, i, j], gate[:, :, :, i, j])
        if ctx.needs_input_grad[2]:
            windows = padded.as_strided(size, stride)
            grad_gate = (grad * windows).sum((1, 2), keepdim=True).sum_to_size(gate.shape)
        return grad_padded, None, grad_gate


@torch.jit.unused  # TorchScript cannot run an autograd.Function
def _windows_times_gate_with_grad(padded: torch.Tensor, windows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return _WindowsTimesGate.apply(padded, windows, gate)


def _taps_outermost(weight: torch.Tensor) -> torch.Tensor:
    """Kernels (N, C_out, C_in, k, k) as rows (N, C_out, k * k * C_in), taps outermost like the im2col columns."""
    return weight.permute(0, 1, 3, 4, 2).reshape(weight.shape[0], weight.shape[1], -1)


def _per_sample_gemm(columns: torch.Tensor, weight: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Rows (B, H' * W', C_out): each sample's columns (B, H' * W', k * k * C_in) times its kernel-attention mix
    (B, kernel_num) of the static kernels.

    The mixed kernels are made a tile of samples x output channels at a time. Each tile re-reads its samples'
    columns and its channels' static kernels, so the tiles span all the samples when the static kernels outweigh
    the columns (kernel_num * C_out > B * H' * W'; ``MIXED_KERNEL_BLOCKS_MAX_BYTES``), all the channels otherwise
    (``MIXED_KERNELS_MAX_BYTES``).
    """
    b, positions, width = columns.shape
    kernel_num, out_chs = weight.shape[0], weight.shape[1]
    row_bytes = width * columns.element_size()
    if kernel_num * out_chs > b * positions:
        samples, block = b, max(1, MIXED_KERNEL_BLOCKS_MAX_BYTES // (b * row_bytes))
    else:
        samples, block = max(1, MIXED_KERNELS_MAX_BYTES // (out_chs * row_bytes)), out_chs
    rows: List[torch.Tensor] = []
    for start in range(0, out_chs, block):
        bank = _taps_outermost(weight[:, start:start + block]).view(kernel_num, -1)
        tile_rows: List[torch.Tensor] = []
        for first in range(0, b, samples):
            mixed = torch.mm(kernels[first:first + samples], bank).view(-1, bank.shape[1] // width, width)
            tile_rows.append(torch.bmm(columns[first:first + samples], mixed.transpose(1, 2)))
        rows.append(torch.cat(tile_rows))
    return torch.cat(rows, dim=2)


def _portable(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], channel: torch.Tensor,
              filters: Optional[torch.Tensor], spatial: Optional[torch.Tensor], kernels: Optional[torch.Tensor],
              kernel_size: int, stride: int, padding: int, dilation: int, groups: int) -> torch.Tensor:
    """Per-sample kernels applied as im2col + matmul, in ops whose traced or exported graph serves every batch size
    (a conv with ``groups = B * groups`` or a branch on the batch size would fix it at the traced one)."""
    k, out_chs = kernel_size, weight.shape[1]
    ho, wo = _out_size(x.shape[-2], k, stride, padding, dilation), _out_size(x.shape[-1], k, stride, padding, dilation)
    mixed = mixed_kernels(weight, kernels, spatial)  # (B, C_out, C_in / groups, k, k)
    columns = F.unfold(x * channel, k, dilation, padding, stride)  # (B, C_in * k * k, H' * W'), channel-major
    columns = columns.unflatten(1, (groups, -1))
    out = torch.matmul(mixed.flatten(2).unflatten(1, (groups, -1)), columns)  # (B, groups, C_out / groups, H' * W')
    out = _scale_and_shift(out.reshape(x.shape[0], out_chs, ho, wo), filters, bias)
    return out.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else out
