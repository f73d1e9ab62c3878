"""The fine-tuning loop, in the shape of timm's ``train.py``, on timm's factories and PyTorch's distributed engine.

Model (``timm.create_model`` / ``create_model_from_checkpoint``, new head sized from the data), transforms
(``timm.data.create_transform`` from the model's pretrained cfg), optimizer and warmup + cosine schedule
(``create_optimizer_v2`` with layer-wise lr decay through the model's ``group_matcher``, ``create_scheduler_v2``),
mixup / cutmix (``timm.data.Mixup``), model EMA (``ModelEmaV3``), gradient clipping (``dispatch_clip_grad``),
mixed precision (``torch.autocast``, a GradScaler for float16), ``torch.compile``, DistributedDataParallel under
torchrun. ODConv models anneal their attention temperature (30 -> 1 over the first 10 epochs, per iteration) only when
their ODConv layers start untrained; validation and exports always run at temperature 1, the inference one.

One job per object: :class:`TrainingState` is what a run has learned (model, optimizer, scheduler, scaler, EMA, epoch,
best result, seed) and what ``--resume`` restores; :func:`train_one_epoch` and :func:`validate` are the loop;
:class:`~zoo.finetune.run_folder.RunFolder` writes the outputs; :func:`prepare_run` sets a :class:`Run` up (data,
transforms, model, state) for them.

Randomness (:mod:`zoo.finetune.loaders`): an epoch's order, each sample's augmentation and the training step's own
draws follow from (seed, epoch, index or rank), so a run resumed from the state saved at the end of an epoch continues
exactly as the uninterrupted run would have, on every process and with any number of loader workers. The global RNGs
the run seeds are restored when :func:`finetune` returns.
"""
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup, resolve_data_config
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from zoo.layers import ODConv2d, odconv_temperature, set_temperature
from zoo.models import check_timm_model_name, create_model_from_checkpoint, create_pretrained_model, replace_convs
from .data import FolderSplit, ImageFiles, read_image_folder, transforms_for
from .digits import digits_folder
from .distributed import Processes, join_processes, leave_processes, sum_over_processes
from .evaluate import Evaluation, evaluate
from .loaders import global_rngs_kept, start_epoch, training_loader, validation_loader
from .recipe import Recipe, RecipeError
from .run_folder import ModelCard, RunFolder, RunFolderError

__all__ = ['FinetuneResult', 'Run', 'TrainingState', 'amp_settings', 'anneals_temperature', 'build_model',
           'finetune', 'open_run_folder', 'optimization_state', 'optimizer_step', 'prepare_run',
           'restore_optimization', 'train_one_epoch', 'validate']

_logger = logging.getLogger(__name__)
_AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
DIGITS_NAME = "scikit-learn's handwritten digits (8x8 scans, shown at 32 x 32)"


@dataclass
class FinetuneResult:
    """What a run produced: its folder, the best epoch and its validation metrics, and the epochs run."""
    folder: Path
    best_epoch: int
    best: Evaluation
    epochs_run: int
    seconds: float
    stopped_early: bool


@dataclass
class TrainingState:
    """Everything a run has learned and counted so far: what ``state.pth`` holds and ``--resume`` restores.

    ``epoch`` counts the finished epochs; the RNGs of the next one derive from (``seed``, ``epoch``, rank).
    """
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    scaler: Optional[torch.amp.GradScaler]
    ema: Optional[ModelEmaV3]
    model_name: str
    classes: List[str]
    seed: int
    epoch: int = 0
    best_epoch: int = 0
    best: Optional[Evaluation] = None

    @property
    def deployed_model(self) -> nn.Module:
        """The weights that are validated and exported: the EMA ones where EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def record(self, evaluation: Evaluation) -> bool:
        """Count a finished epoch and its validation; whether it is the best so far."""
        self.epoch += 1
        improved = self.best is None or evaluation.top1 > self.best.top1
        if improved:
            self.best, self.best_epoch = evaluation, self.epoch
        return improved

    def state_dict(self) -> Dict[str, Any]:
        return {
            **optimization_state(self.model, self.optimizer, self.scheduler, self.scaler),
            'ema': self.ema.module.state_dict() if self.ema else None, 'epoch': self.epoch,
            'best_epoch': self.best_epoch, 'best': vars(self.best) if self.best else None,
            'classes': self.classes, 'model_name': self.model_name, 'seed': self.seed,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a saved state; its weights are loaded as saved (in this model's own layout, never converted)."""
        if (state['model_name'], state['classes'], state['seed']) != (self.model_name, self.classes, self.seed):
            raise RunFolderError(f'the saved state is of {state["model_name"]} on classes '
                                 f'{", ".join(state["classes"][:5])}... with seed {state["seed"]}: it cannot be '
                                 f'resumed as {self.model_name} on these data with seed {self.seed}')
        restore_optimization(state, self.model, self.optimizer, self.scheduler, self.scaler)
        if self.ema is not None and state['ema']:
            self.ema.module.load_state_dict(state['ema'])
        self.epoch, self.best_epoch = state['epoch'], state['best_epoch']
        self.best = Evaluation(**state['best']) if state['best'] else None


