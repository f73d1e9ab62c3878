"""Source-layout machinery shared by every family's converter.

A checkpoint is unwrapped from its training container, its layout is recognised from its keys, every key is renamed
by the layout's rules, and the result is checked key by key and shape by shape against the target model.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from zoo.models import classifier_keys, first_conv_keys
from .reader import CheckpointError, read_checkpoint

__all__ = [
    'CheckpointMismatchError', 'SourceLayout', 'check_state_dict', 'convert_with_layouts', 'detect_layout',
    'read_weights', 'unwrap_state_dict',
]

Replacement = Union[str, Callable[['re.Match[str]'], str]]

# keys that hold the weights in the training containers of timm, DDP, mmengine and the official repos
_CONTAINER_KEYS = ('state_dict', 'model', 'module')
_EMA_CONTAINER_KEYS = ('state_dict_ema', 'model_ema', 'ema_state_dict')
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DistributedDataParallel, torch.compile


@dataclass(frozen=True)
class SourceLayout:
    """One published way of naming a family's weights.

    Attributes:
        name: What the layout is called in messages ('official', 'transformers', ...).
        marker: Regex that a key of this layout, and of no other layout of the family, matches in full.
        rules: (regex, replacement) pairs applied in order to every key with ``re.sub``.
        dropped: Regexes of keys with no counterpart in the model, dropped on purpose.
    """
    name: str
    marker: str
    rules: Tuple[Tuple[str, Replacement], ...] = ()
    dropped: Tuple[str, ...] = ()

    def matches(self, keys: Iterable[str]) -> bool:
        return any(re.fullmatch(self.marker, k) for k in keys)

    def convert(self, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = {}
        for key, value in state_dict.items():
            if any(re.fullmatch(pattern, key) for pattern in self.dropped):
                continue
            for pattern, replacement in self.rules:
                key = re.sub(pattern, replacement, key)
            out[key] = value
        return out


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose converted keys or shapes do not fit the target model."""

    def __init__(self, model: str, layout: str, missing: List[str], unexpected: List[str],
                 mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]], sides: str = '') -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if missing:
            parts.append(f'missing {_preview(missing)}')
        if unexpected:
            parts.append(f'unexpected {_preview(unexpected)}')
        if mismatched:
            shapes = [f'{k}: checkpoint {tuple(got)} vs model {tuple(want)}' for k, got, want in mismatched]
            parts.append(f'mis-shaped {_preview(shapes)}')
        super().__init__(
            f'checkpoint (detected layout: {layout}) does not fit {model}: {sides or "keys differ"}; '
            f'{"; ".join(parts)}. Is it a checkpoint of another model or size?')


def _preview(items: Sequence[str], limit: int = 8) -> str:
    shown = ', '.join(items[:limit])
    more = f', ... ({len(items)} in all)' if len(items) > limit else ''
    return f'[{shown}{more}]'


def _strip_wrapper_prefixes(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split('.', 1)[1]
    return key


def unwrap_state_dict(checkpoint: Any, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint, with DDP / torch.compile prefixes removed.

    Args:
        checkpoint: A bare state dict or a training container ({'state_dict': ..., 'optimizer': ..., ...}).
        use_ema: Take the EMA weights ('state_dict_ema' and the like); an error if the checkpoint has none.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'checkpoint holds a {type(checkpoint).__name__}, not a state dict')
    if use_ema:
        ema_keys = [k for k in _EMA_CONTAINER_KEYS if isinstance(checkpoint.get(k), Mapping)]
        if not ema_keys:
            raise CheckpointError(f'EMA weights were asked for, but the checkpoint has none '
                                  f'(its top-level keys: {_preview(sorted(map(str, checkpoint)))})')
        checkpoint = checkpoint[ema_keys[0]]
    else:
        for key in _CONTAINER_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    state_dict = {_strip_wrapper_prefixes(str(k)): v for k, v in checkpoint.items()}
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f'checkpoint has no state dict: these entries are not tensors: {_preview(not_tensors)}')
    return state_dict


def read_weights(path: Union[str, Path], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict in a checkpoint file, unwrapped from its container (its EMA weights if ``use_ema``)."""
    return unwrap_state_dict(read_checkpoint(path), use_ema=use_ema)


def detect_layout(state_dict: Mapping[str, torch.Tensor], layouts: Sequence[SourceLayout],
                  family: str) -> SourceLayout:
    """The layout among ``layouts`` whose marker some key matches."""
    for layout in layouts:
        if layout.matches(state_dict):
            return layout
    names = ', '.join(layout.name for layout in layouts)
    raise CheckpointError(
        f'not a {family} checkpoint: its keys match none of the {family} layouts ({names}); '
        f'first keys: {_preview(list(state_dict), 5)}')


def _fits(checkpoint_shape: torch.Size, model_shape: torch.Size, first_conv: bool) -> bool:
    if first_conv:  # only the number of input channels may differ
        return checkpoint_shape[:1] + checkpoint_shape[2:] == model_shape[:1] + model_shape[2:]
    return checkpoint_shape == model_shape


Describe = Callable[[Mapping[str, torch.Tensor]], str]


def check_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, layout: str,
                     describe: Optional[Describe] = None) -> None:
    """Raise :class:`CheckpointMismatchError` unless every key and shape fits ``model``.

    As timm adapts them on load, the classifier may have any shape (or be present for a model built without one)
    and the first conv may have other input channels. ``describe(state_dict)`` summarises a checkpoint or model
    (e.g. 'kernel_num 4') for the error, which then names both sides.
    """
    target = model.state_dict()
    classifier, first_conv = classifier_keys(model), first_conv_keys(model)
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target and k not in classifier]
    mismatched = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in state_dict.items()
                  if k in target and k not in classifier and not _fits(v.shape, target[k].shape, k in first_conv)]
    if missing or unexpected or mismatched:
        sides = f'checkpoint has {describe(state_dict)}, model has {describe(target)}' if describe else ''
        raise CheckpointMismatchError(type(model).__name__, layout, missing, unexpected, mismatched, sides)


def convert_with_layouts(checkpoint: Any, model: nn.Module, layouts: Sequence[SourceLayout], family: str,
                         use_ema: bool = False, describe: Optional[Describe] = None) -> Dict[str, torch.Tensor]:
    """Unwrap ``checkpoint``, detect its layout, rename its keys and check them against ``model``."""
    state_dict = unwrap_state_dict(checkpoint, use_ema=use_ema)
    layout = detect_layout(state_dict, layouts, family)
    converted = layout.convert(state_dict)
    check_state_dict(converted, model, layout.name, describe)
    return converted
