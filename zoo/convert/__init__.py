"""The conversion layer: safe checkpoint reading and one converter per family and source layout.

Importing it registers the reader and the converters with ``zoo.models``, so that
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`` converts on the fly.
"""
from zoo.models._checkpoint import register_checkpoint_reader
from .reader import CheckpointError, read_checkpoint
from .state_dict import CheckpointMismatchError, SourceLayout, check_state_dict, detect_layout, unwrap_state_dict
from .van import VAN_LAYOUTS, convert_van

register_checkpoint_reader(read_checkpoint)
