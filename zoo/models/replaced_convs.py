"""Plug-and-play: ODConv and X-volution in any CNN, warm-started from its weights.

Both papers present their operator as a drop-in for the convolutions of an existing network. :func:`replace_convs`
does the replacement on any ``nn.Module`` (a timm model, a torchvision model or backbone, a user's own network):

* ``'odconv'``: every selected conv becomes an ``ODConv2d`` whose static kernels start from the conv's weight. Its
  attention heads (the last layer of the attention branch) start at zero, as a new residual branch's last layer does
  in zero-init practice: every sigmoid attention is then exactly 0.5 and the kernel softmax uniform, at any
  temperature, whatever the input; the kernels are the original weight divided by the product of those 0.5s (and,
  for kernel_num > 1, given zero-sum noise that breaks their symmetry without changing their mean). The converted
  network therefore computes what the original computed, to float rounding (measured in the tests); the heads learn
  from the first step, the attention's first layer from the second, once the heads are no longer zero.
* ``'xvolution'`` / ``'xvolution_sa'``: every selected 3x3 conv becomes an ``XVolution2d`` (PSSA / global
  self-attention) whose convolution branch is the original conv and, where one follows it, its BatchNorm; the
  attention branch's BatchNorm starts at zero, so the network computes exactly what it computed before.

A BatchNorm that follows a replaced conv (found in the traced graph, or by ``convN`` -> ``bnN`` names) moves in with
it (for ODConv into a ``ConvNorm``), so ``timm.utils.reparameterize_model`` folds it for deployment. A timm model
remembers its replacement: exported (``export_hub_folder``, ``save_for_hf``) its config.json names the
``replaced_convs`` architecture below with the base model and the replacement, which ``local-dir:`` / ``hf-hub:``
rebuild.
"""
import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from timm.layers import BatchNormAct2d, get_notrace_modules
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops.misc import FrozenBatchNorm2d

from zoo.layers import ConvNorm, ODConv2d, XVolution2d

__all__ = ['OPS', 'ReplaceReport', 'replace_convs']

OPS = ('odconv', 'xvolution', 'xvolution_sa')
_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)
_KERNEL_NOISE = 0.01  # of the weight's standard deviation: breaks the symmetry of kernel_num > 1 kernels


@dataclass
class ReplaceReport:
    """What :func:`replace_convs` did: the convs replaced (name, what they became) and skipped (name, why), and the
    parameters and multiply-accumulates (torch's FLOP counter, one image of ``input_size``) before and after."""
    op: str
    replaced: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None
    input_size: Tuple[int, ...] = ()

    def __str__(self) -> str:
        lines = [f'{self.op}: {len(self.replaced)} convs replaced, {len(self.skipped)} skipped']
        width = max([len(name) for name, _ in self.replaced + self.skipped] + [6])
        lines += [f'  {name:<{width}}  -> {what}' for name, what in self.replaced]
        lines += [f'  {name:<{width}}  skipped: {why}' for name, why in self.skipped]
        lines.append(f'  parameters: {self.params_before / 1e6:.3f} M -> {self.params_after / 1e6:.3f} M')
        if self.macs_before is not None and self.macs_after is not None:
            lines.append(f'  MACs at {tuple(self.input_size)}: {self.macs_before / 1e9:.3f} G -> '
                         f'{self.macs_after / 1e9:.3f} G')
        return '\n'.join(lines)


