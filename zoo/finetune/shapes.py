"""The embedded detection and segmentation data set: rectangles, ellipses and triangles on textured backgrounds,
generated on first use from a fixed seed, so ``zoo finetune --task detect|segment`` runs with nothing to download.

Written once as ``ROOT/shapes-v1/{train,val}/`` with ``images/NNNN.png``, COCO ``annotations.json`` (boxes, polygon
segmentations, areas) and ``masks/NNNN.png`` (class index per pixel, 0 the background): the layout
:mod:`zoo.finetune.detection` reads for any data set. The folder is built in a temporary folder and renamed into place.
"""
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .digits import cache_root

__all__ = ['SHAPE_CLASSES', 'shapes_folder']

SHAPE_CLASSES = ('rectangle', 'ellipse', 'triangle')
_VERSION = 'shapes-v1'  # a new version for any change of what is generated
_SPLITS = (('train', 600), ('val', 120))
_SIZE = 96
_MIN_SIDE, _MAX_SIDE = 14, 44  # shape sides in pixels
_MAX_SHAPES = 3
_ELLIPSE_POINTS = 32  # vertices of an ellipse's polygon segmentation


def _background(rng: np.random.Generator) -> Image.Image:
    """A textured background: a colour gradient, stripes or checks at a random angle, and pixel noise."""
    y, x = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float32) / _SIZE
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, math.pi)
    ramp = (x * math.cos(angle) + y * math.sin(angle) + 1) / 3
    period = rng.uniform(0.05, 0.25)
    pattern = np.sin(2 * math.pi * (x * math.sin(angle) - y * math.cos(angle)) / period)
    if rng.random() < 0.5:  # checks rather than stripes
        pattern = pattern * np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
    mix = np.clip(ramp + 0.15 * pattern, 0, 1)[..., None]
    pixels = low * (1 - mix) + high * mix + rng.normal(0, 12, (_SIZE, _SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _polygon(kind: str, box: Tuple[float, float, float, float], rng: np.random.Generator) -> List[Tuple[float, float]]:
    """The outline of a shape of ``kind`` that fills ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if kind == 'rectangle':
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if kind == 'ellipse':
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        return [(cx + rx * math.cos(t), cy + ry * math.sin(t))
                for t in np.linspace(0, 2 * math.pi, _ELLIPSE_POINTS, endpoint=False)]
    apex = x0 + rng.uniform(0, 1) * (x1 - x0)  # a triangle with its base on the box's bottom or top edge
    return [(apex, y0), (x1, y1), (x0, y1)] if rng.random() < 0.5 else [(apex, y1), (x1, y0), (x0, y0)]


def _boxes(rng: np.random.Generator) -> List[Tuple[float, float, float, float]]:
    """Up to :data:`_MAX_SHAPES` boxes that do not overlap (so every shape is whole)."""
    boxes: List[Tuple[float, float, float, float]] = []
    for _ in range(int(rng.integers(1, _MAX_SHAPES + 1))):
        for _attempt in range(20):
            w, h = rng.uniform(_MIN_SIDE, _MAX_SIDE, 2)
            x0, y0 = rng.uniform(0, _SIZE - w), rng.uniform(0, _SIZE - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                boxes.append(box)
                break
    return boxes


def _draw(rng: np.random.Generator, image_id: int, annotations: List[Dict[str, Any]]) -> Tuple[Image.Image,
                                                                                             Image.Image]:
    """One image and its class mask; its COCO annotations are appended to ``annotations``."""
    image, mask = _background(rng), Image.new('L', (_SIZE, _SIZE), 0)
    draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for box in _boxes(rng):
        label = int(rng.integers(len(SHAPE_CLASSES)))
        outline = _polygon(SHAPE_CLASSES[label], box, rng)
        draw.polygon(outline, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw_mask.polygon(outline, fill=label + 1)
        xs, ys = [p[0] for p in outline], [p[1] for p in outline]
        x0, y0 = min(xs), min(ys)
        area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))  # shoelace
        annotations.append(dict(
            id=len(annotations) + 1, image_id=image_id, category_id=label + 1, iscrowd=0, area=round(area, 2),
            bbox=[round(v, 2) for v in (x0, y0, max(xs) - x0, max(ys) - y0)],
            segmentation=[[round(v, 2) for point in outline for v in point]]))
    return image, mask


def _write_split(folder: Path, count: int, rng: np.random.Generator) -> None:
    (folder / 'images').mkdir(parents=True)
    (folder / 'masks').mkdir()
    images, annotations = [], []
    for index in range(count):
        image, mask = _draw(rng, index + 1, annotations)
        name = f'{index:04d}.png'
        image.save(folder / 'images' / name)
        mask.save(folder / 'masks' / name)
        images.append(dict(id=index + 1, file_name=f'images/{name}', width=_SIZE, height=_SIZE))
    categories = [dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(SHAPE_CLASSES)]
    coco = dict(images=images, annotations=annotations, categories=categories)
    (folder / 'annotations.json').write_text(json.dumps(coco))


def shapes_folder(root: Optional[Path] = None) -> Path:
    """The shapes data set's folder (see the module docstring), generated on first use (seed 0, seconds)."""
    folder = (root or cache_root()) / _VERSION
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{_VERSION}.', dir=folder.parent))
    try:
        rng = np.random.default_rng(0)
        for split, count in _SPLITS:
            _write_split(tmp / split, count, rng)
        (tmp / 'classes.txt').write_text('\n'.join(('background',) + SHAPE_CLASSES) + '\n')
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
