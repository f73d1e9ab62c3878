"""``weights_manifest.yaml`` -> timm pretrained cfgs.

The manifest is the single source of truth for every pretrained tag: where the weights are published (the project's
Hub mirror and the authors' own location), in which source layout, under which license, with which preprocessing and
reported accuracy. Model files build their ``default_cfgs`` from it with :func:`manifest_cfgs`.

``ZOO_WEIGHTS_MANIFEST=PATH`` replaces the packaged manifest (read once, at ``import zoo``): for an organisation's own
mirror, or for a maintainer trying a mirror before the manifest that marks it published is released.
"""
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import yaml

from zoo._files import atomic_write
from zoo.errors import ManifestError

__all__ = [
    'MANIFEST_PATH', 'WeightsSource', 'hub_org', 'load_manifest', 'manifest_cfgs', 'mirror_repo', 'origin_source',
    'update_manifest', 'weights_cfg_fields', 'weights_location', 'weights_sources',
]

MANIFEST_PATH = Path(os.environ.get('ZOO_WEIGHTS_MANIFEST') or
                     Path(__file__).resolve().parent.parent / 'weights_manifest.yaml')

_REQUIRED_FIELDS = ('family', 'params_m', 'top1', 'license', 'paper', 'origin_url', 'source', 'preprocessing')
_PREPROCESSING_FIELDS = ('input_size', 'interpolation', 'crop_pct', 'mean', 'std')


@functools.lru_cache(maxsize=None)
def _read(path: Path) -> Dict[str, Any]:
    with open(path, encoding='utf-8') as f:
        manifest = yaml.safe_load(f)
    if not isinstance(manifest, dict) or not isinstance(manifest.get('hub_org'), str) \
            or not isinstance(manifest.get('tags'), dict):
        raise ManifestError(f'{path}: a weights manifest has a hub_org name and a tags mapping')
    for tag, entry in manifest['tags'].items():
        missing = [k for k in _REQUIRED_FIELDS if k not in entry]
        missing += [f'preprocessing.{k}' for k in _PREPROCESSING_FIELDS if k not in entry.get('preprocessing', {})]
        source = entry.get('source', {})
        if not ({'hf_hub_id', 'hf_hub_filename'} <= set(source) or 'url' in source) or 'layout' not in source:
            missing.append('source.hf_hub_id + source.hf_hub_filename, or source.url, and source.layout')
        if 'mirror' in entry and not isinstance(entry['mirror'].get('published'), bool):
            missing.append('mirror.published (true or false)')
        if missing:
            raise ManifestError(f'{path}: entry {tag!r} lacks {", ".join(missing)}')
    return manifest


def load_manifest(path: Path = MANIFEST_PATH) -> Dict[str, Dict[str, Any]]:
    """Every manifest entry, keyed by its ``model.tag`` name, in file order."""
    return _read(path)['tags']


def hub_org(path: Path = MANIFEST_PATH) -> str:
    """The project's Hugging Face organisation, home of the mirror repos."""
    return _read(path)['hub_org']


def mirror_repo(tag: str, path: Path = MANIFEST_PATH) -> Optional[str]:
    """The mirror repo of a manifest tag, ``HUB_ORG/MODEL.TAG`` (timm's naming), or None for a tag not mirrored."""
    return f'{hub_org(path)}/{tag}' if 'mirror' in load_manifest(path)[tag] else None


@dataclass(frozen=True)
class WeightsSource:
    """One place a tag's weights can be downloaded from.

    Attributes:
        kind: 'mirror' (the project's Hub mirror), 'hub' (the authors' Hub repo) or 'download' (the authors' original
            download, e.g. a Google Drive file or folder).
        location: The Hub repo id, or the download URL.
        filename: The file in the Hub repo (None for a download).
        layout: The converter's source layout of the file ('zoo' for a mirror: already converted).
        sha256: Hex sha256 of the file where known.
    """
    kind: str
    location: str
    filename: Optional[str]
    layout: str
    sha256: Optional[str]

    def describe(self) -> str:
        if self.kind == 'download':
            return f'{self.location.split("?")[0]} ({self.layout} layout)'
        return f'hf-hub:{self.location}/{self.filename}' + ('' if self.kind == 'mirror' else f' ({self.layout} layout)')


