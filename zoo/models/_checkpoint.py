"""How zoo models receive checkpoints from timm.

timm gives a model its weights either as an in-memory state dict, through the model file's
``checkpoint_filter_fn(state_dict, model)``, or as a file path, through ``model.load_pretrained(path)`` (every zoo
pretrained cfg sets ``custom_load='hf'``, so files and Hub downloads take that route and zoo, not the installed timm,
decides how they are unpickled). Both routes end in the conversion layer, ``zoo.convert``, which knows the source
layouts. It sits above the models, so it registers its reader and one converter per model class here on
``import zoo``; model files never import it.
"""
from typing import Any, Callable, Dict, Mapping, Optional, Set, Type

import torch
from torch import nn
from timm.models import adapt_input_conv

__all__ = [
    'ConvertedCheckpointMixin', 'adaptable_keys', 'checkpoint_filter_fn', 'register_checkpoint_reader',
    'register_converter',
]

Converter = Callable[[Mapping[str, Any], nn.Module], Dict[str, torch.Tensor]]
Reader = Callable[[str], Mapping[str, Any]]

_converters: Dict[Type[nn.Module], Converter] = {}
_reader: Optional[Reader] = None


def register_converter(model_cls: Type[nn.Module], converter: Converter) -> None:
    """Make ``converter(checkpoint, model)`` the way checkpoints of every ``model_cls`` are converted."""
    _converters[model_cls] = converter


def register_checkpoint_reader(reader: Reader) -> None:
    """Make ``reader(path)`` the way zoo models read checkpoint files."""
    global _reader
    _reader = reader


def checkpoint_filter_fn(checkpoint: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map a checkpoint of any supported source layout onto ``model``'s own keys (timm's pretrained_filter_fn)."""
    for cls in type(model).__mro__:
        if cls in _converters:
            return _converters[cls](checkpoint, model)
    raise RuntimeError(f'no checkpoint converter is registered for {type(model).__name__}: `import zoo` first')


def _names(value: Any) -> tuple:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def adaptable_keys(model: nn.Module) -> Set[str]:
    """State dict keys a checkpoint may legitimately disagree on: the classifier (num_classes) and the first conv
    weight (in_chans). timm adapts both when it loads pretrained weights."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    keys = {f'{name}.{p}' for name in _names(cfg.get('classifier')) for p in ('weight', 'bias')}
    keys |= {f'{name}.weight' for name in _names(cfg.get('first_conv'))}
    return keys


def _adapt_to_model(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Set[str]:
    """Adapt classifier and first conv of a converted state dict to ``model`` in place, as timm's loader does.

    Returns the model keys left at their initialisation (a classifier for another number of classes).
    """
    target = model.state_dict()
    left_out = set()
    for key in sorted(adaptable_keys(model)):
        if key not in state_dict or key not in target or state_dict[key].shape == target[key].shape:
            continue
        weight = state_dict[key]
        if weight.ndim == 4 and weight.shape[0] == target[key].shape[0]:
            state_dict[key] = adapt_input_conv(target[key].shape[1], weight)
        else:
            del state_dict[key]
            left_out.add(key)
    for key in list(state_dict):
        if key not in target and key in adaptable_keys(model):
            del state_dict[key]  # classifier of a checkpoint loaded into a model without one (num_classes=0)
    return left_out


class ConvertedCheckpointMixin:
    """Gives a zoo model the ``load_pretrained(path)`` that timm calls for ``custom_load`` pretrained cfgs."""

    def load_pretrained(self, checkpoint_path: str, prefix: str = '') -> None:
        """Read ``checkpoint_path`` safely, convert it from its source layout and load it (strict but for the
        classifier, which is re-initialised when num_classes differs, and the first conv, adapted to in_chans)."""
        if _reader is None:
            raise RuntimeError('no checkpoint reader is registered: `import zoo` first')
        state_dict = checkpoint_filter_fn(_reader(checkpoint_path), self)
        left_out = _adapt_to_model(self, state_dict)
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if k not in left_out]
        if missing or unexpected:
            raise RuntimeError(f'{checkpoint_path}: converted weights do not fit {type(self).__name__}: '
                               f'missing {missing}, unexpected {unexpected}')
