"""timm-native model families; importing this package registers every entrypoint with timm."""
from typing import List

import timm

from ._checkpoint import checkpoint_filter_fn, classifier_keys, first_conv_keys, register_converter, \
    register_weights_reader
from ._manifest import load_manifest
from .efficientmod import EfficientMod
from .odconv_mobilenetv2 import ODMobileNetV2
from .odconv_resnet import ODResNet
from .van import VAN
from .xvolution_resnet import XVolutionResNet

__all__ = [
    'FAMILY_MODULES', 'EfficientMod', 'ODMobileNetV2', 'ODResNet', 'VAN', 'checkpoint_filter_fn', 'classifier_keys',
    'first_conv_keys', 'list_zoo_models', 'load_manifest', 'register_converter', 'register_weights_reader',
    'XVolutionResNet',
]

# timm records a model's module as the last component of its Python module name
FAMILY_MODULES = ('van', 'odconv_resnet', 'odconv_mobilenetv2', 'efficientmod', 'xvolution_resnet')


def list_zoo_models(pattern: str = '*') -> List[str]:
    """Names of the timm models zoo registers, matching a shell-style ``pattern``."""
    return sorted(name for module in FAMILY_MODULES for name in timm.list_models(pattern, module=module))
