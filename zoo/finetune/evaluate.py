"""Top-1 / top-5 accuracy, loss and a confusion matrix of a model on labelled images: the validation of
``zoo finetune`` and the ``zoo evaluate`` command.

A folder's classes are matched to the model's outputs by name: a fine-tuned model's ``label_names``, or ImageNet's
WordNet ids (``n01440764``, ...) for a 1000-class model; a model without names must have one output per class, taken
in the folder's (sorted) order.
"""
import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader

from .data import DataError, FolderSplit, ImageFiles, transforms_for
from .distributed import sum_over_processes

__all__ = ['Evaluation', 'class_index_of', 'confusion_rows', 'evaluate', 'evaluate_folder']


@dataclass
class Evaluation:
    """Metrics over ``count`` images: mean cross-entropy, top-1 / top-5 accuracy in percent, and the confusion
    matrix (rows: true class, columns: predicted class, in the folder's class order; a last column counts
    predictions of model outputs that are none of the folder's classes)."""
    count: int
    loss: float
    top1: float
    top5: float
    confusion: torch.Tensor


def class_index_of(model: nn.Module, classes: Sequence[str]) -> torch.Tensor:
    """The model output of each folder class (see the module docstring); a DataError if they cannot be matched."""
    names = list(model.pretrained_cfg.get('label_names') or [])
    if not names and model.num_classes == 1000:
        names = ImageNetInfo().label_names()
    if names and len(names) == model.num_classes and set(classes) <= set(names):
        return torch.tensor([names.index(c) for c in classes])
    if not names and model.num_classes == len(classes):
        return torch.arange(len(classes))
    shown = ', '.join(list(classes)[:5]) + (', ...' if len(classes) > 5 else '')
    raise DataError(f'the data folder\'s classes ({shown}) are not among the model\'s {model.num_classes} classes '
                    f'({", ".join(map(str, names[:5]))}{", ..." if len(names) > 5 else ""})')


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, class_index: torch.Tensor, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> Evaluation:
    """Score ``model`` (eval mode) on ``loader``; in a process group the metrics of every process are summed."""
    model.eval()
    k = len(class_index)
    outputs_to_class = torch.full((int(class_index.max()) + 1,), k, dtype=torch.long)
    outputs_to_class[class_index] = torch.arange(k)
    totals = torch.zeros(4, dtype=torch.float64)  # count, loss sum, top-1 hits, top-5 hits
    confusion = torch.zeros(k, k + 1, dtype=torch.long)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(images)
        logits, wanted = logits.float().cpu(), class_index[targets]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        predicted = top[:, 0]
        totals += torch.tensor([len(targets), F.cross_entropy(logits, wanted, reduction='sum').item(),
                                (predicted == wanted).sum().item(), (top == wanted[:, None]).any(1).sum().item()],
                               dtype=torch.float64)
        predicted_class = torch.where(predicted < len(outputs_to_class),
                                      outputs_to_class[predicted.clamp(max=len(outputs_to_class) - 1)], k)
        confusion += torch.bincount(targets * (k + 1) + predicted_class, minlength=k * (k + 1)).view(k, k + 1)
    totals, confusion = sum_over_processes(totals, device), sum_over_processes(confusion, device)
    count = int(totals[0])
    if count == 0:
        raise DataError('no images to evaluate')
    return Evaluation(count, totals[1].item() / count, 100 * totals[2].item() / count, 100 * totals[3].item() / count,
                      confusion)


def evaluate_folder(model: nn.Module, folder: FolderSplit, batch_size: int = 32, workers: int = 2) -> Evaluation:
    """``model`` scored with its own preprocessing (its pretrained cfg) on a folder read by ``read_image_folder(...,
    val_fraction=None)``: on its ``val/`` images where it has them, else on all of them."""
    samples = folder.val or folder.train
    _, transform = transforms_for(resolve_data_config(model=model), hflip=0.0, scale=(1.0, 1.0), randaugment=None)
    loader = DataLoader(ImageFiles(samples, transform), batch_size=batch_size, num_workers=workers)
    device = next(model.parameters()).device
    return evaluate(model, loader, class_index_of(model, folder.classes), device)


def confusion_rows(evaluation: Evaluation, classes: Sequence[str]) -> List[str]:
    """The confusion matrix as aligned text lines (an 'other' column only where some prediction fell outside)."""
    matrix = evaluation.confusion
    if matrix[:, -1].sum() == 0:
        matrix, header = matrix[:, :-1], list(classes)
    else:
        header = [*classes, 'other']
    width = max(5, *(len(c) for c in header), len(str(int(matrix.max()))))
    lines = [' ' * width + ''.join(f'{c:>{width + 1}}' for c in header)]
    lines += [f'{name:>{width}}' + ''.join(f'{int(v):>{width + 1}}' for v in row) for name, row in zip(classes, matrix)]
    return lines
