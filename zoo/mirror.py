"""``zoo mirror``, the maintainers' command: every official tag's weights as a Hub folder of the project's mirror.

Per tag: the authors' file (from a folder of originals, or downloaded: huggingface_hub for the authors' Hub repos,
gdown for Google Drive files and folders), checked against the sha256 and size the manifest records (recorded there
where not yet known), converted, checked against the original-layout load on a fixed probe input after a reload of
the written folder, and published to ``HUB_ORG/MODEL.TAG`` unless the manifest records that exact content as
published already. Publishing marks the tag published in the manifest. A dry run does all of it but the upload (and
the mark), with no network once the originals are on disk.

Originals live one folder per tag, ``DIR/MODEL.TAG/``, holding the file as published (for EfficientMod: the Google
Drive folder's files, of which the checkpoint of the right model is taken).
"""
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import timm
import torch
from huggingface_hub import hf_hub_download

from zoo._files import file_sha256
from zoo.convert import CheckpointError
from zoo.errors import ZooError
from zoo.hub import HubFolderError, export_hub_folder, publish_hub_folder
from zoo.models import MANIFEST_PATH, create_model_from_checkpoint, load_manifest, mirror_repo, origin_source, \
    pick_checkpoint, update_manifest

__all__ = ['MirrorError', 'MirroredTag', 'mirror_tag', 'mirror_tags', 'mirrored_tags']

PathLike = Union[str, Path]
_PROBE_SEED = 0


class MirrorError(ZooError, ValueError):
    """A tag that cannot be mirrored: its original is missing, differs from the manifest, or does not convert."""


@dataclass(frozen=True)
class MirroredTag:
    """What ``zoo mirror`` did with one tag.

    Attributes:
        tag: ``MODEL.TAG``.
        original: The authors' file that was converted.
        sha256: Hex sha256 of the original.
        size: Bytes of the original.
        recorded: Whether sha256 and size were new to the manifest (and are recorded now).
        folder: The Hub folder written.
        repo_id: The mirror repo.
        status: 'published', 'unchanged' (published before with the same content) or 'dry run'.
    """
    tag: str
    original: Path
    sha256: str
    size: int
    recorded: bool
    folder: Path
    repo_id: str
    status: str


def mirrored_tags(manifest: Path = MANIFEST_PATH) -> Sequence[str]:
    """The manifest tags that have a mirror (every official tag)."""
    return [tag for tag, entry in load_manifest(manifest).items() if 'mirror' in entry]


def _download_original(tag: str, folder: Path, manifest: Path) -> None:
    """The authors' file(s) of ``tag`` into ``folder``."""
    source = origin_source(tag, manifest)
    folder.mkdir(parents=True, exist_ok=True)
    if source.kind == 'hub':
        hf_hub_download(source.location, source.filename, local_dir=folder)
        return
    import gdown  # only for downloads: it imports an HTML parser
    if '/folders/' in source.location:
        gdown.download_folder(source.location, output=str(folder), quiet=True)
    else:
        gdown.download(source.location, output=f'{folder}/', quiet=True)


def _converts_onto(tag: str) -> Callable[[Path], bool]:
    """Whether a checkpoint file converts onto ``tag``'s model (keys and shapes; nothing is loaded)."""
    model_name = tag.split('.')[0]

    def fits(path: Path) -> bool:
        try:
            with warnings.catch_warnings():  # loading into the meta device copies nothing: the key and shape check
                warnings.simplefilter('ignore', UserWarning)  # of the conversion is what is asked for
                create_model_from_checkpoint(model_name, path, device='meta')
        except CheckpointError:
            return False
        return True
    return fits


def _original(tag: str, originals: Path, manifest: Path) -> Path:
    """The authors' checkpoint of ``tag`` in ``originals/TAG/``: their Hub file, or the checkpoint file there that
    converts onto the model."""
    folder = originals / tag
    if not folder.is_dir():
        raise MirrorError(f'{folder}: no such folder: put the authors\' file(s) of {tag} there '
                          f'({origin_source(tag, manifest).describe()})')
    source = origin_source(tag, manifest)
    if source.kind == 'hub' and (folder / source.filename).is_file():
        return folder / source.filename
    try:
        return pick_checkpoint(folder, fits=_converts_onto(tag))
    except CheckpointError as e:
        raise MirrorError(f'{tag}: {e}') from e


