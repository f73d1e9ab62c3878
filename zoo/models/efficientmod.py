"""EfficientMod

Paper: `Efficient Modulation for Vision Networks` - https://arxiv.org/abs/2403.19967 (Ma, Dai, Yang, Xiao, Chen, Fu,
Yuan; ICLR 2024)
Official code: https://github.com/ma-xu/EfficientMod

A four-stage network that runs channels-last (B, H, W, C) from the stem to the final norm. Its blocks are
LayerNorm -> efficient modulation (``zoo.layers.EfficientModulation``: an MLP whose expanded projection is
multiplied by a depthwise-conv context) -> layer scale, in a residual branch with drop path; the last two stages
end with a few transformer blocks (global multi-head self-attention with heads of at least 32 channels, MLP, no
layer scale). Stages are joined by overlapping patch embeddings (7x7 stride 4 stem, 3x3 stride 2 between stages,
each a conv followed by LayerNorm); the head averages the final LayerNorm's output over positions.

Written from the paper for timm. The official weights (state dict and EMA of the authors' timm training checkpoints)
load through ``EFFICIENTMOD_LAYOUTS`` (``zoo/convert/efficientmod.py``), this file's pretrained filter, which maps the
official keys (``patch_embed.proj``, ``layers.{i}.blocks.{j}``, ``layers.{i}.downsample``,
``mlp.context_layer.context_list.0``, ``gamma_1``, ``head``) onto this file's; they reproduce the official logits.
Departures from the official code, none of which changes a published model: stage ``i``'s downsample belongs to stage
``i`` (the official code ends stage ``i - 1`` with it), so ``feature_info`` reports each resolution once; the context
branch has one depthwise conv (the official code allows a sum over several kernel sizes, which no published model uses);
the expansion ratio of a block must be a whole number, as in every published model; with ``proj_drop_rate > 0`` the
modulation also drops out after ``fc2`` (the official block has no dropout there; all published models train without
it). ``reparameterize()`` folds the layer scales into the modulations' output projections.
"""
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, ClassifierHead, DropPath, LayerScale, Mlp, calculate_drop_path_rates, \
    get_device_dtype, trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from zoo.convert import EFFICIENTMOD_LAYOUTS
from zoo.layers import EfficientModulation, with_output_affine
from ._builder import build_zoo_model
from ._manifest import manifest_cfgs