def optimization_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Scheduler,
                       scaler: Optional[torch.amp.GradScaler]) -> Dict[str, Any]:
    """The state dicts of what an optimization run updates (the scaler's None without one), as ``state.pth`` holds
    them for both trainers."""
    return {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'scaler': scaler.state_dict() if scaler else None}


def restore_optimization(state: Dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                         scheduler: Scheduler, scaler: Optional[torch.amp.GradScaler]) -> None:
    """Load what :func:`optimization_state` saved, as saved (the weights in the model's own layout)."""
    model.load_state_dict(state['model'])
    optimizer.load_state_dict(state['optimizer'])
    scheduler.load_state_dict(state['scheduler'])
    if scaler and state['scaler']:
        scaler.load_state_dict(state['scaler'])


# model and state ------------------------------------------------------------------------------------------------------

def build_model(recipe: Recipe, num_classes: int) -> Tuple[nn.Module, bool, str]:
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
        create = create_pretrained_model if recipe.pretrained else partial(timm.create_model, pretrained=False)
        model, loaded = create(recipe.model, **kwargs), recipe.pretrained
        start = f'{recipe.model} pretrained weights' if recipe.pretrained else 'random initialisation'
    if recipe.convert:
        include = recipe.convert_include.split(',') if recipe.convert_include else None
        _, report = replace_convs(model, recipe.convert, include=include, kernel_num=recipe.convert_kernel_num)
        _logger.info(str(report))
        start += f', its convs replaced by {recipe.convert} ({len(report.replaced)} of them)'
        loaded = loaded and recipe.convert != 'odconv'  # new ODConv layers start untrained
    return model, loaded, start


def anneals_temperature(recipe: Recipe, model: nn.Module, loaded: bool) -> bool:
    """Whether the run anneals ODConv's temperature: the recipe asks for it, or (auto) the ODConv layers start
    untrained."""
    has_odconv = any(isinstance(m, ODConv2d) for m in model.modules())
    mode = recipe.odconv_temperature
    return has_odconv and (mode == 'anneal' or (mode == 'auto' and not loaded))


def amp_settings(recipe: Recipe,
                 device: torch.device) -> Tuple[Optional[torch.dtype], Optional[torch.amp.GradScaler]]:
    """The autocast dtype the recipe asks for (None: float32) and the gradient scaler float16 needs."""
    if recipe.amp is None:
        return None, None
    if recipe.amp == 'fp16' and device.type != 'cuda':
        raise RecipeError('amp fp16 needs a CUDA device; on a CPU use --amp bf16')
    dtype = _AMP_DTYPES[recipe.amp]
    return dtype, torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def _training_state(recipe: Recipe, model: nn.Module, classes: List[str], updates: int,
                    scaler: Optional[torch.amp.GradScaler]) -> TrainingState:
    optimizer = create_optimizer_v2(model, opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                    layer_decay=recipe.layer_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=recipe.sched, num_epochs=recipe.epochs, warmup_epochs=recipe.warmup_epochs,
        warmup_lr=recipe.warmup_lr, min_lr=recipe.min_lr, step_on_epochs=False, updates_per_epoch=updates)
    ema = ModelEmaV3(model, decay=recipe.ema_decay) if recipe.ema_decay else None
    return TrainingState(model, optimizer, scheduler, scaler, ema, recipe.model, classes, recipe.seed)


def _wrapped(model: nn.Module, recipe: Recipe, processes: Processes) -> nn.Module:
    """The module the training steps run: DDP (and SyncBatchNorm) across processes, then torch.compile."""
    if processes.distributed:
        if recipe.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [processes.device.index] if processes.device.type == 'cuda' else None
        model = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
    # static shapes (a graph for the full batches, one for the last): torch 2.14's dynamic-shape backward compile
    # fails once the image size is symbolic too, which any earlier compile in the process may have caused
    return torch.compile(model, dynamic=False) if recipe.compile else model


