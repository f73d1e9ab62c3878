"""timm ResNet blocks with a deploy form: ``reparameterize()`` folds each block's BatchNorms into the convolutions
before them (plain ``nn.Conv2d`` and ``ODConv2d``; the downsample's too). Shared by the ODConv and X-volution
ResNets; timm's ``reparameterize_model`` calls it.
"""
import torch
from torch import nn
from timm.models.resnet import BasicBlock, Bottleneck

from zoo.layers import fuse_conv_bn

__all__ = ['FusableBasicBlock', 'FusableBottleneck', 'NORM_PAIRS']

NORM_PAIRS = (('conv1', 'bn1'), ('conv2', 'bn2'), ('conv3', 'bn3'))


def _fold_block_norms(block: nn.Module) -> None:
    """Fold each conv's BatchNorm (and the downsample's) into the conv, in eval mode; a conv whose norm is already
    gone (folded, or moved into an X-volution) is left as it is."""
    for conv_name, bn_name in NORM_PAIRS:
        bn = getattr(block, bn_name, None)
        if isinstance(bn, nn.BatchNorm2d):
            setattr(block, conv_name, fuse_conv_bn(getattr(block, conv_name), bn))
            setattr(block, bn_name, nn.Identity())
    down = block.downsample
    if isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[1], nn.BatchNorm2d):
        block.downsample = nn.Sequential(fuse_conv_bn(down[0], down[1]), nn.Identity())


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
