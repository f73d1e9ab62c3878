"""Deployment: ``zoo export`` to ONNX with a free batch dimension (checked through onnxruntime), mixed precision
against float32, and torch.compile against eager, one model per family."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from zoo.export import ExportError, export_onnx
from tests.helpers import calibrated_xvolution, load_reference, relative_error, run_zoo_here

FIXTURE_MODELS = ['van_b0', 'od_resnet18', 'od_mobilenetv2_050_4x', 'efficientmod_xxs']


def _with_fixture_weights(name: str) -> torch.nn.Module:
    """A model with the official fixture's weights: random, but with the statistics of a real network."""
    ref = load_reference(name)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=ref.state_dict)).eval()


def _xvolution(name: str, **kwargs) -> torch.nn.Module:
    """An X-volution ResNet with BatchNorm statistics of real forward passes and its attention switched on."""
    torch.manual_seed(0)
    return calibrated_xvolution(timm.create_model(name, **kwargs))


# bfloat16 autocast on CPU against float32: measured 0.25-0.55% (relative max) on the fixtures, 1.3% on X-volution
@pytest.mark.parametrize('name, build, bound', [
    *[(n, _with_fixture_weights, 2e-2) for n in FIXTURE_MODELS], ('xvolution_resnet34', _xvolution, 3e-2)])
def test_bfloat16_autocast_stays_close_to_float32(name, build, bound):
    model = build(name)
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            actual = model(x)
    assert actual.dtype == torch.bfloat16
    assert relative_error(actual.float(), expected) <= bound


@pytest.mark.slow
@pytest.mark.parametrize('reparameterize', [False, True], ids=['training_form', 'reparameterized'])
@pytest.mark.parametrize('name', ['van_b0', 'od_resnet18', 'efficientmod_xxs', 'xvolution_resnet34',
                                  'xvolution_sa_resnet34'])
def test_export_with_a_free_batch_matches_pytorch_at_another_batch(tmp_path, name, reparameterize):
    pytest.importorskip('onnxruntime', reason='ONNX export is checked with the [onnx] extra')
    if name.startswith('xvolution'):  # two X-volution blocks in stage 3 (of six); every full model: export_every_model
        model = _xvolution(name, layers=(1, 1, 2, 1))
    else:
        model = _with_fixture_weights(name)
    result = export_onnx(model, tmp_path / 'model.onnx', input_size=(3, 128, 128), reparameterize=reparameterize)
    assert result.dynamic_batch and result.checked_batch == 3 and result.max_abs_diff <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ['model.onnx']


@pytest.mark.slow
def test_zoo_export_writes_a_checked_file_from_a_checkpoint(tmp_path, reference):
    pytest.importorskip('onnxruntime', reason='ONNX export is checked with the [onnx] extra')
    torch.save(reference('od_resnet18').state_dict, tmp_path / 'od_resnet18.pth')
    result = run_zoo_here('export', 'od_resnet18', '--checkpoint', tmp_path / 'od_resnet18.pth', '--out',
                          tmp_path / 'od.onnx', '--img-size', '96', '--reparam')
    assert result.returncode == 0, result.stderr
    assert 'onnxruntime matches PyTorch at batch 3' in result.stdout and (tmp_path / 'od.onnx').is_file()


def test_export_refuses_a_missing_folder_and_writes_nothing(tmp_path):
    pytest.importorskip('onnxruntime', reason='ONNX export is checked with the [onnx] extra')
    with pytest.raises(ExportError, match='no such folder'):
        export_onnx(timm.create_model('van_b0'), tmp_path / 'absent' / 'model.onnx')
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize('name', ['van_b0', 'od_resnet18', 'efficientmod_xxs', 'xvolution_resnet34'])
def test_compiled_forward_equals_eager(name):
    model = _xvolution(name) if name.startswith('xvolution') else _with_fixture_weights(name)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model, fullgraph=True)(x)
    assert relative_error(actual, expected) <= 1e-5


@pytest.mark.slow
def test_the_gpu_check_script_says_there_is_no_gpu_and_succeeds_on_a_cpu(tmp_path):
    """With $PYTHON as its interpreter (not whatever `python` is on the PATH); a $PYTHON without torch is named."""
    script = Path(__file__).parent.parent / 'benchmarks' / 'gpu_check.sh'
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES='', OUT=str(tmp_path))
    result = subprocess.run(['bash', str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'gpu_check: no CUDA GPU on this machine: nothing to check'
    assert not any(tmp_path.iterdir())
    env['PYTHON'] = str(tmp_path / 'no-python')
    result = subprocess.run(['bash', str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and 'no-python cannot import torch' in result.stderr