def _loss_fn(recipe: Recipe, mixup: Optional[Mixup]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if mixup is not None:  # mixed targets carry the label smoothing
        return SoftTargetCrossEntropy()
    return partial(F.cross_entropy, label_smoothing=recipe.label_smoothing)


# the loop -------------------------------------------------------------------------------------------------------------

def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler],
                   recipe: Recipe) -> None:
    """Apply the accumulated gradients: unscaled (float16), clipped as the recipe asks, then zeroed."""
    if scaler:
        scaler.unscale_(optimizer)
    if recipe.clip_grad:
        parameters = [p for p in model.parameters() if p.requires_grad]
        dispatch_clip_grad(parameters, recipe.clip_grad, mode=recipe.clip_mode)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _step(state: TrainingState, recipe: Recipe, num_updates: int) -> None:
    """One optimizer step (after unscaling and clipping), then the EMA and the lr schedule follow."""
    optimizer_step(state.model, state.optimizer, state.scaler, recipe)
    if state.ema is not None:
        state.ema.update(state.model, step=num_updates)
    state.scheduler.step_update(num_updates)


def train_one_epoch(state: TrainingState, train_model: nn.Module, loader: DataLoader, recipe: Recipe,
                    processes: Processes, mixup: Optional[Mixup] = None, amp_dtype: Optional[torch.dtype] = None,
                    temperature: Optional[Callable[[float], float]] = None,
                    show_every: int = 20) -> Tuple[float, float]:
    """Train ``state.model`` through ``train_model`` (itself, or its DDP / compiled wrapper) for epoch
    ``state.epoch`` on ``loader``.

    ``temperature(progress in epochs)`` sets the ODConv attention temperature before each step where given. The loss
    is summed on the device; the progress bar (main process, on a terminal) reads it every ``show_every`` steps.

    Returns:
        The mean training loss over every process's images, and the images per second of all processes together.
    """
    device, epoch, steps = processes.device, state.epoch, len(loader)
    updates = math.ceil(steps / recipe.accumulate)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    loss_fn = _loss_fn(recipe, mixup)
    train_model.train()
    if recipe.freeze_backbone:  # a linear probe: the backbone's BatchNorm statistics stay as they are
        state.model.eval()
        state.model.get_classifier().train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros((), dtype=torch.long, device=device)
    count, start = 0, time.perf_counter()
    bar = tqdm(loader, desc=f'epoch {epoch + 1}/{recipe.epochs}', unit='batch', leave=False,
               disable=not processes.is_main or None)
    for i, (images, targets) in enumerate(bar):
        step_now = (i + 1) % recipe.accumulate == 0 or i + 1 == steps
        current_temperature = temperature(epoch + i / steps) if temperature is not None else None
        if current_temperature is not None:
            set_temperature(state.model, current_temperature)
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if recipe.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)
        # gradients are all-reduced only on the micro-batch that steps the optimizer
        sync = train_model.no_sync() if processes.distributed and not step_now else contextlib.nullcontext()
        with sync:
            with autocast:
                logits = train_model(images)
                loss = loss_fn(logits, targets)
            (state.scaler.scale(loss) if state.scaler else loss).div(recipe.accumulate).backward()
        if step_now:
            _step(state, recipe, epoch * updates + i // recipe.accumulate + 1)
        loss_sum += loss.detach().double() * len(images)
        if mixup is None:  # mixed targets have no accuracy
            hits += (logits.detach().argmax(1) == targets).sum()
        count += len(images)
        if not bar.disable and ((i + 1) % show_every == 0 or i + 1 == steps):
            bar.set_postfix(_progress(loss_sum, hits, count, start, state, mixup is None, current_temperature),
                            refresh=False)
    seconds = time.perf_counter() - start
    total = sum_over_processes(torch.stack([loss_sum, torch.tensor(count, dtype=torch.float64, device=device)]),
                               device)
    return (total[0] / total[1]).item(), count * processes.world_size / seconds


def _progress(loss_sum: torch.Tensor, hits: torch.Tensor, count: int, start: float, state: TrainingState,
              has_accuracy: bool, temperature: Optional[float]) -> Dict[str, str]:
    """The progress bar's figures (reading the device's sums waits for it: done every few steps)."""
    status = dict(loss=f'{loss_sum.item() / count:.3f}', img_s=f'{count / (time.perf_counter() - start):.0f}',
                  lr=f'{state.optimizer.param_groups[0]["lr"]:.2e}')
    if has_accuracy:
        status['acc'] = f'{100 * hits.item() / count:.1f}%'
    if temperature is not None:
        status['T'] = f'{temperature:.2f}'
    return status


def validate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> Evaluation:
    """``model``'s loss, top-1 / top-5 and confusion on ``loader`` (summed over the processes) at ODConv
    temperature 1, the inference temperature the exports run at."""
    set_temperature(model, 1.0)
    return evaluate(model, loader, torch.arange(num_classes), device, amp_dtype, channels_last)


# a run ----------------------------------------------------------------------------------------------------------------

def _default_output_folder(recipe: Recipe) -> Path:
    """``runs/MODEL-DATA`` (DATA: the data folder's name, or the embedded data set's)."""
    model = recipe.model.split(':')[-1].replace('/', '-')
    data = Path(recipe.data).resolve().name if recipe.data else ('digits' if recipe.task == 'classify' else 'shapes')
    return Path('runs') / f'{model}-{data}'


def open_run_folder(recipe: Recipe, resume: Optional[Path], force: bool) -> RunFolder:
    """The run's folder: the one resumed, else the recipe's output (default ``runs/MODEL-DATA``), which must be new
    unless ``force``."""
    folder = RunFolder(Path(resume or recipe.output or _default_output_folder(recipe)))
    if resume is None:
        folder.check_new(force)
    return folder


def finetune(recipe: Recipe, resume: Optional[Path] = None, force: bool = False) -> FinetuneResult:
    """Run (or with ``resume``, continue) a fine-tuning run of ``recipe``; see the module docstring.

    Everything is checked (run folder, data, model, checkpoint) before the run folder is written.

    Raises:
        RecipeError, DataError, RunFolderError, CheckpointError: bad settings, data, run folder or checkpoint.
    """
    processes = join_processes()
    try:
        folder = open_run_folder(recipe, resume, force)
        with global_rngs_kept():
            return _run(recipe, processes, folder, resume is not None, force)
    finally:
        leave_processes(processes)


@dataclass
class Run:
    """A run set up by :func:`prepare_run`: its data, preprocessing, training state and what each step uses."""
    recipe: Recipe
    processes: Processes
    split: FolderSplit
    train_loader: DataLoader  # its sampler set to each epoch by start_epoch
    val_loader: DataLoader
    state: TrainingState
    train_model: nn.Module  # the model, or its DDP / compiled wrapper
    mixup: Optional[Mixup]
    amp_dtype: Optional[torch.dtype]
    temperature: Optional[Callable[[float], float]]  # the ODConv temperature by epoch, where it anneals
    card: ModelCard

    def start_epoch(self) -> DataLoader:
        """The training loader set to the next epoch, the RNGs seeded for it
        (:func:`zoo.finetune.loaders.start_epoch`)."""
        return start_epoch(self.train_loader, self.recipe.seed, self.state.epoch, self.processes.rank)


def prepare_run(recipe: Recipe, processes: Processes) -> Run:
    """Read the data, build the model (seeded by ``recipe.seed``), its preprocessing and its training state."""
    data = Path(recipe.data) if recipe.data else digits_folder()
    split = read_image_folder(data, recipe.val_fraction, seed=recipe.seed, workers=recipe.workers)
    torch.manual_seed(recipe.seed)  # the initial weights
    model, loaded, start = build_model(recipe, len(split.classes))
    model.to(processes.device)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    if recipe.freeze_backbone:
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    input_size = (3, recipe.img_size, recipe.img_size) if recipe.img_size else None
    data_config = resolve_data_config(args=dict(input_size=input_size) if input_size else {}, model=model)
    amp_dtype, scaler = amp_settings(recipe, processes.device)
    train_tf, val_tf = transforms_for(data_config, recipe.hflip, recipe.scale, recipe.randaugment)
    train = training_loader(ImageFiles(split.train, train_tf), recipe.batch_size, recipe.workers, processes,
                            recipe.seed)
    val = validation_loader(ImageFiles(split.val, val_tf), recipe.batch_size, recipe.workers, processes)
    mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.label_smoothing,
                  num_classes=len(split.classes)) if recipe.mixup > 0 or recipe.cutmix > 0 else None
    temperature = partial(odconv_temperature, initial=recipe.temperature_initial, final=1.0,
                          anneal_epochs=recipe.temperature_epochs) \
        if anneals_temperature(recipe, model, loaded) else None
    card = ModelCard(recipe.data or DIGITS_NAME, split.classes, start, recipe.to_dict(), data_config)
    state = _training_state(recipe, model, split.classes, math.ceil(len(train) / recipe.accumulate), scaler)
    return Run(recipe, processes, split, train, val, state, _wrapped(model, recipe, processes), mixup, amp_dtype,
               temperature, card)


