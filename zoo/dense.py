"""Dense prediction: any zoo or timm model as the backbone of torchvision's detectors and segmenters.

:func:`dense_backbone` turns a model (by name, loaded through zoo's one loading path, or a module, a
:func:`zoo.replace_convs` one included) into what ``FasterRCNN``, ``MaskRCNN``, ``RetinaNet`` and ``FCOS`` take as
``backbone``: the model's stage features (timm's ``forward_intermediates``, through ``FeatureGetterNet``) under
torchvision's ``FeaturePyramidNetwork``, with ``out_channels`` set. The detection conventions are the defaults:
BatchNorm frozen (timm's ``freeze_batch_norm_2d``: statistics and affine fixed, as at batch sizes of 1-2 per GPU
they cannot be estimated) and the first stages frozen. ODConv's attention BatchNorm (over pooled (B, C) vectors, a
``BatchNorm1d``) stays trainable: with a batch of one it normalises with its running statistics, so batch 1 trains.

:class:`FPNSegmenter` is the semantic segmentation model: a light head on the FPN levels to per-pixel logits, in
torchvision's segmentation output format (``{'out': (B, classes, H, W)}``).
"""
import json
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import freeze_batch_norm_2d
from timm.models._features import FeatureGetterNet
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from zoo.models import check_timm_model_name, create_model_from_checkpoint

__all__ = ['DETECTORS', 'DenseBackbone', 'EXTRA_BLOCKS', 'FPNSegmenter', 'dense_backbone', 'detector',
           'load_dense_model']

# the FPN's extra levels: Faster / Mask R-CNN pool P5 into P6, RetinaNet and FCOS add P6 and P7 by strided convs;
# each with (the number of stages it takes features from by default: strides 4-32, resp. 8-32; its extra levels)
EXTRA_BLOCKS = {'pool': (4, 1), 'p6p7': (3, 2), None: (4, 0)}

# torchvision's detectors, the FPN extra levels each expects, and its anchor sizes per level as multiples of the
# level's stride (torchvision's defaults at the default levels: 32-512 px over strides 4-64 for Faster / Mask R-CNN,
# 32-512 px times 2^(0, 1/3, 2/3) over strides 8-128 for RetinaNet, FCOS's 8-128 px scale references)
DETECTORS = {
    'fasterrcnn': (FasterRCNN, 'pool', (8.,)),
    'maskrcnn': (MaskRCNN, 'pool', (8.,)),
    'retinanet': (RetinaNet, 'p6p7', (4., 4. * 2 ** (1 / 3), 4. * 2 ** (2 / 3))),
    'fcos': (FCOS, 'p6p7', (1.,)),
}