def _unsupported(conv: nn.Conv2d, op: str) -> Optional[str]:
    """Why ``op`` cannot replace ``conv`` (None if it can)."""
    if type(conv) is not nn.Conv2d:
        return f'{type(conv).__name__} is a Conv2d with its own forward'
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (numbers only)"
    if conv.padding_mode != 'zeros':
        return f'padding_mode={conv.padding_mode!r} (zeros only)'
    square = all(len(set(v)) == 1 for v in (conv.kernel_size, conv.stride, conv.padding, conv.dilation))
    if not square:
        return 'asymmetric kernel, stride, padding or dilation'
    if op == 'odconv':
        return None
    if conv.kernel_size != (3, 3):
        return f'{conv.kernel_size[0]}x{conv.kernel_size[1]} kernel (X-volution replaces 3x3 convs)'
    if conv.bias is not None:
        return 'has a bias (X-volution\'s conv branch has none)'
    if conv.groups != 1:
        return f'groups={conv.groups} (X-volution replaces dense convs)'
    if conv.padding != conv.dilation:
        return f'padding {conv.padding[0]} with dilation {conv.dilation[0]} changes the output size'
    if op == 'xvolution_sa' and conv.dilation != (1, 1):
        return 'dilated (global self-attention has no dilated form)'
    return None


class _NormFinder(fx.Tracer):
    """Traces a model with norms (and timm's untraceable modules) as leaves, to see which norm each conv feeds."""

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, (*_NORMS, nn.Conv2d, *get_notrace_modules())) or super().is_leaf_module(m, name)


def _norm_after(model: nn.Module) -> Dict[str, str]:
    """conv name -> the name of the norm that alone consumes its output."""
    modules = dict(model.named_modules())
    pairs: Dict[str, str] = {}
    try:
        graph = _NormFinder().trace(model)
    except Exception:  # an untraceable model: the names are all there is to go by
        graph = None
    if graph is not None:
        for node in graph.nodes:
            if node.op == 'call_module' and isinstance(modules.get(node.target), nn.Conv2d):
                users = list(node.users)
                if len(users) == 1 and users[0].op == 'call_module' and isinstance(modules.get(users[0].target),
                                                                                   _NORMS):
                    pairs[node.target] = users[0].target
        return pairs
    for name, module in modules.items():
        if isinstance(module, nn.Conv2d):
            parent, _, leaf = name.rpartition('.')
            for candidate in (leaf.replace('conv', 'bn'), leaf.replace('conv', 'norm')):
                target = f'{parent}.{candidate}' if parent else candidate
                if candidate != leaf and isinstance(modules.get(target), _NORMS):
                    pairs[name] = target
    return pairs


def _default_include(model: nn.Module, op: str) -> List[str]:
    """The papers' placement: ODConv every conv (the stem is excluded elsewhere); X-volution the 3x3 convs of the stage
    at stride 16 (stage 3, 14 x 14 at 224 px), found from timm's feature_info or a torchvision ResNet's layer3."""
    if op == 'odconv':
        return ['*']
    stages = [f['module'] for f in getattr(model, 'feature_info', []) or [] if f.get('reduction') == 16]
    if stages:
        return [f'{stages[-1]}.*']
    if isinstance(getattr(model, 'layer3', None), nn.Module):
        return ['layer3.*']
    raise ValueError(f'{type(model).__name__} has no feature_info to find its stride-16 stage: name the X-volution '
                     f'convs with include=, e.g. include=["layer3.*"]')


