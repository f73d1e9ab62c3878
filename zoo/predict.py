"""Top-k classification of image files with a model's own preprocessing (its pretrained cfg)."""
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import ImageNetInfo, create_transform, resolve_data_config
from torch import nn

from zoo.errors import ImageFileError, UsageError
from zoo.models import create_model_from_checkpoint, create_pretrained_model, resolve_model_name

__all__ = ['class_names', 'classify_images', 'load_image', 'load_model']

Prediction = List[Tuple[str, float]]  # (label, probability), best first


def load_image(path: Union[str, Path]) -> Image.Image:
    """An image file as RGB; an ImageFileError naming the file if it is missing or not an image."""
    path = Path(path)
    if path.is_dir():
        raise ImageFileError(f'{path} is a folder: give image files (`zoo evaluate MODEL --data FOLDER` scores a '
                             f'folder)')
    if not path.is_file():
        raise ImageFileError(f'{path}: no such image file')
    try:
        with Image.open(path) as image:
            return image.convert('RGB')
    except (UnidentifiedImageError, OSError) as e:
        raise ImageFileError(f'{path}: not a readable image ({e.__class__.__name__})') from e


def load_model(name: str, checkpoint: Optional[Union[str, Path]] = None) -> nn.Module:
    """The model to classify with, in eval mode: ``MODEL[.TAG]`` with its published weights or, given
    ``checkpoint``, a checkpoint file's (keeping its classes); or an ``hf-hub:`` / ``local-dir:`` model."""
    hub_or_folder = name.startswith(('hf-hub:', 'local-dir:'))
    if checkpoint and hub_or_folder:
        raise UsageError('--checkpoint goes with a model name (MODEL[.TAG]), not with hf-hub: or local-dir:')
    if not hub_or_folder:
        resolve_model_name(name)
    if checkpoint:
        return create_model_from_checkpoint(name, checkpoint).eval()
    return create_pretrained_model(name).eval()


def class_names(model: nn.Module) -> List[str]:
    """Label of each output: the pretrained cfg's label names, ImageNet's for a 1000-class head, else indices."""
    names = model.pretrained_cfg.get('label_names')
    if names and len(names) == model.num_classes:
        return list(names)
    if model.num_classes == 1000:
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return [str(i) for i in range(model.num_classes)]


@torch.no_grad()
def classify_images(model: nn.Module, paths: Sequence[Union[str, Path]], top_k: int = 5,
                    batch_size: int = 8) -> Iterable[Prediction]:
    """The ``top_k`` classes of each image, preprocessed as the model's pretrained cfg says; yields per image."""
    transform = create_transform(**resolve_data_config(model=model))
    names = class_names(model)
    top_k = min(top_k, model.num_classes)
    model.eval()
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([transform(load_image(p)) for p in paths[start:start + batch_size]])
        probs = model(batch).softmax(dim=-1)
        values, indices = probs.topk(top_k, dim=-1)
        for row_values, row_indices in zip(values.tolist(), indices.tolist()):
            yield [(names[i], p) for i, p in zip(row_indices, row_values)]
