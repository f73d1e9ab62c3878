"""X-volution ResNets

Paper: `X-volution: On the Unification of Convolution and Self-attention` - https://arxiv.org/abs/2106.02253
(Chen, Wang, Wang, Guo, Chen, Lu; 2021). No official code or weights exist: a reconstruction from the paper's text,
see ``zoo.layers.xvolution`` for the operator and the choices made. The PSSA models' ``a1_in1k`` tags are warm starts:
timm's ResNet weights in the convolution branches, the attention branches untrained, so they equal the ResNet until
fine-tuned.

timm's ResNet-34 / ResNet-50 with every 3x3 convolution of stage 3 (``layer3``, 14x14 at 224 px) replaced by
``zoo.layers.XVolution2d``; the paper finds stage 3 the best place (+1.2 top-1 on ResNet-34, +0.9 on ResNet-50 with
PSSA). The replaced conv's BatchNorm becomes the X-volution's convolution-branch norm, so with the attention
branch's BatchNorm at its zero initialisation the network computes exactly its plain ResNet. Checkpoints (zoo's own
layout: none were ever published) load through ``XVOLUTION_RESNET_LAYOUTS`` (``zoo/convert/xvolution.py``), this
file's pretrained filter. ``reparameterize()``
(``timm.utils.reparameterize_model``) folds every block's BatchNorms into their convolutions and fuses each PSSA
X-volution into a single ``PixelShiftConv2d``.
"""
from typing import Any, Dict, Tuple

from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import ResNet

from zoo.convert import XVOLUTION_RESNET_LAYOUTS
from zoo.layers import XVolution2d
from ._builder import build_zoo_model
from ._fusable_resnet import NORM_PAIRS, FusableBasicBlock, FusableBottleneck
from ._manifest import manifest_cfgs

__all__ = ['XVolutionResNet']


def _xvolution_like(conv: nn.Conv2d, norm: nn.BatchNorm2d, attention: str) -> XVolution2d:
    """An X-volution with the geometry timm gave ``conv``, whose convolution branch is ``conv`` -> ``norm``."""
    try:
        return XVolution2d.from_conv(conv, norm, attention)
    except ValueError as e:  # timm's grouped (ResNeXt) blocks
        raise ValueError(f'{e}; build the model without cardinality / groups') from None


class XVolutionResNet(ResNet):
    """timm ResNet whose 3x3 convolutions in ``xvolution_stages`` are X-volutions; see the module docstring.

    Args:
        attention: 'pssa' or 'sa' (see ``XVolution2d``).
        xvolution_stages: 0-based indices of the stages (``layer{i + 1}``) to convert; the paper's best is (2,).
        **kwargs: timm ``ResNet`` arguments.
    """

    def __init__(self, attention: str = 'pssa', xvolution_stages: Tuple[int, ...] = (2,), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for stage in xvolution_stages:
            for block in getattr(self, f'layer{stage + 1}'):
                for conv_name, bn_name in NORM_PAIRS:
                    conv = getattr(block, conv_name, None)
                    if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                        setattr(block, conv_name, _xvolution_like(conv, getattr(block, bn_name), attention))
                        setattr(block, bn_name, nn.Identity())


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc', 'paper_ids': 'arXiv:2106.02253',
        'paper_name': 'X-volution: On the Unification of Convolution and Self-attention',
        'notes': ('no official code or weights exist: train it, or load weights trained with zoo',),
        **kwargs,
    }



def _warm_start_note(resnet: str) -> Tuple[str, ...]:
    return (f'no official code or weights exist: train it, load weights trained with zoo, or start from timm\'s '
            f'{resnet}.a1_in1k weights with the .a1_in1k tag',)


# '*' after the warm starts makes the untrained tags the default (timm would take the first tag with weights), so that
# `pretrained=True` without a tag never silently means a ResNet warm start
default_cfgs = generate_default_cfgs({
    **manifest_cfgs('xvolution_resnet', _cfg),
    'xvolution_resnet34.untrained*': _cfg(notes=_warm_start_note('resnet34')),
    'xvolution_resnet50.untrained*': _cfg(notes=_warm_start_note('resnet50')),
    'xvolution_sa_resnet34.untrained': _cfg(),
    'xvolution_sa_resnet50.untrained': _cfg(),
})


def _create_xvolution_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> XVolutionResNet:
    return build_zoo_model(XVolutionResNet, variant, pretrained, XVOLUTION_RESNET_LAYOUTS,
                           feature_cfg=dict(feature_cls='getter'), **kwargs)


@register_model
def xvolution_resnet34(pretrained: bool = False, **kwargs: Any) -> XVolutionResNet:
    """ResNet-34 with PSSA X-volutions in stage 3 (paper: +1.2 top-1 over ResNet-34; no published weights)."""
    model_args = dict(block=FusableBasicBlock, layers=(3, 4, 6, 3), attention='pssa')
    return _create_xvolution_resnet('xvolution_resnet34', pretrained, **dict(model_args, **kwargs))


@register_model
def xvolution_resnet50(pretrained: bool = False, **kwargs: Any) -> XVolutionResNet:
    """ResNet-50 with PSSA X-volutions in stage 3 (paper: +0.9 top-1 over ResNet-50; no published weights)."""
    model_args = dict(block=FusableBottleneck, layers=(3, 4, 6, 3), attention='pssa')
    return _create_xvolution_resnet('xvolution_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def xvolution_sa_resnet34(pretrained: bool = False, **kwargs: Any) -> XVolutionResNet:
    """ResNet-34 with global self-attention X-volutions in stage 3 (no published weights)."""
    model_args = dict(block=FusableBasicBlock, layers=(3, 4, 6, 3), attention='sa')
    return _create_xvolution_resnet('xvolution_sa_resnet34', pretrained, **dict(model_args, **kwargs))


@register_model
def xvolution_sa_resnet50(pretrained: bool = False, **kwargs: Any) -> XVolutionResNet:
    """ResNet-50 with global self-attention X-volutions in stage 3 (no published weights)."""
    model_args = dict(block=FusableBottleneck, layers=(3, 4, 6, 3), attention='sa')
    return _create_xvolution_resnet('xvolution_sa_resnet50', pretrained, **dict(model_args, **kwargs))
