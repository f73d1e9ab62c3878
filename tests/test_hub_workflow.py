""""I have an official checkpoint -> I want it on the Hub -> users load it": ``zoo convert``, ``zoo publish``,
``zoo predict`` and ``zoo info`` run as a user runs them, and every bad input ends in one line."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from zoo.cli import main
from zoo.hub import export_hub_folder
from tests.helpers import (RunsCodeWhenUnpickled, efficientmod_training_checkpoint, lay_out_hub_cache, load_reference,
                           odconv_training_checkpoint, run_python_offline, run_zoo, run_zoo_here,
                           van_training_checkpoint)


def _official_case(name: str, container):
    ref = load_reference(name)
    return container(ref.state_dict), ref.inputs[0], ref.outputs[0]


def _xvolution_case():
    """X-volution has no official weights: a checkpoint a user trained with zoo."""
    model = timm.create_model('xvolution_resnet34', num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0)  # attention switched on
        x = torch.randn(2, 3, 64, 64)
        return {'epoch': 9, 'state_dict': model.state_dict()}, x, model(x)


CASES = {  # one model of each family: (MODEL[.TAG], checkpoint container, inputs, expected logits)
    'van': lambda: ('van_b0.in1k', *_official_case('van_b0', van_training_checkpoint)),
    'odconv': lambda: ('od_resnet18.in1k', *_official_case('od_resnet18', odconv_training_checkpoint)),
    'efficientmod': lambda: ('efficientmod_xxs.in1k', *_official_case(
        'efficientmod_xxs', lambda sd: efficientmod_training_checkpoint(sd, {k: v * 0.5 for k, v in sd.items()}))),
    'xvolution': lambda: ('xvolution_resnet34', *_xvolution_case()),
}

_LOAD_LIKE_A_USER = '''
import sys, torch, timm, zoo
folder, repo_id, io_file = sys.argv[1:4]
x, expected = torch.load(io_file)
for source in (f'local-dir:{folder}', f'hf-hub:{repo_id}'):
    model = timm.create_model(source, pretrained=True).eval()
    with torch.no_grad():
        print(source, (model(x) - expected).abs().max().item())
reset = timm.create_model(f'hf-hub:{repo_id}', pretrained=True, num_classes=3).eval()
backbone = timm.create_model(f'hf-hub:{repo_id}', pretrained=True, features_only=True).eval()
with torch.no_grad():
    print('num_classes', reset(x).shape[-1])
    print('features_match', [f.shape[1] for f in backbone(x)] == backbone.feature_info.channels())
'''


@pytest.mark.slow
@pytest.mark.parametrize('family', CASES)
def test_official_checkpoint_to_hub_folder_to_users(tmp_path, family):
    model_name, checkpoint, x, expected = CASES[family]()
    torch.save(checkpoint, tmp_path / 'checkpoint.pth.tar')
    folder = tmp_path / 'export'
    converted = run_zoo('convert', model_name, tmp_path / 'checkpoint.pth.tar', '--out', folder, '--verify')
    assert converted.returncode == 0, converted.stderr
    assert 'verified: reloaded with local-dir:' in converted.stdout

    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == model_name.split('.')[0]
    assert len(config['zoo']['source']['sha256']) == 64
    card = (folder / 'README.md').read_text()
    assert 'import zoo' in card and config['zoo']['source']['sha256'] in card

    repo_id = f'someone/{family}-export'
    lay_out_hub_cache(tmp_path / 'hub', repo_id, {p.name: p.read_bytes() for p in folder.iterdir()})
    torch.save((x, expected), tmp_path / 'io.pt')
    loaded = run_python_offline(_LOAD_LIKE_A_USER, folder, repo_id, tmp_path / 'io.pt', hub_cache=tmp_path / 'hub')
    assert loaded.returncode == 0, loaded.stderr
    lines = dict(line.split(' ', 1) for line in loaded.stdout.splitlines())
    assert float(lines[f'local-dir:{folder}']) <= 1e-4
    assert float(lines[f'hf-hub:{repo_id}']) <= 1e-4
    assert lines['num_classes'] == '3' and lines['features_match'] == 'True'


@pytest.fixture(scope='module')
def van_export(tmp_path_factory):
    """A folder converted from the official VAN-B0 training checkpoint."""
    tmp = tmp_path_factory.mktemp('van_export')
    torch.save(van_training_checkpoint(load_reference('van_b0').state_dict), tmp / 'van_tiny_754.pth.tar')
    result = run_zoo_here('convert', 'van_b0.in1k', tmp / 'van_tiny_754.pth.tar', '--out', tmp / 'van_b0-in1k')
    assert result.returncode == 0, result.stderr
    return tmp / 'van_b0-in1k'


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / 'cat.png'
    Image.fromarray((np.random.default_rng(0).random((90, 120, 3)) * 255).astype('uint8')).save(path)
    return path


def test_publish_dry_run_accepts_the_folder_and_lists_what_it_would_upload(van_export):
    result = run_zoo_here('publish', van_export, '--repo-id', 'someone/van_b0.in1k', '--dry-run')
    assert result.returncode == 0, result.stderr
    assert 'would upload to https://huggingface.co/someone/van_b0.in1k' in result.stdout
    assert all(name in result.stdout for name in ('config.json', 'model.safetensors', 'README.md'))


def test_predict_prints_the_top_k_imagenet_classes(van_export, image_file):
    result = run_zoo_here('predict', f'local-dir:{van_export}', image_file, '--top-k', '3')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(image_file) and len(lines) == 4
    probs = [float(line.split('%')[0]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True)
    names = set(timm.data.ImageNetInfo().label_descriptions())
    assert all(line.split('%', 1)[1].strip() in names for line in lines[1:])


def test_predict_with_a_checkpoint_file_keeps_its_classes(tmp_path, image_file):
    torch.save(odconv_training_checkpoint(load_reference('od_resnet18').state_dict), tmp_path / 'od.pth.tar')
    result = run_zoo_here('predict', 'od_resnet18', image_file, '--checkpoint', tmp_path / 'od.pth.tar', '--top-k', '2')
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3
    fine_tuned = timm.create_model('van_b0', num_classes=4).state_dict()
    torch.save(fine_tuned, tmp_path / 'pets.pth')
    result = run_zoo_here('predict', 'van_b0', image_file, '--checkpoint', tmp_path / 'pets.pth', '--top-k', '9')
    assert result.returncode == 0, result.stderr
    assert sorted(line.split('%')[1].strip() for line in result.stdout.splitlines()[1:]) == ['0', '1', '2', '3']


def test_info_shows_preprocessing_features_and_weights():
    result = run_zoo_here('info', 'efficientmod_s.in1k')
    assert result.returncode == 0, result.stderr
    assert 'bicubic, crop_pct 0.875' in result.stdout
    assert '312 channels at stride 32' in result.stdout and 'drive.google.com' in result.stdout
    as_json = json.loads(run_zoo_here('info', 'van_b0', '--json').stdout)
    assert as_json['params_m'] == 4.106 and len(as_json['feature_info']) == 4


@pytest.mark.parametrize('command', ['list', 'info', 'convert', 'publish', 'predict'])
def test_every_subcommand_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, '--help'])
    assert exit_info.value.code == 0 and 'examples:' in capsys.readouterr().out


def _bad_inputs(tmp_path, van_export):
    """(name, argv, expected message) of each way a user can get it wrong."""
    good = tmp_path / 'good.pth.tar'
    torch.save(van_training_checkpoint(load_reference('van_b0').state_dict), good)
    (tmp_path / 'notes.pth').write_text('these are not weights')
    (tmp_path / 'cut.pth').write_bytes(good.read_bytes()[:4096])
    torch.save({'state_dict': {}, 'args': RunsCodeWhenUnpickled(tmp_path / 'code_ran')}, tmp_path / 'evil.pth')
    torch.save(timm.create_model('resnet18').state_dict(), tmp_path / 'resnet18.pth')
    (tmp_path / 'occupied').mkdir()
    (tmp_path / 'occupied' / 'keep.txt').write_text('mine')
    (tmp_path / 'a_file').write_text('')
    (tmp_path / 'notes.jpg').write_text('not an image')
    Image.new('RGB', (32, 32)).save(tmp_path / 'black.png')
    out = str(tmp_path / 'out')
    return [
        ('unknown model', ['convert', 'van_b9', good, '--out', out], "unknown model 'van_b9'"),
        ('unknown tag', ['convert', 'van_b0.in22k', good, '--out', out], "unknown tag 'in22k' for van_b0"),
        ('missing checkpoint', ['convert', 'van_b0', tmp_path / 'absent.pth', '--out', out], 'no such checkpoint'),
        ('corrupt checkpoint', ['convert', 'van_b0', tmp_path / 'notes.pth', '--out', out],
         'not a PyTorch or safetensors checkpoint: the file holds text ("these are not weights...")'),
        ('truncated checkpoint', ['convert', 'van_b0', tmp_path / 'cut.pth', '--out', out], 'damaged or truncated'),
        ('malicious checkpoint', ['convert', 'van_b0', tmp_path / 'evil.pth', '--out', out],
         'refused: unpickling it would run code'),
        ('another architecture', ['convert', 'van_b0', tmp_path / 'resnet18.pth', '--out', out],
         'not a VAN checkpoint'),
        ('occupied output', ['convert', 'van_b0', good, '--out', tmp_path / 'occupied'], 'pass --force'),
        ('force over a foreign folder', ['convert', 'van_b0', good, '--out', tmp_path / 'occupied', '--force'],
         'is not a zoo export'),
        ('force over the checkpoint folder', ['convert', 'van_b0', good, '--out', tmp_path, '--force'],
         'holds the checkpoint'),
        ('unwritable output', ['convert', 'van_b0', good, '--out', tmp_path / 'a_file' / 'out'], 'cannot write'),
        # sysfs refuses new folders to every user, root included: a read-only place named as itself, not as a temp
        ('read-only output', ['convert', 'van_b0', good, '--out', '/sys/zoo-out'], 'cannot write /sys/zoo-out:'),
        ('a folder to predict', ['predict', f'local-dir:{van_export}', tmp_path], 'is a folder: give image files'),
        ('non-image input', ['predict', f'local-dir:{van_export}', tmp_path / 'notes.jpg'], 'not a readable image'),
        ('missing image', ['predict', f'local-dir:{van_export}', tmp_path / 'absent.png'], 'no such image file'),
        ('unknown model to predict', ['predict', 'vann_b0', tmp_path / 'black.png'], "unknown model 'vann_b0'"),
        ('checkpoint with a Hub model', ['predict', f'local-dir:{van_export}', tmp_path / 'black.png', '--checkpoint',
                                         good], '--checkpoint goes with a model name'),
        ('not an export', ['publish', tmp_path / 'occupied', '--repo-id', 'a/b', '--dry-run'], 'lacks config.json'),
        ('bad repo id', ['publish', van_export, '--repo-id', 'no-org', '--dry-run'], 'must look like ORG/NAME'),
    ]


def test_bad_input_ends_in_one_line_and_leaves_nothing_behind(tmp_path, van_export, capsys):
    for name, argv, message in _bad_inputs(tmp_path, van_export):
        before = sorted(p.name for p in tmp_path.iterdir())
        assert main([str(a) for a in argv]) == 1, name
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith('zoo: ') and message in err, (name, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, name  # no output, no temporary folder
    assert not (tmp_path / 'code_ran').exists()
    assert (tmp_path / 'occupied' / 'keep.txt').read_text() == 'mine'


@pytest.mark.slow
def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    (tmp_path / 'notes.pth').write_text('these are not weights')
    result = run_zoo('convert', 'van_b0', tmp_path / 'notes.pth', '--out', tmp_path / 'out')
    assert result.returncode == 1
    assert result.stderr.count('\n') == 1 and 'Traceback' not in result.stderr


def test_force_replaces_an_earlier_export_only(tmp_path):
    torch.save(van_training_checkpoint(load_reference('van_b0').state_dict), tmp_path / 'ck.pth.tar')
    convert = ['convert', 'van_b0', str(tmp_path / 'ck.pth.tar'), '--out', str(tmp_path / 'out')]
    assert main(convert) == 0
    (tmp_path / 'out' / 'README.md').write_text('edited')
    assert main([*convert, '--force']) == 0
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert (tmp_path / 'out' / 'README.md').read_text() != 'edited'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ck.pth.tar', 'out']  # no backup or temporary left


def test_a_channels_last_model_exports_and_stays_channels_last(tmp_path):
    model = timm.create_model('od_resnet18', num_classes=3).eval().to(memory_format=torch.channels_last)
    export_hub_folder(model, tmp_path / 'out')
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    reloaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), model(x), rtol=0, atol=1e-5)


def test_ema_weights_are_converted_when_asked_for(tmp_path):
    ref = load_reference('efficientmod_xxs')
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in ref.state_dict.items()}
    torch.save(efficientmod_training_checkpoint(ref.state_dict, ema), tmp_path / 'best.pth.tar')
    assert main(['convert', 'efficientmod_xxs', str(tmp_path / 'best.pth.tar'), '--out', str(tmp_path / 'ema'),
                 '--ema']) == 0
    config = json.loads((tmp_path / 'ema' / 'config.json').read_text())
    assert config['zoo']['source']['ema'] is True
    model = timm.create_model(f'local-dir:{tmp_path / "ema"}', pretrained=True)
    torch.testing.assert_close(model.stem.conv.weight, ema['patch_embed.proj.weight'])


@pytest.mark.slow
def test_publish_without_network_fails_in_one_line_and_changes_nothing(tmp_path, van_export):
    card = (van_export / 'README.md').read_text()
    script = 'import sys, zoo.cli; sys.exit(zoo.cli.main(sys.argv[1:]))'
    result = run_python_offline(script, 'publish', van_export, '--repo-id', 'someone/van', hub_cache=tmp_path / 'hub')
    assert result.returncode == 1
    assert result.stderr.startswith('zoo: ') and result.stderr.count('\n') == 1, result.stderr
    assert (van_export / 'README.md').read_text() == card
