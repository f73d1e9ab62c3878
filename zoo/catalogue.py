"""The catalogue of zoo models for ``zoo list`` and ``zoo info``: names, families, sizes and where weights come from."""
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import timm
import torch

from zoo.models import FAMILY_MODULES, load_manifest, resolve_model_name, weights_location

__all__ = ['ModelSummary', 'model_info', 'summarize_models']


@dataclass(frozen=True)
class ModelSummary:
    """One registered model: its family, parameter count (millions) and pretrained tags with their sources."""
    name: str
    family: str
    params_m: float
    pretrained: Tuple[Tuple[str, str], ...]  # (tag, where its weights come from)


def _params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def summarize_models(pattern: str = '*') -> List[ModelSummary]:
    """Every zoo model whose name matches the shell-style ``pattern``, in name order within each family."""
    manifest = load_manifest()
    summaries = []
    for family in FAMILY_MODULES:
        for name in timm.list_models(pattern, module=family):
            tags = tuple((tag, weights_location(tag)) for tag in manifest if tag.split('.')[0] == name)
            model = timm.create_model(name, device='meta')  # shapes only: no memory, no initialisation cost
            summaries.append(ModelSummary(name, family, _params_m(model), tags))
    return summaries


def model_info(name: str) -> Dict[str, Any]:
    """Architecture summary, pretrained cfg, feature_info and manifest entry of ``MODEL[.TAG]``."""
    model_name, _ = resolve_model_name(name)
    model = timm.create_model(name, device='meta')
    features = timm.create_model(model_name, features_only=True, device='meta').feature_info
    return {
        'model': model_name,
        'class': type(model).__name__,
        'family': next(f for f in FAMILY_MODULES if model_name in timm.list_models(module=f)),
        'params_m': round(_params_m(model), 3),
        'num_features': model.num_features,
        'pretrained_cfg': {k: v for k, v in model.pretrained_cfg.items() if v is not None},
        'feature_info': [dict(num_chs=f['num_chs'], reduction=f['reduction'], module=f['module'])
                         for f in features.get_dicts()],
        'manifest': load_manifest().get(f'{model_name}.{model.pretrained_cfg["tag"]}'),
    }
