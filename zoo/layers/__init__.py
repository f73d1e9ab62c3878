"""Operators of the zoo families, each usable on its own; nothing here knows about timm's model registry."""
from .fusion import ConvNorm, batchnorm_affine, fuse_conv_bn, norm_affine, with_input_affine, with_output_affine
from .lka import LargeKernelAttention
from .modulation import EfficientModulation, ModulationContext
from .odconv import ODConv2d, OmniAttention, odconv_temperature, set_temperature
from .xvolution import GlobalSelfAttention, PixelShiftAttention, PixelShiftConv2d, XVolution2d, pixel_shift_products
