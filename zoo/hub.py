"""Hub-ready folders in timm's format: export, validation and upload.

A folder written by :func:`export_hub_folder` holds ``config.json`` (timm's: architecture, num_classes, the
pretrained cfg with the real preprocessing, plus a ``zoo`` record of the source file and its sha256),
``model.safetensors`` (zoo's own keys) and a ``README.md`` model card. After ``import zoo`` it loads with
``timm.create_model('local-dir:DIR', pretrained=True)`` or, once published, ``'hf-hub:ORG/NAME'``.
"""
import copy
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import yaml
from safetensors import safe_open
from timm.models import save_for_hf
from torch import nn

import zoo
from zoo._files import current_umask, file_sha256
from zoo.convert import CheckpointMismatchError, check_state_dict
from zoo.errors import ZooError
from zoo.models import load_manifest, origin_source

__all__ = [
    'HubFolderError', 'check_output_folder', 'export_hub_folder', 'file_sha256', 'move_into_place',
    'publish_hub_folder', 'validate_hub_folder', 'verify_hub_folder',
]

PathLike = Union[str, Path]
_FOLDER_FILES = ('config.json', 'model.safetensors', 'README.md')
_REPO_PLACEHOLDER = 'ORG/NAME'


class HubFolderError(ZooError, ValueError):
    """A Hub folder that cannot be written, or that is not a valid zoo export."""


def _model_card(model: nn.Module, cfg: Dict[str, Any], repo_hint: str, source: Optional[Dict[str, Any]],
                finetuned: Optional[Dict[str, Any]], published: Optional[Dict[str, Any]],
                label_names: Optional[Sequence[str]]) -> str:
    """The README.md of a Hub folder; ``cfg`` is the pretrained cfg written to its config.json, ``published`` the
    manifest entry of the weights where they are the published ones (their reported accuracy applies)."""
    license_id = cfg.get('license') or 'unknown'
    if finetuned:
        title, made = f'{cfg["architecture"]} fine-tuned on {finetuned["data"]}', 'fine-tuned'
    elif published:
        title, made = f'{cfg["architecture"]}.{cfg["tag"]}', 'converted'
    else:
        title, made = f'{cfg["architecture"]} ({model.num_classes} classes)', 'converted'
    lines = [
        '---',
        'tags: [image-classification, timm, zoo]',
        'library_name: timm',
        f'license: {license_id if license_id != "unknown" else "other"}',
        '---',
        f'# {title}',
        '',
        f'{type(model).__name__} for image classification ({model.num_classes} classes), in timm\'s format, {made} '
        f'with zoo {zoo.__version__}, the package that registers this architecture with timm '
        f'(`pip install zoo-timm`).',
        '',
    ]
    if finetuned:
        lines += _finetuned_lines(finetuned)
    elif label_names:
        shown = ', '.join(list(label_names)[:20]) + (f', ... ({len(label_names)} in all)' if len(label_names) > 20
                                                     else '')
        lines.append(f'- Classes: {shown}')
    if cfg.get('paper_name'):
        lines.append(f'- Paper: {cfg["paper_name"]} ({cfg.get("paper_ids", "")})')
    if cfg.get('origin_url'):
        lines.append(f'- Original code: {cfg["origin_url"]}')
    lines.append(f'- License: {license_id}' + (' (the original repository names none: ask its authors before '
                                                'redistributing)' if license_id == 'unknown' else ''))
    if published:
        origin = origin_source(f'{cfg["architecture"]}.{cfg["tag"]}').describe()
        lines.append(f'- Reported ImageNet-1k top-1: {published["top1"]} (authors; the authors\' weights from '
                     f'{origin})' if published['top1'] is not None else f'- Weights from {origin}: {published["note"]}')
    if source:
        lines.append(f'- Converted from `{source["file"]}` (sha256 `{source["sha256"]}`, '
                     f'{"EMA" if source["ema"] else "plain"} weights)' +
                     ('' if published or finetuned else ': not the published weights of this architecture, so no '
                                                        'reported accuracy applies'))
    lines += [
        f'- Preprocessing: {cfg.get("interpolation")} resize, crop_pct {cfg.get("crop_pct")}, input '
        f'{tuple(cfg.get("input_size", ()))}, mean {tuple(cfg.get("mean", ()))}, std {tuple(cfg.get("std", ()))}',
        '',
        '## Usage',
        '',
        '```python',
        'import timm',
        'import zoo  # registers the architecture with timm',
        '',
        f'model = timm.create_model("hf-hub:{repo_hint}", pretrained=True).eval()',
        'config = timm.data.resolve_data_config(model=model)',
        'transform = timm.data.create_transform(**config)',
        '```',
        '',
        'With zoo installed (`import zoo` registers the architecture), `num_classes=` and `features_only=True` work '
        'as for any timm model.',
    ]
    if finetuned:
        lines += _recipe_lines(finetuned['recipe'])
    citation = _citation(cfg.get('paper_name'))
    if citation:
        lines += ['', '## Citation', '', '```bibtex', citation, '```']
    return '\n'.join(lines) + '\n'


