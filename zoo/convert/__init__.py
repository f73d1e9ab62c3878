"""The conversion layer: safe checkpoint reading and one converter per family and source layout.

Importing it registers the converters and the safe weights reader with ``zoo.models``, so that
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`` reads and converts on the fly.
"""
from zoo.models import register_weights_reader
from .reader import CheckpointError, read_checkpoint
from .state_dict import CheckpointMismatchError, SourceLayout, check_state_dict, detect_layout, read_weights, \
    unwrap_state_dict
from .van import VAN_LAYOUTS, convert_van
from .odconv import ODCONV_MOBILENETV2_LAYOUTS, ODCONV_RESNET_LAYOUTS, convert_odconv_mobilenetv2, convert_odconv_resnet
from .efficientmod import EFFICIENTMOD_LAYOUTS, convert_efficientmod
from .xvolution import XVOLUTION_LAYOUTS, convert_xvolution_resnet

register_weights_reader(read_weights)
