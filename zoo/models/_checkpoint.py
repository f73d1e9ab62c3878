"""How zoo models receive checkpoints from timm.

Whatever timm loads for a zoo model (a ``file=`` override, a Hub download, an in-memory ``state_dict``) reaches the
model file's ``checkpoint_filter_fn(state_dict, model)`` before ``load_state_dict``. The converters behind it live in
the conversion layer, ``zoo.convert``, which knows the source layouts; it sits above the models, so it registers one
converter per model class here on ``import zoo`` and model files never import it.
"""
from typing import Any, Callable, Dict, Mapping, Set, Type

import torch
from torch import nn

__all__ = ['checkpoint_filter_fn', 'classifier_keys', 'first_conv_keys', 'register_converter']

Converter = Callable[[Mapping[str, Any], nn.Module], Dict[str, torch.Tensor]]

_converters: Dict[Type[nn.Module], Converter] = {}


def register_converter(model_cls: Type[nn.Module], converter: Converter) -> None:
    """Make ``converter(checkpoint, model)`` the way checkpoints of every ``model_cls`` are converted."""
    _converters[model_cls] = converter


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


def classifier_keys(model: nn.Module) -> Set[str]:
    """Classifier weights and biases, which a checkpoint may size for another num_classes (timm then drops them)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return {f'{name}.{p}' for name in _names(cfg.get('classifier')) for p in ('weight', 'bias')}


def first_conv_keys(model: nn.Module) -> Set[str]:
    """First conv weights, which a checkpoint may have for other in_chans (timm then adapts them)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return {f'{name}.weight' for name in _names(cfg.get('first_conv'))}
