"""Operators of the zoo families, each usable on its own; nothing here knows about timm's model registry."""
from .fusion import batchnorm_affine, conv_with_input_affine, conv_with_output_affine, fuse_conv_bn
from .lka import LargeKernelAttention
from .odconv import ODConv2d, OmniAttention, odconv_temperature, set_temperature
