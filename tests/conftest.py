"""Shared fixtures: the official reference outputs, and checkpoint files written the way they are published."""
import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file

import zoo  # noqa: F401  (registers the models with timm)

FIXTURES = Path(__file__).parent / 'fixtures' / 'official'


@dataclass
class OfficialReference:
    """One file of tests/fixtures/official: the official state dict and the official model's outputs."""
    state_dict: Dict[str, torch.Tensor]
    inputs: List[torch.Tensor]
    outputs: List[torch.Tensor]


def load_reference(name: str) -> OfficialReference:
    tensors = load_file(str(FIXTURES / f'{name}.safetensors'))
    prefix = 'state_dict.'
    # floats are stored as float16; the official model ran with exactly these values in float32
    state_dict = {k[len(prefix):]: v.float() if v.is_floating_point() else v
                  for k, v in tensors.items() if k.startswith(prefix)}
    count = sum(k.startswith('input_') for k in tensors)
    return OfficialReference(
        state_dict, [tensors[f'input_{i}'] for i in range(count)], [tensors[f'output_{i}'] for i in range(count)])


@pytest.fixture(scope='session')
def reference():
    """``reference(name)`` -> :class:`OfficialReference` of ``tests/fixtures/official/{name}.safetensors``."""
    cache = {}

    def get(name: str) -> OfficialReference:
        if name not in cache:
            cache[name] = load_reference(name)
        return cache[name]
    return get


@pytest.fixture(scope='session')
def official_keys() -> Dict[str, Dict[str, List[int]]]:
    """Key -> shape of every official state dict, full size, per ``family/model`` (official_state_dict_keys.json)."""
    return json.loads((FIXTURES / 'official_state_dict_keys.json').read_text())


def training_checkpoint(state_dict: Dict[str, torch.Tensor], **extra) -> dict:
    """A timm-0.4 style training checkpoint around ``state_dict``, as the VAN originals are published."""
    return {
        'epoch': 299, 'arch': 'van_b0', 'state_dict': state_dict, 'version': 2, 'metric': 75.4,
        'optimizer': {'state': {0: {'exp_avg': torch.ones(4), 'step': torch.tensor(10.)}},
                      'param_groups': [{'lr': 1e-5, 'weight_decay': 0.05, 'params': [0]}]},
        'args': argparse.Namespace(model='van_b0', lr=1e-3, epochs=300, drop_path=0.1),
        **extra,
    }


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f'max abs diff {diff:.3g} > {atol}'


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude of ``expected``."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def with_random_batchnorm_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with moderate random BatchNorm statistics and affines (so that folding them is not
    folding an identity), drawn from a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for tensor, low, high in ((m.running_mean, -0.3, 0.3), (m.running_var, 0.5, 2.), (m.weight, 0.5, 1.5),
                                          (m.bias, -0.3, 0.3)):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return model.eval()


def lay_out_hub_cache(cache_dir: Path, repo_id: str, files: Dict[str, bytes], commit: str = 'a' * 40) -> None:
    """Write ``files`` into ``cache_dir`` exactly as huggingface_hub caches a download of ``repo_id`` at ``main``."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / 'refs').mkdir(parents=True, exist_ok=True)
    (repo / 'refs' / 'main').write_text(commit)
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def torch_bytes(obj) -> bytes:
    """``obj`` serialised with torch.save, as a checkpoint file's bytes."""
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


ZOO = str(Path(sys.executable).parent / 'zoo')  # the console script pip installed beside this interpreter


def run_zoo(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The ``zoo`` command, run as a user runs it."""
    return subprocess.run([ZOO, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def run_python_offline(script: str, *args, hub_cache: Path) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter with ``HF_HUB_OFFLINE=1`` and ``hub_cache`` as the Hugging Face cache."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(hub_cache), HF_HOME=str(hub_cache.parent / 'hf_home'))
    return subprocess.run([sys.executable, '-c', script, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)
