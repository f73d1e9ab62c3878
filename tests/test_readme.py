"""Every Python snippet of README.md runs as written, in a fresh interpreter, offline: the files it names are made
here (from the official fixtures) and the Hub repos it downloads from are laid out in a Hub cache."""
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from zoo.hub import export_hub_folder
from tests.helpers import (as_transformers_layout, efficientmod_training_checkpoint, lay_out_hub_cache, load_reference,
                           odconv_training_checkpoint, perturbed, run_python_offline, torch_bytes,
                           van_training_checkpoint)

README = Path(__file__).parent.parent / 'README.md'
SNIPPETS = re.findall(r'```python\n(.*?)```', README.read_text(encoding='utf-8'), re.S)


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """A working folder with the files the snippets name, and a Hub cache with the repos they download."""
    root = tmp_path_factory.mktemp('readme')
    van, odconv, efficientmod = (load_reference(n) for n in ('van_b0', 'od_resnet18', 'efficientmod_xxs'))
    torch.save(van_training_checkpoint(van.state_dict), root / 'van_tiny_754.pth.tar')
    torch.save(odconv_training_checkpoint(odconv.state_dict), root / 'od_resnet18.pth.tar')
    torch.save(efficientmod_training_checkpoint(efficientmod.state_dict, perturbed(efficientmod.state_dict)),
               root / 'model_best.pth.tar')
    export = timm.create_model('efficientmod_xxs', pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(root / 'model_best.pth.tar')))
    export_hub_folder(export, root / 'efficientmod_xxs-in1k')
    cache = root / 'hub'
    lay_out_hub_cache(cache, 'Visual-Attention-Network/van-tiny',
                      {'pytorch_model.bin': torch_bytes(as_transformers_layout(van.state_dict))})
    save_file(timm.create_model('resnet18').state_dict(), root / 'resnet18.safetensors')
    resnet18_weights = (root / 'resnet18.safetensors').read_bytes()
    lay_out_hub_cache(cache, 'timm/resnet18.a1_in1k', {'model.safetensors': resnet18_weights})
    lay_out_hub_cache(cache, 'me/efficientmod_xxs.in1k',
                      {p.name: p.read_bytes() for p in (root / 'efficientmod_xxs-in1k').iterdir()})
    return root


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) >= 8


@pytest.mark.slow  # each snippet runs in a fresh interpreter
@pytest.mark.parametrize('index', range(len(SNIPPETS)))
def test_snippet_runs_as_written(workspace, index):
    result = run_python_offline(SNIPPETS[index], hub_cache=workspace / 'hub', cwd=workspace)
    assert result.returncode == 0, f'README snippet {index}:\n{SNIPPETS[index]}\n{result.stderr[-3000:]}'
