"""The layout of X-volution ResNet checkpoints (``models/xvolution_resnet.py``).

No official weights exist, so the one layout is zoo's own: a training-form state dict saved from an X-volution
ResNet (``layer3.0.conv2.conv.weight``, ``layer3.0.conv2.attn.q.weight``, ...), bare or in a training container,
as ``zoo convert`` / ``export_hub_folder`` write it and as timm's training scripts save it.
"""
from .layouts import CheckpointLayouts, SourceLayout

__all__ = ['XVOLUTION_RESNET_LAYOUTS']

XVOLUTION_RESNET_LAYOUTS = CheckpointLayouts('X-volution ResNet', (
    SourceLayout(name='zoo', marker=r'layer\d\.\d+\.conv\d\.attn\.q\.weight'),
))
