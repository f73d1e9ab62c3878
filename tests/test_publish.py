"""``zoo publish`` takes every folder zoo writes: fine-tuned timm models of any architecture, plug-and-play models and
architecture overrides, each validated by rebuilding config.json's architecture and model_args on the meta device;
a damaged folder, or one whose weights do not fit its config, gets one line."""
import json

import pytest
import timm
import torch

from zoo.finetune import finetune, resolve_recipe
from zoo.hub import export_hub_folder
from tests.helpers import run_zoo_here, write_image_folder

QUICK = dict(pretrained=False, img_size=32, batch_size=8, workers=0, epochs=1, warmup_epochs=0, hflip=0.0)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('data'), per_class=4, val_per_class=2)


def _finetuned(tmp_path, data, **settings):
    return finetune(resolve_recipe(dict(QUICK, data=str(data), output=str(tmp_path / 'run'), **settings))).folder


def _dry_run(folder):
    return run_zoo_here('publish', folder, '--repo-id', 'me/model', '--dry-run')


def _accepted(folder):
    result = _dry_run(folder)
    assert result.returncode == 0, result.stderr
    assert 'would upload to https://huggingface.co/me/model' in result.stdout


def test_a_finetuned_timm_model_is_accepted(tmp_path, data):
    _accepted(_finetuned(tmp_path, data, model='resnet18') / 'best')


def test_a_plug_and_play_finetune_is_accepted(tmp_path, data):
    folder = _finetuned(tmp_path, data, model='resnet18', convert='odconv') / 'best'
    assert json.loads((folder / 'config.json').read_text())['architecture'] == 'replaced_convs'
    _accepted(folder)


@pytest.fixture
def kernel_num_2(tmp_path):
    model = timm.create_model('od_resnet18', kernel_num=2, num_classes=4).eval()
    export_hub_folder(model, tmp_path / 'od2')
    return model, tmp_path / 'od2'


def test_an_architecture_override_is_recorded_accepted_and_rebuilt(kernel_num_2):
    model, folder = kernel_num_2
    assert json.loads((folder / 'config.json').read_text())['model_args']['kernel_num'] == 2
    _accepted(folder)
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)


def _refused(folder, message):
    result = _dry_run(folder)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr, result.stderr


def test_a_damaged_folder_is_refused_in_one_line(kernel_num_2):
    _, folder = kernel_num_2
    weights = folder / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:1000])
    _refused(folder, 'model.safetensors is damaged')


@pytest.mark.parametrize('model_args, message', [
    ({'kernel_num': 4}, 'does not fit its config.json'),  # weights of kernel_num 2
    ({'no_such_argument': 1}, 'cannot be built with its model_args'),
])
def test_a_config_the_weights_do_not_fit_is_refused_in_one_line(kernel_num_2, model_args, message):
    _, folder = kernel_num_2
    config = json.loads((folder / 'config.json').read_text())
    config['model_args'].update(model_args)
    (folder / 'config.json').write_text(json.dumps(config))
    _refused(folder, message)
