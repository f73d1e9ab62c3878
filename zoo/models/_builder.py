"""Model construction shared by every zoo family: timm's builder, with zoo's reading of checkpoint files.

:func:`build_zoo_model` is the one place where a checkpoint file becomes a model. Every route there goes through
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``: a user's own call,
``zoo convert``, ``zoo predict --checkpoint`` and ``zoo finetune --checkpoint`` (the last three via
:func:`create_model_from_checkpoint`).
"""
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, TypeVar, Union

import timm
from torch import nn
from timm.models import PretrainedCfg, build_model_with_cfg, resolve_pretrained_cfg

from zoo.convert import CheckpointLayouts, read_state_dict
from zoo.errors import UsageError, WeightsUnavailableError
from ._manifest import load_manifest, weights_cfg_fields
from ._pretrained import pretrained_weights_file

__all__ = ['build_zoo_model', 'create_model_from_checkpoint']

_logger = logging.getLogger(__name__)

ModelT = TypeVar('ModelT', bound=nn.Module)
_WEIGHT_SOURCES = ('file', 'state_dict', 'url', 'hf_hub_id')


def _check_weights_exist(variant: str, cfg: PretrainedCfg) -> None:
    """Where no weights source is set, say so and how to load weights of one's own."""
    if any(getattr(cfg, key, None) for key in _WEIGHT_SOURCES):
        return
    tag = f'{variant}.{cfg.tag}' if cfg.tag else variant
    notes = f' ({"; ".join(cfg.notes)})' if cfg.notes else ''
    raise WeightsUnavailableError(
        f'{tag} has no pretrained weights{notes}: create it with pretrained=False, or load your own with '
        f'pretrained_cfg_overlay=dict(file=PATH) or timm.create_model("hf-hub:ORG/NAME", pretrained=True)')


def _manifest_weights_file(variant: str, cfg: PretrainedCfg, cache_dir: Optional[str]) -> Optional[str]:
    """The local file of a manifest tag's weights where ``cfg`` asks for them as registered (not for a file, state
    dict, ``hf-hub:`` / ``local-dir:`` folder or other source a user gave), downloaded from the first source that
    gives them (zoo.models._pretrained)."""
    tag = f'{variant}.{cfg.tag}'
    if tag not in load_manifest() or cfg.file or cfg.state_dict or cfg.source in ('hf-hub', 'local-dir'):
        return None
    asked = {key: getattr(cfg, key) for key in ('hf_hub_id', 'hf_hub_filename', 'url') if getattr(cfg, key)}
    if asked != weights_cfg_fields(tag):
        return None
    return str(pretrained_weights_file(tag, cache_dir=cache_dir))


def _is_file_source(cfg: PretrainedCfg) -> bool:
    """Whether timm would read the weights from ``cfg.file`` with its generic loader."""
    return bool(cfg.file) and not cfg.state_dict and cfg.source not in ('hf-hub', 'local-dir')


def _with_file_weights(cfg: PretrainedCfg, layouts: CheckpointLayouts, use_ema: bool) -> PretrainedCfg:
    """``cfg`` carrying the weights of its file, read by zoo, and describing them: ``num_classes`` is the size of
    the file's classifier (0 without one), so timm keeps a classifier of the asked-for size and replaces another.

    zoo reads the file rather than timm for its messages about damaged or unsafe files, its safetensors detection
    by content, and because timm's file loader takes a training checkpoint's EMA weights whenever they exist.
    """
    weights = read_state_dict(cfg.file, use_ema=use_ema)
    num_classes = cfg.num_classes
    if isinstance(cfg.classifier, str):
        num_classes = layouts.num_classes(weights, cfg.classifier) or 0
    return dataclasses.replace(cfg, state_dict=weights, num_classes=num_classes)


def _forget_file_weights(model: nn.Module) -> None:
    """Drop the weights from the pretrained cfgs timm stored on ``model`` (and a features wrapper's copy): the
    model holds them now, and its cfg keeps the file they came from."""
    for module in model.modules():
        cfg = getattr(module, 'pretrained_cfg', None)
        if isinstance(cfg, dict):
            cfg.pop('state_dict', None)


