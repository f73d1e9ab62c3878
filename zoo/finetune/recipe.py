"""A fine-tuning recipe: every setting of a ``zoo finetune`` run, from defaults, a YAML file and command-line flags.

Precedence, lowest first: the defaults below (for the embedded digits data set, :data:`DIGITS_DEFAULTS` over them),
a ``--config`` YAML file, then the flags given on the command line. The resolved recipe is written to the run folder
as ``config.yaml``, which ``--config`` reads back.
"""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import yaml

from zoo.errors import ZooError

__all__ = ['DIGITS_DEFAULTS', 'SHAPES_DEFAULTS', 'Recipe', 'RecipeError', 'load_recipe_file', 'recipe_for_run',
           'resolve_recipe']


class RecipeError(ZooError, ValueError):
    """A recipe file or setting that cannot be used."""


def _setting(default: Any, help_text: str) -> Any:
    """A recipe field: its default and the help of its command-line flag."""
    return field(default=default, metadata={'help': help_text})


@dataclass
class Recipe:
    """Every setting of a fine-tuning run (the flags of ``zoo finetune`` are these names with dashes)."""
    # model
    model: str = _setting('van_b0', 'zoo or timm name, MODEL.TAG, hf-hub:ORG/NAME or local-dir:DIR')
    pretrained: bool = _setting(True, "start from the model's published weights")
    checkpoint: Optional[str] = _setting(None, 'start from this checkpoint file instead (any layout zoo reads)')
    drop_path: Optional[float] = _setting(None, "stochastic depth rate; the model's default if None")
    convert: Optional[str] = _setting(None, "replace the model's convs first: 'odconv', 'xvolution' or 'xvolution_sa'")
    convert_include: Optional[str] = _setting(None, 'comma-separated module-name globs of the convs to replace; '
                                                    "the papers' placement if none")
    convert_kernel_num: int = _setting(1, 'kernels per ODConv when converting to odconv')
    # data
    data: Optional[str] = _setting(None, 'ImageFolder root (train/ and val/, or class folders); none: the digits')
    val_fraction: float = _setting(0.2, 'held out for validation when the folder has no val/')
    img_size: Optional[int] = _setting(None, "training and validation resolution; the pretrained cfg's if None")
    batch_size: int = _setting(32, 'per process')
    workers: int = _setting(2, 'DataLoader worker processes per process')
    hflip: float = _setting(0.5, 'probability of a horizontal flip')
    scale: Tuple[float, float] = _setting((0.08, 1.0), "RandomResizedCrop's area range")
    randaugment: Optional[str] = _setting(None, "timm auto_augment string, e.g. 'rand-m9-mstd0.5-inc1'")
    mixup: float = _setting(0.0, 'mixup alpha (0: off)')
    cutmix: float = _setting(0.0, 'cutmix alpha (0: off)')
    label_smoothing: float = _setting(0.1, 'label smoothing of the cross-entropy')
    # optimisation
    epochs: int = _setting(10, 'epochs to train')
    opt: str = _setting('adamw', "timm optimizer name (create_optimizer_v2), e.g. 'adamw', 'sgd', 'lamb'")
    lr: float = _setting(5e-4, 'for a batch of batch_size * processes * accumulate images')
    weight_decay: float = _setting(0.05, 'decoupled weight decay (not on biases and norms)')
    layer_decay: Optional[float] = _setting(None, "layer-wise lr decay by the model's group_matcher")
    sched: str = _setting('cosine', "timm scheduler name (create_scheduler_v2), e.g. 'cosine', 'step'")
    warmup_epochs: int = _setting(1, 'epochs of linear lr warmup')
    warmup_lr: float = _setting(1e-6, 'lr the warmup starts from')
    min_lr: float = _setting(1e-6, 'lr the schedule ends at')
    accumulate: int = _setting(1, 'batches per optimizer step')
    clip_grad: Optional[float] = _setting(None, 'clip gradients to this norm (or value, see clip_mode)')
    clip_mode: str = _setting('norm', "'norm', 'value' or 'agc'")
    ema_decay: Optional[float] = _setting(None, "model EMA (timm's ModelEmaV3) when set, e.g. 0.999")
    freeze_backbone: bool = _setting(False, 'train the classifier only (linear probe)')
    patience: Optional[int] = _setting(None, 'stop after this many epochs without a better validation top-1')
    odconv_temperature: str = _setting(
        'auto', "ODConv attention temperature: 'auto' anneals only when the ODConv layers start untrained, "
        "'anneal' always, 'off' keeps 1")
    temperature_initial: float = _setting(30.0, 'ODConv temperature at the start of an annealing')
    temperature_epochs: float = _setting(10.0, 'epochs over which the ODConv temperature falls to 1')
    # speed
    amp: Optional[str] = _setting(None, "'bf16' or 'fp16' mixed precision where the device supports it")
    channels_last: bool = _setting(False, 'model and images in channels_last memory')
    compile: bool = _setting(False, 'torch.compile the model')
    sync_bn: bool = _setting(False, 'SyncBatchNorm across processes (CUDA)')
    seed: int = _setting(0, 'seed of the data split, initialisation, augmentation and order')
    # dense prediction (zoo.finetune.dense_trainer)
    task: str = _setting('classify', "'classify' (image folder), 'detect' (COCO folder) or 'segment' (mask folder)")
    detector: str = _setting('fcos', "torchvision detector for --task detect: 'fcos', 'retinanet', 'fasterrcnn' or "
                                     "'maskrcnn'")
    fpn_channels: int = _setting(256, 'channels of the feature pyramid (detect, segment)')
    anchor_scale: float = _setting(1.0, "multiplies the detector's anchor sizes (below 1 for small objects)")
    trainable_stages: Optional[int] = _setting(None, 'backbone stages that train (detect, segment); None: 3 for a '
                                                     'trained backbone, all for an untrained one')
    freeze_bn: Optional[bool] = _setting(None, "frozen backbone BatchNorm (detect, segment); None: for a trained "
                                               "backbone only")
    output: Optional[str] = _setting(None, 'run folder; runs/MODEL-DATA if None')

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# the embedded default: a small zoo model trained from scratch on scikit-learn's 8x8 digits, upscaled, in minutes on
# a CPU (nothing to download, so no pretrained weights); no flips, mild crops (digits are not mirror-symmetric)
DIGITS_DEFAULTS: Dict[str, Any] = dict(
    model='van_b0', pretrained=False, img_size=32, batch_size=64, epochs=12, lr=2e-3, weight_decay=0.05,
    warmup_epochs=1, hflip=0.0, scale=(0.6, 1.0), label_smoothing=0.1)
