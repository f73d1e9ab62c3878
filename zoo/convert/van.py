"""The published layouts of VAN checkpoints and their key maps onto zoo's VAN (``models/van.py``).

Layouts:
    official      VAN-Classification (``patch_embed1.proj``, ``block1.0.attn.spatial_gating_unit.conv0``, ``norm1``,
                  ``head``), e.g. ``van_tiny_754.pth.tar`` in ``Visual-Attention-Network/VAN-Tiny-original``.
    transformers  Hugging Face ``VanForImageClassification`` (``van.encoder.stages.0.layers.0...``, ``classifier``),
                  the ``Visual-Attention-Network/van-{tiny,small,base,large}`` repos. Its ``van.layernorm`` is not used
                  by the transformers forward either and is dropped.
    mmpretrain    OpenMMLab (``backbone.patch_embed1.projection``,
                  ``backbone.blocks1.0.attn.spatial_gating_unit.DW_conv``, ``head.fc``). mmpretrain builds its stage
                  LayerNorms with eps 1e-5, the official models 1e-6: build the model with ``norm_eps=1e-5`` to
                  reproduce mmpretrain's outputs exactly.
    zoo           this package's own keys (``stages.0.downsample.conv``), e.g. a state dict saved from a zoo model.
"""
from .layouts import CheckpointLayouts, SourceLayout

__all__ = ['VAN_LAYOUTS']


def _one_based(target: str):
    """A replacement for a pattern whose group 1 is a 1-based stage number: ``target`` formatted with that number
    made 0-based, then the remaining groups."""
    return lambda m: target.format(int(m[1]) - 1, *m.groups()[1:])


_OFFICIAL_RULES = (
    (r'^patch_embed(\d)\.proj\.', _one_based('stages.{0}.downsample.conv.')),
    (r'^patch_embed(\d)\.norm\.', _one_based('stages.{0}.downsample.norm.')),
    (r'^block(\d)\.(\d+)\.', _one_based('stages.{0}.blocks.{1}.')),
    (r'^norm(\d)\.', _one_based('stages.{0}.norm.')),
    (r'\.attn\.proj_1\.', '.attn.proj1.'),
    (r'\.attn\.proj_2\.', '.attn.proj2.'),
    (r'\.spatial_gating_unit\.conv0\.', '.lka.conv_dw.'),
    (r'\.spatial_gating_unit\.conv_spatial\.', '.lka.conv_dw_dilated.'),
    (r'\.spatial_gating_unit\.conv1\.', '.lka.conv_pw.'),
    (r'\.mlp\.dwconv\.dwconv\.', '.mlp.dwconv.'),
    (r'\.layer_scale_(\d)$', r'.ls\1.gamma'),
)

VAN_LAYOUTS = CheckpointLayouts('VAN', (
    SourceLayout(
        name='zoo',
        marker=r'stages\.0\.downsample\.conv\.weight',
    ),
    SourceLayout(
        name='official',
        marker=r'patch_embed1\.proj\.weight',
        rules=_OFFICIAL_RULES,
    ),
    SourceLayout(
        name='transformers',
        marker=r'van\.encoder\.stages\.0\.embeddings\.convolution\.weight',
        rules=(
            (r'^van\.encoder\.stages\.(\d+)\.embeddings\.convolution\.', r'stages.\1.downsample.conv.'),
            (r'^van\.encoder\.stages\.(\d+)\.embeddings\.normalization\.', r'stages.\1.downsample.norm.'),
            (r'^van\.encoder\.stages\.(\d+)\.normalization\.', r'stages.\1.norm.'),
            (r'^van\.encoder\.stages\.(\d+)\.layers\.(\d+)\.', r'stages.\1.blocks.\2.'),
            (r'\.pre_normomalization\.', '.norm1.'),  # sic: the transformers attribute name
            (r'\.post_normalization\.', '.norm2.'),
            (r'\.attention\.pre_projection\.conv\.', '.attn.proj1.'),
            (r'\.attention\.attention_layer\.attention\.depth_wise\.', '.attn.lka.conv_dw.'),
            (r'\.attention\.attention_layer\.attention\.depth_wise_dilated\.', '.attn.lka.conv_dw_dilated.'),
            (r'\.attention\.attention_layer\.attention\.point_wise\.', '.attn.lka.conv_pw.'),
            (r'\.attention\.post_projection\.', '.attn.proj2.'),
            (r'\.attention_scaling\.weight$', '.ls1.gamma'),
            (r'\.mlp_scaling\.weight$', '.ls2.gamma'),
            (r'\.mlp\.in_dense\.', '.mlp.fc1.'),
            (r'\.mlp\.depth_wise\.', '.mlp.dwconv.'),
            (r'\.mlp\.out_dense\.', '.mlp.fc2.'),
            (r'^classifier\.', 'head.'),
        ),
        dropped=(r'van\.layernorm\..*',),
    ),
    SourceLayout(
        name='mmpretrain',
        marker=r'backbone\.patch_embed1\.projection\.weight',
        rules=(
            # mmpretrain renamed a few official modules; undo that, then map as the official layout
            (r'^backbone\.', ''),
            (r'^(patch_embed\d)\.projection\.', r'\1.proj.'),
            (r'^blocks(\d)\.', r'block\1.'),
            (r'\.spatial_gating_unit\.DW_conv\.', '.spatial_gating_unit.conv0.'),
            (r'\.spatial_gating_unit\.DW_D_conv\.', '.spatial_gating_unit.conv_spatial.'),
            (r'^head\.fc\.', 'head.'),
            *_OFFICIAL_RULES,
        ),
    ),
))
