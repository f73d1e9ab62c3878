"""zoo: VAN, ODConv, EfficientMod and X-volution backbones as first-class timm models.

``import zoo`` registers every model with timm (``timm.create_model('van_b0', pretrained=True)``) and the checkpoint
converters that load the official weights. Layering, each importing only those below it::

    layers (operators) <- models (one file per family) <- convert <- hub, predict <- cli
"""
from . import models
from . import convert
from .convert import CheckpointError, read_checkpoint
from .layers import odconv_temperature, set_temperature

__version__ = '0.1.0'
__all__ = ['CheckpointError', 'odconv_temperature', 'read_checkpoint', 'set_temperature', '__version__']