def _without_norm_act(norm: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """(the norm alone, what remains in its place): a BatchNormAct2d leaves its dropout and activation behind."""
    if isinstance(norm, BatchNormAct2d):
        plain = nn.BatchNorm2d(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats,
                               device=norm.running_mean.device, dtype=norm.running_mean.dtype)
        plain.load_state_dict(norm.state_dict(), strict=False)
        return plain.train(norm.training), nn.Sequential(norm.drop, norm.act)
    return norm, nn.Identity()


@torch.no_grad()
def _odconv_from(conv: nn.Conv2d, kernel_num: int, reduction: float, generator: torch.Generator) -> ODConv2d:
    """An ODConv2d that computes what ``conv`` computes until it is trained; see the module docstring."""
    odconv = ODConv2d(conv.in_channels, conv.out_channels, conv.kernel_size[0], stride=conv.stride[0],
                      padding=conv.padding[0], dilation=conv.dilation[0], groups=conv.groups, reduction=reduction,
                      kernel_num=kernel_num, device=conv.weight.device, dtype=conv.weight.dtype)
    attention = odconv.attention
    sigmoids = 0
    for head in (attention.channel_fc, attention.filter_fc, attention.spatial_fc, attention.kernel_fc):
        if head is not None:
            head.weight.zero_()
            head.bias.zero_()
            sigmoids += head is not attention.kernel_fc
    weight = conv.weight * 2. ** sigmoids  # each sigmoid attention starts at 0.5
    noise = torch.randn((kernel_num, *weight.shape), generator=generator).to(weight) * weight.std() * _KERNEL_NOISE
    odconv.kernel_bank().copy_(weight + (noise - noise.mean(dim=0)))
    if conv.bias is not None:
        odconv.bias = nn.Parameter(conv.bias.detach().clone())
    return odconv


def _macs(model: nn.Module, input_size: Sequence[int]) -> Optional[int]:
    """Multiply-accumulates of one eval-mode forward, by torch's FLOP counter (None where the forward fails)."""
    training = model.training
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(torch.zeros(1, *input_size, device=next(model.parameters()).device))
        return counter.get_total_flops() // 2
    except Exception:  # e.g. a detection model that wants a list of images: its MACs are not counted
        return None
    finally:
        model.train(training)


def replace_convs(
        model: nn.Module,
        op: str,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        kernel_sizes: Optional[Sequence[int]] = None,
        kernel_num: int = 1,
        reduction: float = 0.0625,
        input_size: Optional[Sequence[int]] = None,
        seed: int = 0,
        count_macs: bool = True,
) -> Tuple[nn.Module, ReplaceReport]:
    """Replace ``model``'s convs with ``op`` in place, carrying their weights over; see the module docstring.

    Args:
        model: Any network; it is modified in place (and returned).
        op: 'odconv', 'xvolution' (PSSA) or 'xvolution_sa' (global self-attention).
        include: Module-name globs of the convs to replace; the papers' placement if None (ODConv: every conv but the
            stem, the first one; X-volution: the 3x3 convs of the stride-16 stage).
        exclude: Module-name globs of convs to leave.
        kernel_sizes: Replace only convs with these (square) kernel sizes; X-volution's default is (3,), ODConv's any.
        kernel_num: ODConv's kernels per layer.
        reduction: ODConv's attention width as a fraction of the input channels.
        input_size: (C, H, W) for the MAC count; the model's pretrained cfg's, else (3, 224, 224).
        seed: Seed of ODConv's symmetry-breaking kernel noise.
        count_macs: Count the MACs before and after (a forward pass each); False leaves the report's MACs None.
    Returns:
        The model and a :class:`ReplaceReport`. Convs the operator cannot replace (a bias for X-volution, padding
        modes, asymmetric kernels, ...) are left and listed with the reason.
    """
    if op not in OPS:
        raise ValueError(f'unknown op {op!r}: use one of {", ".join(OPS)}')
    input_size = tuple(input_size or (getattr(model, 'pretrained_cfg', None) or {}).get('input_size') or (3, 224, 224))
    report = ReplaceReport(op, input_size=input_size, params_before=sum(p.numel() for p in model.parameters()),
                           macs_before=_macs(model, input_size) if count_macs else None)
    modules = dict(model.named_modules())
    convs = [name for name, m in modules.items() if isinstance(m, nn.Conv2d)]
    patterns = list(include) if include is not None else _default_include(model, op)
    stem = convs[0] if convs and include is None and op == 'odconv' else None
    sizes = kernel_sizes if kernel_sizes is not None else (None if op == 'odconv' else (3,))
    selected = [name for name in convs if name != stem and any(fnmatch.fnmatchcase(name, p) for p in patterns)
                and not any(fnmatch.fnmatchcase(name, p) for p in exclude or ())
                and (sizes is None or modules[name].kernel_size[0] in sizes)]
    norms = _norm_after(model)
    generator = torch.Generator().manual_seed(seed)
    for name in selected:
        conv = modules[name]
        reason = _unsupported(conv, op)
        if reason:
            report.skipped.append((name, reason))
            continue
        norm, remainder = _without_norm_act(modules[norms[name]]) if name in norms else (None, None)
        if op == 'odconv':
            new: nn.Module = _odconv_from(conv, kernel_num, reduction, generator)
            if norm is not None:
                new = ConvNorm(new, norm)
        else:
            attention = 'pssa' if op == 'xvolution' else 'sa'
            new = XVolution2d.from_conv(conv, norm if norm is not None else nn.Identity(), attention)
        model.set_submodule(name, new)
        if remainder is not None:
            model.set_submodule(norms[name], remainder)
        report.replaced.append((name, f'{type(new).__name__}' + (f' with {norms[name]}' if name in norms else '')))
    report.params_after = sum(p.numel() for p in model.parameters())
    report.macs_after = _macs(model, input_size) if count_macs else None
    _remember(model, dict(op=op, include=include, exclude=exclude, kernel_sizes=kernel_sizes, kernel_num=kernel_num,
                          reduction=reduction, seed=seed))
    return model, report


# model arguments timm records from the model itself on export (get_model_args), not the base's architecture
_CURRENT_TRAITS = ('num_classes', 'in_chans', 'global_pool', 'img_size')


def _remember(model: nn.Module, replacement: Dict[str, Any]) -> None:
    """Record on a timm model what was replaced, so its exports name the ``replaced_convs`` architecture with the
    arguments that rebuild it (``replaced_convs_args``, which zoo's export hands to timm's ``save_for_hf``)."""
    cfg = getattr(model, 'pretrained_cfg', None)
    if not cfg or not timm.is_model(cfg.get('architecture', '')) or cfg['architecture'] == 'replaced_convs':
        return
    base_args = {k: v for k, v in timm.models.get_model_args(model).items() if k not in _CURRENT_TRAITS}
    model.replaced_convs_args = dict(base=cfg['architecture'], base_args=base_args, **replacement)
    model.pretrained_cfg = dict(cfg, architecture='replaced_convs', tag=None)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None, 'crop_pct': 0.875,
            'interpolation': 'bilinear', 'first_conv': None, 'classifier': None, **kwargs}


