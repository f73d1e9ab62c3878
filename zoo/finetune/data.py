"""Image folders for fine-tuning: discovery, checking, the train / validation split, and timm's transforms.

A data folder is an ImageFolder: either ``train/`` and ``val/`` (or ``validation/``), each with one sub-folder per
class, or the class folders themselves, from which a seeded, per-class fraction is held out for validation. Every
file is opened and decoded once up front (in threads): files that are not readable images are skipped with one warning
that counts them and names a few, so a stray ``.DS_Store`` or a truncated download never stops a run.
"""
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import Dataset

from zoo.errors import ZooError

__all__ = ['DataError', 'FolderSplit', 'ImageFiles', 'read_image_folder', 'transforms_for']

_logger = logging.getLogger(__name__)
_VAL_NAMES = ('val', 'validation')

Sample = Tuple[Path, int]


class DataError(ZooError, ValueError):
    """A data folder that cannot be used for training or evaluation."""


@dataclass
class FolderSplit:
    """The images of a data folder: class names (sorted folder names) and (path, class index) samples."""
    classes: List[str]
    train: List[Sample]
    val: List[Sample]
    skipped: int  # files that are not readable images


class ImageFiles(Dataset):
    """(image tensor, class index) of each sample, the image read as RGB and transformed."""

    def __init__(self, samples: Sequence[Sample], transform: Callable) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert('RGB')), target


def _is_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()  # decodes: a truncated file fails here, not in a DataLoader worker mid-epoch
        return True
    except Exception:  # PIL signals every kind of unreadable file with its own exceptions
        return False


def _class_folders(root: Path) -> List[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
    if not folders:
        raise DataError(f'{root} has no class folders: put the images of each class in a folder of its own '
                        f'(ROOT/CLASS/IMAGE, or ROOT/train/CLASS/IMAGE and ROOT/val/CLASS/IMAGE)')
    return folders


def _files(folders: Sequence[Path]) -> Dict[str, List[Path]]:
    return {folder.name: sorted(p for p in folder.rglob('*') if p.is_file() and not p.name.startswith('.'))
            for folder in folders}


def _check_images(files: Dict[str, List[Path]], workers: int) -> Tuple[Dict[str, List[Path]], List[Path]]:
    """Keep the readable images of each class; the unreadable files are returned apart."""
    every = [p for paths in files.values() for p in paths]
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL releases the GIL while it decodes
        readable = dict(zip(every, pool.map(_is_image, every)))
    kept = {name: [p for p in paths if readable[p]] for name, paths in files.items()}
    return kept, [p for p in every if not readable[p]]


def _labelled(files: Dict[str, List[Path]], classes: List[str]) -> List[Sample]:
    """(path, class index) of every file, class by class."""
    return [(p, index) for index, name in enumerate(classes) for p in files.get(name, ())]


def _held_out(files: Dict[str, List[Path]], classes: List[str], fraction: float,
              seed: int) -> Tuple[List[Sample], List[Sample]]:
    """A per-class split: ``fraction`` of each class (at least one image where it has two) for validation."""
    train, val = [], []
    rng = random.Random(seed)
    for index, name in enumerate(classes):
        paths = list(files[name])
        rng.shuffle(paths)
        count = max(1, round(len(paths) * fraction)) if len(paths) > 1 else 0
        val += [(p, index) for p in paths[:count]]
        train += [(p, index) for p in paths[count:]]
    return train, val


def read_image_folder(root: Path, val_fraction: Optional[float] = 0.2, seed: int = 0, workers: int = 4) -> FolderSplit:
    """The classes and samples of the ImageFolder at ``root`` (see the module docstring). Without a ``val/`` folder,
    ``val_fraction`` of each class is held out for validation, or with ``val_fraction=None`` nothing (every image is
    in ``train``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f'{root}: no such data folder')
    val_root = next((root / name for name in _VAL_NAMES if (root / name).is_dir()), None)
    train_root = root / 'train' if (root / 'train').is_dir() else root
    if val_root is not None and train_root == root:
        raise DataError(f'{root} has {val_root.name}/ but no train/: put the training images in {root / "train"}')
    train_folders = _class_folders(train_root)
    classes = [f.name for f in train_folders]
    files, skipped = _check_images(_files(train_folders), workers)
    if val_root is not None:
        val_folders = _class_folders(val_root)
        stray = sorted({f.name for f in val_folders} - set(classes))
        if stray:
            raise DataError(f'{val_root} has classes that {train_root} lacks: {", ".join(stray)}')
        val_files, val_skipped = _check_images(_files(val_folders), workers)
        skipped += val_skipped
        train, val = _labelled(files, classes), _labelled(val_files, classes)
    elif val_fraction is None:
        train, val = _labelled(files, classes), []
    else:
        train, val = _held_out(files, classes, val_fraction, seed)
    empty = [name for name in classes if not files[name]]
    if empty:
        raise DataError(f'{train_root}: class folder{"s" if len(empty) > 1 else ""} {", ".join(empty)} ha'
                        f'{"ve" if len(empty) > 1 else "s"} no readable images')
    if skipped:
        names = ', '.join(str(p) for p in skipped[:3]) + (', ...' if len(skipped) > 3 else '')
        _logger.warning(f'skipped {len(skipped)} file{"s" if len(skipped) > 1 else ""} that are not readable '
                        f'images: {names}')
    if val_fraction is not None and not val:
        raise DataError(f'{root}: no images left for validation: add a val/ folder or more images per class')
    return FolderSplit(classes, train, val, len(skipped))


def transforms_for(data_config: Dict[str, object], hflip: float, scale: Tuple[float, float],
                   randaugment: Optional[str]) -> Tuple[Callable, Callable]:
    """timm's training and evaluation transforms for ``data_config`` (``resolve_data_config``'s output)."""
    train = create_transform(**data_config, is_training=True, hflip=hflip, scale=scale, auto_augment=randaugment)
    val = create_transform(**data_config)
    return train, val
