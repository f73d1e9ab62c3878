"""Efficient modulation: the token mixer and MLP of EfficientMod, fused into one channels-last operator.

Paper: `Efficient Modulation for Vision Networks` - https://arxiv.org/abs/2403.19967 (Ma et al., ICLR 2024)

``y = fc2(act(fc1(x)) * ctx(x))`` with the context ``ctx(x) = g(act(dwconv(f(x))))``: a projection ``f``, a large
depthwise convolution (7x7 in every published model) with GELU, and a projection ``g`` back. When the block
expands (ratio r > 1) the context is computed at the input width and multiplied into all r slices of the expanded
projection, as the official code's ``repeat(1, 1, 1, r)`` does; the broadcast here never materialises the copies.
Blocks with ratio 1 have no activation after ``fc1`` (official behaviour).

Two computations of the same numbers, chosen in :meth:`EfficientModulation.forward`: with autograd (and under
torch.compile, export and TorchScript) the formula as written; without it (inference) the activation and the
modulation overwrite ``fc1``'s output instead of allocating new tensors, on CPU a chunk of positions at a time so that
the expansion stays in the cache. A forward hook on ``fc1`` or ``context.conv`` therefore sees a tensor that is
overwritten afterwards when autograd is off: copy it in the hook.
"""
from typing import List, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import register_notrace_module

from ._tracing import is_compiling

__all__ = ['EfficientModulation', 'InplaceGELU', 'ModulationContext']


@register_notrace_module  # decided per call: an FX graph traced without autograd must not bake in the overwrite
class InplaceGELU(nn.GELU):
    """GELU that, when autograd is off, overwrites its input: use it only on a fresh layer output nothing else reads.

    On CPU a newly allocated activation costs about as much as a pass over it (its pages are faulted in and zeroed),
    and the expanded activations of the first stage are the largest tensors of the network.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return F.gelu(x, approximate=self.approximate)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)


def _reusing(act_layer: Type[nn.Module]) -> nn.Module:
    return InplaceGELU() if act_layer is nn.GELU else act_layer()


class ModulationContext(nn.Module):
    """``g(act(dwconv(f(x))))`` on channels-last maps (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, kernel_size: int = 7, act_layer: Type[nn.Module] = nn.GELU,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.f = nn.Linear(dim, dim, **dd)
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, **dd)
        self.act = _reusing(act_layer)
        self.g = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a contiguous NHWC tensor permuted to NCHW is a channels_last NCHW tensor: the conv reads and writes it
        # without copies, and its output permuted back is contiguous NHWC again
        x = self.f(x).permute(0, 3, 1, 2)
        x = self.act(self.conv(x)).permute(0, 2, 3, 1)
        return self.g(x)


@register_notrace_module  # FX keeps it whole: how it runs is decided per call (autograd or not, size)
class EfficientModulation(nn.Module):
    """``fc2(act(fc1(x)) * ctx(x))`` on channels-last maps (B, H, W, dim) -> (B, H, W, dim).

    Args:
        dim: Channels in and out.
        ratio: Expansion of ``fc1`` (an integer: the context is broadcast over ``ratio`` slices of ``dim``).
        kernel_size: Kernel of the context's depthwise convolution.
        act_layer: Activation after ``fc1`` (expanding blocks only) and inside the context.
        drop: Dropout after the modulation and after ``fc2``.
        device: Device of the parameters.
        dtype: Data type of the parameters.

    Attributes:
        chunk_elements: Elements of the expansion made at a time on CPU without autograd (the default, about 3 MB of
            float32, stays in a CPU's cache).
    """

    def __init__(
            self,
            dim: int,
            ratio: int = 4,
            kernel_size: int = 7,
            act_layer: Type[nn.Module] = nn.GELU,
            drop: float = 0.,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if ratio < 1 or int(ratio) != ratio:
            raise ValueError(f'EfficientModulation needs a whole expansion ratio >= 1, got {ratio}')
        dd = {'device': device, 'dtype': dtype}
        self.ratio = int(ratio)
        self.fc1 = nn.Linear(dim, dim * self.ratio, **dd)
        self.act = _reusing(act_layer) if self.ratio > 1 else nn.Identity()
        self.context = ModulationContext(dim, kernel_size, act_layer, **dd)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(dim * self.ratio, dim, **dd)
        self.drop2 = nn.Dropout(drop)
        self.chunk_elements = 4096 * 192

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.context(x)
        if torch.jit.is_scripting() or torch.is_grad_enabled() or is_compiling():
            return self._modulate(x, context)
        return self._modulate_in_place(x, context)

    def _modulate(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The formula, the context broadcast over the ``ratio`` slices of the expansion (no copies of it)."""
        x = self.act(self.fc1(x))
        x = (x.unflatten(-1, (self.ratio, -1)) * context.unsqueeze(-2)).flatten(-2)
        return self.drop2(self.fc2(self.drop1(x)))

    def _modulate_in_place(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The formula without autograd, overwriting ``fc1``'s output; on CPU ``chunk_elements`` of the expansion at
        a time: the largest tensors of the network then stay in the cache (1.25x faster on the first stage's
        blocks)."""
        shape, positions = x.shape, x.numel() // x.shape[-1]
        x, context = x.reshape(positions, -1), context.reshape(positions, -1)
        rows = max(1, self.chunk_elements // self.fc1.out_features) if x.device.type == 'cpu' else positions
        outs: List[torch.Tensor] = []
        for start in range(0, positions, rows):
            expanded = self.act(self.fc1(x[start:start + rows]))  # InplaceGELU: in place
            expanded.unflatten(-1, (self.ratio, -1)).mul_(context[start:start + rows].unsqueeze(-2))
            outs.append(self.drop2(self.fc2(self.drop1(expanded))))
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).view(shape)
