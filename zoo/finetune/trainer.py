"""The fine-tuning loop, on timm's factories and PyTorch's distributed engine.

Model (``timm.create_model`` / ``create_model_from_checkpoint``, new head sized from the data), transforms
(``timm.data.create_transform`` from the model's pretrained cfg), optimizer and warmup + cosine schedule
(``create_optimizer_v2`` with layer-wise lr decay through the model's ``group_matcher``, ``create_scheduler_v2``),
mixup / cutmix (``timm.data.Mixup``), model EMA (``ModelEmaV3``), gradient clipping (``dispatch_clip_grad``),
mixed precision (``torch.autocast``, a GradScaler for float16), ``torch.compile``, DistributedDataParallel under
torchrun. ODConv models anneal their attention temperature (30 -> 1 over the first 10 epochs, per iteration) only when
their ODConv layers start untrained; validation and exports always run at temperature 1, the inference one.

Each epoch starts from RNG seeds derived from (seed, epoch, rank), so ``--resume`` from the state saved at the end of
an epoch continues exactly as the uninterrupted run would have.
"""
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup, resolve_data_config
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from zoo.hub import export_hub_folder
from zoo.layers import ODConv2d, odconv_temperature, set_temperature
from zoo.models import check_timm_model_name, create_model_from_checkpoint, replace_convs
from .data import ImageFiles, read_image_folder, transforms_for
from .digits import digits_folder
from .distributed import Processes, join_processes, leave_processes, sum_over_processes
from .evaluate import Evaluation, evaluate
from .recipe import Recipe, RecipeError
from .run_folder import RunFolder, RunFolderError

__all__ = ['FinetuneResult', 'finetune']

_logger = logging.getLogger(__name__)
_AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


@dataclass
class FinetuneResult:
    """What a run produced: its folder, the best epoch and its validation metrics, and the epochs run."""
    folder: Path
    best_epoch: int
    best: Evaluation
    epochs_run: int
    seconds: float
    stopped_early: bool


def _seed_epoch(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seed every RNG for ``epoch`` of process ``rank``; the DataLoader's generator (shuffle, worker seeds)."""
    value = (seed * 1_000_003 + epoch * 101 + rank) % 2 ** 32
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)  # timm's Mixup draws from numpy
    return torch.Generator().manual_seed(value)


def _default_output(recipe: Recipe) -> Path:
    model = recipe.model.split(':')[-1].replace('/', '-')
    data = Path(recipe.data).resolve().name if recipe.data else ('digits' if recipe.task == 'classify' else 'shapes')
    return Path('runs') / f'{model}-{data}'


def _build_model(recipe: Recipe, num_classes: int) -> Tuple[nn.Module, bool, str]:
    """The model with a head for ``num_classes``, whether its ODConv layers (if any) start trained, and where its
    weights came from."""
    check_timm_model_name(recipe.model)
    kwargs: Dict[str, Any] = dict(num_classes=num_classes)
    if recipe.drop_path is not None:
        kwargs['drop_path_rate'] = recipe.drop_path
    if recipe.checkpoint:
        model, loaded, start = create_model_from_checkpoint(recipe.model, recipe.checkpoint, **kwargs), True, \
            recipe.checkpoint
    else:
        model, loaded = timm.create_model(recipe.model, pretrained=recipe.pretrained, **kwargs), recipe.pretrained
        start = f'{recipe.model} pretrained weights' if recipe.pretrained else 'random initialisation'
    if recipe.convert:
        include = recipe.convert_include.split(',') if recipe.convert_include else None
        _, report = replace_convs(model, recipe.convert, include=include, kernel_num=recipe.convert_kernel_num)
        _logger.info(str(report))
        start += f', its convs replaced by {recipe.convert} ({len(report.replaced)} of them)'
        loaded = loaded and recipe.convert != 'odconv'  # new ODConv layers start untrained
    return model, loaded, start


def _anneals_temperature(recipe: Recipe, model: nn.Module, loaded: bool) -> bool:
    has_odconv = any(isinstance(m, ODConv2d) for m in model.modules())
    mode = recipe.odconv_temperature
    return has_odconv and (mode == 'anneal' or (mode == 'auto' and not loaded))


def _amp(recipe: Recipe, device: torch.device) -> Tuple[Optional[torch.dtype], Optional[torch.amp.GradScaler]]:
    if recipe.amp is None:
        return None, None
    if recipe.amp == 'fp16' and device.type != 'cuda':
        raise RecipeError('amp fp16 needs a CUDA device; on a CPU use --amp bf16')
    dtype = _AMP_DTYPES[recipe.amp]
    return dtype, torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


