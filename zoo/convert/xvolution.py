"""X-volution ResNet checkpoints -> ``zoo.models.xvolution_resnet.XVolutionResNet``.

No official weights exist, so the one layout is zoo's own: a training-form state dict saved from an X-volution
ResNet (``layer3.0.conv2.conv.weight``, ``layer3.0.conv2.attn.q.weight``, ...), bare or in a training container,
as ``zoo convert`` / ``export_hub_folder`` write it and as timm's training scripts save it.
"""
from typing import Any, Dict, Mapping

import torch
from torch import nn

from zoo.models import XVolutionResNet, register_converter
from .state_dict import SourceLayout, convert_with_layouts

__all__ = ['XVOLUTION_LAYOUTS', 'convert_xvolution_resnet']

XVOLUTION_LAYOUTS = (
    SourceLayout(name='zoo', marker=r'layer\d\.\d+\.conv\d\.attn\.q\.weight'),
)


def convert_xvolution_resnet(checkpoint: Mapping[str, Any], model: nn.Module,
                             use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """An X-volution ResNet checkpoint as a state dict of ``model`` (checked key by key)."""
    return convert_with_layouts(checkpoint, model, XVOLUTION_LAYOUTS, family='X-volution ResNet', use_ema=use_ema)


register_converter(XVolutionResNet, convert_xvolution_resnet)
