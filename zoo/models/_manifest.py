"""``weights_manifest.yaml`` -> timm pretrained cfgs.

The manifest is the single source of truth for every pretrained tag: where the weights are published, in which
source layout, under which license, with which preprocessing and reported accuracy. Model files build their
``default_cfgs`` from it with :func:`manifest_cfgs`.
"""
import functools
from pathlib import Path
from typing import Any, Callable, Dict

import yaml

__all__ = ['MANIFEST_PATH', 'load_manifest', 'manifest_cfgs', 'weights_location']

MANIFEST_PATH = Path(__file__).resolve().parent.parent / 'weights_manifest.yaml'

_REQUIRED_FIELDS = ('family', 'params_m', 'top1', 'license', 'paper', 'origin_url', 'source', 'preprocessing')
_PREPROCESSING_FIELDS = ('input_size', 'interpolation', 'crop_pct', 'mean', 'std')


@functools.lru_cache(maxsize=None)
def load_manifest(path: Path = MANIFEST_PATH) -> Dict[str, Dict[str, Any]]:
    """Every manifest entry, keyed by its ``model.tag`` name, in file order."""
    with open(path, encoding='utf-8') as f:
        manifest = yaml.safe_load(f)
    for tag, entry in manifest.items():
        missing = [k for k in _REQUIRED_FIELDS if k not in entry]
        missing += [f'preprocessing.{k}' for k in _PREPROCESSING_FIELDS if k not in entry.get('preprocessing', {})]
        source = entry.get('source', {})
        if not ({'hf_hub_id', 'hf_hub_filename'} <= set(source) or 'url' in source) or 'layout' not in source:
            missing.append('source.hf_hub_id + source.hf_hub_filename, or source.url, and source.layout')
        if missing:
            raise ValueError(f'{path}: entry {tag!r} lacks {", ".join(missing)}')
    return manifest


def _cfg_args(entry: Dict[str, Any]) -> Dict[str, Any]:
    pre = entry['preprocessing']
    args = dict(
        input_size=tuple(pre['input_size']), interpolation=pre['interpolation'], crop_pct=pre['crop_pct'],
        mean=tuple(pre['mean']), std=tuple(pre['std']),
        license=entry['license'], paper_name=entry['paper']['name'], paper_ids=entry['paper']['id'],
        origin_url=entry['origin_url'],
    )
    source = entry['source']
    notes = (entry['note'],) if entry.get('note') else ()
    if 'hf_hub_id' in source:
        args.update(hf_hub_id=source['hf_hub_id'], hf_hub_filename=source['hf_hub_filename'])
    else:
        notes += (f'weights: {source["url"]}',)
    return dict(args, notes=notes) if notes else args


def manifest_cfgs(family: str, cfg: Callable[..., Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Pretrained cfgs of one family, ``{'model.tag': cfg(**manifest fields)}``, ready for generate_default_cfgs."""
    return {tag: cfg(**_cfg_args(entry)) for tag, entry in load_manifest().items() if entry['family'] == family}


def weights_location(entry: Dict[str, Any]) -> str:
    """Where a manifest entry's weights are downloaded from: ``hf-hub:ORG/NAME/FILE`` or the original URL."""
    source = entry['source']
    if 'hf_hub_id' in source:
        return f"hf-hub:{source['hf_hub_id']}/{source['hf_hub_filename']} ({source['layout']} layout)"
    return f"manual download, {source['url'].split('?')[0]} ({source['layout']} layout)"
