"""``timm.create_model('van_b0', pretrained=True)`` downloads from the authors' Hub repos and converts on the fly.

Run like a user, in a fresh interpreter with ``HF_HUB_OFFLINE=1`` and a Hub cache laid out on disk, so the real
timm and huggingface_hub code paths resolve the files; the weights inside are the official reference weights.
"""
import json

import pytest
import torch

from tests.helpers import (as_transformers_layout, lay_out_hub_cache, official_state_dict_keys, run_python_offline,
                           torch_bytes, van_training_checkpoint)

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


@pytest.mark.slow
def test_pretrained_loads_the_transformers_repo_from_the_hub_cache(tmp_path, reference):
    weights = as_transformers_layout(reference('van_b0').state_dict)
    lay_out_hub_cache(tmp_path / 'hub', 'Visual-Attention-Network/van-tiny',
                      {'pytorch_model.bin': torch_bytes(weights)})
    assert _run_offline(tmp_path, reference, {}) <= 1e-4


@pytest.mark.slow
def test_pretrained_loads_the_original_training_checkpoint_from_the_hub_cache(tmp_path, reference):
    checkpoint = van_training_checkpoint(reference('van_b0').state_dict)
    lay_out_hub_cache(tmp_path / 'hub', 'Visual-Attention-Network/VAN-Tiny-original',
                      {'van_tiny_754.pth.tar': torch_bytes(checkpoint)})
    overlay = dict(hf_hub_id='Visual-Attention-Network/VAN-Tiny-original', hf_hub_filename='van_tiny_754.pth.tar')
    assert _run_offline(tmp_path, reference, dict(pretrained_cfg_overlay=overlay)) <= 1e-4


@pytest.mark.slow
def test_missing_cache_entry_fails_offline_with_the_repo_named(tmp_path, reference):
    ref = reference('van_b0')
    torch.save((ref.inputs[0], ref.outputs[0]), tmp_path / 'io.pt')
    result = run_python_offline(_LOAD_AND_COMPARE, tmp_path / 'io.pt', '{}', hub_cache=tmp_path / 'hub')
    assert result.returncode != 0
    assert 'van-tiny' in result.stderr
