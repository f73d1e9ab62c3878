"""The published layouts of EfficientMod checkpoints and their key maps onto zoo's EfficientMod
(``models/efficientmod.py``).

The authors publish timm training checkpoints: ``{'epoch', 'arch', 'state_dict', 'state_dict_ema', 'optimizer',
'amp_scaler', 'version', 'args': argparse.Namespace, 'metric'}``. ``state_dict`` is converted unless the EMA weights
are asked for (``use_ema=True``); timm's own ``load_state_dict`` would prefer the EMA ones.

Layouts:
    official  ma-xu/EfficientMod ``models/EfficientMod.py`` (``patch_embed.proj``, ``layers.{i}.blocks.{j}``,
              ``layers.{i}.downsample`` at the end of stage i, ``mlp.context_layer.context_list.0``, ``gamma_1``,
              ``head``).
    zoo       this package's own keys (``stem.conv``, ``stages.{i}.downsample`` at the start of stage i).
"""
from .layouts import CheckpointLayouts, SourceLayout

__all__ = ['EFFICIENTMOD_LAYOUTS']

EFFICIENTMOD_LAYOUTS = CheckpointLayouts('EfficientMod', (
    SourceLayout(
        name='zoo',
        marker=r'stem\.conv\.weight',
    ),
    SourceLayout(
        name='official',
        marker=r'patch_embed\.proj\.weight',
        rules=(
            (r'^patch_embed\.proj\.', 'stem.conv.'),
            (r'^patch_embed\.norm\.', 'stem.norm.'),
            # the official stage i ends with the downsample that zoo's stage i + 1 starts with
            (r'^layers\.(\d+)\.downsample\.proj\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.conv.'),
            (r'^layers\.(\d+)\.downsample\.norm\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.norm.'),
            (r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
            (r'\.gamma_1$', '.layer_scale.gamma'),
            (r'\.mlp\.context_layer\.context_list\.0\.', '.mlp.context.conv.'),
            (r'\.mlp\.context_layer\.', '.mlp.context.'),
            (r'^head\.', 'head.fc.'),
        ),
    ),
))