def _citation(paper_name: Optional[str]) -> Optional[str]:
    """The BibTeX entry the manifest gives for a paper."""
    return next((entry['paper']['citation'] for entry in load_manifest().values()
                 if entry['paper']['name'] == paper_name and entry['paper'].get('citation')), None)



def _published_entry(model: nn.Module, source: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The manifest entry of ``model``'s weights where they are the published ones: its tag's entry, the tag's number
    of classes, and (where the manifest knows it) the published file's sha256."""
    cfg = model.pretrained_cfg
    tag = f'{cfg.get("architecture")}.{cfg.get("tag")}'
    entry = load_manifest().get(tag)
    if entry is None or model.num_classes != timm.models.get_pretrained_cfg(tag).num_classes:
        return None
    sha256 = entry['source'].get('sha256')
    return entry if source is None or sha256 is None or sha256 == source['sha256'] else None


def _finetuned_lines(finetuned: Dict[str, Any]) -> List[str]:
    """The fine-tuning part of a model card: data, classes, recipe and validation results."""
    classes = list(finetuned['classes'])
    shown = ', '.join(classes[:20]) + (f', ... ({len(classes)} in all)' if len(classes) > 20 else '')
    recipe = finetuned['recipe']
    return [
        f'- Data: {finetuned["data"]}; classes: {shown}',
        f'- Validation (epoch {finetuned["epoch"]} of {recipe["epochs"]}): top-1 {finetuned["val_top1"]:.2f}%, '
        f'top-5 {finetuned["val_top5"]:.2f}% on {finetuned["val_images"]} images',
        f'- Started from: {finetuned["start"]}',
        f'- Recipe: {recipe["opt"]}, lr {recipe["lr"]}, weight decay {recipe["weight_decay"]}, {recipe["sched"]} '
        f'schedule, batch {recipe["batch_size"]}, {recipe["epochs"]} epochs, image size {finetuned["img_size"]}, '
        f'label smoothing {recipe["label_smoothing"]} (all settings below)',
    ]


def _recipe_lines(recipe: Dict[str, Any]) -> List[str]:
    """The whole recipe of a fine-tuning run, as ``zoo finetune --config`` reads it."""
    return ['', '## Training recipe', '', '```yaml', yaml.safe_dump(recipe, sort_keys=False).rstrip(), '```']


def _is_zoo_export(folder: Path) -> bool:
    try:
        return 'zoo' in json.loads((folder / 'config.json').read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_output_folder(out_dir: PathLike, force: bool = False, source: Optional[PathLike] = None) -> None:
    """Raise ``HubFolderError`` unless ``out_dir`` may be written: absent or empty, or with ``force`` an earlier zoo
    export; never the working folder, one of its parents, or a folder holding ``source``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise HubFolderError(f'{out_dir} exists and is not a folder')
    resolved, cwd = out_dir.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise HubFolderError(f'{out_dir} is the working folder or holds it: choose a new folder for the export')
    if source is not None and resolved in Path(source).resolve().parents:
        raise HubFolderError(f'{out_dir} holds the checkpoint {source}: choose a new folder for the export')
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise HubFolderError(f'{out_dir} is not empty: choose another folder or pass --force to replace it')
        if not _is_zoo_export(out_dir):
            raise HubFolderError(f'{out_dir} is not a zoo export: --force only replaces folders written by '
                                 f'`zoo convert`')


def _prepare_output(out_dir: Path, force: bool, source: Optional[PathLike]) -> Path:
    """A fresh temporary folder beside ``out_dir`` (renamed into place once complete)."""
    check_output_folder(out_dir, force, source)
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=parent))
    except OSError as e:
        raise HubFolderError(f'cannot write {out_dir}: {e.strerror or e}') from e


def _apply_umask(folder: Path) -> None:
    """Give ``folder`` and its files the modes the user's umask asks for (mkdtemp and safetensors use 0o700/0o600)."""
    umask = current_umask()
    for path in (folder, *folder.iterdir()):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is kept aside until then and restored on failure."""
    if not (out_dir.is_dir() and any(out_dir.iterdir())):
        try:
            tmp.replace(out_dir)  # absent or empty: one rename
        except OSError as e:  # e.g. a read-only mount point: its name, not the temporary folder's
            raise HubFolderError(f'cannot write {out_dir}: {e.strerror or e}') from e
        return
    backup = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.old.', dir=out_dir.resolve().parent))
    backup.rmdir()
    out_dir.rename(backup)
    try:
        tmp.rename(out_dir)
    except BaseException:
        backup.rename(out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def verify_hub_folder(folder: PathLike) -> str:
    """Load ``folder`` as a user would (``local-dir:``) and check a forward pass; returns a one-line report."""
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(2, *model.pretrained_cfg['input_size'], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    if not torch.isfinite(out).all():
        raise HubFolderError('the converted model gives non-finite outputs: the checkpoint is damaged')
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return (f'verified: reloaded with local-dir:, {params:.3f} M parameters, output {tuple(out.shape)} finite, '
            f'logits mean {out.mean():.3f} std {out.std():.3f}')


def export_hub_folder(model: nn.Module, out_dir: PathLike, source: Optional[PathLike] = None, use_ema: bool = False,
                      repo_hint: str = _REPO_PLACEHOLDER, force: bool = False, verify: bool = False,
                      label_names: Optional[Sequence[str]] = None, data_config: Optional[Dict[str, Any]] = None,
                      finetuned: Optional[Dict[str, Any]] = None) -> str:
    """Write ``model`` as a Hub-ready timm folder (config.json, model.safetensors, README.md).

    Args:
        model: A zoo model (``timm.create_model`` or ``zoo.models.create_model_from_checkpoint``).
        out_dir: Folder to create; it must be absent or empty, or with ``force`` an earlier zoo export.
        source: The checkpoint file the weights came from; its name and sha256 are recorded.
        use_ema: Whether the EMA weights of ``source`` were taken (recorded).
        repo_hint: Repo id shown in the model card's usage example.
        force: Replace an earlier export in ``out_dir``.
        verify: Reload the folder and check a forward pass (:func:`verify_hub_folder`) before it is moved in.
        label_names: Name of each class (config.json's ``label_names``, which ``zoo predict`` prints).
        data_config: Preprocessing the weights were trained with (timm's data config: input_size, mean, std, ...),
            recorded in place of the model's pretrained cfg's.
        finetuned: What a fine-tuning run's model card states (data, classes, recipe, validation metrics).
    Returns:
        The verification report, or '' without ``verify``. The folder is written beside ``out_dir`` and renamed
        into place when complete and verified: on failure ``out_dir`` is as it was.
    """
    out_dir = Path(out_dir)
    if label_names is not None and len(label_names) != model.num_classes:
        raise HubFolderError(f'{len(label_names)} label names for a model with {model.num_classes} classes: give one '
                             f'name per class')
    tmp = _prepare_output(out_dir, force, source)
    try:
        record = {'file': Path(source).name, 'sha256': file_sha256(source), 'ema': use_ema} if source else None
        if not all(t.is_contiguous() for t in model.state_dict().values()):
            # a channels_last model: safetensors stores contiguous tensors only, and the caller's model stays as it is
            model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        published = None if finetuned else _published_entry(model, record)
        model_config: Dict[str, Any] = {'label_names': list(label_names)} if label_names else {}
        cfg = model.pretrained_cfg
        if not published and f'{cfg.get("architecture")}.{cfg.get("tag")}' in load_manifest():
            model_config['pretrained_cfg'] = {'tag': 'finetuned'}  # not the weights the tag names
        save_for_hf(model, str(tmp), model_config=model_config or None, data_config=data_config,
                    model_args=getattr(model, 'replaced_convs_args', None), safe_serialization=True)
        config = json.loads((tmp / 'config.json').read_text())
        config.get('model_args', {}).pop('pretrained_use_ema', None)  # which weights were read, not architecture
        config['zoo'] = {'version': zoo.__version__, **({'source': record} if record else {})}
        (tmp / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
        written_cfg = dict(config['pretrained_cfg'], architecture=config['architecture'])
        (tmp / 'README.md').write_text(_model_card(model, written_cfg, repo_hint, record, finetuned, published,
                                                   label_names))
        _apply_umask(tmp)
        report = verify_hub_folder(tmp) if verify else ''
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _read_hub_config(folder: Path) -> Tuple[str, int, Dict[str, Any]]:
    """config.json's architecture, num_classes and model_args."""
    path = folder / 'config.json'
    try:
        config = json.loads(path.read_text())
        architecture, num_classes = config['architecture'], config.get('num_classes', 1000)
        model_args = config.get('model_args') or {}
    except (ValueError, KeyError, TypeError) as e:
        raise HubFolderError(f'{path} is not a timm model config ({type(e).__name__}: {e})') from e
    if not isinstance(architecture, str) or not isinstance(num_classes, int) or not isinstance(model_args, dict):
        raise HubFolderError(f'{path}: architecture must be a name, num_classes a number and model_args a mapping')
    if not timm.is_model(architecture):
        raise HubFolderError(f'{path}: {architecture!r} is not a timm model (zoo\'s included): is the package that '
                             f'registers it installed and imported?')
    return architecture, num_classes, model_args


def _shapes_only_model(folder: Path) -> nn.Module:
    """The model config.json describes (its architecture with its model_args), built on the meta device."""
    architecture, num_classes, model_args = _read_hub_config(folder)
    try:
        return timm.create_model(architecture, device='meta', **dict(model_args, num_classes=num_classes))
    except Exception as e:  # any argument the architecture refuses, with the architecture's own error
        raise HubFolderError(f'{folder / "config.json"}: {architecture} cannot be built with its model_args '
                             f'{model_args} ({type(e).__name__}: {" ".join(str(e).split())})') from e


def validate_hub_folder(folder: PathLike) -> List[Tuple[str, int]]:
    """Check that ``folder`` is a loadable timm Hub folder; returns its files as (name, bytes).

    Builds config.json's architecture with its ``model_args`` on the meta device and checks the names and shapes of
    model.safetensors against it with the conversion layer's state-dict check, without reading the weights. Any
    timm architecture passes: zoo's, timm's own, a ``replaced_convs`` plug-and-play model, architecture overrides.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HubFolderError(f'{folder}: no such folder')
    missing = [name for name in _FOLDER_FILES if not (folder / name).is_file()]
    if missing:
        raise HubFolderError(f'{folder} lacks {", ".join(missing)}: write it with `zoo convert` or `zoo finetune`')
    model = _shapes_only_model(folder)
    try:
        with safe_open(str(folder / 'model.safetensors'), 'pt') as f:
            weights = {k: torch.empty(f.get_slice(k).get_shape(), device='meta') for k in f.keys()}
    except Exception as e:  # safetensors reports every kind of damage with its own error
        raise HubFolderError(f'{folder / "model.safetensors"} is damaged ({" ".join(str(e).split())})') from e
    try:
        check_state_dict(weights, model, 'safetensors', adapt=False)
    except CheckpointMismatchError as e:
        raise HubFolderError(f'{folder / "model.safetensors"} does not fit its config.json ({e})') from e
    return [(p.name, p.stat().st_size) for p in sorted(folder.iterdir()) if p.is_file()]


def publish_hub_folder(folder: PathLike, repo_id: str, private: bool = False,
                       dry_run: bool = False) -> Tuple[str, List[Tuple[str, int]]]:
    """Upload ``folder`` (validated first) to the Hub repo ``repo_id`` (created if needed).

    The model card's usage example gets the real repo id. With ``dry_run`` nothing is changed or uploaded.
    Returns the repo URL and the folder's files as (name, bytes).
    """
    from huggingface_hub import HfApi

    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise HubFolderError(f'repo id {repo_id!r} must look like ORG/NAME')
    files = validate_hub_folder(folder)
    url = f'https://huggingface.co/{repo_id}'
    if dry_run:
        return url, files
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)  # fails first without network or login
    except Exception as e:  # huggingface_hub reports no network, no login and no permission with many types
        reason = ' '.join(str(e).split()) or type(e).__name__
        raise HubFolderError(f'cannot create {repo_id} on the Hugging Face Hub ({reason}): check the network '
                             f'connection and log in with `hf auth login` (or set HF_TOKEN)') from e
    card = Path(folder) / 'README.md'
    card.write_text(re.sub(r'create_model\("hf-hub:[^"]*"', f'create_model("hf-hub:{repo_id}"', card.read_text()))
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message='Upload zoo export')
    return url, files