__all__ = ['EfficientMod']


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: conv (kernel k, stride s, padding k // 2) then LayerNorm; NHWC -> NHWC."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, norm_eps: float = 1e-5,
                 device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, **dd)
        self.norm = nn.LayerNorm(out_chs, eps=norm_eps, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class ModulationBlock(nn.Module):
    """``x + drop_path(layer_scale * modulation(norm(x)))`` on (B, H, W, C)."""

    def __init__(
            self,
            dim: int,
            ratio: int,
            kernel_size: int = 7,
            ls_init_value: float = 1e-4,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_eps: float = 1e-5,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = EfficientModulation(dim, ratio, kernel_size=kernel_size, act_layer=act_layer, drop=proj_drop, **dd)
        self.layer_scale = LayerScale(dim, ls_init_value, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.layer_scale(self.mlp(self.norm(x))))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the layer scale into the modulation's output projection ``fc2``.

        The LayerNorm's affine would fold exactly into ``fc1`` and ``f`` too, but PyTorch's CPU LayerNorm is slower
        without an affine than with one, so it stays.
        """
        if isinstance(self.layer_scale, nn.Identity):
            return
        self.mlp.fc2 = with_output_affine(self.mlp.fc2, self.layer_scale.gamma)
        self.layer_scale = nn.Identity()


class AttentionBlock(nn.Module):
    """A pre-norm transformer block over the H * W positions of a (B, H, W, C) map, without layer scale."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            num_heads: int = 8,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_eps: float = 1e-5,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        # official: heads of dim // num_heads channels, but never fewer than 32 (so the width may exceed dim)
        self.attn = Attention(dim, num_heads=num_heads, attn_head_dim=max(dim // num_heads, 32),
                              attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(1, 2)
        tokens = tokens + self.drop_path1(self.attn(self.norm1(tokens)))
        tokens = tokens + self.drop_path2(self.mlp(self.norm2(tokens)))
        return tokens.reshape(x.shape)


class EfficientModStage(nn.Module):
    """Downsample (all but the first stage), modulation blocks, then attention blocks; (B, H, W, C) in and out."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            block_ratios: Sequence[int],
            attn_depth: int,
            attn_mlp_ratio: float,
            drop_path_rates: List[float],
            downsample: bool = True,
            num_heads: int = 8,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_eps: float = 1e-5,
            device=None,
            dtype=None,
            **modulation_kwargs: Any,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = PatchEmbed(in_chs, out_chs, 3, 2, norm_eps, **dd) if downsample else nn.Identity()
        depth = len(block_ratios)
        blocks: List[nn.Module] = [
            ModulationBlock(out_chs, ratio, proj_drop=proj_drop, drop_path=dpr, act_layer=act_layer, norm_eps=norm_eps,
                            **modulation_kwargs, **dd)
            for ratio, dpr in zip(block_ratios, drop_path_rates[:depth])
        ]
        blocks += [
            AttentionBlock(out_chs, attn_mlp_ratio, num_heads=num_heads, proj_drop=proj_drop, attn_drop=attn_drop,
                           drop_path=dpr, act_layer=act_layer, norm_eps=norm_eps, **dd)
            for dpr in drop_path_rates[depth:depth + attn_depth]
        ]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class EfficientMod(nn.Module):
    """EfficientMod: modulation blocks, then attention blocks in the deeper stages; channels-last inside.

    Stage ``i`` runs at stride 4 * 2**i with ``embed_dims[i]`` channels. ``forward_features`` returns the final
    LayerNorm's output as (B, embed_dims[-1], H/32, W/32) (an NCHW view of the channels-last map); the head averages
    it over positions.
    """

    def __init__(
            self,
            embed_dims: Tuple[int, ...] = (32, 64, 128, 256),
            block_ratios: Tuple[Tuple[int, ...], ...] = ((1, 6), (1, 6), (1, 6, 1, 6, 1, 6), (1, 6)),
            attn_depths: Tuple[int, ...] = (0, 0, 1, 2),
            attn_mlp_ratios: Tuple[float, ...] = (4, 4, 4, 4),
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            kernel_size: int = 7,
            num_heads: int = 8,
            ls_init_value: float = 1e-4,
            norm_eps: float = 1e-5,
            act_layer: Type[nn.Module] = nn.GELU,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            embed_dims: Channels of each stage.
            block_ratios: Per stage, the expansion ratio of each modulation block (its length is the stage's
                number of modulation blocks; ratio 1 blocks do not expand).
            attn_depths: Number of attention blocks after the modulation blocks of each stage.
            attn_mlp_ratios: MLP expansion of each stage's attention blocks.
            in_chans: Number of input image channels.
            num_classes: Number of classifier outputs; 0 for no classifier.
            global_pool: Pooling before the classifier ('avg', 'max', 'avgmax', ... or '' for none).
            kernel_size: Kernel of the modulation context's depthwise conv.
            num_heads: Heads of the attention blocks (each at least 32 channels wide).
            ls_init_value: Initial value of the modulation blocks' layer scales.
            norm_eps: Epsilon of every LayerNorm.
            act_layer: Activation of the modulation blocks and the attention MLPs.
            drop_rate: Dropout before the classifier.
            proj_drop_rate: Dropout inside the modulation and after the attention and MLP projections.
            attn_drop_rate: Dropout of the attention weights.
            drop_path_rate: Stochastic depth rate, increasing linearly over all blocks up to this value.
            device: Device of the parameters (e.g. 'meta' to build without memory).
            dtype: Data type of the parameters.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.feature_info = []

        self.stem = PatchEmbed(in_chans, embed_dims[0], 7, 4, norm_eps, **dd)
        stage_depths = [len(ratios) + attn for ratios, attn in zip(block_ratios, attn_depths)]
        dpr = calculate_drop_path_rates(drop_path_rate, stage_depths, stagewise=True)
        stages = []
        prev_chs = embed_dims[0]
        for i, dim in enumerate(embed_dims):
            stages.append(EfficientModStage(
                prev_chs, dim, block_ratios[i],
                attn_depth=attn_depths[i],
                attn_mlp_ratio=attn_mlp_ratios[i],
                drop_path_rates=dpr[i],
                downsample=i > 0,
                num_heads=num_heads,
                attn_drop=attn_drop_rate,
                norm_eps=norm_eps,
                kernel_size=kernel_size,
                ls_init_value=ls_init_value,
                proj_drop=proj_drop_rate,
                act_layer=act_layer,
                **dd,
            ))
            prev_chs = dim
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = prev_chs
        self.norm = nn.LayerNorm(prev_chs, eps=norm_eps, **dd)
        self.head = ClassifierHead(prev_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # the official initialisation: truncated normal for linear layers, PyTorch's default for convs
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)  # keeps the head's device and dtype

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
            norm: Apply the final LayerNorm to the last stage's intermediate.
            stop_early: Stop after the last requested stage.
            output_fmt: 'NCHW' (views of the channels-last maps) or 'NHWC'.
            intermediates_only: Return only the intermediates.
        Returns:
            The list of intermediates, or (final features, intermediates).
        """
        assert output_fmt in ('NCHW', 'NHWC'), 'Output format must be one of NCHW or NHWC.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        x = self.stem(x.permute(0, 2, 3, 1))
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                x_inter = self.norm(x) if norm and feat_idx == last_idx else x
                intermediates.append(x_inter if output_fmt == 'NHWC' else x_inter.permute(0, 3, 1, 2))
        if intermediates_only:
            return intermediates
        return self.norm(x).permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last of ``indices``, the final norm and the classifier when asked."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_norm = prune_head = True
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.head = ClassifierHead(self.num_features, 0, pool_type='', **get_device_dtype(self))
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x.permute(0, 2, 3, 1)))
        return self.norm(x).permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc',
        **kwargs,
    }


default_cfgs = generate_default_cfgs(manifest_cfgs('efficientmod', _cfg))


def _alternating(depth: int, ratio: int) -> Tuple[int, ...]:
    """Expansion ratios of a stage of the published models: 1, ratio, 1, ratio, ..."""
    return tuple(1 if i % 2 == 0 else ratio for i in range(depth))


def _create_efficientmod(variant: str, pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_zoo_model(
        EfficientMod, variant, pretrained, EFFICIENTMOD_LAYOUTS,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


@register_model
def efficientmod_xxs(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """EfficientMod-xxs, 4.7M params, 77.1 top-1 on ImageNet-1k (distilled)."""
    model_args = dict(
        embed_dims=(32, 64, 128, 256), block_ratios=tuple(_alternating(d, 6) for d in (2, 2, 6, 2)),
        attn_depths=(0, 0, 1, 2), attn_mlp_ratios=(4, 4, 4, 4))
    return _create_efficientmod('efficientmod_xxs', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def efficientmod_xs(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """EfficientMod-xs, 6.6M params, 79.4 top-1 on ImageNet-1k (distilled)."""
    model_args = dict(
        embed_dims=(32, 64, 144, 288), block_ratios=tuple(_alternating(d, 4) for d in (3, 3, 4, 2)),
        attn_depths=(0, 0, 3, 3), attn_mlp_ratios=(4, 4, 4, 4))
    return _create_efficientmod('efficientmod_xs', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def efficientmod_s(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """EfficientMod-s, 12.9M params, 81.9 top-1 on ImageNet-1k (distilled)."""
    model_args = dict(
        embed_dims=(32, 64, 144, 312), block_ratios=tuple(_alternating(d, 6) for d in (4, 4, 8, 4)),
        attn_depths=(0, 0, 4, 4), attn_mlp_ratios=(4, 4, 4, 5), drop_path_rate=0.02)
    return _create_efficientmod('efficientmod_s', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def efficientmod_s_conv(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """EfficientMod-s-Conv (modulation blocks only), 12.9M params, 80.5 top-1 on ImageNet-1k (no distillation)."""
    model_args = dict(
        embed_dims=(40, 80, 160, 344), block_ratios=tuple(_alternating(d, 6) for d in (4, 4, 12, 8)),
        attn_depths=(0, 0, 0, 0), drop_path_rate=0.02)
    return _create_efficientmod('efficientmod_s_conv', pretrained=pretrained, **dict(model_args, **kwargs))
