"""The manifest as users see it: which zoo models exist, how big they are, and where their weights come from.

(Exporting a Hub folder and publishing it arrive with the `zoo convert` / `zoo publish` commands.)
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import timm
import torch

from zoo.models import FAMILY_MODULES, load_manifest

__all__ = ['ModelSummary', 'summarize_models', 'weights_location']


@dataclass(frozen=True)
class ModelSummary:
    """One registered model: its family, parameter count (millions) and pretrained tags with their sources."""
    name: str
    family: str
    params_m: float
    pretrained: Tuple[Tuple[str, str], ...]  # (tag, where its weights come from)


def weights_location(entry: Dict[str, Any]) -> str:
    """Where a manifest entry's weights are downloaded from: ``hf-hub:ORG/NAME/FILE`` or the original URL."""
    source = entry['source']
    if 'hf_hub_id' in source:
        return f"hf-hub:{source['hf_hub_id']}/{source['hf_hub_filename']} ({source['layout']} layout)"
    return f"{source['url']} ({source['layout']} layout, manual download)"


def _count_params_m(name: str) -> float:
    with torch.device('meta'):  # shapes only: no memory, no initialisation cost
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters()) / 1e6


def summarize_models(pattern: str = '*') -> List[ModelSummary]:
    """Every zoo model whose name matches the shell-style ``pattern``, in name order within each family."""
    manifest = load_manifest()
    summaries = []
    for family in FAMILY_MODULES:
        for name in timm.list_models(pattern, module=family):
            tags = tuple((tag, weights_location(entry)) for tag, entry in manifest.items()
                         if tag.split('.')[0] == name)
            summaries.append(ModelSummary(name, family, _count_params_m(name), tags))
    return summaries
