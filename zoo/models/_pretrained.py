"""Where ``pretrained=True`` takes a manifest tag's weights from, in order: the project's Hub mirror where it is
published, else the authors' Hub repo, else the authors' original download (Google Drive, through gdown).

Hub files go through huggingface_hub, with its cache and its offline mode (``HF_HUB_OFFLINE=1``); downloads go into
the same cache folder, under ``zoo-downloads/TAG/``. A file whose sha256 is known is checked before it is used, and
one that fails is removed from the cache. A cached file is used without asking the network (a tag's weights never
change). Before anything is downloaded the source's host is reached once, in seconds, so that a machine without a
network gets its answer at once rather than after huggingface_hub's retries. Processes that ask for the same tag at
once (torchrun) take turns: the first downloads, the others find the file in the cache.
"""
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union
from urllib.parse import urlsplit

from filelock import FileLock
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

from zoo._files import file_sha256
from zoo.convert import CheckpointError
from zoo.errors import WeightsUnavailableError
from ._manifest import MANIFEST_PATH, WeightsSource, weights_sources

__all__ = ['pick_checkpoint', 'pretrained_weights_file']

PathLike = Union[str, Path]
_CHECKPOINT_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.tar', '.bin', '.safetensors')
_CONNECT_TIMEOUT_S = 3.0
_RATE_LIMITED = ('too many users', 'many accesses')  # Google Drive's words, as gdown passes them on


class _SourceFailed(Exception):
    """One source could not give the weights (the reason is the message)."""


def _manual_route(tag: str) -> str:
    model = tag.split('.')[0]
    return (f'create the model without weights (pretrained=False, or `zoo finetune --no-pretrained`), or download the '
            f'file yourself and load it with `--checkpoint FILE` or timm.create_model({model!r}, pretrained=True, '
            f'pretrained_cfg_overlay=dict(file=PATH))')


def _hub_cache(cache_dir: Optional[PathLike]) -> Path:
    return Path(cache_dir or constants.HF_HUB_CACHE)


def _download_folder(tag: str, cache_dir: Optional[PathLike]) -> Path:
    return _hub_cache(cache_dir) / 'zoo-downloads' / tag


def _cached(source: WeightsSource, tag: str, cache_dir: Optional[PathLike]) -> Optional[Path]:
    """The source's file where it is in the cache already (no network)."""
    if source.kind == 'download':
        files = [p for p in _download_folder(tag, cache_dir).glob('*') if p.is_file() and not p.name.startswith('.')]
        return files[0] if files else None
    path = try_to_load_from_cache(source.location, source.filename, cache_dir=cache_dir)
    return Path(path) if isinstance(path, str) else None