def _check_reload(model: torch.nn.Module, folder: Path) -> None:
    """The folder, loaded as users load it, gives the converted model's logits on a fixed probe input, exactly."""
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    probe = torch.randn(2, *model.pretrained_cfg['input_size'], generator=torch.Generator().manual_seed(_PROBE_SEED))
    with torch.no_grad():
        expected, found = model(probe), reloaded(probe)
    if not torch.equal(expected, found):
        raise MirrorError(f'{folder}: the reloaded folder differs from the converted original on the probe input '
                          f'(max abs {(expected - found).abs().max().item():.3g})')


def mirror_tag(tag: str, originals: Path, out_dir: Path, dry_run: bool = False,
               manifest: Path = MANIFEST_PATH) -> MirroredTag:
    """Mirror one tag; see the module docstring."""
    entry = load_manifest(manifest)[tag]
    original = _original(tag, originals, manifest)
    sha256, size = file_sha256(original), original.stat().st_size
    known = entry['source'].get('sha256'), entry['source'].get('size')
    if known[0] is not None and (sha256, size) != known:
        raise MirrorError(f'{original}: sha256 {sha256} and {size} bytes, but the manifest records {known[0]} and '
                          f'{known[1]} bytes for {tag}: not the authors\' file')
    recorded = known[0] is None
    if recorded:
        update_manifest(manifest, tag, 'source', sha256=sha256, size=size)
    model = create_model_from_checkpoint(tag, original).eval()
    repo_id = mirror_repo(tag, manifest)
    folder = out_dir / tag
    export_hub_folder(model, folder, source=original, repo_hint=repo_id, force=True)
    _check_reload(model, folder)
    mirror = entry['mirror']
    content = file_sha256(folder / 'model.safetensors')
    if mirror['published'] and mirror.get('sha256') == content:
        status = 'unchanged'
    elif dry_run:
        status = 'dry run'
    else:
        publish_hub_folder(folder, repo_id)
        update_manifest(manifest, tag, 'mirror', published=True, sha256=content)
        status = 'published'
    return MirroredTag(tag, original, sha256, size, recorded, folder, repo_id, status)


def mirror_tags(tags: Optional[Sequence[str]], out_dir: PathLike, originals: Optional[PathLike] = None,
                download_to: Optional[PathLike] = None, dry_run: bool = False,
                manifest: Optional[PathLike] = None) -> Iterator[MirroredTag]:
    """Mirror ``tags`` (default: every mirrored tag), one after the other.

    Args:
        tags: ``MODEL.TAG`` names of the manifest.
        out_dir: Where the Hub folders are written, one per tag (``OUT/MODEL.TAG``).
        originals: A folder of the authors' files, ``ORIGINALS/MODEL.TAG/...``; or
        download_to: A folder to download them into first (huggingface_hub, gdown), in the same layout.
        dry_run: Everything but the upload.
        manifest: The weights manifest to check against and record in (default: the package's).
    """
    manifest = Path(manifest or MANIFEST_PATH)
    known = mirrored_tags(manifest)
    tags = list(tags or known)
    unknown = [tag for tag in tags if tag not in known]
    if unknown:
        raise MirrorError(f'{", ".join(unknown)}: not a mirrored tag of {manifest} (those are {", ".join(known)})')
    if (originals is None) == (download_to is None):
        raise MirrorError('give either a folder of originals (--from DIR) or one to download them into '
                          '(--download-to DIR)')
    base = Path(originals if originals is not None else download_to)
    for tag in tags:
        if download_to is not None:
            try:
                _download_original(tag, base / tag, manifest)
            except Exception as e:  # huggingface_hub and gdown report network faults and refusals with many types
                raise MirrorError(f'{tag}: cannot download {origin_source(tag, manifest).describe()} '
                                  f'({type(e).__name__}: {" ".join(str(e).split())[:300]})') from e
        try:
            yield mirror_tag(tag, base, Path(out_dir), dry_run=dry_run, manifest=manifest)
        except (CheckpointError, HubFolderError) as e:
            raise MirrorError(f'{tag}: {e}') from e
