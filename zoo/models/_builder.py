"""Model construction shared by every zoo family: timm's builder, zoo's checkpoint conversion, and a clear message
where the official weights cannot be downloaded automatically."""
from typing import Any, Callable, Dict, Optional, TypeVar

from torch import nn
from timm.models import build_model_with_cfg
from timm.models._builder import resolve_pretrained_cfg

from ._checkpoint import checkpoint_filter_fn
from ._manifest import load_manifest

__all__ = ['build_zoo_model']

ModelT = TypeVar('ModelT', bound=nn.Module)
_WEIGHT_SOURCES = ('file', 'state_dict', 'url', 'hf_hub_id')


def _check_weights_reachable(variant: str, kwargs: Dict[str, Any]) -> None:
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if any(getattr(cfg, key, None) for key in _WEIGHT_SOURCES):
        return
    tag = f'{variant}.{cfg.tag}' if cfg.tag else variant
    entry = load_manifest().get(tag)
    if entry is None:
        raise RuntimeError(f'{tag} has no pretrained weights: create it with pretrained=False')
    raise RuntimeError(
        f'{tag} weights are not on the Hugging Face Hub; they are published at {entry["source"]["url"]}. Download the '
        f'file, then load it with timm.create_model({variant!r}, pretrained=True, '
        f'pretrained_cfg_overlay=dict(file=PATH)).')


def build_zoo_model(
        model_cls: Callable[..., ModelT],
        variant: str,
        pretrained: bool,
        feature_cfg: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> ModelT:
    """``build_model_with_cfg`` with zoo's checkpoint conversion; explains where manually published weights are."""
    if pretrained:
        _check_weights_reachable(variant, kwargs)
    return build_model_with_cfg(
        model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg, **kwargs)