def _run(recipe: Recipe, processes: Processes, folder: RunFolder, resuming: bool, force: bool) -> FinetuneResult:
    """Set the run up (restored from its folder when ``resuming``), then train it epoch by epoch."""
    run = prepare_run(recipe, processes)
    rows: List[Dict[str, float]] = []
    if resuming:
        run.state.load_state_dict(folder.load_state())
        rows = folder.metrics()[:run.state.epoch]
    elif processes.is_main:
        folder.create(force)
        folder.write_recipe(recipe.to_dict())
    if processes.distributed:
        torch.distributed.barrier()  # the folder exists before any process writes to it
    if processes.is_main:
        _log_start(run)
    return _train_epochs(run, folder, rows)


def _train_epochs(run: Run, folder: RunFolder, rows: List[Dict[str, float]]) -> FinetuneResult:
    """Train, validate and (on the main process) write each remaining epoch; stop early without progress."""
    recipe, state, processes = run.recipe, run.state, run.processes
    run_start, stopped_early = time.perf_counter(), False
    while state.epoch < recipe.epochs:
        epoch_start = time.perf_counter()
        train_loss, img_s = train_one_epoch(state, run.train_model, run.start_epoch(), recipe, processes, run.mixup,
                                            run.amp_dtype, run.temperature)
        evaluation = validate(state.deployed_model, run.val_loader, len(run.split.classes), processes.device,
                              run.amp_dtype, recipe.channels_last)
        improved = state.record(evaluation)
        rows.append(dict(epoch=state.epoch, train_loss=train_loss, val_loss=evaluation.loss, val_top1=evaluation.top1,
                         val_top5=evaluation.top5, lr=state.optimizer.param_groups[0]['lr'],
                         temperature=run.temperature(state.epoch) if run.temperature else 1.0, train_img_s=img_s,
                         seconds=time.perf_counter() - epoch_start))
        if processes.is_main:
            folder.write_epoch(rows, state.deployed_model, evaluation, improved, run.card, state.state_dict())
            _log_epoch(recipe, rows[-1], evaluation)
        if recipe.patience and state.epoch - state.best_epoch >= recipe.patience and state.epoch < recipe.epochs:
            stopped_early = True
            if processes.is_main:
                _logger.info(f'no better validation top-1 for {recipe.patience} epochs: stopping early')
            break
    if processes.is_main and state.best is not None:
        folder.plot_confusion(state.best, run.split.classes)
    return FinetuneResult(folder.path, state.best_epoch, state.best, state.epoch, time.perf_counter() - run_start,
                          stopped_early)


