"""Helpers shared by the tests: the official reference outputs, checkpoint files written the way they are published,
numeric comparisons, and running zoo as a user runs it (the console script, a fresh interpreter offline)."""
import argparse
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / 'fixtures' / 'official'


@dataclass
class OfficialReference:
    """One file of tests/fixtures/official: the official state dict and the official model's outputs."""
    state_dict: Dict[str, torch.Tensor]
    inputs: List[torch.Tensor]
    outputs: List[torch.Tensor]


def load_reference(name: str) -> OfficialReference:
    """``tests/fixtures/official/{name}.safetensors`` as an :class:`OfficialReference`."""
    tensors = load_file(str(FIXTURES / f'{name}.safetensors'))
    prefix = 'state_dict.'
    # floats are stored as float16; the official model ran with exactly these values in float32
    state_dict = {k[len(prefix):]: v.float() if v.is_floating_point() else v
                  for k, v in tensors.items() if k.startswith(prefix)}
    count = sum(k.startswith('input_') for k in tensors)
    return OfficialReference(
        state_dict, [tensors[f'input_{i}'] for i in range(count)], [tensors[f'output_{i}'] for i in range(count)])


def official_state_dict_keys() -> Dict[str, Dict[str, List[int]]]:
    """Key -> shape of every official state dict, full size, per ``family/model`` (official_state_dict_keys.json)."""
    return json.loads((FIXTURES / 'official_state_dict_keys.json').read_text())


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


