"""``zoo finetune --task detect|segment``: torchvision's detectors and :class:`zoo.dense.FPNSegmenter` on
:func:`zoo.dense.dense_backbone`, with classification's run machinery.

The model is loaded as for classification (``--model``, ``--checkpoint``, ``--convert``; its classifier removed), its
stage features put under an FPN, then the detector (``--detector``) or the segmentation head. The run folder, recipe
precedence, ``--resume``, torchrun / DistributedDataParallel, timm's optimizer and schedule, mixed precision and the
ODConv temperature are classification's. Validation is COCO's mAP by pycocotools' ``COCOeval`` (boxes, and masks for
Mask R-CNN) for detection, the mean IoU over classes for segmentation. ``best/`` and ``last/`` hold the whole model
(``model.safetensors``, ``dense.json``; :func:`zoo.dense.load_dense_model` rebuilds it) and the backbone as a timm Hub
folder (``backbone/``, which ``dense_backbone('local-dir:RUN/best/backbone')`` loads).

Without ``--data`` the run trains on the embedded shapes data set (:mod:`zoo.finetune.shapes`).
"""
import contextlib
import io
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pycocotools import mask as coco_mask
from pycocotools.cocoeval import COCOeval
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from zoo._files import current_umask
from zoo.dense import DETECTORS, FPNSegmenter, dense_backbone, detector
from zoo.hub import move_into_place, export_hub_folder
from zoo.layers import odconv_temperature, set_temperature
from .dense_data import IGNORE_INDEX, CocoDetections, MaskImages, detection_collate, read_dense_folder
from .distributed import Processes, join_processes, leave_processes, sum_over_processes
from .loaders import start_epoch, training_loader, validation_loader
from .recipe import Recipe, RecipeError
from .run_folder import RunFolder, RunFolderError
from .shapes import shapes_folder
from .trainer import (amp_settings, anneals_temperature, build_model, open_run_folder, optimization_state,
                      optimizer_step, restore_optimization)

__all__ = ['DenseResult', 'finetune_dense']

_logger = logging.getLogger(__name__)
_SEGMENT_SIZE = 512  # segmentation's default training resolution
_METRICS = {'detect': ('map50', 'map'), 'segment': ('miou', 'pixel_acc')}
_UNSUPPORTED = ('mixup', 'cutmix', 'ema_decay', 'layer_decay', 'randaugment', 'freeze_backbone', 'compile',
                'channels_last', 'sync_bn')


@dataclass
class DenseResult:
    """What a dense run produced: its folder, the best epoch and its validation metrics (mAP@0.5 and mAP@0.5:0.95
    for detection, mean IoU and pixel accuracy for segmentation, fractions in [0, 1]), epochs run, seconds."""
    folder: Path
    best_epoch: int
    best: Dict[str, float]
    epochs_run: int
    seconds: float
    stopped_early: bool


def _check_recipe(recipe: Recipe) -> None:
    used = [f'--{name.replace("_", "-")}' for name in _UNSUPPORTED if getattr(recipe, name)]
    if used:
        raise RecipeError(f'{", ".join(used)} apply to classification only: leave them out of --task {recipe.task}')
    if recipe.task == 'segment' and recipe.detector != 'fcos':
        raise RecipeError('--detector applies to --task detect only')


def _coco_eval(coco_gt: Any, results: List[Dict[str, Any]], kind: str) -> Tuple[float, float]:
    """(mAP@0.5, mAP@0.5:0.95) of ``results`` (COCO result dicts) by pycocotools; 0 without any result."""
    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
        evaluation = COCOeval(coco_gt, coco_gt.loadRes(results), kind)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[1]), float(evaluation.stats[0])