def _log_start(run: Run) -> None:
    recipe, split, processes, anneal = run.recipe, run.split, run.processes, run.temperature is not None
    _logger.info(f'{recipe.model} on {len(split.train)} training and {len(split.val)} validation images of '
                 f'{len(split.classes)} classes, {processes.world_size} process(es) on {processes.device.type}, from '
                 f'{run.card.start}' + (f'; ODConv temperature {recipe.temperature_initial:g} -> 1 over '
                                        f'{recipe.temperature_epochs:g} epochs' if anneal else ''))
    if anneal and recipe.temperature_epochs > recipe.epochs:
        _logger.warning(f'the ODConv temperature anneals over {recipe.temperature_epochs:g} epochs but the run has '
                        f'{recipe.epochs}: it ends above 1, while validation and the exports run at 1 (the inference '
                        f'temperature); lower --temperature-epochs or train longer')


def _log_epoch(recipe: Recipe, row: Dict[str, float], evaluation: Evaluation) -> None:
    _logger.info(f'epoch {row["epoch"]}/{recipe.epochs}: train loss {row["train_loss"]:.4f}, val loss '
                 f'{evaluation.loss:.4f}, top-1 {evaluation.top1:.2f}%, top-5 {evaluation.top5:.2f}%, '
                 f'{row["train_img_s"]:.0f} img/s' + (f', temperature {row["temperature"]:.2f}'
                                                      if row['temperature'] != 1.0 else ''))
