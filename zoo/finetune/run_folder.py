"""The folder a fine-tuning run writes: its recipe, per-epoch metrics, plots, the training state for ``--resume``,
and ``best/`` / ``last/`` Hub-ready model folders. Every file is written beside its place and renamed into it, so an
interrupted run never leaves a half-written file.

    RUN/config.yaml      the resolved recipe (``zoo finetune --config RUN/config.yaml`` repeats the run)
    RUN/metrics.csv      one row per epoch
    RUN/curves.png       loss and accuracy per epoch
    RUN/confusion.png    the best model's validation confusion matrix, written when the run ends
    RUN/state.pth        model, optimizer, scheduler, scaler, EMA, epoch and the best result so far
    RUN/best/, RUN/last/ timm Hub folders (config.json with label_names, model.safetensors, README.md)
"""
import csv
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from torch import nn

from zoo._files import atomic_write
from zoo.convert import read_checkpoint
from zoo.errors import ZooError
from zoo.hub import export_hub_folder
from .evaluate import Evaluation

__all__ = ['ModelCard', 'RunFolder', 'RunFolderError']

METRIC_COLUMNS = ('epoch', 'train_loss', 'val_loss', 'val_top1', 'val_top5', 'lr', 'temperature', 'train_img_s',
                  'seconds')


class RunFolderError(ZooError, ValueError):
    """A run folder that cannot be started, replaced or resumed."""


@dataclass
class ModelCard:
    """What the model cards of ``best/`` and ``last/`` state about the run, besides the epoch and its validation."""
    data: str  # the data set, in words
    classes: List[str]
    start: str  # where the weights started from
    recipe: Dict[str, Any]
    data_config: Dict[str, Any]  # timm's preprocessing of the run (resolve_data_config)


