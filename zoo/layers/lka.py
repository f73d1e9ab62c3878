"""Large Kernel Attention, the token mixer of VAN.

Paper: `Visual Attention Network` (Guo et al., arXiv 2202.09741), Sec. 3.2. A K x K convolution with dilation d is
decomposed into a (2d - 1) x (2d - 1) depthwise conv, a ceil(K / d) x ceil(K / d) depthwise conv with dilation d and
a 1 x 1 conv; the result multiplies the input element-wise. With the paper's K = 21, d = 3 this is the 5 x 5 ->
7 x 7 (dilation 3) -> 1 x 1 stack of the official code, whose receptive field is 23 x 23 (K rounded up to whole
dilated taps).
"""
import math
from typing import Optional

import torch
from torch import nn

__all__ = ['LargeKernelAttention']


class LargeKernelAttention(nn.Module):
    """Input (B, C, H, W) gated by a decomposed K x K depthwise + pointwise attention map of the same shape."""

    def __init__(self, dim: int, kernel_size: int = 21, dilation: int = 3, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        """
        Args:
            dim: Number of channels C (input = output).
            kernel_size: Receptive field K of the decomposed convolution, in pixels.
            dilation: Dilation d of the long-range depthwise conv.
            device: Device of the parameters.
            dtype: Data type of the parameters.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        local_size = 2 * dilation - 1
        dilated_size = math.ceil(kernel_size / dilation)
        self.conv_dw = nn.Conv2d(dim, dim, local_size, padding=local_size // 2, groups=dim, **dd)
        self.conv_dw_dilated = nn.Conv2d(
            dim, dim, dilated_size, padding=(dilated_size // 2) * dilation, dilation=dilation, groups=dim, **dd)
        self.conv_pw = nn.Conv2d(dim, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.conv_pw(self.conv_dw_dilated(self.conv_dw(x)))
        return x * attn
