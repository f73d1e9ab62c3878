"""Detection and segmentation data: COCO-format folders and mask folders, checked up front.

A data folder has ``train/`` and ``val/`` (or ``validation/``), each with

- for detection, ``annotations.json`` in COCO's format (boxes, and polygon or RLE segmentations for Mask R-CNN),
  its ``file_name`` paths relative to the split folder; read with torchvision's ``CocoDetection``;
- for segmentation, ``images/NAME.EXT`` and ``masks/NAME.png`` (the class index of each pixel, 255 ignored), with the
  class names one a line in ``classes.txt`` beside the splits (index 0 first), or numbered from the masks without it.

The embedded shapes data set (:mod:`zoo.finetune.shapes`) has both. Problems that would stop or skew a run are found
before it starts: a file that is not COCO JSON, annotations of unknown images or category ids and missing image files
are one-line errors; boxes that leave their image (clipped), boxes without area (dropped) and images without
annotations (kept, as background) are counted in one warning each.
"""
import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from .data import DataError

__all__ = ['CocoSplit', 'DenseData', 'MaskSplit', 'read_dense_folder', 'detection_collate']

_logger = logging.getLogger(__name__)
_VAL_NAMES = ('val', 'validation')
_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')
IGNORE_INDEX = 255


def _warn_count(total: int, what: str, examples: Sequence[Any], action: str) -> None:
    """One warning that counts the ``examples`` of ``what`` among ``total`` and names the first three."""
    if examples:
        shown = ', '.join(map(str, list(examples)[:3])) + (', ...' if len(examples) > 3 else '')
        _logger.warning(f'{len(examples)} of {total} {what} ({shown}): {action}')


@dataclass
class CocoSplit:
    """One split of a COCO-format folder: the folder, its annotation file and the category ids in label order
    (label i + 1 is ``category_ids[i]``; 0 is the background)."""
    folder: Path
    annotations: Path
    category_ids: List[int]
    images: int


def _read_coco_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except OSError as e:
        raise DataError(f'{path}: cannot read the COCO annotations ({e.strerror or e})') from e
    except ValueError as e:
        raise DataError(f'{path}: not a JSON file ({e})') from e
    missing = [key for key in ('images', 'annotations', 'categories') if not isinstance(data.get(key), list)]
    if missing:
        raise DataError(f'{path}: not COCO annotations (no {", ".join(missing)} list)')
    return data


def _check_coco(path: Path, folder: Path) -> Tuple[List[int], List[str], int]:
    """The category ids and names of a COCO file, and its number of images, after the checks of the module
    docstring."""
    data = _read_coco_json(path)
    images = {image['id']: image for image in data['images']}
    categories = sorted(data['categories'], key=lambda c: c['id'])
    category_ids = [c['id'] for c in categories]
    annotations = data['annotations']
    unknown_images = sorted({a['image_id'] for a in annotations} - set(images))
    if unknown_images:
        raise DataError(f'{path}: {len(unknown_images)} image ids in annotations are not among its images (e.g. '
                        f'{", ".join(map(str, unknown_images[:3]))}): fix the file')
    unknown = [a for a in annotations if a['category_id'] not in set(category_ids)]
    if unknown:
        ids = sorted({a['category_id'] for a in unknown})
        raise DataError(f'{path}: {len(unknown)} annotations have category ids that are not among its categories '
                        f'({", ".join(map(str, ids[:5]))}; categories: {", ".join(map(str, category_ids[:10]))}): '
                        f'add the categories or remove the annotations')
    missing = [image['file_name'] for image in images.values() if not (folder / image['file_name']).is_file()]
    if missing:
        raise DataError(f'{path}: {len(missing)} of {len(images)} image files are missing under {folder} (e.g. '
                        f'{", ".join(missing[:3])})')
    outside, empty = [], []
    for a in annotations:
        x, y, w, h = a['bbox']
        image = images[a['image_id']]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, image['width']), min(y + h, image['height'])
        if x1 - x0 <= 1 or y1 - y0 <= 1:
            empty.append(f'annotation {a["id"]}')
        elif (x0, y0, x1, y1) != (x, y, x + w, y + h):
            outside.append(f'annotation {a["id"]}')
    _warn_count(len(annotations), f'boxes in {path} leave their image', outside, 'clipped to it')
    _warn_count(len(annotations), f'boxes in {path} have no area inside their image', empty,
                'left out')
    annotated = {a['image_id'] for a in annotations}
    unannotated = [image['file_name'] for image in images.values() if image['id'] not in annotated]
    _warn_count(len(images), f'images in {path} have no annotations', unannotated, 'trained as background')
    return category_ids, [c['name'] for c in categories], len(images)