class RunFolder:
    """The files of one run (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def is_run(self) -> bool:
        return (self.path / 'config.yaml').is_file()

    def check_new(self, force: bool) -> None:
        """Raise unless a new run may be written here: absent or empty, or with ``force`` an earlier run."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f'{self.path} exists and is not a folder')
        if self.path.is_dir() and any(self.path.iterdir()):
            if not self.is_run():
                raise RunFolderError(f'{self.path} holds files that are not a zoo run: choose another --output')
            if not force:
                raise RunFolderError(f'{self.path} holds an earlier run: pass --resume {self.path} to continue it '
                                     f'or --force to replace it')

    def create(self, force: bool) -> None:
        """Make the folder of a new run (an earlier run in it is replaced with ``force``)."""
        self.check_new(force)
        if self.path.is_dir() and any(self.path.iterdir()):
            shutil.rmtree(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f'cannot write {self.path}: {e.strerror or e}') from e

    def recipe(self) -> Dict[str, Any]:
        """The recipe of the run in this folder (for ``--resume``)."""
        if not self.is_run():
            raise RunFolderError(f'{self.path} is not a zoo run (no config.yaml): nothing to resume')
        return yaml.safe_load((self.path / 'config.yaml').read_text(encoding='utf-8'))

    def write_recipe(self, recipe: Dict[str, Any]) -> None:
        atomic_write(self.path / 'config.yaml',
                      lambda tmp: tmp.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding='utf-8'))

    def save_state(self, state: Dict[str, Any]) -> None:
        atomic_write(self.path / 'state.pth', lambda tmp: torch.save(state, tmp))

    def load_state(self) -> Dict[str, Any]:
        path = self.path / 'state.pth'
        if not path.is_file():
            raise RunFolderError(f'{self.path} has no state.pth: the run ended before its first epoch')
        return read_checkpoint(path)

    def metrics(self) -> List[Dict[str, float]]:
        path = self.path / 'metrics.csv'
        if not path.is_file():
            return []
        with open(path, newline='') as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def write_metrics(self, rows: Sequence[Dict[str, float]], columns: Sequence[str] = METRIC_COLUMNS) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator='\n')
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path / 'metrics.csv', lambda tmp: tmp.write_text(text.getvalue()))

    def write_epoch(self, rows: Sequence[Dict[str, float]], model: nn.Module, evaluation: Evaluation, improved: bool,
                    card: ModelCard, state: Dict[str, Any]) -> None:
        """What a finished epoch changes: metrics.csv, curves.png and last/; best/ when it ``improved``; then
        state.pth, last, so that a resume never starts from a state newer than the exports. (confusion.png is written
        when the run ends: :meth:`plot_confusion`.)"""
        epoch = int(rows[-1]['epoch'])
        self.write_metrics(rows)
        self.plot_curves(rows)
        self.export('last', model, evaluation, epoch, card)
        if improved:
            self.export('best', model, evaluation, epoch, card)
        self.save_state(state)

    def export(self, name: str, model: nn.Module, evaluation: Evaluation, epoch: int, card: ModelCard) -> None:
        """``model`` as the Hub folder RUN/``name``, its card stating the run and the validation at ``epoch``."""
        finetuned = dict(data=card.data, classes=card.classes, epoch=epoch, val_top1=evaluation.top1,
                         val_top5=evaluation.top5, val_images=evaluation.count, start=card.start, recipe=card.recipe,
                         img_size=card.data_config['input_size'][-1])
        export_hub_folder(model, self.path / name, force=True, label_names=card.classes, data_config=card.data_config,
                          finetuned=finetuned)

    def plot_curves(self, rows: Sequence[Dict[str, float]]) -> None:
        """Training and validation loss, validation top-1 per epoch, as curves.png."""
        epochs = [int(r['epoch']) for r in rows]
        fig = _figure((9, 3.4))
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.9, wspace=0.25)  # fixed: a layout engine costs
        loss_ax, acc_ax = fig.subplots(1, 2)  # as much as the drawing, every epoch
        loss_ax.plot(epochs, [r['train_loss'] for r in rows], marker='o', label='train')
        loss_ax.plot(epochs, [r['val_loss'] for r in rows], marker='o', label='validation')
        loss_ax.set(xlabel='epoch', ylabel='loss', title='loss')
        loss_ax.legend()
        acc_ax.plot(epochs, [r['val_top1'] for r in rows], marker='o', color='tab:green')
        acc_ax.set(xlabel='epoch', ylabel='top-1 (%)', title='validation accuracy')
        acc_ax.grid(alpha=0.3)
        atomic_write(self.path / 'curves.png', lambda tmp: fig.savefig(tmp, format='png', dpi=100))

    def plot_confusion(self, evaluation: Evaluation, classes: Sequence[str]) -> None:
        """The validation confusion matrix (rows: true class, columns: predicted) as confusion.png."""
        matrix = evaluation.confusion[:, :-1].numpy()
        size = min(12., 2.5 + 0.45 * len(classes))
        fig = _figure((size, size), layout='constrained')  # class names of any length
        ax = fig.subplots()
        ax.imshow(matrix, cmap='Blues')
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel='predicted', ylabel='true',
               title=f'validation: top-1 {evaluation.top1:.1f}% of {evaluation.count}')
        ax.set_xticklabels(classes, rotation=90 if len(classes) > 10 else 0)
        ax.set_yticklabels(classes)
        if len(classes) <= 30:
            for (i, j), count in ((ij, matrix[ij]) for ij in zip(*matrix.nonzero())):
                ax.text(j, i, str(count), ha='center', va='center', fontsize=8,
                        color='white' if count > matrix.max() / 2 else 'black')
        atomic_write(self.path / 'confusion.png', lambda tmp: fig.savefig(tmp, format='png', dpi=100))


def _figure(size: Tuple[float, float], layout: Optional[str] = None):
    """A matplotlib figure of ``size`` inches for files only: no pyplot (its global state and window machinery are
    for screens)."""
    from matplotlib.figure import Figure
    return Figure(figsize=size, layout=layout)
