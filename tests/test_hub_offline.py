"""``timm.create_model('van_b0', pretrained=True)`` downloads from the authors' Hub repos and converts on the fly.

Run like a user, in a fresh interpreter with ``HF_HUB_OFFLINE=1`` and a Hub cache laid out on disk, so the real
timm and huggingface_hub code paths resolve the files; the weights inside are the official reference weights.
"""
import json
import re

import torch

from helpers import (lay_out_hub_cache, official_state_dict_keys, run_python_offline, torch_bytes,
                     van_training_checkpoint)

# official VAN-Classification keys -> transformers VanForImageClassification keys, written from the transformers
# module names; test_inverse_table_yields_the_published_transformers_keys checks it against the published key set
_OFFICIAL_TO_TRANSFORMERS = (
    (r'^patch_embed(\d)\.proj\.', lambda m: f'van.encoder.stages.{int(m[1]) - 1}.embeddings.convolution.'),
    (r'^patch_embed(\d)\.norm\.', lambda m: f'van.encoder.stages.{int(m[1]) - 1}.embeddings.normalization.'),
    (r'^block(\d)\.(\d+)\.', lambda m: f'van.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.'),
    (r'^norm(\d)\.', lambda m: f'van.encoder.stages.{int(m[1]) - 1}.normalization.'),
    (r'\.norm1\.', '.pre_normomalization.'),
    (r'\.norm2\.', '.post_normalization.'),
    (r'\.attn\.proj_1\.', '.attention.pre_projection.conv.'),
    (r'\.attn\.spatial_gating_unit\.conv0\.', '.attention.attention_layer.attention.depth_wise.'),
    (r'\.attn\.spatial_gating_unit\.conv_spatial\.', '.attention.attention_layer.attention.depth_wise_dilated.'),
    (r'\.attn\.spatial_gating_unit\.conv1\.', '.attention.attention_layer.attention.point_wise.'),
    (r'\.attn\.proj_2\.', '.attention.post_projection.'),
    (r'\.layer_scale_1$', '.attention_scaling.weight'),
    (r'\.layer_scale_2$', '.mlp_scaling.weight'),
    (r'\.mlp\.fc1\.', '.mlp.in_dense.'),
    (r'\.mlp\.dwconv\.dwconv\.', '.mlp.depth_wise.'),
    (r'\.mlp\.fc2\.', '.mlp.out_dense.'),
    (r'^head\.', 'classifier.'),
)


def as_transformers_layout(state_dict):
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _OFFICIAL_TO_TRANSFORMERS:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    last = max(int(k.split('.')[3]) for k in out if k.startswith('van.encoder.stages.'))
    norm = out[f'van.encoder.stages.{last}.normalization.weight']
    out['van.layernorm.weight'], out['van.layernorm.bias'] = torch.ones_like(norm), torch.zeros_like(norm)
    return out


def test_inverse_table_yields_the_published_transformers_keys():
    official_keys = official_state_dict_keys()
    official = {k: torch.empty(s) for k, s in official_keys['van/van_b0'].items()}
    converted = {k: list(v.shape) for k, v in as_transformers_layout(official).items()}
    assert converted == official_keys['transformers/van-tiny']


_LOAD_AND_COMPARE = '''
import json, sys, torch, timm, zoo
inputs, expected = torch.load(sys.argv[1])
model = timm.create_model('van_b0', pretrained=True, **json.loads(sys.argv[2])).eval()
with torch.no_grad():
    print('max_abs_diff', (model(inputs) - expected).abs().max().item())
'''


def _run_offline(tmp_path, reference, kwargs: dict) -> float:
    ref = reference('van_b0')
    io_file = tmp_path / 'io.pt'
    torch.save((ref.inputs[0], ref.outputs[0]), io_file)
    result = run_python_offline(_LOAD_AND_COMPARE, io_file, json.dumps(kwargs), hub_cache=tmp_path / 'hub')
    assert result.returncode == 0, result.stderr
    return float(result.stdout.split('max_abs_diff')[1])


def test_pretrained_loads_the_transformers_repo_from_the_hub_cache(tmp_path, reference):
    weights = as_transformers_layout(reference('van_b0').state_dict)
    lay_out_hub_cache(tmp_path / 'hub', 'Visual-Attention-Network/van-tiny',
                      {'pytorch_model.bin': torch_bytes(weights)})
    assert _run_offline(tmp_path, reference, {}) <= 1e-4


def test_pretrained_loads_the_original_training_checkpoint_from_the_hub_cache(tmp_path, reference):
    checkpoint = van_training_checkpoint(reference('van_b0').state_dict)
    lay_out_hub_cache(tmp_path / 'hub', 'Visual-Attention-Network/VAN-Tiny-original',
                      {'van_tiny_754.pth.tar': torch_bytes(checkpoint)})
    overlay = dict(hf_hub_id='Visual-Attention-Network/VAN-Tiny-original', hf_hub_filename='van_tiny_754.pth.tar')
    assert _run_offline(tmp_path, reference, dict(pretrained_cfg_overlay=overlay)) <= 1e-4


def test_missing_cache_entry_fails_offline_with_the_repo_named(tmp_path, reference):
    ref = reference('van_b0')
    torch.save((ref.inputs[0], ref.outputs[0]), tmp_path / 'io.pt')
    result = run_python_offline(_LOAD_AND_COMPARE, tmp_path / 'io.pt', '{}', hub_cache=tmp_path / 'hub')
    assert result.returncode != 0
    assert 'van-tiny' in result.stderr