class CocoDetections(Dataset):
    """(image (3, H, W) float in [0, 1], target) of a :class:`CocoSplit`: torchvision's ``CocoDetection`` through its
    transforms-v2 wrapper, boxes clipped to the image and those without area dropped, labels 1..K."""

    def __init__(self, split: CocoSplit, train: bool, hflip: float = 0.5, masks: bool = False) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = CocoDetection(str(split.folder), str(split.annotations))
        keys = ('image_id', 'boxes', 'labels', 'masks') if masks else ('image_id', 'boxes', 'labels')
        self.dataset = wrap_dataset_for_transforms_v2(coco, target_keys=keys)
        self.coco = coco.coco
        self.image_ids = coco.ids
        self.masks = masks
        self.label_of = {category: i + 1 for i, category in enumerate(split.category_ids)}
        steps: List[Callable] = [v2.ToImage()]
        if train and hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        # integer COCO boxes become float, as the detectors' box coders need
        steps += [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.BoundingBoxes: torch.float32,
                              'others': None}, scale=True),
                  v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()]
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        image, target = self.dataset[index]
        if 'boxes' not in target:  # an image without annotations
            size = (image.height, image.width)
            target = dict(target, boxes=tv_tensors.BoundingBoxes(torch.zeros(0, 4), format='XYXY', canvas_size=size),
                          labels=torch.zeros(0, dtype=torch.int64))
            if self.masks:
                target['masks'] = tv_tensors.Mask(torch.zeros(0, *size, dtype=torch.uint8))
        target['labels'] = torch.tensor([self.label_of[int(c)] for c in target['labels']], dtype=torch.int64)
        image, target = self.transform(image, target)
        target['image_id'] = self.image_ids[index]
        return image, target


def detection_collate(batch: Sequence[Tuple[torch.Tensor, Dict[str, Any]]]) -> Tuple[List[torch.Tensor], List[Any]]:
    """Lists of images and targets, as torchvision's detectors take them."""
    images, targets = zip(*batch)
    return list(images), list(targets)


@dataclass
class MaskSplit:
    """One split of a mask folder: (image, mask) file pairs."""
    pairs: List[Tuple[Path, Path]]


def _read_mask_split(folder: Path) -> MaskSplit:
    images, masks = folder / 'images', folder / 'masks'
    if not images.is_dir() or not masks.is_dir():
        raise DataError(f'{folder}: a segmentation split has images/ and masks/ folders')
    pairs, unmatched = [], []
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
        mask = masks / f'{image.stem}.png'
        (pairs.append((image, mask)) if mask.is_file() else unmatched.append(image.name))
    _warn_count(len(unmatched) + len(pairs), f'images in {images} have no masks/NAME.png', unmatched, 'left out')
    if not pairs:
        raise DataError(f'{folder}: no image in images/ has a mask in masks/ (masks/NAME.png for images/NAME.EXT)')
    return MaskSplit(pairs)


def _mask_classes(root: Path, splits: Sequence[MaskSplit]) -> List[str]:
    """Class names from ``classes.txt``, else numbered up to the largest index in the masks; masks with indices
    beyond the names are refused."""
    largest, where = 0, None
    for split in splits:
        for _, mask in split.pairs:
            with Image.open(mask) as m:
                values = np.unique(np.asarray(m))
            values = values[values != IGNORE_INDEX]
            if len(values) and values.max() > largest:
                largest, where = int(values.max()), mask
    names_file = root / 'classes.txt'
    if not names_file.is_file():
        return [str(i) for i in range(largest + 1)]
    names = [line.strip() for line in names_file.read_text(encoding='utf-8').splitlines() if line.strip()]
    if largest >= len(names):
        raise DataError(f'{where} has class index {largest} but {names_file} names {len(names)} classes: add the '
                        f'names, or mark pixels to ignore with {IGNORE_INDEX}')
    return names


class MaskImages(Dataset):
    """(image (3, S, S) normalised, mask (S, S) int64) of a :class:`MaskSplit`, resized to ``size``."""

    def __init__(self, split: MaskSplit, size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                 hflip: float = 0.5) -> None:
        self.pairs = split.pairs
        steps: List[Callable] = [v2.ToImage(), v2.Resize((size, size))]
        if train and hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        steps += [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
                  v2.Normalize(list(mean), list(std))]
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            image, mask = self.transform(image.convert('RGB'), tv_tensors.Mask(torch.from_numpy(np.array(mask))))
        return image, mask.as_subclass(torch.Tensor)


@dataclass
class DenseData:
    """A checked data folder: class names (without the background for detection, whose label 0 it is) and the two
    splits (:class:`CocoSplit` for detection, :class:`MaskSplit` for segmentation)."""
    classes: List[str]
    train: Any
    val: Any

    @property
    def sizes(self) -> Tuple[int, int]:
        return tuple(s.images if isinstance(s, CocoSplit) else len(s.pairs) for s in (self.train, self.val))


def _split_folders(root: Path) -> Tuple[Path, Path]:
    if not root.is_dir():
        raise DataError(f'{root}: no such data folder')
    val = next((root / name for name in _VAL_NAMES if (root / name).is_dir()), None)
    if not (root / 'train').is_dir() or val is None:
        raise DataError(f'{root}: a detection or segmentation data folder has train/ and val/ splits')
    return root / 'train', val


def read_dense_folder(root: Path, task: str) -> DenseData:
    """The data folder ``root`` for ``task`` ('detect' or 'segment'), checked; see the module docstring.

    Raises:
        DataError: a folder or file that cannot be used, in one line.
    """
    train, val = _split_folders(Path(root))
    if task == 'segment':
        splits = [_read_mask_split(train), _read_mask_split(val)]
        return DenseData(_mask_classes(Path(root), splits), *splits)
    coco = []
    for folder in (train, val):
        path = folder / 'annotations.json'
        if not path.is_file():
            raise DataError(f'{folder}: no annotations.json (COCO format, file_name relative to {folder})')
        ids, names, count = _check_coco(path, folder)
        coco.append((CocoSplit(folder, path, ids, count), names))
    (train_split, names), (val_split, val_names) = coco
    if val_split.category_ids != train_split.category_ids:
        raise DataError(f'{val_split.annotations} and {train_split.annotations} have different categories: give both '
                        f'splits the same list')
    return DenseData(names, train_split, val_split)
