"""Visual Attention Network (VAN)

Paper: `Visual Attention Network` - https://arxiv.org/abs/2202.09741 (Guo, Lu, Liu, Cheng, Hu; CVMJ 2023)
Official code: https://github.com/Visual-Attention-Network/VAN-Classification (Apache-2.0)

A four-stage hierarchical network whose token mixer is Large Kernel Attention (``zoo.layers.LargeKernelAttention``).
Each stage is an overlapping patch embedding (strided conv + BatchNorm), blocks of BatchNorm -> attention and
BatchNorm -> conv MLP, both scaled by a learnt layer scale, and a LayerNorm over channels. As in the official code the
attention unit adds its own input back (``proj2(lka(...)) + x``) inside the layer-scaled residual branch, and the
classifier sees the mean over positions of the last stage's LayerNorm output.

Written from the paper for timm. Original checkpoints load through ``VAN_LAYOUTS`` (``zoo/convert/van.py``), this file's
pretrained filter: the official VAN-Classification training checkpoints (``patch_embed1.proj``,
``block1.0.attn.spatial_gating_unit.conv0``, ``norm1``, ``head``), Hugging Face transformers'
``VanForImageClassification`` (``van.encoder.stages.0.layers.0...``), mmpretrain's (``backbone.blocks1...``) and zoo's
own keys, recognised from the keys; they reproduce the official logits. ``reparameterize()`` folds BatchNorm and layer
scale into the adjacent convolutions for deployment.
"""
from typing import Any, Dict, List, Optional, Set, Tuple, Type, Union

import torch
from torch import nn
import torch.nn.functional as F

from timm.layers import DropPath, LayerNorm2d, LayerScale2d, SelectAdaptivePool2d, calculate_drop_path_rates, \
    get_device_dtype, trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from zoo.convert import VAN_LAYOUTS
from zoo.layers import LargeKernelAttention, batchnorm_affine, fuse_conv_bn, with_input_affine, with_output_affine
from ._builder import build_zoo_model
from ._manifest import manifest_cfgs

__all__ = ['VAN']


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows (kernel k, stride s, padding k // 2) followed by BatchNorm."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, **dd)
        self.norm = nn.BatchNorm2d(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BatchNorm into the conv."""
        if isinstance(self.norm, nn.Identity):
            return
        self.conv = fuse_conv_bn(self.conv, self.norm)
        self.norm = nn.Identity()


class SpatialAttention(nn.Module):
    """1x1 conv -> activation -> LKA -> 1x1 conv, plus the unit's input (the official inner shortcut).

    After fusion the shortcut carries the per-channel scale of the folded norm and layer scale.
    """

    def __init__(self, dim: int, act_layer: Type[nn.Module] = nn.GELU, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.proj1 = nn.Conv2d(dim, dim, 1, **dd)
        self.act = act_layer()
        self.lka = LargeKernelAttention(dim, **dd)
        self.proj2 = nn.Conv2d(dim, dim, 1, **dd)
        self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.lka(self.act(self.proj1(x)))) + self.shortcut(x)


class ConvMlp(nn.Module):
    """1x1 conv expansion -> 3x3 depthwise conv -> activation -> 1x1 conv projection."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: Type[nn.Module] = nn.GELU, drop: float = 0.,
                 device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, **dd)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.dwconv(self.fc1(x)))
        return self.drop2(self.fc2(self.drop1(x)))


class VanBlock(nn.Module):
    """``x + ls1 * attn(bn1(x))`` then ``x + ls2 * mlp(bn2(x))``, each residual branch with drop path."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            ls_init_value: float = 1e-2,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim, **dd)
        self.attn = SpatialAttention(dim, act_layer=act_layer, **dd)
        self.ls1 = LayerScale2d(dim, ls_init_value, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim, **dd)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.ls2 = LayerScale2d(dim, ls_init_value, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold both BatchNorms into the 1x1 convs that follow them and both layer scales into the last convs.

        The attention's inner shortcut sees the normalised input, so it becomes ``gamma1 * scale1 * x`` (the norm's
        shift, scaled, joins proj2's bias). Eval-mode only: the norms' running statistics are baked in.
        """
        if isinstance(self.norm1, nn.Identity):
            return
        scale1, shift1 = batchnorm_affine(self.norm1)
        gamma1 = self.ls1.gamma.double()
        self.attn.proj1 = with_input_affine(self.attn.proj1, scale1, shift1)
        self.attn.proj2 = with_output_affine(self.attn.proj2, gamma1, gamma1 * shift1)
        self.attn.shortcut = LayerScale2d(gamma1.numel(), **get_device_dtype(self.ls1))
        self.attn.shortcut.gamma.copy_(gamma1 * scale1)

        scale2, shift2 = batchnorm_affine(self.norm2)
        self.mlp.fc1 = with_input_affine(self.mlp.fc1, scale2, shift2)
        self.mlp.fc2 = with_output_affine(self.mlp.fc2, self.ls2.gamma)
        self.norm1, self.ls1, self.norm2, self.ls2 = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()