def build_zoo_model(
        model_cls: Callable[..., ModelT],
        variant: str,
        pretrained: bool,
        checkpoint_layouts: CheckpointLayouts,
        feature_cfg: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> ModelT:
    """``timm.models.build_model_with_cfg`` whose pretrained filter converts any published layout of the family.

    Args:
        model_cls: The model class.
        variant: Model name, the key of its pretrained cfgs.
        pretrained: Load pretrained weights.
        checkpoint_layouts: The family's checkpoint layouts; ``checkpoint_layouts.convert`` is timm's
            ``pretrained_filter_fn``.
        feature_cfg: timm's feature extraction cfg.
        **kwargs: Model arguments and timm's ``pretrained_cfg``, ``pretrained_cfg_overlay`` and
            ``pretrained_use_ema`` (take a training checkpoint file's EMA weights rather than its ``state_dict``).

    A ``file=`` checkpoint is read here, safely; its classifier is kept where it has the asked-for number of
    classes (by default, its own) and replaced, with a warning, where it has another. A manifest tag's registered
    weights are downloaded from the first source that gives them (the mirror, the authors' Hub repo, the authors'
    download: ``zoo.models._pretrained``) and read as such a file.
    """
    use_ema = kwargs.pop('pretrained_use_ema', False)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.pop('pretrained_cfg', None),
                                 pretrained_cfg_overlay=kwargs.pop('pretrained_cfg_overlay', None))
    if use_ema and not (pretrained and _is_file_source(cfg)):
        raise UsageError(f'{variant}: pretrained_use_ema=True selects the EMA weights of a checkpoint file: pass '
                         f'pretrained=True, pretrained_cfg_overlay=dict(file=PATH)')
    if pretrained:
        _check_weights_exist(variant, cfg)
        file = _manifest_weights_file(variant, cfg, kwargs.get('cache_dir'))
        if file is not None:
            cfg = dataclasses.replace(cfg, file=file)
    reads_file = pretrained and _is_file_source(cfg)
    if reads_file:
        file = cfg.file
        cfg = _with_file_weights(cfg, checkpoint_layouts, use_ema)
        _warn_if_classifier_replaced(file, cfg.num_classes, kwargs)
    model = build_model_with_cfg(
        model_cls, variant, pretrained, pretrained_cfg=cfg, pretrained_filter_fn=checkpoint_layouts.convert,
        feature_cfg=feature_cfg, **kwargs)
    if reads_file:
        _forget_file_weights(model)
    # conversion happens above only, in the pretrained filter: load_state_dict (and timm's checkpoint_path= or
    # load_checkpoint, a resume) loads zoo's own keys and refuses another layout with a pointer to the filter's route
    model.register_load_state_dict_pre_hook(checkpoint_layouts.refuse_foreign_layout)
    return model


def _warn_if_classifier_replaced(file: str, checkpoint_classes: int, kwargs: Dict[str, Any]) -> None:
    asked = kwargs.get('num_classes', checkpoint_classes)
    if checkpoint_classes and asked and asked != checkpoint_classes and not kwargs.get('features_only'):
        _logger.warning(f'{file}: its classifier has {checkpoint_classes} classes and the model {asked}: the '
                        f'classifier starts untrained')


def create_model_from_checkpoint(model_name: str, checkpoint: Union[str, Path], **kwargs: Any) -> nn.Module:
    """``model_name`` with the weights of a checkpoint file in any layout zoo or timm reads (an official training
    checkpoint, a transformers ``pytorch_model.bin``, a zoo or timm safetensors file, ...).

    The classifier keeps the checkpoint's number of classes unless ``num_classes`` asks for another. Other keyword
    arguments go to ``timm.create_model`` (``pretrained_use_ema=True`` for a training checkpoint's EMA weights).
    """
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {}, file=str(checkpoint))
    return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
