"""The layouts of ODConv checkpoints (``models/odconv_resnet.py``, ``models/odconv_mobilenetv2.py``).

The official training script saves ``{'epoch', 'state_dict', 'acc', 'best_acc', 'optimizer'}`` from a
DistributedDataParallel model (keys prefixed ``module.``). Under the container and the prefix, the official ResNet
keys are zoo's own (``conv1``, ``layer1.0.conv1.weight`` of shape (kernel_num, C_out, C_in, k, k),
``layer1.0.conv1.attention.fc``, ``fc``); the MobileNetV2 ones too (``features.{i}...``) but for the classifier,
``classifier.1`` behind a dropout there, ``classifier`` here.
"""
from typing import Mapping

import torch

from .layouts import CheckpointLayouts, SourceLayout

__all__ = ['ODCONV_MOBILENETV2_LAYOUTS', 'ODCONV_RESNET_LAYOUTS', 'describe_odconv']


def describe_odconv(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'kernel_num N, widths A..B': kernels per ODConv and the widths of the first and last dynamic convs."""
    dynamic = [k[:-len('attention.fc.weight')] + 'weight' for k in state_dict if k.endswith('.attention.fc.weight')]
    dynamic = [k for k in dynamic if k in state_dict]
    if not dynamic:
        return 'no ODConv layers'
    first, last = state_dict[dynamic[0]].shape, state_dict[dynamic[-1]].shape
    return f'kernel_num {first[0]}, widths {first[2]}..{last[1]}'


ODCONV_RESNET_LAYOUTS = CheckpointLayouts('ODConv ResNet', (
    SourceLayout(name='official (= zoo)', marker=r'layer1\.0\.conv1\.attention\.fc\.weight'),
), describe=describe_odconv)

ODCONV_MOBILENETV2_LAYOUTS = CheckpointLayouts('ODConv MobileNetV2', (
    SourceLayout(name='official (or zoo)', marker=r'features\.1\.conv\.0\.0\.attention\.fc\.weight',
                 rules=((r'^classifier\.1\.', 'classifier.'),)),
), describe=describe_odconv)
