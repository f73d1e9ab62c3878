"""zoo: VAN, ODConv, EfficientMod and X-volution backbones as first-class timm models.

``import zoo`` registers every model with timm (``timm.create_model('van_b0', pretrained=True)``); each model file
reads the official checkpoints of its family through the conversion layer. Layering, each importing only those below
it::

    cli -> catalogue, hub, predict, dense -> models (one file per family) -> convert (checkpoint layouts), layers

and ``zoo.errors`` (the errors about what a user gave zoo) below them all.
"""
from . import models
from .convert import CheckpointError, read_checkpoint
from .errors import ZooError
from .layers import odconv_temperature, set_temperature
from .models import replace_convs
from .dense import dense_backbone

__version__ = '0.1.0'
__all__ = ['CheckpointError', 'ZooError', 'dense_backbone', 'odconv_temperature', 'read_checkpoint', 'replace_convs',
           'set_temperature', '__version__']