class _DenseRun:
    """One detection or segmentation run in one process."""

    def __init__(self, recipe: Recipe, processes: Processes, folder: RunFolder, data: Path) -> None:
        _check_recipe(recipe)
        self.recipe, self.processes, self.folder = recipe, processes, folder
        self.data = read_dense_folder(data, recipe.task)
        self.data_name = recipe.data or 'the synthetic shapes (rectangles, ellipses, triangles)'
        torch.manual_seed(recipe.seed)
        self.detect = recipe.task == 'detect'
        num_classes = len(self.data.classes) + 1 if self.detect else len(self.data.classes)
        backbone_model, loaded, self.start = build_model(recipe, 0)
        self.anneal = anneals_temperature(recipe, backbone_model, loaded)
        extra_blocks = DETECTORS[recipe.detector][1] if self.detect else 'pool'
        trainable = recipe.trainable_stages if recipe.trainable_stages is not None else (3 if loaded else None)
        freeze_bn = recipe.freeze_bn if recipe.freeze_bn is not None else loaded
        backbone = dense_backbone(backbone_model, out_channels=recipe.fpn_channels, extra_blocks=extra_blocks,
                                  trainable_stages=trainable, freeze_bn=freeze_bn)
        self.backbone_model = backbone.body.model  # BatchNorm frozen in place of the original's
        self.image_size = recipe.img_size or (None if self.detect else _SEGMENT_SIZE)
        if self.detect:
            self.model = detector(recipe.detector, backbone, num_classes, self.image_size,
                                  anchor_scale=recipe.anchor_scale)
        else:
            self.model = FPNSegmenter(backbone, num_classes)
        self.model.to(processes.device)
        self.amp_dtype, self.scaler = amp_settings(recipe, processes.device)
        self.train_set, self.val_set = self._datasets()
        collate = detection_collate if self.detect else None
        self.train_loader = training_loader(self.train_set, recipe.batch_size, recipe.workers, processes, recipe.seed,
                                            collate)
        self.val_loader = validation_loader(self.val_set, recipe.batch_size, recipe.workers, processes, collate)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / recipe.accumulate)
        self.optimizer = create_optimizer_v2(self.model, opt=recipe.opt, lr=recipe.lr,
                                             weight_decay=recipe.weight_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=recipe.sched, num_epochs=recipe.epochs, warmup_epochs=recipe.warmup_epochs,
            warmup_lr=recipe.warmup_lr, min_lr=recipe.min_lr, step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch)
        self.train_model = self.model
        if processes.distributed:
            device_ids = [processes.device.index] if processes.device.type == 'cuda' else None
            # the backbone's unused layers (classifier's place, final norm) get no gradients
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids, find_unused_parameters=True)
        self.metric = _METRICS[recipe.task][0]
        self.epoch, self.best_epoch, self.best, self.rows = 0, 0, None, []

    def _datasets(self) -> Tuple[Any, Any]:
        if self.detect:
            masks = self.recipe.detector == 'maskrcnn'
            return (CocoDetections(self.data.train, True, self.recipe.hflip, masks),
                    CocoDetections(self.data.val, False, masks=masks))
        cfg = self.backbone_model.pretrained_cfg
        return tuple(MaskImages(split, self.image_size, cfg['mean'], cfg['std'], train, self.recipe.hflip)
                     for split, train in ((self.data.train, True), (self.data.val, False)))

    def _temperature(self, progress: float) -> float:
        if not self.anneal:
            return 1.0
        return odconv_temperature(progress, self.recipe.temperature_initial, 1.0, self.recipe.temperature_epochs)

    def _loss(self, images: Any, targets: Any) -> torch.Tensor:
        device = self.processes.device
        if self.detect:
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            return sum(self.train_model(images, targets).values())
        logits = self.train_model(images.to(device))['out']
        return F.cross_entropy(logits, targets.to(device), ignore_index=IGNORE_INDEX)

    def train_epoch(self, epoch: int) -> Tuple[float, float]:
        """One epoch; the mean training loss (over every process) and the images per second."""
        recipe, device = self.recipe, self.processes.device
        loader = start_epoch(self.train_loader, recipe.seed, epoch, self.processes.rank)
        autocast = torch.autocast(device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        self.train_model.train()
        loss_sum, count, start = torch.zeros((), dtype=torch.float64, device=device), 0, time.perf_counter()
        bar = tqdm(loader, desc=f'epoch {epoch + 1}/{recipe.epochs}', unit='batch', leave=False,
                   disable=not self.processes.is_main or None)
        for i, (images, targets) in enumerate(bar):
            if self.anneal:
                set_temperature(self.model, self._temperature(epoch + i / len(loader)))
            step_now = (i + 1) % recipe.accumulate == 0 or i + 1 == len(loader)
            accumulating = self.processes.distributed and not step_now
            with self.train_model.no_sync() if accumulating else contextlib.nullcontext():
                with autocast:
                    loss = self._loss(images, targets)
                (self.scaler.scale(loss) if self.scaler else loss).div(recipe.accumulate).backward()
            if step_now:
                self._step(epoch * self.steps_per_epoch + i // recipe.accumulate + 1)
            loss_sum += loss.detach().double() * len(images)
            count += len(images)
            if not bar.disable:
                bar.set_postfix(dict(loss=f'{loss_sum.item() / count:.3f}',
                                     img_s=f'{count / (time.perf_counter() - start):.1f}'), refresh=False)
        seconds = time.perf_counter() - start
        total = sum_over_processes(torch.stack([loss_sum, torch.tensor(count, dtype=torch.float64, device=device)]),
                                   device)
        return (total[0] / total[1]).item(), count * self.processes.world_size / seconds

    def _step(self, num_updates: int) -> None:
        optimizer_step(self.model, self.optimizer, self.scaler, self.recipe)
        self.scheduler.step_update(num_updates)

    # validation, saving ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """The validation metrics of :class:`DenseResult`, over every process's share."""
        set_temperature(self.model, 1.0)  # the inference temperature
        self.model.eval()
        return self._validate_detection() if self.detect else self._validate_segmentation()

    def _validate_detection(self) -> Dict[str, float]:
        boxes, masks = [], []
        category_ids = self.data.val.category_ids
        for images, targets in self.val_loader:
            outputs = self.model([image.to(self.processes.device) for image in images])
            for output, target in zip(outputs, targets):
                xyxy = output['boxes'].float().cpu()
                xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1).tolist()
                for i, (box, score, label) in enumerate(zip(xywh, output['scores'].tolist(),
                                                            output['labels'].tolist())):
                    if label == 0:  # the background's score (RetinaNet, FCOS score it like any class)
                        continue
                    result = dict(image_id=target['image_id'], category_id=category_ids[label - 1], score=score)
                    boxes.append(dict(result, bbox=box))
                    if 'masks' in output:
                        binary = (output['masks'][i, 0] > 0.5).cpu().numpy().astype(np.uint8)
                        rle = coco_mask.encode(np.asfortranarray(binary))
                        masks.append(dict(result, segmentation=dict(rle, counts=rle['counts'].decode())))
        if self.processes.distributed:
            gathered: List[Any] = [None] * self.processes.world_size
            dist.all_gather_object(gathered, (boxes, masks))
            boxes = [r for part in gathered for r in part[0]]
            masks = [r for part in gathered for r in part[1]]
        coco = self.val_set.coco
        map50, map_ = _coco_eval(coco, boxes, 'bbox')
        metrics = dict(map50=map50, map=map_)
        if self.recipe.detector == 'maskrcnn':
            metrics['mask_map50'], metrics['mask_map'] = _coco_eval(coco, masks, 'segm')
        return metrics

    def _validate_segmentation(self) -> Dict[str, float]:
        classes = len(self.data.classes)
        confusion = torch.zeros(classes, classes, dtype=torch.float64, device=self.processes.device)
        for images, masks in self.val_loader:
            predicted = self.model(images.to(self.processes.device))['out'].argmax(1)
            masks = masks.to(self.processes.device)
            kept = masks != IGNORE_INDEX
            confusion += torch.bincount(masks[kept] * classes + predicted[kept], minlength=classes ** 2).view(
                classes, classes)
        confusion = sum_over_processes(confusion, self.processes.device)
        union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
        present = union > 0
        iou = confusion.diag()[present] / union[present]
        return dict(miou=iou.mean().item() if len(iou) else 0.0,
                    pixel_acc=(confusion.diag().sum() / confusion.sum().clamp(min=1)).item())

    def state(self) -> Dict[str, Any]:
        return {
            **optimization_state(self.model, self.optimizer, self.scheduler, self.scaler), 'epoch': self.epoch,
            'best_epoch': self.best_epoch, 'best': self.best, 'classes': self.data.classes,
            'model_name': self.recipe.model, 'task': self.recipe.task, 'seed': self.recipe.seed,
        }

    def load_state(self, state: Dict[str, Any]) -> None:
        if state.get('task') != self.recipe.task or state['classes'] != self.data.classes:
            raise RunFolderError(f'{self.folder.path} is a {state.get("task", "classify")} run on classes '
                                 f'{", ".join(state["classes"][:5])}...: it cannot be resumed on these data')
        restore_optimization(state, self.model, self.optimizer, self.scheduler, self.scaler)
        self.epoch, self.best_epoch, self.best = state['epoch'], state['best_epoch'], state['best']
        self.rows = self.folder.metrics()[:self.epoch]

    def export(self, name: str, metrics: Dict[str, float], epoch: int) -> None:
        """``RUN/name/``: the backbone as a timm Hub folder, the whole model and ``dense.json``, written beside and
        renamed into place."""
        out = self.folder.path / name
        tmp = Path(tempfile.mkdtemp(prefix=f'.{name}.', dir=self.folder.path))
        try:
            export_hub_folder(self.backbone_model, tmp / 'backbone')
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(tmp / 'model.safetensors'))
            recipe = self.recipe
            record = dict(task=recipe.task, detector=recipe.detector if self.detect else None,
                          classes=self.data.classes, image_size=self.image_size, fpn_channels=recipe.fpn_channels,
                          anchor_scale=recipe.anchor_scale, out_indices=list(self.model.backbone.body.out_indices),
                          data=self.data_name, start=self.start, epoch=epoch, metrics=metrics, recipe=recipe.to_dict())
            (tmp / 'dense.json').write_text(json.dumps(record, indent=2) + '\n')
            for path in (tmp, tmp / 'model.safetensors', tmp / 'dense.json'):  # mkdtemp makes the folder private
                path.chmod((0o777 if path.is_dir() else 0o666) & ~current_umask())
            move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def end_epoch(self, epoch: int, train_loss: float, img_s: float, metrics: Dict[str, float],
                  seconds: float) -> None:
        """Record the epoch; on rank 0 write metrics, last/, best/ (when better) and the training state."""
        self.epoch = epoch + 1
        improved = self.best is None or metrics[self.metric] > self.best[self.metric]
        if improved:
            self.best, self.best_epoch = metrics, self.epoch
        first, second = _METRICS[self.recipe.task]
        self.rows.append({'epoch': self.epoch, 'train_loss': train_loss, f'val_{first}': metrics[first],
                          f'val_{second}': metrics[second], 'lr': self.optimizer.param_groups[0]['lr'],
                          'train_img_s': img_s, 'seconds': seconds})
        if not self.processes.is_main:
            return
        self.folder.write_metrics(self.rows, columns=list(self.rows[0]))
        self.export('last', metrics, self.epoch)
        if improved:
            self.export('best', metrics, self.epoch)
        self.folder.save_state(self.state())
        _logger.info(f'epoch {self.epoch}/{self.recipe.epochs}: train loss {train_loss:.4f}, '
                     + ', '.join(f'{k} {v:.3f}' for k, v in metrics.items()) + f', {img_s:.1f} img/s')


