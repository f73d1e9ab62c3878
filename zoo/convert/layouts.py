"""Source layouts: how a family's published checkpoints name their weights, and their conversion to zoo's keys.

A checkpoint is unwrapped from its training container, its layout is recognised from its keys, every key is renamed
by the layout's rules, and the result is checked key by key and shape by shape against the model it is for. This
module knows layouts, keys and shapes; it never imports a model class: the model files hand it their models.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from .reader import CheckpointError, read_checkpoint

__all__ = [
    'CheckpointLayouts', 'CheckpointMismatchError', 'SourceLayout', 'check_state_dict', 'classifier_keys',
    'first_conv_keys', 'read_state_dict', 'unwrap_state_dict',
]

Replacement = Union[str, Callable[['re.Match[str]'], str]]
OntoModel = Callable[[Dict[str, torch.Tensor], Set[str]], Dict[str, torch.Tensor]]  # (state dict, model keys) -> ...
Describe = Callable[[Mapping[str, torch.Tensor]], str]  # state dict -> what it is, e.g. 'kernel_num 4, widths ...'

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
        onto_model: Renames that depend on the target model's keys (after the rules), e.g. which convs of a plain
            ResNet became X-volutions.
        added: Regexes of model keys this layout lacks on purpose: they keep the model's initialisation (e.g. an
            X-volution's attention branch, when the weights are a plain ResNet's).
    """
    name: str
    marker: str
    rules: Tuple[Tuple[str, Replacement], ...] = ()
    dropped: Tuple[str, ...] = ()
    onto_model: Optional[OntoModel] = None
    added: Tuple[str, ...] = ()

    def matches(self, keys: Iterable[str]) -> bool:
        return any(re.fullmatch(self.marker, k) for k in keys)

    def converts(self, state_dict: Mapping[str, torch.Tensor]) -> bool:
        """Whether converting ``state_dict`` changes anything (a zoo layout's state dict converts to itself)."""
        return self.onto_model is not None or bool(self.added) or list(self.rename(state_dict)) != list(state_dict)

    def rename(self, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``state_dict`` with zoo's keys: every key renamed by the rules, the dropped ones left out."""
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


def read_state_dict(path: Union[str, Path], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict in a checkpoint file, read without executing code and unwrapped from its container (its EMA
    weights if ``use_ema``)."""
    try:
        return unwrap_state_dict(read_checkpoint(path), use_ema=use_ema)
    except CheckpointError as e:
        if str(e).startswith(str(path)):
            raise
        raise CheckpointError(f'{path}: {e}') from e


def _names(value: Any) -> Tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def classifier_keys(model: nn.Module) -> Set[str]:
    """Classifier weights and biases (from the pretrained cfg), which a checkpoint may size for other classes."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return {f'{name}.{p}' for name in _names(cfg.get('classifier')) for p in ('weight', 'bias')}


def first_conv_keys(model: nn.Module) -> Set[str]:
    """First conv weights (from the pretrained cfg), which a checkpoint may have for other input channels."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return {f'{name}.weight' for name in _names(cfg.get('first_conv'))}


def _fits(checkpoint_shape: torch.Size, model_shape: torch.Size, first_conv: bool) -> bool:
    if first_conv:  # only the number of input channels may differ
        return checkpoint_shape[:1] + checkpoint_shape[2:] == model_shape[:1] + model_shape[2:]
    return checkpoint_shape == model_shape


def check_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, layout: str,
                     describe: Optional[Describe] = None, adapt: bool = True) -> None:
    """Raise :class:`CheckpointMismatchError` unless every key and shape fits ``model``.

    With ``adapt``, as timm adapts them on load, the classifier may have any shape, be absent, or be present for a
    model built without one, and the first conv may have other input channels; without it, every key and shape must
    be the model's (a Hub folder's weights and its config). ``describe(state_dict)`` summarises a checkpoint or model
    (e.g. 'kernel_num 4') for the error, which then names both sides.
    """
    target = model.state_dict()
    classifier, first_conv = (classifier_keys(model), first_conv_keys(model)) if adapt else (set(), set())
    missing = [k for k in target if k not in state_dict and k not in classifier]
    unexpected = [k for k in state_dict if k not in target and k not in classifier]
    mismatched = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in state_dict.items()
                  if k in target and k not in classifier and not _fits(v.shape, target[k].shape, k in first_conv)]
    if missing or unexpected or mismatched:
        sides = f'checkpoint has {describe(state_dict)}, model has {describe(target)}' if describe else ''
        raise CheckpointMismatchError(type(model).__name__, layout, missing, unexpected, mismatched, sides)


@dataclass(frozen=True)
class CheckpointLayouts:
    """The layouts one family's checkpoints are published in, and their conversion to a model's state dict.

    Attributes:
        family: The family's name in messages ('VAN', ...).
        layouts: Its layouts, each recognised by a key only it has.
        describe: Summary of a state dict for mismatch errors (e.g. 'kernel_num 4, widths 64..512').
    """
    family: str
    layouts: Tuple[SourceLayout, ...]
    describe: Optional[Describe] = None

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> SourceLayout:
        """The layout whose marker some key matches."""
        for layout in self.layouts:
            if layout.matches(state_dict):
                return layout
        names = ', '.join(layout.name for layout in self.layouts)
        raise CheckpointError(
            f'not a {self.family} checkpoint: its keys match none of the {self.family} layouts ({names}); '
            f'first keys: {_preview(list(state_dict), 5)}')

    def convert(self, checkpoint: Mapping[str, Any], model: nn.Module,
                use_ema: bool = False) -> Dict[str, torch.Tensor]:
        """``checkpoint`` (a state dict or a training container, any layout) as ``model``'s state dict, checked key
        by key and shape by shape: timm's ``pretrained_filter_fn`` of the family's models."""
        layout, state_dict = self._renamed(checkpoint, use_ema)
        if layout.onto_model is not None or layout.added:
            target = model.state_dict()
            if layout.onto_model is not None:
                state_dict = layout.onto_model(state_dict, set(target))
            state_dict.update({k: v for k, v in target.items() if k not in state_dict
                               and any(re.fullmatch(pattern, k) for pattern in layout.added)})
        check_state_dict(state_dict, model, layout.name, self.describe)
        return state_dict

    def num_classes(self, checkpoint: Mapping[str, Any], classifier: str) -> Optional[int]:
        """Output rows of the classifier module ``classifier`` (named in zoo's keys) in ``checkpoint``, or None if the
        checkpoint has no such classifier."""
        _, state_dict = self._renamed(checkpoint, use_ema=False)
        weight = state_dict.get(f'{classifier}.weight')
        return None if weight is None else weight.shape[0]

    def refuse_foreign_layout(self, module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        """A ``register_load_state_dict_pre_hook`` hook that converts nothing: ``load_state_dict`` loads a model's own
        keys only, as in timm (and as a resume must: it restores exactly what was saved). A state dict in another
        published layout of the family is refused with an error naming the layout and the call that converts it;
        any other mismatch is left to ``load_state_dict``'s own message."""
        if prefix or set(state_dict) <= set(module.state_dict()):
            return
        layout = next((layout for layout in self.layouts if layout.matches(state_dict)), None)
        if layout is None or not layout.converts(state_dict):
            return
        raise CheckpointError(
            f'this state dict is in the {layout.name} layout of {self.family} checkpoints, which load_state_dict '
            f'does not convert: create the model from the file with zoo.models.create_model_from_checkpoint(MODEL, '
            f'PATH), or timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))')

    def _renamed(self, checkpoint: Mapping[str, Any], use_ema: bool) -> Tuple[SourceLayout, Dict[str, torch.Tensor]]:
        state_dict = unwrap_state_dict(checkpoint, use_ema=use_ema)
        layout = self.detect(state_dict)
        return layout, layout.rename(state_dict)
