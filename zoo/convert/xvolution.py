"""The layouts of X-volution ResNet checkpoints (``models/xvolution_resnet.py``).

No official weights exist. Two layouts load:

    zoo          a training-form state dict saved from an X-volution ResNet (``layer3.0.conv2.conv.weight``,
                 ``layer3.0.conv2.attn.q.weight``, ...), bare or in a training container, as ``zoo convert`` /
                 ``export_hub_folder`` write it and as timm's training scripts save it.
    timm ResNet  a plain ResNet's weights (timm's, e.g. ``timm/resnet50.a1_in1k``): the weights of each converted conv
                 and its BatchNorm become the X-volution's convolution branch, and the attention branch keeps its
                 initialisation (its BatchNorm at zero), so the model computes exactly the ResNet until fine-tuned.
"""
import re
from typing import Dict, Set

import torch

from .layouts import CheckpointLayouts, SourceLayout

__all__ = ['XVOLUTION_RESNET_LAYOUTS']


def _resnet_onto_xvolution(state_dict: Dict[str, torch.Tensor], model_keys: Set[str]) -> Dict[str, torch.Tensor]:
    """``layerS.B.convK.*`` / ``layerS.B.bnK.*`` of the convs that are X-volutions in the model ->
    ``layerS.B.convK.conv.*`` / ``layerS.B.convK.bn.*``."""
    out = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r'(layer\d\.\d+)\.(conv|bn)(\d)\.(\w+)', key)
        if match:
            block, kind, index, param = match.groups()
            branch = f'{block}.conv{index}.{"conv" if kind == "conv" else "bn"}.{param}'
            if branch in model_keys:
                key = branch
        out[key] = value
    return out


XVOLUTION_RESNET_LAYOUTS = CheckpointLayouts('X-volution ResNet', (
    SourceLayout(name='zoo', marker=r'layer\d\.\d+\.conv\d\.attn\.q\.weight'),
    SourceLayout(name='timm ResNet', marker=r'layer3\.0\.conv2\.weight', onto_model=_resnet_onto_xvolution,
                 added=(r'layer\d\.\d+\.conv\d\.attn\..*',)),
))