def _check_reachable(url: str) -> None:
    """Raise :class:`_SourceFailed` unless a TCP connection to ``url``'s host opens within a few seconds."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == 'https' else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise _SourceFailed(f'no network: cannot reach {parts.hostname} ({e.strerror or e})') from e


def _check_sha256(path: Path, expected: Optional[str], remove: Callable[[], None]) -> None:
    if expected is None:
        return
    found = file_sha256(path)
    if found != expected:
        remove()
        raise _SourceFailed(f'sha256 mismatch: the file has {found}, the manifest {expected}; the file was not kept')


def _fetch_from_hub(source: WeightsSource, cache_dir: Optional[PathLike]) -> Path:
    _check_reachable(constants.ENDPOINT)
    try:
        path = Path(hf_hub_download(source.location, source.filename, cache_dir=cache_dir))
    except Exception as e:  # huggingface_hub reports missing repos, files and network faults with many types
        raise _SourceFailed(f'{type(e).__name__}: {" ".join(str(e).split())[:200]}') from e

    def remove() -> None:
        blob = path.resolve()
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
    _check_sha256(path, source.sha256, remove)
    return path


def pick_checkpoint(folder: Path, fits: Optional[Callable[[Path], bool]] = None) -> Path:
    """The checkpoint file in a downloaded folder (an EfficientMod Google Drive folder holds the training run's files):
    the only one, else the first that ``fits`` the model, trying files named ``*best*`` first."""
    files = sorted((p for p in folder.rglob('*') if p.is_file() and p.name.endswith(_CHECKPOINT_SUFFIXES)),
                   key=lambda p: ('best' not in p.name, p.name))
    if len(files) == 1 and fits is None:
        return files[0]
    for path in files:
        if fits(path) if fits is not None else 'best' in path.name:
            return path
    names = ', '.join(p.name for p in files) or 'none'
    raise CheckpointError(f'{folder}: no checkpoint of this model in the folder (checkpoint files: {names})')


def _gdown(url: str, into: Path) -> Path:
    """Download a file or a folder with gdown into the folder ``into``; the file, or the folder's checkpoint."""
    import gdown  # only for downloads: it imports an HTML parser
    import requests
    try:
        if '/folders/' in url:
            gdown.download_folder(url, output=str(into), quiet=True)
            return pick_checkpoint(into)
        return Path(gdown.download(url, output=f'{into}/', quiet=True))
    except requests.exceptions.RequestException as e:
        raise _SourceFailed(f'download failed: {" ".join(str(e).split())[:200]}') from e
    except CheckpointError as e:
        raise _SourceFailed(str(e)) from e
    except gdown.exceptions.FileURLRetrievalError as e:
        reason = ' '.join(str(e).split())
        if any(words in reason.lower() for words in _RATE_LIMITED):
            raise _SourceFailed('Google Drive refuses scripted downloads of this file for now (its rate limit: '
                                '"too many users have viewed or downloaded this file recently"); try again in a few '
                                'hours, or download it in a browser') from e
        raise _SourceFailed(f'download failed: {reason[:200]}') from e


def _fetch_download(source: WeightsSource, tag: str, cache_dir: Optional[PathLike]) -> Path:
    _check_reachable(source.location)
    folder = _download_folder(tag, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix='.download.', dir=folder))
    try:
        path = _gdown(source.location, work)
        _check_sha256(path, source.sha256, lambda: None)
        return path.replace(folder / path.name)  # into the cache only once complete and checked
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fetch(source: WeightsSource, tag: str, cache_dir: Optional[PathLike]) -> Path:
    if source.kind == 'download':
        return _fetch_download(source, tag, cache_dir)
    return _fetch_from_hub(source, cache_dir)


def _lock(tag: str, cache_dir: Optional[PathLike]):
    locks = _hub_cache(cache_dir) / 'zoo-downloads' / '.locks'
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f'{tag}.lock'))


def _failure(tag: str, failures: Sequence[str]) -> WeightsUnavailableError:
    return WeightsUnavailableError(f'{tag}: no pretrained weights could be had ({"; ".join(failures)}): '
                                  f'{_manual_route(tag)}')


def pretrained_weights_file(tag: str, cache_dir: Optional[PathLike] = None, manifest: Path = MANIFEST_PATH) -> Path:
    """The local file of a manifest tag's weights, from the cache or downloaded from its first source that gives it.

    Args:
        tag: ``MODEL.TAG`` of the manifest.
        cache_dir: The Hugging Face cache folder (default: huggingface_hub's, ``HF_HUB_CACHE``).
        manifest: The weights manifest that names the tag's sources.
    Raises:
        WeightsUnavailableError: No source gave the file: offline without a cached copy, no network, Google Drive's
            rate limit, a sha256 mismatch, ... The message names each source's cause and the manual route.
    """
    sources = weights_sources(tag, manifest)
    for source in sources:
        path = _cached(source, tag, cache_dir)
        if path is not None:
            return path
    if constants.HF_HUB_OFFLINE:
        where = ', '.join(source.describe() for source in sources)
        raise _failure(tag, [f'offline (HF_HUB_OFFLINE) and not in the cache {_hub_cache(cache_dir)}: {where}'])
    failures: List[str] = []
    try:
        lock = _lock(tag, cache_dir)
    except OSError as e:
        raise _failure(tag, [f'cannot write the cache folder {_hub_cache(cache_dir)} ({e.strerror or e})']) from e
    with lock:  # one process downloads, the others wait and find the file cached
        for source in sources:
            path = _cached(source, tag, cache_dir)
            if path is not None:
                return path
            try:
                return _fetch(source, tag, cache_dir)
            except _SourceFailed as e:
                failures.append(f'{source.describe()}: {e}')
    raise _failure(tag, failures)