# the embedded dense default: the synthetic shapes (zoo.finetune.shapes) from scratch, under ten minutes on a CPU
SHAPES_DEFAULTS: Dict[str, Any] = dict(
    model='resnet10t', pretrained=False, img_size=96, batch_size=8, epochs=8, lr=1e-3, weight_decay=0.05,
    warmup_epochs=1, fpn_channels=64)

_RESUMABLE_CHANGES = ('workers',)  # settings that do not change what a resumed run computes

_CHOICES = {
    'clip_mode': ('norm', 'value', 'agc'), 'odconv_temperature': ('auto', 'anneal', 'off'),
    'amp': (None, 'bf16', 'fp16'), 'convert': (None, 'odconv', 'xvolution', 'xvolution_sa'),
    'task': ('classify', 'detect', 'segment'), 'detector': ('fcos', 'retinanet', 'fasterrcnn', 'maskrcnn'),
}


def _coerce(name: str, value: Any, default: Any, annotation: Any) -> Any:
    """``value`` of setting ``name`` as its field's type, or a RecipeError that says what was expected."""
    if value is None:
        return None
    if annotation in (Tuple[float, float], 'Tuple[float, float]'):
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise RecipeError(f'recipe setting {name!r} must be two numbers, got {value!r}')
        return tuple(float(v) for v in value)
    kind = type(default) if default is not None else _optional_type(annotation)
    if kind is bool:
        if not isinstance(value, bool):
            raise RecipeError(f'recipe setting {name!r} must be true or false, got {value!r}')
        return value
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise RecipeError(f'recipe setting {name!r} must be a {kind.__name__}, got {value!r}') from e