class DenseBackbone(nn.Module):
    """Stage features of a model, under a feature pyramid (or not): (B, 3, H, W) -> OrderedDict of (B, C, H/s, W/s).

    Keys are '0', '1', ... from the finest level (then 'pool' or 'p6', 'p7' with an FPN), as torchvision's
    ``BackboneWithFPN`` names them, so its detectors' RoI poolers and anchor generators find them.

    Attributes:
        body: The model wrapped by timm's ``FeatureGetterNet``; ``body.model`` is the model itself.
        fpn: torchvision's ``FeaturePyramidNetwork``, or None.
        extra_blocks: The FPN's extra levels ('pool', 'p6p7' or None).
        out_channels: Channels of every output with an FPN; of the last stage without.
        channels: Channels of each stage feature.
        reductions: Stride of each stage feature.
        strides: Stride of each output, the extra levels' included.
    """

    def __init__(self, body: FeatureGetterNet, fpn: Optional[FeaturePyramidNetwork] = None,
                 extra_blocks: Optional[str] = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.extra_blocks = extra_blocks if fpn is not None else None
        self.channels: List[int] = body.feature_info.channels()
        self.reductions: List[int] = body.feature_info.reduction()
        self.out_channels = fpn.layer_blocks[0].out_channels if fpn is not None else self.channels[-1]
        extra_levels = EXTRA_BLOCKS[self.extra_blocks][1]
        self.strides = self.reductions + [self.reductions[-1] * 2 ** (i + 1) for i in range(extra_levels)]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = OrderedDict((str(i), f) for i, f in enumerate(self.body(x)))
        return self.fpn(features) if self.fpn is not None else features


def _load(model: str, pretrained: bool, checkpoint: Optional[Union[str, Path]]) -> nn.Module:
    """The model by name with zoo's loading (``checkpoint=`` files in any layout zoo reads, ``hf-hub:``,
    ``local-dir:``); a fine-tuned model keeps its own classes (the head is dropped later)."""
    check_timm_model_name(model)
    if checkpoint is not None:
        if model.startswith(('hf-hub:', 'local-dir:')):
            raise ValueError(f'checkpoint= goes with a model name, not with {model}: its folder holds the weights')
        return create_model_from_checkpoint(model, checkpoint)
    return timm.create_model(model, pretrained=pretrained or model.startswith(('hf-hub:', 'local-dir:')))


def _default_out_indices(model: nn.Module, levels: int) -> List[int]:
    """The last stage of each of the ``levels`` coarsest strides up to 32 (for a ResNet: layer1-4 for 4)."""
    last_of_stride: Dict[int, int] = {}
    for i, info in enumerate(model.feature_info):
        if info['reduction'] <= 32:
            last_of_stride[info['reduction']] = i
    return [last_of_stride[r] for r in sorted(last_of_stride)][-levels:]


def _freeze_stages(model: nn.Module, trainable_stages: int) -> None:
    """Stop the gradients of every parameter before the last ``trainable_stages`` stages of ``feature_info`` (the
    stem and the first stages: torchvision's ``trainable_layers``)."""
    stages = [info['module'] for info in model.feature_info]
    if trainable_stages >= len(stages):
        return
    first = stages[len(stages) - trainable_stages] + '.'
    names = [name for name, _ in model.named_parameters()]
    if not any(name.startswith(first) for name in names):
        raise ValueError(f'{type(model).__name__}: no parameters under stage {first[:-1]!r} to start training from')
    for name, parameter in model.named_parameters():
        if name.startswith(first):
            break
        parameter.requires_grad_(False)


def _extra_block(extra_blocks: Optional[str], out_channels: int) -> Optional[ExtraFPNBlock]:
    if extra_blocks == 'pool':
        return LastLevelMaxPool()
    return LastLevelP6P7(out_channels, out_channels) if extra_blocks == 'p6p7' else None


def dense_backbone(
        model: Union[str, nn.Module],
        pretrained: bool = False,
        checkpoint: Optional[Union[str, Path]] = None,
        out_indices: Optional[Sequence[int]] = None,
        fpn: bool = True,
        out_channels: int = 256,
        extra_blocks: Optional[str] = 'pool',
        trainable_stages: Optional[int] = 3,
        freeze_bn: bool = True,
) -> DenseBackbone:
    """A backbone for torchvision's detectors and segmenters from any zoo or timm model; see the module docstring.

    Args:
        model: A zoo or timm model name (``MODEL[.TAG]``, ``hf-hub:ORG/NAME``, ``local-dir:DIR``) or a timm model
            (one with ``feature_info`` and ``forward_intermediates``, a ``zoo.replace_convs`` model included).
            A module is used as it is, in place.
        pretrained: Load the model's published weights (always for ``hf-hub:`` / ``local-dir:``).
        checkpoint: Load the weights of this file instead (any layout zoo reads).
        out_indices: Indices into the model's ``feature_info`` of the stages to take; by default the last stage of
            each stride, the four coarsest (strides 4-32) for ``extra_blocks='pool'``, three (8-32) for 'p6p7'.
        fpn: Put torchvision's ``FeaturePyramidNetwork`` over the stages; False returns the stage features.
        out_channels: Channels of the FPN levels.
        extra_blocks: The FPN's extra levels: 'pool' (a max-pooled P6, for Faster / Mask R-CNN), 'p6p7' (P6 and P7
            by strided convs, for RetinaNet and FCOS) or None.
        trainable_stages: How many of the last stages train; the parameters before them are frozen. None: all.
        freeze_bn: Replace every BatchNorm2d (and timm's BatchNormAct2d) by its frozen form. For an untrained model
            pass False (and ``trainable_stages=None``): timm's ResNets start each block's last BatchNorm at zero,
            which frozen would leave the residual branches without gradients.
    Returns:
        A :class:`DenseBackbone`; the model's classifier is removed.
    """
    if extra_blocks not in EXTRA_BLOCKS:
        raise ValueError(f'unknown extra_blocks {extra_blocks!r}: use "pool" (Faster / Mask R-CNN), "p6p7" '
                         f'(RetinaNet, FCOS) or None')
    if isinstance(model, str):
        model = _load(model, pretrained, checkpoint)
    elif pretrained or checkpoint is not None:
        raise ValueError('pretrained= and checkpoint= go with a model name: a module is used with its own weights')
    if not hasattr(model, 'forward_intermediates') or not getattr(model, 'feature_info', None):
        raise ValueError(f'{type(model).__name__} has no timm feature_info / forward_intermediates: give a timm or zoo '
                         f'model (timm.create_model), or use torchvision\'s own backbones for other networks')
    if hasattr(model, 'reset_classifier'):
        model.reset_classifier(0)
    out_indices = list(out_indices) if out_indices is not None else _default_out_indices(
        model, EXTRA_BLOCKS[extra_blocks if fpn else None][0])
    if trainable_stages is not None:
        _freeze_stages(model, trainable_stages)
    if freeze_bn:
        model = freeze_batch_norm_2d(model)
    # prune=False: the model keeps every layer, so its weights stay those of a whole model (best/ folders export it)
    body = FeatureGetterNet(model, out_indices=out_indices, prune=False)
    if not fpn:
        return DenseBackbone(body)
    pyramid = FeaturePyramidNetwork(body.feature_info.channels(), out_channels,
                                    extra_blocks=_extra_block(extra_blocks, out_channels))
    return DenseBackbone(body, pyramid, extra_blocks)


def detector(kind: str, backbone: DenseBackbone, num_classes: int, image_size: Optional[int] = None,
             anchor_scale: float = 1.0, **kwargs) -> nn.Module:
    """torchvision's detector ``kind`` ('fasterrcnn', 'maskrcnn', 'retinanet', 'fcos') on ``backbone``.

    Args:
        kind: The detector; ``backbone`` must have the FPN extra levels it expects (``DETECTORS``).
        backbone: A :class:`DenseBackbone` with an FPN.
        num_classes: Classes including the background, label 0 (torchvision's convention).
        image_size: Resize images to this size (shorter and longer side); torchvision's 800 / 1333 if None.
        anchor_scale: Multiplies every anchor size (below 1 for objects smaller than at COCO's scales).
        **kwargs: Further arguments of the detector class.
    Returns:
        The detector, normalising images with the backbone model's mean and std.
    """
    if kind not in DETECTORS:
        raise ValueError(f'unknown detector {kind!r}: use one of {", ".join(DETECTORS)}')
    detector_cls, extra_blocks, multiples = DETECTORS[kind]
    if backbone.fpn is None or backbone.extra_blocks != extra_blocks:
        raise ValueError(f'{kind} needs dense_backbone(..., extra_blocks={extra_blocks!r}) (with an FPN)')
    sizes = tuple(tuple(int(round(m * s * anchor_scale)) for m in multiples) for s in backbone.strides)
    ratios = ((1.0,) if kind == 'fcos' else (0.5, 1.0, 2.0),) * len(backbone.strides)
    cfg = backbone.body.model.pretrained_cfg
    if image_size is not None:
        kwargs = dict(min_size=image_size, max_size=image_size, **kwargs)
    anchors = AnchorGenerator(sizes, ratios)
    key = 'rpn_anchor_generator' if kind in ('fasterrcnn', 'maskrcnn') else 'anchor_generator'
    return detector_cls(backbone, num_classes=num_classes, image_mean=list(cfg['mean']), image_std=list(cfg['std']),
                        **{key: anchors}, **kwargs)


class FPNSegmenter(nn.Module):
    """Semantic segmentation on a :class:`DenseBackbone` with an FPN: each pyramid level (strides up to 32) through a
    3x3 conv, GroupNorm and ReLU, upsampled to the finest level and summed, then a 1x1 conv to class logits,
    upsampled to the input size. (B, 3, H, W) -> ``{'out': (B, num_classes, H, W)}``."""

    def __init__(self, backbone: DenseBackbone, num_classes: int, channels: int = 128) -> None:
        super().__init__()
        if backbone.fpn is None:
            raise ValueError('FPNSegmenter needs a dense_backbone with fpn=True; on stage features (fpn=False) use '
                             "torchvision's DeepLabHead(backbone.out_channels, num_classes)")
        self.backbone = backbone
        self.levels = len(backbone.reductions)  # the extra levels (pool, p6, p7) are too coarse to help
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(backbone.out_channels, channels, 3, padding=1, bias=False),
                          nn.GroupNorm(min(32, channels), channels), nn.ReLU(inplace=True))
            for _ in range(self.levels))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        levels = list(self.backbone(x).values())[:self.levels]
        size = levels[0].shape[-2:]
        fused = sum(F.interpolate(layer(f), size=size, mode='bilinear', align_corners=False) if i else layer(f)
                    for i, (layer, f) in enumerate(zip(self.lateral, levels)))
        logits = self.classifier(fused)
        return {'out': F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=False)}


def load_dense_model(folder: Union[str, Path]) -> nn.Module:
    """The detector or segmenter of a ``zoo finetune --task detect|segment`` folder (``RUN/best``), in eval mode.

    The folder holds ``dense.json`` (task, detector, classes, image size, pyramid), ``model.safetensors`` (the whole
    model) and ``backbone/`` (the backbone as a timm Hub folder, loaded through ``local-dir:``).
    """
    folder = Path(folder)
    try:
        record = json.loads((folder / 'dense.json').read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
        raise ValueError(f'{folder}: not a detection or segmentation model folder (no readable dense.json)') from e
    detect = record['task'] == 'detect'
    backbone = dense_backbone(f'local-dir:{folder / "backbone"}', out_indices=record['out_indices'],
                              out_channels=record['fpn_channels'],
                              extra_blocks=DETECTORS[record['detector']][1] if detect else 'pool',
                              trainable_stages=None)
    if detect:
        model = detector(record['detector'], backbone, len(record['classes']) + 1, record['image_size'],
                         anchor_scale=record['anchor_scale'])
    else:
        model = FPNSegmenter(backbone, len(record['classes']))
    model.load_state_dict(load_file(str(folder / 'model.safetensors')))
    return model.eval()