def finetune_dense(recipe: Recipe, resume: Optional[Path] = None, force: bool = False) -> DenseResult:
    """Run (or with ``resume``, continue) a detection or segmentation run of ``recipe``; see the module docstring.

    Raises:
        RecipeError, DataError, RunFolderError, CheckpointError: bad settings, data, run folder or checkpoint.
    """
    processes = join_processes()
    try:
        folder = open_run_folder(recipe, resume, force)
        run = _DenseRun(recipe, processes, folder, Path(recipe.data) if recipe.data else shapes_folder())
        if resume is not None:
            run.load_state(folder.load_state())
        elif processes.is_main:
            folder.create(force)
            folder.write_recipe(recipe.to_dict())
        if processes.distributed:
            dist.barrier()  # the folder exists before any process writes to it
        return _train(run)
    finally:
        leave_processes(processes)


def _train(run: _DenseRun) -> DenseResult:
    recipe, start, stopped_early = run.recipe, time.perf_counter(), False
    if run.processes.is_main:
        train, val = run.data.sizes
        what = recipe.detector if run.detect else 'FPN segmentation'
        _logger.info(f'{what} on {recipe.model}, {train} training and {val} validation images of '
                     f'{len(run.data.classes)} classes, {run.processes.world_size} process(es) on '
                     f'{run.processes.device.type}, from {run.start}')
    for epoch in range(run.epoch, recipe.epochs):
        epoch_start = time.perf_counter()
        train_loss, img_s = run.train_epoch(epoch)
        metrics = run.validate()
        run.end_epoch(epoch, train_loss, img_s, metrics, time.perf_counter() - epoch_start)
        if recipe.patience and run.epoch - run.best_epoch >= recipe.patience and run.epoch < recipe.epochs:
            stopped_early = True
            break
    return DenseResult(run.folder.path, run.best_epoch, run.best, run.epoch, time.perf_counter() - start,
                       stopped_early)