def _optional_type(annotation: Any) -> type:
    args = [a for a in getattr(annotation, '__args__', ()) if a is not type(None)]
    return args[0] if args else str


def resolve_recipe(*layers: Mapping[str, Any]) -> Recipe:
    """A recipe from the defaults overlaid by ``layers`` in order; unknown settings and bad values are refused."""
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    defaults = Recipe()
    values: Dict[str, Any] = {}
    for layer in layers:
        unknown = sorted(set(layer) - set(fields))
        if unknown:
            raise RecipeError(f'unknown recipe setting {", ".join(map(repr, unknown))}: the settings are '
                              f'{", ".join(fields)}')
        for name, value in layer.items():
            values[name] = _coerce(name, value, getattr(defaults, name), fields[name].type)
    for name, allowed in _CHOICES.items():
        if name in values and values[name] not in allowed:
            raise RecipeError(f'recipe setting {name!r} must be one of {", ".join(map(str, allowed))}, '
                              f'got {values[name]!r}')
    recipe = dataclasses.replace(defaults, **values)
    for name in ('epochs', 'batch_size', 'accumulate'):
        if getattr(recipe, name) < 1:
            raise RecipeError(f'recipe setting {name!r} must be at least 1, got {getattr(recipe, name)}')
    if not 0 < recipe.val_fraction < 1:
        raise RecipeError(f'recipe setting \'val_fraction\' must be between 0 and 1, got {recipe.val_fraction}')
    return recipe


def load_recipe_file(path: Union[str, Path]) -> Dict[str, Any]:
    """The settings in a YAML recipe file (checked when resolved)."""
    path = Path(path)
    try:
        settings = yaml.safe_load(path.read_text(encoding='utf-8'))
    except OSError as e:
        raise RecipeError(f'{path}: cannot read the recipe ({e.strerror or e})') from e
    except yaml.YAMLError as e:
        raise RecipeError(f'{path}: not a YAML recipe ({" ".join(str(e).split())})') from e
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise RecipeError(f'{path}: a recipe is a mapping of settings, not a {type(settings).__name__}')
    return settings


def recipe_for_run(flags: Mapping[str, Any], config: Optional[Union[str, Path]] = None,
                   resumed: Optional[Mapping[str, Any]] = None) -> Recipe:
    """The recipe of a run: ``flags`` (the settings given on the command line) over a ``config`` file over the
    defaults, or, when resuming, over the ``resumed`` run's recipe. Without data anywhere, the embedded digits
    defaults (the shapes defaults for --task detect / segment) apply under the config file and the flags."""
    if resumed is not None:
        given = resolve_recipe(flags).to_dict()
        changed = sorted('--' + k.replace('_', '-') for k in flags
                         if k not in _RESUMABLE_CHANGES and given[k] != resumed.get(k))
        if changed:
            verb = 'differs' if len(changed) == 1 else 'differ'
            raise RecipeError(f'a resumed run keeps its recipe: {", ".join(changed)} {verb} from the run\'s; start a '
                              f'new run (--output) to change it')
        return resolve_recipe(resumed, flags)
    from_file = load_recipe_file(config) if config else {}
    base: Dict[str, Any] = {}
    if not (flags.get('data') or from_file.get('data')):
        dense = flags.get('task', from_file.get('task', 'classify')) != 'classify'
        base = SHAPES_DEFAULTS if dense else DIGITS_DEFAULTS
    return resolve_recipe(base, from_file, flags)
