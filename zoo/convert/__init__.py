"""The conversion layer: safe checkpoint reading, and the layouts each family's checkpoints are published in.

It sits below the models and imports none of them: each model file hands its family's :class:`CheckpointLayouts`
to timm as the pretrained filter, and converters only see the keys and shapes of the model they are given.
"""
from .reader import CheckpointError, read_checkpoint
from .layouts import CheckpointLayouts, CheckpointMismatchError, SourceLayout, check_state_dict, classifier_keys, \
    first_conv_keys, read_state_dict, unwrap_state_dict
from .van import VAN_LAYOUTS
from .odconv import ODCONV_MOBILENETV2_LAYOUTS, ODCONV_RESNET_LAYOUTS
from .efficientmod import EFFICIENTMOD_LAYOUTS
from .xvolution import XVOLUTION_RESNET_LAYOUTS

__all__ = [
    'CheckpointError', 'CheckpointLayouts', 'CheckpointMismatchError', 'EFFICIENTMOD_LAYOUTS',
    'ODCONV_MOBILENETV2_LAYOUTS', 'ODCONV_RESNET_LAYOUTS', 'SourceLayout', 'VAN_LAYOUTS', 'XVOLUTION_RESNET_LAYOUTS',
    'check_state_dict', 'classifier_keys', 'first_conv_keys', 'read_checkpoint', 'read_state_dict',
    'unwrap_state_dict',
]
