"""ODConv checkpoints -> ``ODResNet`` and ``ODMobileNetV2``.

The official training script saves ``{'epoch', 'state_dict', 'acc', 'best_acc', 'optimizer'}`` from a
DistributedDataParallel model (keys prefixed ``module.``). Under the container and the prefix, the official ResNet
keys are zoo's own (``conv1``, ``layer1.0.conv1.weight`` of shape (kernel_num, C_out, C_in, k, k),
``layer1.0.conv1.attention.fc``, ``fc``); the MobileNetV2 ones too (``features.{i}...``) but for the classifier,
``classifier.1`` behind a dropout there, ``classifier`` here.
"""
from typing import Any, Dict, Mapping

import torch
from torch import nn

from zoo.models import ODMobileNetV2, ODResNet, register_converter
from .state_dict import SourceLayout, convert_with_layouts

__all__ = [
    'ODCONV_MOBILENETV2_LAYOUTS', 'ODCONV_RESNET_LAYOUTS', 'convert_odconv_mobilenetv2', 'convert_odconv_resnet',
    'describe_odconv',
]

ODCONV_RESNET_LAYOUTS = (
    SourceLayout(name='official (= zoo)', marker=r'layer1\.0\.conv1\.attention\.fc\.weight'),
)
ODCONV_MOBILENETV2_LAYOUTS = (
    SourceLayout(name='official (or zoo)', marker=r'features\.1\.conv\.0\.0\.attention\.fc\.weight',
                 rules=((r'^classifier\.1\.', 'classifier.'),)),
)


def describe_odconv(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'kernel_num N, widths A..B': kernels per ODConv and the widths of the first and last dynamic convs."""
    dynamic = [k[:-len('attention.fc.weight')] + 'weight' for k in state_dict if k.endswith('.attention.fc.weight')]
    dynamic = [k for k in dynamic if k in state_dict]
    if not dynamic:
        return 'no ODConv layers'
    first, last = state_dict[dynamic[0]].shape, state_dict[dynamic[-1]].shape
    return f'kernel_num {first[0]}, widths {first[2]}..{last[1]}'


def convert_odconv_resnet(checkpoint: Mapping[str, Any], model: nn.Module,
                          use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """An official ODConv ResNet checkpoint as a state dict of ``model`` (checked key by key)."""
    return convert_with_layouts(checkpoint, model, ODCONV_RESNET_LAYOUTS, family='ODConv ResNet', use_ema=use_ema,
                                describe=describe_odconv)


def convert_odconv_mobilenetv2(checkpoint: Mapping[str, Any], model: nn.Module,
                               use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """An official ODConv MobileNetV2 checkpoint as a state dict of ``model`` (checked key by key)."""
    return convert_with_layouts(checkpoint, model, ODCONV_MOBILENETV2_LAYOUTS, family='ODConv MobileNetV2',
                                use_ema=use_ema, describe=describe_odconv)


register_converter(ODResNet, convert_odconv_resnet)
register_converter(ODMobileNetV2, convert_odconv_mobilenetv2)
