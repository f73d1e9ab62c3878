"""ResNets with Omni-Dimensional Dynamic Convolution (ODConv ResNet)

Paper: `Omni-Dimensional Dynamic Convolution` - https://openreview.net/forum?id=DmpCfq6Mg39 (Li, Zhou, Yao; ICLR 2022)
Official code: https://github.com/OSVAI/ODConv (MIT)

timm's ResNet with every 3x3 and 1x1 convolution of its residual blocks replaced by ``zoo.layers.ODConv2d``; the stem
conv and the 1x1 downsample convs stay static, as in the paper. ``kernel_num`` 1 is the paper's "ODConv (1x)", 4 (2
for ResNet-101) its "ODConv (4x)". Parameter names equal the official ones: ``ODCONV_RESNET_LAYOUTS``
(``zoo/convert/odconv.py``), this file's pretrained filter, unwraps the official DDP training container and checks
every key and shape. Inference runs at temperature 1; ``zoo.set_temperature`` and
``zoo.layers.odconv_temperature`` give the official annealing for training. ``reparameterize()``
(``timm.utils.reparameterize_model``) folds every block's BatchNorms into its ODConvs (and downsample convs).
"""
from typing import Any, Dict

from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import ResNet

from zoo.convert import ODCONV_RESNET_LAYOUTS
from zoo.layers import ODConv2d
from ._builder import build_zoo_model
from ._fusable_resnet import FusableBasicBlock, FusableBottleneck
from ._manifest import manifest_cfgs

__all__ = ['ODResNet', 'ODBasicBlock', 'ODBottleneck']


def _odconv_like(conv: nn.Conv2d, kernel_num: int, reduction: float) -> ODConv2d:
    """An ODConv2d with the geometry timm gave ``conv`` (stride, padding, dilation for output_stride), on its device
    and in its dtype."""
    return ODConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size[0], stride=conv.stride[0], padding=conv.padding[0],
        dilation=conv.dilation[0], groups=conv.groups, reduction=reduction, kernel_num=kernel_num,
        device=conv.weight.device, dtype=conv.weight.dtype)


class ODBasicBlock(FusableBasicBlock):
    """timm's BasicBlock with ODConv 3x3 convolutions."""

    def __init__(self, *args: Any, kernel_num: int = 1, reduction: float = 0.0625, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conv1 = _odconv_like(self.conv1, kernel_num, reduction)
        self.conv2 = _odconv_like(self.conv2, kernel_num, reduction)


class ODBottleneck(FusableBottleneck):
    """timm's Bottleneck with ODConv 1x1, 3x3 and 1x1 convolutions."""

    def __init__(self, *args: Any, kernel_num: int = 1, reduction: float = 0.0625, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conv1 = _odconv_like(self.conv1, kernel_num, reduction)
        self.conv2 = _odconv_like(self.conv2, kernel_num, reduction)
        self.conv3 = _odconv_like(self.conv3, kernel_num, reduction)


class ODResNet(ResNet):
    """timm ResNet built from ODConv blocks (``ODBasicBlock`` / ``ODBottleneck``); see the module docstring."""


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc', 'license': 'mit',
        'paper_ids': 'openreview:DmpCfq6Mg39', 'paper_name': 'Omni-Dimensional Dynamic Convolution',
        'origin_url': 'https://github.com/OSVAI/ODConv',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **manifest_cfgs('odconv_resnet', _cfg),
    'od_resnet34.untrained': _cfg(),
    'od_resnet34_4x.untrained': _cfg(),
})


def _create_od_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ODResNet:
    """An ODConv ResNet; ``kernel_num`` and ``reduction`` go to every ODConv2d, the rest to timm's ``ResNet``."""
    block_args = dict(kwargs.pop('block_args', None) or {}, kernel_num=kwargs.pop('kernel_num'),
                      reduction=kwargs.pop('reduction', 0.0625))
    return build_zoo_model(ODResNet, variant, pretrained, ODCONV_RESNET_LAYOUTS, block_args=block_args,
                           feature_cfg=dict(feature_cls='getter'), **kwargs)


@register_model
def od_resnet18(pretrained: bool = False, **kwargs: Any) -> ODResNet:
    """ODConv (1x) ResNet-18, 11.9M params, 73.05 top-1."""
    model_args = dict(block=ODBasicBlock, layers=(2, 2, 2, 2), kernel_num=1)
    return _create_od_resnet('od_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def od_resnet18_4x(pretrained: bool = False, **kwargs: Any) -> ODResNet:
    """ODConv (4x) ResNet-18, 44.9M params, 74.19 top-1."""
    model_args = dict(block=ODBasicBlock, layers=(2, 2, 2, 2), kernel_num=4)
    return _create_od_resnet('od_resnet18_4x', pretrained, **dict(model_args, **kwargs))


@register_model
def od_resnet34(pretrained: bool = False, **kwargs: Any) -> ODResNet:
    """ODConv (1x) ResNet-34, 22.3M params (no published weights)."""
    model_args = dict(block=ODBasicBlock, layers=(3, 4, 6, 3), kernel_num=1)
    return _create_od_resnet('od_resnet34', pretrained, **dict(model_args, **kwargs))


@register_model
def od_resnet34_4x(pretrained: bool = False, **kwargs: Any) -> ODResNet:
    """ODConv (4x) ResNet-34, 85.6M params (no published weights)."""
    model_args = dict(block=ODBasicBlock, layers=(3, 4, 6, 3), kernel_num=4)
    return _create_od_resnet('od_resnet34_4x', pretrained, **dict(model_args, **kwargs))


@register_model
def od_resnet50(pretrained: bool = False, **kwargs: Any) -> ODResNet:
    """ODConv (1x) ResNet-50, 28.6M params, 77.87 top-1."""
    model_args = dict(block=ODBottleneck, layers=(3, 4, 6, 3), kernel_num=1)
    return _create_od_resnet('od_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def od_resnet50_4x(pretrained: bool = False, **kwargs: Any) -> ODResNet:
    """ODConv (4x) ResNet-50, 90.7M params, 78.50 top-1."""
    model_args = dict(block=ODBottleneck, layers=(3, 4, 6, 3), kernel_num=4)
    return _create_od_resnet('od_resnet50_4x', pretrained, **dict(model_args, **kwargs))


@register_model
def od_resnet101(pretrained: bool = False, **kwargs: Any) -> ODResNet:
    """ODConv (1x) ResNet-101, 50.8M params, 78.84 top-1."""
    model_args = dict(block=ODBottleneck, layers=(3, 4, 23, 3), kernel_num=1)
    return _create_od_resnet('od_resnet101', pretrained, **dict(model_args, **kwargs))


@register_model
def od_resnet101_2x(pretrained: bool = False, **kwargs: Any) -> ODResNet:
    """ODConv (2x) ResNet-101, 90.4M params, 79.15 top-1."""
    model_args = dict(block=ODBottleneck, layers=(3, 4, 23, 3), kernel_num=2)
    return _create_od_resnet('od_resnet101_2x', pretrained, **dict(model_args, **kwargs))
