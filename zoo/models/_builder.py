"""Model construction shared by every zoo family: timm's builder, zoo's checkpoint reading and conversion, and a
clear message where the official weights cannot be downloaded automatically."""
import functools
from typing import Any, Callable, Dict, Optional, TypeVar

from torch import nn
from timm.models import PretrainedCfg, build_model_with_cfg
from timm.models._builder import resolve_pretrained_cfg

from ._checkpoint import checkpoint_filter_fn, read_weights_file
from ._manifest import load_manifest

__all__ = ['build_zoo_model']

ModelT = TypeVar('ModelT', bound=nn.Module)
_WEIGHT_SOURCES = ('file', 'state_dict', 'url', 'hf_hub_id')


def _resolve_cfg(variant: str, kwargs: Dict[str, Any]) -> PretrainedCfg:
    return resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                  pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))


def _check_weights_reachable(variant: str, cfg: PretrainedCfg) -> None:
    if any(getattr(cfg, key, None) for key in _WEIGHT_SOURCES):
        return
    tag = f'{variant}.{cfg.tag}' if cfg.tag else variant
    entry = load_manifest().get(tag)
    if entry is None:
        notes = f' ({"; ".join(cfg.notes)})' if cfg.notes else ''
        raise RuntimeError(
            f'{tag} has no pretrained weights{notes}: create it with pretrained=False, or load your own with '
            f'pretrained_cfg_overlay=dict(file=PATH) or timm.create_model("hf-hub:ORG/NAME", pretrained=True)')
    raise RuntimeError(
        f'{tag} weights are not on the Hugging Face Hub; they are published at {entry["source"]["url"]}. Download the '
        f'file, then load it with timm.create_model({variant!r}, pretrained=True, '
        f'pretrained_cfg_overlay=dict(file=PATH)).')


def _is_file_source(cfg: PretrainedCfg) -> bool:
    """Whether timm would read the weights from ``cfg.file`` with its generic loader."""
    return bool(cfg.file) and not cfg.state_dict and cfg.source not in ('hf-hub', 'local-dir') and not cfg.custom_load


def _forget_weights(model: nn.Module, file: str) -> None:
    """Drop the in-memory weights from the pretrained cfgs timm stored on ``model``; keep where they came from."""
    for module in model.modules():
        cfg = getattr(module, 'pretrained_cfg', None)
        if isinstance(cfg, dict) and 'state_dict' in cfg:
            del cfg['state_dict']
            cfg['file'] = file


def build_zoo_model(
        model_cls: Callable[..., ModelT],
        variant: str,
        pretrained: bool,
        feature_cfg: Optional[Dict[str, Any]] = None,
        pretrained_use_ema: bool = False,
        **kwargs: Any,
) -> ModelT:
    """``build_model_with_cfg`` with zoo's checkpoint reading and conversion.

    A ``file=`` checkpoint is read by zoo (safely, with clear errors) and gives its ``state_dict``, or with
    ``pretrained_use_ema=True`` its EMA weights; timm's generic loader would silently prefer the EMA ones.
    Weights that are published only outside the Hub get an error that says where they are and how to load them.
    """
    if pretrained_use_ema and not pretrained:
        raise ValueError(f'{variant}: pretrained_use_ema=True needs pretrained=True')
    file = None
    if pretrained:
        cfg = _resolve_cfg(variant, kwargs)
        _check_weights_reachable(variant, cfg)
        if _is_file_source(cfg):
            file = cfg.file
            weights = read_weights_file(file, pretrained_use_ema)
            kwargs['pretrained_cfg_overlay'] = dict(kwargs.get('pretrained_cfg_overlay') or {}, state_dict=weights)
    # weights read above are already the chosen ones; a container from elsewhere is unwrapped by the filter
    filter_fn = functools.partial(checkpoint_filter_fn, use_ema=pretrained_use_ema and file is None)
    model = build_model_with_cfg(
        model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, feature_cfg=feature_cfg, **kwargs)
    if file is not None:
        _forget_weights(model, file)
    return model