def origin_source(tag: str, path: Path = MANIFEST_PATH) -> WeightsSource:
    """The authors' own file of a tag's weights: their Hub repo where they have one, else their download."""
    origin = load_manifest(path)[tag]['source']
    if 'hf_hub_id' in origin:
        return WeightsSource('hub', origin['hf_hub_id'], origin['hf_hub_filename'], origin['layout'],
                             origin.get('sha256'))
    return WeightsSource('download', origin['url'], None, origin['layout'], origin.get('sha256'))


def weights_sources(tag: str, path: Path = MANIFEST_PATH) -> Tuple[WeightsSource, ...]:
    """Where ``pretrained=True`` may take a tag's weights from, in the order it tries them: the published mirror, then
    the authors' file (their Hub repo, else their download)."""
    mirror = load_manifest(path)[tag].get('mirror')
    published = (WeightsSource('mirror', mirror_repo(tag, path), 'model.safetensors', 'zoo', mirror.get('sha256')),) \
        if mirror and mirror['published'] else ()
    return published + (origin_source(tag, path),)


def _cfg_args(tag: str, entry: Dict[str, Any]) -> Dict[str, Any]:
    pre = entry['preprocessing']
    args = dict(
        input_size=tuple(pre['input_size']), interpolation=pre['interpolation'], crop_pct=pre['crop_pct'],
        mean=tuple(pre['mean']), std=tuple(pre['std']),
        license=entry['license'], paper_name=entry['paper']['name'], paper_ids=entry['paper']['id'],
        origin_url=entry['origin_url'],
    )
    args.update(weights_cfg_fields(tag))
    return dict(args, notes=(entry['note'],)) if entry.get('note') else args


def weights_cfg_fields(tag: str) -> Dict[str, str]:
    """The pretrained cfg fields that locate a tag's weights: its first source's (``hf_hub_id`` and
    ``hf_hub_filename``, or ``url``), so timm counts the tag as pretrained."""
    first = weights_sources(tag)[0]
    if first.kind == 'download':
        return dict(url=first.location)
    return dict(hf_hub_id=first.location, hf_hub_filename=first.filename)


def manifest_cfgs(family: str, cfg: Callable[..., Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Pretrained cfgs of one family, ``{'model.tag': cfg(**manifest fields)}``, ready for generate_default_cfgs."""
    return {tag: cfg(**_cfg_args(tag, entry)) for tag, entry in load_manifest().items() if entry['family'] == family}


def weights_location(tag: str) -> str:
    """Where ``pretrained=True`` takes a tag's weights from first, e.g. ``hf-hub:ORG/NAME/FILE (transformers
    layout)``, with the later sources after 'else'."""
    return ', else '.join(source.describe() for source in weights_sources(tag))


def _entry_lines(lines: Sequence[str], tag: str) -> Tuple[int, int]:
    """The first and past-the-last line of ``tag``'s entry."""
    start = next((i for i, line in enumerate(lines) if line.split('#')[0].rstrip() == f'  {tag}:'), None)
    if start is None:
        raise KeyError(tag)
    return start, next((i for i in range(start + 1, len(lines)) if re.match(r'  \S', lines[i])), len(lines))


def update_manifest(path: Path, tag: str, field: str, **values: Any) -> None:
    """Set ``values`` in the one-line mapping ``field`` of ``tag``'s entry (``zoo mirror`` records sha256s, sizes and
    what is published), keeping the file's comments and layout; the result is read back and checked before it
    replaces the file."""
    path = Path(path).resolve()  # the package's manifest is a link to the repository's: write the file itself
    lines = path.read_text(encoding='utf-8').split('\n')
    try:
        start, end = _entry_lines(lines, tag)
    except KeyError:
        raise ManifestError(f'{path}: no entry {tag!r}') from None
    row = next((i for i in range(start, end) if lines[i].startswith(f'    {field}: {{')), None)
    if row is None:
        raise ManifestError(f'{path}: entry {tag!r} has no one-line {field} mapping')
    for key, value in values.items():
        text = json.dumps(value)  # null, true / false, numbers and quoted strings read back as themselves in YAML
        lines[row], count = re.subn(rf'\b{key}: [^,}}]+', f'{key}: {text}', lines[row])
        if count != 1:
            raise ManifestError(f'{path}: entry {tag!r}: {field} has no {key}')
    text = '\n'.join(lines)
    written = yaml.safe_load(text)['tags'][tag][field]
    if any(written.get(key) != value for key, value in values.items()):
        raise ManifestError(f'{path}: {tag}.{field} would not read back as {values}')
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding='utf-8'))
    _read.cache_clear()