def as_transformers_layout(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An official VAN state dict renamed to the transformers layout of the Hub's van-* repos."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _OFFICIAL_TO_TRANSFORMERS:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    last = max(int(k.split('.')[3]) for k in out if k.startswith('van.encoder.stages.'))
    norm = out[f'van.encoder.stages.{last}.normalization.weight']
    out['van.layernorm.weight'], out['van.layernorm.bias'] = torch.ones_like(norm), torch.zeros_like(norm)
    return out


def van_training_checkpoint(state_dict: Dict[str, torch.Tensor], **extra: Any) -> Dict[str, Any]:
    """A timm-0.4 style training checkpoint around ``state_dict``, as the VAN originals are published."""
    return {
        'epoch': 299, 'arch': 'van_b0', 'state_dict': state_dict, 'version': 2, 'metric': 75.4,
        'optimizer': {'state': {0: {'exp_avg': torch.ones(4), 'step': torch.tensor(10.)}},
                      'param_groups': [{'lr': 1e-5, 'weight_decay': 0.05, 'params': [0]}]},
        'args': argparse.Namespace(model='van_b0', lr=1e-3, epochs=300, drop_path=0.1),
        **extra,
    }


def odconv_training_checkpoint(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """What the official ODConv DDP training script saves."""
    optimizer = {'state': {}, 'param_groups': [{'lr': 1e-4, 'momentum': 0.9, 'params': []}]}
    return {'epoch': 100, 'state_dict': {f'module.{k}': v for k, v in state_dict.items()}, 'acc': 72.9,
            'best_acc': 73.05, 'optimizer': optimizer}


def efficientmod_training_checkpoint(state_dict: Dict[str, torch.Tensor],
                                     state_dict_ema: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """What the EfficientMod authors' timm training script saves (``--model-ema --amp``)."""
    return {
        'epoch': 299, 'arch': 'efficientMod_xxs', 'state_dict': state_dict, 'state_dict_ema': state_dict_ema,
        'optimizer': {'state': {0: {'exp_avg': torch.ones(3)}}, 'param_groups': [{'lr': 4e-3, 'params': [0]}]},
        'amp_scaler': {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
                       '_growth_tracker': 120},
        'version': 2, 'metric': 77.1,
        'args': argparse.Namespace(model='efficientMod_xxs', lr=4e-3, model_ema=True, distillation_type='soft'),
    }


def perturbed(state_dict: Dict[str, torch.Tensor], factor: float = 0.9) -> Dict[str, torch.Tensor]:
    """Other weights of the same shapes, standing in for the EMA copy of a training run."""
    return {k: v * factor + 0.01 if v.is_floating_point() else v for k, v in state_dict.items()}


class RunsCodeWhenUnpickled:
    """Pickles as a call to ``open(marker, 'w')``: loading it with plain pickle would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def write_image_folder(root: Path, classes: Sequence[str] = ('cat', 'dog', 'fox'), per_class: int = 8,
                       val_per_class: int = 0, size: int = 40, seed: int = 0) -> Path:
    """An ImageFolder of PNGs whose classes differ in colour (easy to learn): ``root/CLASS/N.png``, or with
    ``val_per_class`` also ``root/train/...`` and ``root/val/...``."""
    rng = np.random.default_rng(seed)
    splits = {'train': per_class, 'val': val_per_class} if val_per_class else {'': per_class}
    for split, count in splits.items():
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (size, size, 3))
                pixels[..., index % 3] += 140 + 20 * (index // 3)
                Image.fromarray(pixels.clip(0, 255).astype('uint8')).save(folder / f'{i}.png')
    return root


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f'max abs diff {diff:.3g} > {atol}'


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude of ``expected``."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def with_random_batchnorm_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` in eval mode with moderate random BatchNorm statistics and affines (so that folding them is not
    folding an identity), drawn from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
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


def torch_bytes(obj: Any) -> bytes:
    """``obj`` serialised with torch.save, as a checkpoint file's bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


ZOO = str(Path(sys.executable).parent / 'zoo')  # the console script pip installed beside this interpreter


def run_zoo(*args: Any, cwd: Any = None) -> subprocess.CompletedProcess:
    """The ``zoo`` command, run as a user runs it."""
    return subprocess.run([ZOO, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def run_zoo_here(*args: Any) -> subprocess.CompletedProcess:
    """The ``zoo`` command run in this process (output captured), for checks that need no fresh interpreter."""
    from zoo.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # --help
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_python_offline(script: str, *args: Any, hub_cache: Path, cwd: Any = None) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter with ``HF_HUB_OFFLINE=1`` and ``hub_cache`` as the Hugging Face cache."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(hub_cache), HF_HOME=str(hub_cache.parent / 'hf_home'))
    return subprocess.run([sys.executable, '-c', script, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def calibrated_xvolution(model: torch.nn.Module) -> torch.nn.Module:
    """An X-volution network with BatchNorm statistics of real forward passes and the attention switched on (scale
    0.2): random statistics would let the quadratic PSSA products overflow over a dozen blocks."""
    from zoo.layers import XVolution2d
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running statistics become the average over the calibration batches
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, XVolution2d):
                m.attn.bn.weight.fill_(0.2)
        model.train()
        for seed in range(2):
            model(torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


class FileServer:
    """An HTTP server on 127.0.0.1 that serves ``files`` (path -> bytes) and counts the requests for each path; a
    ``delay`` in seconds before each answer keeps a download in flight while other processes ask for it."""

    def __init__(self, files: Dict[str, bytes], delay: float = 0.0) -> None:
        import http.server
        import threading
        self.requests: Dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests[self.path] = server.requests.get(self.path, 0) + 1
                body = files.get(self.path)
                time.sleep(delay)
                self.send_response(200 if body is not None else 404)
                self.send_header('Content-Length', str(len(body or b'')))
                self.end_headers()
                self.wfile.write(body or b'')

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f'http://127.0.0.1:{self._httpd.server_port}{path}'

    def __enter__(self) -> 'FileServer':
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def closed_port_url(path: str = '/') -> str:
    """A 127.0.0.1 URL where nothing listens: a connection is refused at once, as on a machine without a network."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return f'http://127.0.0.1:{port}{path}'


def manifest_copy(path: Path, changes: Dict[str, Dict[str, Any]]) -> Path:
    """A copy of zoo's weights manifest at ``path`` with some tags' fields replaced:
    ``manifest_copy(p, {'od_resnet18.in1k': {'source.url': URL, 'mirror.published': True}})``."""
    import yaml
    from zoo.models import MANIFEST_PATH
    manifest = yaml.safe_load(MANIFEST_PATH.read_text())
    for tag, fields in changes.items():
        entry = manifest['tags'][tag]
        for dotted, value in fields.items():
            field, key = dotted.split('.')
            entry[field] = dict(entry[field], **{key: value})
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path
