"""timm-native model families; importing this package registers every entrypoint with timm."""
import difflib
from typing import Any, List, Optional, Sequence, Tuple

import timm

from torch import nn

from zoo.errors import ModelNameError, WeightsUnavailableError
from ._builder import create_model_from_checkpoint
from ._manifest import MANIFEST_PATH, WeightsSource, hub_org, load_manifest, mirror_repo, origin_source, \
    update_manifest, weights_location, weights_sources
from ._pretrained import pick_checkpoint, pretrained_weights_file
from .efficientmod import EfficientMod
from .odconv_mobilenetv2 import ODMobileNetV2
from .odconv_resnet import ODResNet
from .replaced_convs import OPS, ReplaceReport, replace_convs
from .van import VAN
from .xvolution_resnet import XVolutionResNet

__all__ = [
    'FAMILY_MODULES', 'OPS', 'EfficientMod', 'ODMobileNetV2', 'ODResNet', 'ReplaceReport', 'VAN', 'XVolutionResNet',
    'replace_convs',
    'MANIFEST_PATH', 'WeightsSource', 'check_timm_model_name', 'create_model_from_checkpoint',
    'create_pretrained_model', 'hub_org', 'list_zoo_models', 'load_manifest', 'mirror_repo', 'origin_source', 'pick_checkpoint',
    'pretrained_weights_file', 'resolve_model_name', 'update_manifest', 'weights_location', 'weights_sources',
]

# timm records a model's module as the last component of its Python module name
FAMILY_MODULES = ('van', 'odconv_resnet', 'odconv_mobilenetv2', 'efficientmod', 'xvolution_resnet')


def list_zoo_models(pattern: str = '*') -> List[str]:
    """Names of the timm models zoo registers, matching a shell-style ``pattern``."""
    return sorted(name for module in FAMILY_MODULES for name in timm.list_models(pattern, module=module))


_LOOKALIKES = str.maketrans({'o': '0', 'O': '0', 'l': '1', 'I': '1', '-': '_'})  # van_bo -> van_b0


def _unknown_model(model: str, known: Sequence[str], where: str) -> ModelNameError:
    lookalike = model.translate(_LOOKALIKES)
    close = [lookalike] if lookalike in known else difflib.get_close_matches(model, known, n=3, cutoff=0.75)
    hint = f'did you mean {" or ".join(close)}? ' if close else ''
    return ModelNameError(f'unknown model {model!r}: {hint}{where}')


def resolve_model_name(name: str) -> Tuple[str, Optional[str]]:
    """``MODEL`` or ``MODEL.TAG`` of a zoo model -> (model, tag or None); a clear error for anything else."""
    model, _, tag = name.partition('.')
    if model not in list_zoo_models():
        raise _unknown_model(model, list_zoo_models(), '`zoo list` shows the models zoo registers')
    if tag and name not in timm.list_models(model, include_tags=True):
        known = ', '.join(t.split('.', 1)[1] for t in timm.list_models(model, include_tags=True))
        raise ModelNameError(f'unknown tag {tag!r} for {model}: it has {known}')
    return model, tag or None


def check_timm_model_name(name: str) -> None:
    """Raise a clear error unless ``name`` is a timm model (zoo's included), ``MODEL.TAG``, ``hf-hub:`` or
    ``local-dir:``."""
    if name.startswith(('hf-hub:', 'local-dir:')):
        return
    model = name.partition('.')[0]
    if not timm.is_model(model):
        raise _unknown_model(model, timm.list_models(), '`zoo list` shows zoo\'s models, timm.list_models() all')


def create_pretrained_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True, **kwargs)``; weights that cannot be read (a missing ``local-dir:``
    folder, an unknown or unreachable Hub repo, a download that is not in the cache offline) raise a
    :class:`~zoo.errors.WeightsUnavailableError` that names the model and the reason."""
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as e:  # the file system's and huggingface_hub's errors (the latter's HTTP errors included)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsUnavailableError(f'cannot load the weights of {name}: {reason} (check the name, the folder or '
                                      f'the network)') from e