default_cfgs = generate_default_cfgs({'replaced_convs.untrained': _cfg()})


@register_model
def replaced_convs(pretrained: bool = False, base: str = 'resnet50', base_args: Optional[Dict[str, Any]] = None,
                   op: str = 'odconv', include: Optional[Sequence[str]] = None,
                   exclude: Optional[Sequence[str]] = None, kernel_sizes: Optional[Sequence[int]] = None,
                   kernel_num: int = 1, reduction: float = 0.0625, seed: int = 0, **kwargs: Any) -> nn.Module:
    """The timm model ``base`` (built with ``base_args``) with its convs replaced (:func:`replace_convs`): the
    architecture a replaced model's config.json names, so ``local-dir:`` / ``hf-hub:`` rebuild it and load its
    weights. ``timm.create_model('replaced_convs', base='resnet18', op='xvolution')`` builds one directly."""
    def build(**model_kwargs: Any) -> nn.Module:
        model = timm.create_model(base, **dict(base_args or {}, **model_kwargs))
        replace_convs(model, op, include=include, exclude=exclude, kernel_sizes=kernel_sizes, kernel_num=kernel_num,
                      reduction=reduction, seed=seed, count_macs=False)  # the report is not kept
        return model
    # the base's cfg (preprocessing, pool size, first conv, classifier) under this architecture's name, so that
    # exports rebuild the replaced model; a folder's own cfg is kept, a tag ('untrained') names no cfg of a base
    cfg = kwargs.pop('pretrained_cfg', None)
    if cfg is None or isinstance(cfg, str):
        cfg = dict(copy.deepcopy(timm.models.get_pretrained_cfg(base).to_dict()), architecture='replaced_convs',
                   tag=None)
    return build_model_with_cfg(build, 'replaced_convs', pretrained, pretrained_cfg=cfg,
                                feature_cfg=dict(feature_cls='getter'), **kwargs)