class VanStage(nn.Module):
    """Overlapping patch embedding, ``depth`` VAN blocks, then LayerNorm over channels."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            patch_size: int,
            stride: int,
            mlp_ratio: float,
            drop_path_rates: List[float],
            norm_eps: float = 1e-6,
            device=None,
            dtype=None,
            **block_kwargs: Any,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = OverlapPatchEmbed(in_chs, out_chs, patch_size, stride, **dd)
        self.blocks = nn.Sequential(*[
            VanBlock(out_chs, mlp_ratio=mlp_ratio, drop_path=dpr, **block_kwargs, **dd) for dpr in drop_path_rates
        ])
        self.norm = LayerNorm2d(out_chs, eps=norm_eps, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)


class VAN(nn.Module):
    """Visual Attention Network.

    Stage ``i`` runs at stride 4 * 2**i with ``embed_dims[i]`` channels; the first stage embeds 7x7 patches at
    stride 4, the others 3x3 at stride 2. ``forward_features`` returns the last stage's LayerNorm output
    (B, embed_dims[-1], H/32, W/32); the head averages it over positions.
    """

    def __init__(
            self,
            embed_dims: Tuple[int, ...] = (64, 128, 256, 512),
            depths: Tuple[int, ...] = (3, 4, 6, 3),
            mlp_ratios: Tuple[float, ...] = (8, 8, 4, 4),
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            ls_init_value: float = 1e-2,
            norm_eps: float = 1e-6,
            act_layer: Type[nn.Module] = nn.GELU,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            embed_dims: Channels of each stage.
            depths: Number of blocks of each stage.
            mlp_ratios: MLP hidden width of each stage, as a multiple of its channels.
            in_chans: Number of input image channels.
            num_classes: Number of classifier outputs; 0 for no classifier.
            global_pool: Pooling before the classifier ('avg', 'max', 'avgmax', ... or '' for none).
            ls_init_value: Initial value of the layer scales.
            norm_eps: Epsilon of the per-stage LayerNorms (1e-6 in the official models).
            act_layer: Activation of the attention units and MLPs.
            drop_rate: Dropout before the classifier.
            proj_drop_rate: Dropout inside the MLPs.
            drop_path_rate: Stochastic depth rate, increasing linearly over the blocks up to this value.
            device: Device of the parameters (e.g. 'meta' to build without memory).
            dtype: Data type of the parameters.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.feature_info = []

        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        prev_chs = in_chans
        for i, (dim, depth, mlp_ratio) in enumerate(zip(embed_dims, depths, mlp_ratios)):
            stages.append(VanStage(
                prev_chs, dim, depth,
                patch_size=7 if i == 0 else 3,
                stride=4 if i == 0 else 2,
                mlp_ratio=mlp_ratio,
                drop_path_rates=dpr[i],
                norm_eps=norm_eps,
                ls_init_value=ls_init_value,
                proj_drop=proj_drop_rate,
                act_layer=act_layer,
                **dd,
            ))
            prev_chs = dim
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = prev_chs
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # the official initialisation: fan-out normal for convs, truncated normal for the classifier
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0., (2. / fan_out) ** 0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stages\.0\.downsample',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^stages\.(\d+)\.norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that also returns the output of selected stages.

        Args:
            x: Input images (B, in_chans, H, W).
            indices: Take the last n stages if int, all if None, those listed if a sequence.
            norm: Accepted for API compatibility: every stage already ends in its LayerNorm.
            stop_early: Stop after the last requested stage.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediates.
        Returns:
            The list of intermediates, or (final features, intermediates).
        """
        assert output_fmt == 'NCHW', 'Output format must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
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
        """Drop the stages after the last of ``indices`` (and the classifier when asked)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_head = True
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
        'first_conv': 'stages.0.downsample.conv', 'classifier': 'head',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2202.09741', 'paper_name': 'Visual Attention Network',
        'origin_url': 'https://github.com/Visual-Attention-Network/VAN-Classification',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **manifest_cfgs('van', _cfg),
    'van_b4.untrained': _cfg(),
    'van_b5.untrained': _cfg(),
    'van_b6.untrained': _cfg(),
})


def _create_van(variant: str, pretrained: bool = False, **kwargs: Any) -> VAN:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_zoo_model(
        VAN, variant, pretrained, VAN_LAYOUTS, feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs)


@register_model
def van_b0(pretrained: bool = False, **kwargs: Any) -> VAN:
    """VAN-B0 (VAN-Tiny), 4.1M params, 75.4 top-1 on ImageNet-1k."""
    model_args = dict(embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2), mlp_ratios=(8, 8, 4, 4))
    return _create_van('van_b0', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def van_b1(pretrained: bool = False, **kwargs: Any) -> VAN:
    """VAN-B1 (VAN-Small), 13.9M params, 81.1 top-1 on ImageNet-1k."""
    model_args = dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2), mlp_ratios=(8, 8, 4, 4))
    return _create_van('van_b1', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def van_b2(pretrained: bool = False, **kwargs: Any) -> VAN:
    """VAN-B2 (VAN-Base), 26.6M params, 82.8 top-1 on ImageNet-1k."""
    model_args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3), mlp_ratios=(8, 8, 4, 4))
    return _create_van('van_b2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def van_b3(pretrained: bool = False, **kwargs: Any) -> VAN:
    """VAN-B3 (VAN-Large), 44.8M params, 83.9 top-1 on ImageNet-1k."""
    model_args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 27, 3), mlp_ratios=(8, 8, 4, 4))
    return _create_van('van_b3', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def van_b4(pretrained: bool = False, **kwargs: Any) -> VAN:
    """VAN-B4, 60.3M params (configuration of the official code; no published weights)."""
    model_args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), mlp_ratios=(8, 8, 4, 4))
    return _create_van('van_b4', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def van_b5(pretrained: bool = False, **kwargs: Any) -> VAN:
    """VAN-B5, 89.9M params (configuration of the official code; no published weights)."""
    model_args = dict(embed_dims=(96, 192, 480, 768), depths=(3, 3, 24, 3), mlp_ratios=(8, 8, 4, 4))
    return _create_van('van_b5', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def van_b6(pretrained: bool = False, **kwargs: Any) -> VAN:
    """VAN-B6, 200M params (configuration of the official code; no published weights)."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(6, 6, 90, 6), mlp_ratios=(8, 8, 4, 4))
    return _create_van('van_b6', pretrained=pretrained, **dict(model_args, **kwargs))