class _Run:
    """One fine-tuning run in one process (rank 0 of several, or alone)."""

    def __init__(self, recipe: Recipe, processes: Processes, folder: RunFolder, data: Path) -> None:
        self.recipe, self.processes, self.folder = recipe, processes, folder
        self.split = read_image_folder(data, recipe.val_fraction, seed=recipe.seed, workers=recipe.workers)
        torch.manual_seed(recipe.seed)  # the initial weights
        self.data_name = recipe.data or "scikit-learn's handwritten digits (8x8 scans, shown at 32 x 32)"
        self.model, loaded, self.start = _build_model(recipe, len(self.split.classes))
        self.anneal = _anneals_temperature(recipe, self.model, loaded)
        device = processes.device
        self.model.to(device)
        if recipe.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if recipe.freeze_backbone:
            self.model.requires_grad_(False)
            self.model.get_classifier().requires_grad_(True)
        input_size = (3, recipe.img_size, recipe.img_size) if recipe.img_size else None
        self.data_config = resolve_data_config(args=dict(input_size=input_size) if input_size else {},
                                               model=self.model)
        self.amp_dtype, self.scaler = _amp(recipe, device)
        self.train_set, self.val_set = self._datasets()
        self.steps_per_epoch = math.ceil(len(self._train_loader(0)) / recipe.accumulate)
        self.optimizer = create_optimizer_v2(self.model, opt=recipe.opt, lr=recipe.lr,
                                             weight_decay=recipe.weight_decay, layer_decay=recipe.layer_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=recipe.sched, num_epochs=recipe.epochs, warmup_epochs=recipe.warmup_epochs,
            warmup_lr=recipe.warmup_lr, min_lr=recipe.min_lr, step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch)
        self.ema = ModelEmaV3(self.model, decay=recipe.ema_decay) if recipe.ema_decay else None
        self.mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix,
                           label_smoothing=recipe.label_smoothing, num_classes=len(self.split.classes)) \
            if recipe.mixup > 0 or recipe.cutmix > 0 else None
        self.train_model = self._wrapped(self.model)
        self.epoch, self.best_epoch, self.best, self.rows = 0, 0, None, []

    def _wrapped(self, model: nn.Module) -> nn.Module:
        """The module the training steps run: DDP (and SyncBatchNorm) across processes, then torch.compile."""
        if self.processes.distributed:
            if self.recipe.sync_bn:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            device_ids = [self.processes.device.index] if self.processes.device.type == 'cuda' else None
            model = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        # static shapes (a graph for the full batches, one for the last): torch 2.14's dynamic-shape backward compile
        # fails once the image size is symbolic too, which any earlier compile in the process may have caused
        return torch.compile(model, dynamic=False) if self.recipe.compile else model

    def _datasets(self) -> Tuple[ImageFiles, ImageFiles]:
        train_tf, val_tf = transforms_for(self.data_config, self.recipe.hflip, self.recipe.scale,
                                          self.recipe.randaugment)
        return ImageFiles(self.split.train, train_tf), ImageFiles(self.split.val, val_tf)

    def _train_loader(self, epoch: int) -> DataLoader:
        rank, world_size = self.processes.rank, self.processes.world_size
        generator = _seed_epoch(self.recipe.seed, epoch, rank)
        sampler = None
        if self.processes.distributed:
            sampler = DistributedSampler(self.train_set, world_size, rank, shuffle=True, seed=self.recipe.seed)
            sampler.set_epoch(epoch)
        per_process = math.ceil(len(self.train_set) / world_size)
        # a last batch of one image cannot be normalised by BatchNorm in training: it is left out, a batch of one is not
        drop_last = per_process % self.recipe.batch_size == 1 and per_process > 1
        return DataLoader(self.train_set, batch_size=self.recipe.batch_size, shuffle=sampler is None, sampler=sampler,
                          num_workers=self.recipe.workers, generator=generator, drop_last=drop_last,
                          pin_memory=self.processes.device.type == 'cuda', persistent_workers=False)

    def _val_loader(self) -> DataLoader:
        rank, world_size = self.processes.rank, self.processes.world_size
        shard = Subset(self.val_set, range(rank, len(self.val_set), world_size))  # each image scored once
        return DataLoader(shard, batch_size=self.recipe.batch_size, num_workers=self.recipe.workers)

    # training -----------------------------------------------------------------------------------------------------

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.mixup is not None:
            return SoftTargetCrossEntropy()(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.recipe.label_smoothing)

    def _set_train_mode(self) -> None:
        self.train_model.train()
        if self.recipe.freeze_backbone:  # a linear probe: the backbone's BatchNorm statistics stay as they are
            self.model.eval()
            self.model.get_classifier().train()

    def _temperature(self, progress: float) -> float:
        if not self.anneal:
            return 1.0
        return odconv_temperature(progress, self.recipe.temperature_initial, 1.0, self.recipe.temperature_epochs)

    def train_epoch(self, epoch: int) -> Tuple[float, float]:
        """One epoch; returns the mean training loss (over every process) and the images per second."""
        loader = self._train_loader(epoch)
        device, recipe = self.processes.device, self.recipe
        autocast = torch.autocast(device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        self._set_train_mode()
        # the loss is summed where it is computed: reading it every step would wait for the GPU every step
        loss_sum, count, hits, start = torch.zeros((), dtype=torch.float64, device=device), 0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f'epoch {epoch + 1}/{recipe.epochs}', unit='batch', leave=False,
                   disable=not self.processes.is_main or None)
        for i, (images, targets) in enumerate(bar):
            step_now = (i + 1) % recipe.accumulate == 0 or i + 1 == len(loader)
            temperature = self._temperature(epoch + i / len(loader))
            if self.anneal:
                set_temperature(self.model, temperature)
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if recipe.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            # gradients are all-reduced only on the micro-batch that steps the optimizer
            accumulating = self.processes.distributed and not step_now
            sync = self.train_model.no_sync() if accumulating else contextlib.nullcontext()
            with sync:
                with autocast:
                    logits = self.train_model(images)
                    loss = self._loss(logits, targets)
                (self.scaler.scale(loss) if self.scaler else loss).div(recipe.accumulate).backward()
            if step_now:
                self._step(epoch * self.steps_per_epoch + i // recipe.accumulate + 1)
            loss_sum += loss.detach().double() * len(images)
            count += len(images)
            if bar.disable:
                continue
            status = dict(loss=f'{loss_sum.item() / count:.3f}', img_s=f'{count / (time.perf_counter() - start):.0f}',
                          lr=f'{self.optimizer.param_groups[0]["lr"]:.2e}')
            if self.mixup is None:  # mixed targets have no accuracy
                hits += (logits.argmax(1) == targets).sum().item()
                status['acc'] = f'{100 * hits / count:.1f}%'
            if self.anneal:
                status['T'] = f'{temperature:.2f}'
            bar.set_postfix(status, refresh=False)
        seconds = time.perf_counter() - start
        total = sum_over_processes(torch.stack([loss_sum, torch.tensor(count, dtype=torch.float64, device=device)]),
                                   device)
        return (total[0] / total[1]).item(), count * self.processes.world_size / seconds

    def _step(self, num_updates: int) -> None:
        """One optimizer step (after unscaling and clipping), then the EMA and the lr schedule follow."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.recipe.clip_grad:
            parameters = [p for p in self.model.parameters() if p.requires_grad]
            dispatch_clip_grad(parameters, self.recipe.clip_grad, mode=self.recipe.clip_mode)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=num_updates)
        self.scheduler.step_update(num_updates)

    # validation, saving ---------------------------------------------------------------------------------------------

    def deployed_model(self) -> nn.Module:
        """The weights that are validated and exported: the EMA ones where EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def validate(self) -> Evaluation:
        model = self.deployed_model()
        set_temperature(model, 1.0)  # the inference temperature, which exports run at
        evaluation = evaluate(model, self._val_loader(), torch.arange(len(self.split.classes)),
                              self.processes.device, self.amp_dtype, self.recipe.channels_last)
        return evaluation

    def state(self) -> Dict[str, Any]:
        return {
            'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(), 'scaler': self.scaler.state_dict() if self.scaler else None,
            'ema': self.ema.module.state_dict() if self.ema else None, 'epoch': self.epoch,
            'best_epoch': self.best_epoch, 'best': vars(self.best) if self.best else None,
            'classes': self.split.classes, 'model_name': self.recipe.model, 'seed': self.recipe.seed,
        }

    def load_state(self, state: Dict[str, Any]) -> None:
        if state['model_name'] != self.recipe.model or state['classes'] != self.split.classes:
            raise RunFolderError(f'{self.folder.path} is a run of {state["model_name"]} on classes '
                                 f'{", ".join(state["classes"][:5])}...: it cannot be resumed with {self.recipe.model} '
                                 f'on these data')
        self.model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        if self.scaler and state['scaler']:
            self.scaler.load_state_dict(state['scaler'])
        if self.ema is not None and state['ema']:
            self.ema.module.load_state_dict(state['ema'])
        self.epoch, self.best_epoch = state['epoch'], state['best_epoch']
        self.best = Evaluation(**state['best']) if state['best'] else None
        self.rows = self.folder.metrics()[:self.epoch]

    def export(self, name: str, evaluation: Evaluation, epoch: int) -> None:
        finetuned = dict(
            data=self.data_name, classes=self.split.classes, epoch=epoch, val_top1=evaluation.top1,
            val_top5=evaluation.top5, val_images=evaluation.count, start=self.start, recipe=self.recipe.to_dict(),
            img_size=self.data_config['input_size'][-1])
        export_hub_folder(self.deployed_model(), self.folder.path / name, force=True, label_names=self.split.classes,
                          data_config=self.data_config, finetuned=finetuned)

    def end_epoch(self, epoch: int, train_loss: float, img_s: float, evaluation: Evaluation, seconds: float) -> None:
        """Record the epoch; on rank 0 write metrics, plots, last/, best/ (when better) and the training state."""
        self.epoch = epoch + 1
        improved = self.best is None or evaluation.top1 > self.best.top1
        if improved:
            self.best, self.best_epoch = evaluation, self.epoch
        self.rows.append(dict(epoch=self.epoch, train_loss=train_loss, val_loss=evaluation.loss,
                              val_top1=evaluation.top1, val_top5=evaluation.top5,
                              lr=self.optimizer.param_groups[0]['lr'],
                              temperature=self._temperature(self.epoch), train_img_s=img_s, seconds=seconds))
        if not self.processes.is_main:
            return
        self.folder.write_metrics(self.rows)
        self.folder.plot_curves(self.rows)
        self.export('last', evaluation, self.epoch)
        if improved:
            self.export('best', evaluation, self.epoch)
            self.folder.plot_confusion(evaluation, self.split.classes)
        self.folder.save_state(self.state())
        _logger.info(f'epoch {self.epoch}/{self.recipe.epochs}: train loss {train_loss:.4f}, val loss '
                     f'{evaluation.loss:.4f}, top-1 {evaluation.top1:.2f}%, top-5 {evaluation.top5:.2f}%, '
                     f'{img_s:.0f} img/s' + (f', temperature {self._temperature(self.epoch):.2f}' if self.anneal
                                             else ''))


def finetune(recipe: Recipe, resume: Optional[Path] = None, force: bool = False) -> FinetuneResult:
    """Run (or with ``resume``, continue) a fine-tuning run of ``recipe``; see the module docstring.

    Everything is checked (run folder, data, model, checkpoint) before the run folder is written.

    Raises:
        RecipeError, DataError, RunFolderError, CheckpointError: bad settings, data, run folder or checkpoint.
    """
    processes = join_processes()
    try:
        folder = RunFolder(Path(resume or recipe.output or _default_output(recipe)))
        if resume is None:
            folder.check_new(force)
        run = _Run(recipe, processes, folder, Path(recipe.data) if recipe.data else digits_folder())
        if resume is not None:
            run.load_state(folder.load_state())
        elif processes.is_main:
            folder.create(force)
            folder.write_recipe(recipe.to_dict())
        if processes.distributed:
            torch.distributed.barrier()  # the folder exists before any process writes to it
        return _train(run)
    finally:
        leave_processes(processes)


def _train(run: _Run) -> FinetuneResult:
    recipe, start, stopped_early = run.recipe, time.perf_counter(), False
    if run.processes.is_main:
        _logger.info(f'{recipe.model} on {len(run.split.train)} training and {len(run.split.val)} validation images '
                     f'of {len(run.split.classes)} classes, {run.processes.world_size} process(es) on '
                     f'{run.processes.device.type}, from {run.start}' +
                     (f'; ODConv temperature {recipe.temperature_initial:g} -> 1 over {recipe.temperature_epochs:g} '
                      f'epochs' if run.anneal else ''))
    if run.anneal and recipe.temperature_epochs > recipe.epochs and run.processes.is_main:
        _logger.warning(f'the ODConv temperature anneals over {recipe.temperature_epochs:g} epochs but the run has '
                        f'{recipe.epochs}: it ends above 1, while validation and the exports run at 1 (the inference '
                        f'temperature); lower --temperature-epochs or train longer')
    for epoch in range(run.epoch, recipe.epochs):
        epoch_start = time.perf_counter()
        train_loss, img_s = run.train_epoch(epoch)
        evaluation = run.validate()
        run.end_epoch(epoch, train_loss, img_s, evaluation, time.perf_counter() - epoch_start)
        if recipe.patience and run.epoch - run.best_epoch >= recipe.patience and run.epoch < recipe.epochs:
            stopped_early = True
            if run.processes.is_main:
                _logger.info(f'no better validation top-1 for {recipe.patience} epochs: stopping early')
            break
    return FinetuneResult(run.folder.path, run.best_epoch, run.best, run.epoch, time.perf_counter() - start,
                          stopped_early)
