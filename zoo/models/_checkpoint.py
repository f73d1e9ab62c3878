"""How zoo models receive checkpoints from timm.

Whatever timm loads for a zoo model (a ``file=`` override, a Hub download, an in-memory ``state_dict``) reaches
``checkpoint_filter_fn(state_dict, model)`` before ``load_state_dict``. The converters behind it live in the
conversion layer, ``zoo.convert``, which knows the source layouts and how to read files safely; it sits above the
models, so on ``import zoo`` it registers one converter per model class, and its weights reader, here; model files
never import it.
"""
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Set, Type, Union

import torch
from torch import nn

__all__ = [
    'checkpoint_filter_fn', 'classifier_keys', 'first_conv_keys', 'read_weights_file', 'register_converter',
    'register_weights_reader',
]

Converter = Callable[..., Dict[str, torch.Tensor]]  # (checkpoint, model, use_ema=False) -> model's state dict
WeightsReader = Callable[[Union[str, Path], bool], Dict[str, torch.Tensor]]  # (path, use_ema) -> state dict

_converters: Dict[Type[nn.Module], Converter] = {}
_weights_reader: Optional[WeightsReader] = None


def register_converter(model_cls: Type[nn.Module], converter: Converter) -> None:
    """Make ``converter(checkpoint, model)`` the way checkpoints of every ``model_cls`` are converted."""
    _converters[model_cls] = converter


def register_weights_reader(reader: WeightsReader) -> None:
    """Make ``reader(path, use_ema)`` the way zoo reads the state dict in a checkpoint file."""
    global _weights_reader
    _weights_reader = reader


def read_weights_file(path: Union[str, Path], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict in a checkpoint file (its EMA weights if ``use_ema``), read without executing code."""
    if _weights_reader is None:
        raise RuntimeError('no checkpoint reader is registered: `import zoo` first')
    return _weights_reader(path, use_ema)


def checkpoint_filter_fn(checkpoint: Mapping[str, Any], model: nn.Module,
                         use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Map a checkpoint of any supported source layout onto ``model``'s own keys (timm's pretrained_filter_fn).

    A training container gives its ``state_dict``, or its EMA weights if ``use_ema``.
    """
    for cls in type(model).__mro__:
        if cls in _converters:
            return _converters[cls](checkpoint, model, use_ema=use_ema)
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
