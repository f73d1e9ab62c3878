"""MobileNetV2 with Omni-Dimensional Dynamic Convolution (ODConv MobileNetV2)

Paper: `Omni-Dimensional Dynamic Convolution` - https://openreview.net/forum?id=DmpCfq6Mg39 (Li, Zhou, Yao; ICLR 2022)
Official code: https://github.com/OSVAI/ODConv (MIT)

MobileNetV2 (Sandler et al., arXiv 1801.04381) with every convolution but the stem replaced by
``zoo.layers.ODConv2d``: the 1x1 expansions, the 3x3 depthwise convs, the 1x1 projections and the final 1x1 conv to
1280 channels. Module names follow the official (torchvision-style) model, ``features.{i}``:
``ODCONV_MOBILENETV2_LAYOUTS`` (``zoo/convert/odconv.py``), this file's pretrained filter, unwraps the official DDP
training container and renames only the classifier (``classifier.1`` -> ``classifier``). ``reparameterize()``
(``timm.utils.reparameterize_model``) folds the BatchNorm after every ODConv into it.
"""
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
from torch import nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, SelectAdaptivePool2d, calculate_drop_path_rates, get_device_dtype, make_divisible
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from zoo.convert import ODCONV_MOBILENETV2_LAYOUTS
from zoo.layers import ODConv2d, fuse_conv_bn
from ._builder import build_zoo_model
from ._manifest import manifest_cfgs

__all__ = ['ODMobileNetV2']

# (expansion t, output channels c, repeats n, first stride s) of MobileNetV2, Table 2 of its paper
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _fold_norm_after(seq: nn.Sequential, index: int) -> None:
    """Fold the eval-mode BatchNorm ``seq[index]`` into the ODConv2d before it (once)."""
    if isinstance(seq[index], nn.BatchNorm2d):
        seq[index - 1] = fuse_conv_bn(seq[index - 1], seq[index])
        seq[index] = nn.Identity()


class ODConvNormAct(nn.Sequential):
    """ODConv2d -> BatchNorm -> ReLU6 (official names ``0``, ``1``, ``2``)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 device=None, dtype=None, **odconv_args: Any) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__(
            ODConv2d(in_chs, out_chs, kernel_size, stride=stride, groups=groups, **odconv_args, **dd),
            nn.BatchNorm2d(out_chs, **dd),
            nn.ReLU6(inplace=True),
        )

    @torch.no_grad()
    def reparameterize(self) -> None:
        _fold_norm_after(self, 1)


class InvertedResidual(nn.Module):
    """1x1 expansion (unless t = 1) -> 3x3 depthwise -> 1x1 linear projection, all ODConv; residual when shapes
    allow."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int, drop_path: float = 0.,
                 device=None, dtype=None, **odconv_args: Any) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        hidden = int(round(in_chs * expand_ratio))
        self.has_skip = stride == 1 and in_chs == out_chs
        layers = [ODConvNormAct(in_chs, hidden, 1, **odconv_args, **dd)] if expand_ratio != 1 else []
        layers += [
            ODConvNormAct(hidden, hidden, 3, stride=stride, groups=hidden, **odconv_args, **dd),
            ODConv2d(hidden, out_chs, 1, **odconv_args, **dd),
            nn.BatchNorm2d(out_chs, **dd),
        ]
        self.conv = nn.Sequential(*layers)
        self.drop_path = DropPath(drop_path) if drop_path > 0. and self.has_skip else nn.Identity()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the projection's BatchNorm (the other convs' are folded by their ``ODConvNormAct``)."""
        _fold_norm_after(self.conv, len(self.conv) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_skip:
            return x + self.drop_path(self.conv(x))
        return self.conv(x)


class ODMobileNetV2(nn.Module):
    """MobileNetV2 with ODConv; ``features`` = stem, 17 inverted residuals, final 1x1 ODConv to 1280 channels."""

    def __init__(
            self,
            width_mult: float = 1.0,
            kernel_num: int = 1,
            reduction: float = 0.0625,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.2,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            width_mult: Channel multiplier of every layer but the last (1280 channels up to 1.0).
            kernel_num: Kernels per ODConv (1: the paper's "ODConv (1x)", 4: "ODConv (4x)").
            reduction: Width of the ODConv attentions as a fraction of their input channels.
            in_chans: Number of input image channels.
            num_classes: Number of classifier outputs; 0 for no classifier.
            global_pool: Pooling before the classifier ('' for none).
            drop_rate: Dropout before the classifier (0.2 in the official recipe).
            drop_path_rate: Stochastic depth of the residual blocks, rising linearly to this value.
            device: Device of the parameters (e.g. 'meta' to build without memory).
            dtype: Data type of the parameters.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        odconv_args = dict(kernel_num=kernel_num, reduction=reduction, **dd)

        stem_chs = make_divisible(32 * width_mult)
        features: List[nn.Module] = [nn.Sequential(
            nn.Conv2d(in_chans, stem_chs, 3, stride=2, padding=1, bias=False, **dd),
            nn.BatchNorm2d(stem_chs, **dd),
            nn.ReLU6(inplace=True),
        )]
        self.feature_info = []
        dpr = calculate_drop_path_rates(drop_path_rate, sum(n for _, _, n, _ in _SETTINGS))
        prev_chs, reduction_so_far = stem_chs, 2
        for t, c, n, s in _SETTINGS:
            out_chs = make_divisible(c * width_mult)
            if s > 1 and len(features) > 1:  # the stage before a downsampling is a feature level
                self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction_so_far,
                                              module=f'features.{len(features) - 1}'))
            for i in range(n):
                stride = s if i == 0 else 1
                reduction_so_far *= stride
                features.append(InvertedResidual(prev_chs, out_chs, stride, t, dpr[len(features) - 1],
                                                 **odconv_args))
                prev_chs = out_chs
        self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction_so_far,
                                      module=f'features.{len(features) - 1}'))
        self.num_features = self.head_hidden_size = make_divisible(1280 * max(1.0, width_mult))
        features.append(ODConvNormAct(prev_chs, self.num_features, 1, **odconv_args))
        self.features = nn.Sequential(*features)

        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.classifier = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's MobileNetV2 initialisation, as the official code (the ODConv kernels initialise themselves)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^features\.0\.', blocks=r'^features\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.classifier = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def _feature_ends(self) -> List[int]:
        return [int(info['module'].split('.')[1]) for info in self.feature_info]

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that also returns the outputs of the feature levels (strides 2, 4, 8, 16, 32).

        Args:
            x: Input images (B, in_chans, H, W).
            indices: Take the last n levels if int, all if None, those listed if a sequence.
            norm: Accepted for API compatibility (there is no final norm).
            stop_early: Stop after the last requested level.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediates.
        """
        assert output_fmt == 'NCHW', 'Output format must be NCHW.'
        ends = self._feature_ends()
        take_indices, max_index = feature_take_indices(len(ends), indices)
        take_ends = [ends[i] for i in take_indices]
        last = ends[max_index] if stop_early or intermediates_only else len(self.features) - 1
        intermediates = []
        for idx, layer in enumerate(self.features):
            if idx > last:
                break
            x = layer(x)
            if idx in take_ends:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the layers after the last of ``indices``, the final 1x1 conv included, and the classifier."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.features = self.features[:self._feature_ends()[max_index] + 1]
        self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.features, x)
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'features.0.0', 'classifier': 'classifier', 'license': 'mit',
        'paper_ids': 'openreview:DmpCfq6Mg39', 'paper_name': 'Omni-Dimensional Dynamic Convolution',
        'origin_url': 'https://github.com/OSVAI/ODConv',
        **kwargs,
    }


