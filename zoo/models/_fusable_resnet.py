"""timm ResNet blocks with a deploy form: ``reparameterize()`` folds each block's BatchNorms into the convolutions
before them (plain ``nn.Conv2d`` and ``ODConv2d``; the downsample's too). Shared by the ODConv and X-volution
ResNets; timm's ``reparameterize_model`` calls it.
"""
import torch
from torch import nn
from timm.models.resnet import BasicBlock, Bottleneck

from zoo.layers import fuse_norm

__all__ = ['FusableBasicBlock', 'FusableBottleneck', 'NORM_PAIRS']

NORM_PAIRS = (('conv1', 'bn1'), ('conv2', 'bn2'), ('conv3', 'bn3'))


def _fold_block_norms(block: nn.Module) -> None:
    """Fold each conv's BatchNorm (and the downsample's) into the conv, in eval mode."""
    for conv_name, bn_name in NORM_PAIRS:
        fused = fuse_norm(getattr(block, conv_name, None), getattr(block, bn_name, None))  # None unless foldable
        if fused is not None:
            setattr(block, conv_name, fused)
            setattr(block, bn_name, nn.Identity())
    down = block.downsample
    if isinstance(down, nn.Sequential) and len(down) == 2:
        fused = fuse_norm(down[0], down[1])
        if fused is not None:
            block.downsample = nn.Sequential(fused, nn.Identity())


class FusableBasicBlock(BasicBlock):
    """timm's BasicBlock whose ``reparameterize()`` folds its BatchNorms into its convolutions."""

    @torch.no_grad()
    def reparameterize(self) -> None:
        _fold_block_norms(self)


class FusableBottleneck(Bottleneck):
    """timm's Bottleneck whose ``reparameterize()`` folds its BatchNorms into its convolutions."""

    @torch.no_grad()
    def reparameterize(self) -> None:
        _fold_block_norms(self)