default_cfgs = generate_default_cfgs(manifest_cfgs('odconv_mobilenetv2', _cfg))


def _create_od_mobilenetv2(variant: str, pretrained: bool = False, **kwargs: Any) -> ODMobileNetV2:
    return build_zoo_model(ODMobileNetV2, variant, pretrained, ODCONV_MOBILENETV2_LAYOUTS,
                           feature_cfg=dict(feature_cls='getter'), **kwargs)


@register_model
def od_mobilenetv2_050(pretrained: bool = False, **kwargs: Any) -> ODMobileNetV2:
    """ODConv (1x) MobileNetV2 0.5, 2.4M params, 68.06 top-1."""
    model_args = dict(width_mult=0.5, kernel_num=1)
    return _create_od_mobilenetv2('od_mobilenetv2_050', pretrained, **dict(model_args, **kwargs))


@register_model
def od_mobilenetv2_050_4x(pretrained: bool = False, **kwargs: Any) -> ODMobileNetV2:
    """ODConv (4x) MobileNetV2 0.5, 4.4M params, 70.23 top-1."""
    model_args = dict(width_mult=0.5, kernel_num=4)
    return _create_od_mobilenetv2('od_mobilenetv2_050_4x', pretrained, **dict(model_args, **kwargs))


@register_model
def od_mobilenetv2_075(pretrained: bool = False, **kwargs: Any) -> ODMobileNetV2:
    """ODConv (1x) MobileNetV2 0.75, 3.5M params, 72.71 top-1."""
    model_args = dict(width_mult=0.75, kernel_num=1)
    return _create_od_mobilenetv2('od_mobilenetv2_075', pretrained, **dict(model_args, **kwargs))


@register_model
def od_mobilenetv2_075_4x(pretrained: bool = False, **kwargs: Any) -> ODMobileNetV2:
    """ODConv (4x) MobileNetV2 0.75, 7.5M params, 74.01 top-1."""
    model_args = dict(width_mult=0.75, kernel_num=4)
    return _create_od_mobilenetv2('od_mobilenetv2_075_4x', pretrained, **dict(model_args, **kwargs))


@register_model
def od_mobilenetv2_100(pretrained: bool = False, **kwargs: Any) -> ODMobileNetV2:
    """ODConv (1x) MobileNetV2 1.0, 4.9M params, 74.74 top-1."""
    model_args = dict(width_mult=1.0, kernel_num=1)
    return _create_od_mobilenetv2('od_mobilenetv2_100', pretrained, **dict(model_args, **kwargs))


@register_model
def od_mobilenetv2_100_4x(pretrained: bool = False, **kwargs: Any) -> ODMobileNetV2:
    """ODConv (4x) MobileNetV2 1.0, 11.5M params, 75.29 top-1."""
    model_args = dict(width_mult=1.0, kernel_num=4)
    return _create_od_mobilenetv2('od_mobilenetv2_100_4x', pretrained, **dict(model_args, **kwargs))
