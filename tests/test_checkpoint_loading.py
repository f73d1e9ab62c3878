"""One loading path: a checkpoint file becomes a model through ``timm.create_model(..., pretrained_cfg_overlay=
dict(file=...))`` (and ``zoo.models.create_model_from_checkpoint``, which ``zoo convert`` / ``predict`` use), with
timm's classifier and input-channel adaptation, the training container's plain or EMA weights, and nothing left in
the model's pretrained cfg."""
import logging

import pytest
import timm
import torch

from zoo.convert import CheckpointError, CheckpointMismatchError, ODCONV_RESNET_LAYOUTS, unwrap_state_dict
from zoo.models import create_model_from_checkpoint
from tests.helpers import assert_logits_close, efficientmod_training_checkpoint, perturbed, van_training_checkpoint


@pytest.fixture(scope='module')
def seven_class_checkpoint(tmp_path_factory):
    """A fine-tuned efficientmod_xs with a 7-class head, saved as a training container."""
    torch.manual_seed(0)
    model = timm.create_model('efficientmod_xs', num_classes=7).eval()
    path = tmp_path_factory.mktemp('finetuned') / 'last.pth.tar'
    torch.save({'epoch': 3, 'state_dict': model.state_dict()}, path)
    return model, path


def _load(path, model_name='efficientmod_xs', **kwargs):
    return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


class TestClassifier:
    def test_a_head_of_the_asked_for_size_is_kept(self, seven_class_checkpoint):
        trained, path = seven_class_checkpoint
        model = _load(path, num_classes=7)
        with torch.no_grad():
            torch.testing.assert_close(model(X), trained(X), rtol=0, atol=0)

    def test_without_num_classes_the_model_takes_the_checkpoint_head(self, seven_class_checkpoint):
        trained, path = seven_class_checkpoint
        for model in (_load(path), create_model_from_checkpoint('efficientmod_xs', path).eval()):
            assert model.num_classes == 7 and model.pretrained_cfg['num_classes'] == 7
            with torch.no_grad():
                torch.testing.assert_close(model(X), trained(X), rtol=0, atol=0)

    def test_a_head_of_another_size_is_replaced_with_a_warning(self, seven_class_checkpoint, caplog):
        trained, path = seven_class_checkpoint
        with caplog.at_level(logging.WARNING, logger='zoo'):
            model = _load(path, num_classes=10)
        warnings = [r.getMessage() for r in caplog.records if r.name.startswith('zoo')]
        assert warnings == [f'{path}: its classifier has 7 classes and the model 10: the classifier starts untrained']
        assert model.get_classifier().weight.shape == (10, trained.num_features)
        torch.testing.assert_close(model.stem.conv.weight, trained.stem.conv.weight, rtol=0, atol=0)

    def test_a_headless_model_takes_the_backbone_quietly(self, seven_class_checkpoint, caplog):
        trained, path = seven_class_checkpoint
        with caplog.at_level(logging.WARNING, logger='zoo'):
            model = _load(path, num_classes=0)
        assert not caplog.records
        with torch.no_grad():
            torch.testing.assert_close(model(X), trained.forward_head(trained.forward_features(X), pre_logits=True))


def test_first_conv_is_adapted_to_in_chans(tmp_path, reference):
    ref = reference('van_b0')
    torch.save(ref.state_dict, tmp_path / 'van.pth')
    model = _load(tmp_path / 'van.pth', 'van_b0', in_chans=1)
    expected = ref.state_dict['patch_embed1.proj.weight'].sum(dim=1, keepdim=True)
    torch.testing.assert_close(model.stages[0].downsample.conv.weight, expected)


def test_the_model_keeps_where_its_weights_came_from_but_not_the_weights(seven_class_checkpoint):
    _, path = seven_class_checkpoint
    for model in (_load(path), _load(path, features_only=True)):
        for cfg in (m.pretrained_cfg for m in model.modules() if hasattr(m, 'pretrained_cfg')):
            assert 'state_dict' not in cfg and cfg['file'] == str(path)


class TestEma:
    @pytest.fixture
    def checkpoint_file(self, tmp_path, reference):
        state_dict = reference('efficientmod_xxs').state_dict
        path = tmp_path / 'best.pth.tar'
        torch.save(efficientmod_training_checkpoint(state_dict, perturbed(state_dict)), path)
        return path, state_dict

    def test_plain_weights_unless_the_ema_ones_are_asked_for(self, checkpoint_file):
        path, state_dict = checkpoint_file
        plain, ema = _load(path, 'efficientmod_xxs'), _load(path, 'efficientmod_xxs', pretrained_use_ema=True)
        torch.testing.assert_close(plain.stem.conv.weight, state_dict['patch_embed.proj.weight'], rtol=0, atol=0)
        torch.testing.assert_close(ema.stem.conv.weight, perturbed(state_dict)['patch_embed.proj.weight'],
                                   rtol=0, atol=0)

    def test_ema_asked_for_but_absent(self, tmp_path, reference):
        torch.save({'epoch': 1, 'state_dict': reference('efficientmod_xxs').state_dict}, tmp_path / 'no_ema.pth')
        with pytest.raises(CheckpointError, match=r'no_ema\.pth: EMA weights were asked for, but the checkpoint has '
                                                  r'none'):
            _load(tmp_path / 'no_ema.pth', 'efficientmod_xxs', pretrained_use_ema=True)

    def test_ema_without_a_file_is_refused(self):
        with pytest.raises(ValueError, match=r'pretrained_use_ema=True selects the EMA weights of a checkpoint file'):
            timm.create_model('efficientmod_xxs', pretrained_use_ema=True)


def test_unwrap_prefers_ema_only_when_asked():
    plain, ema = {'w': torch.zeros(1)}, {'w': torch.ones(1)}
    checkpoint = {'state_dict': plain, 'state_dict_ema': ema, 'optimizer': {}}
    assert unwrap_state_dict(checkpoint)['w'].item() == 0
    assert unwrap_state_dict(checkpoint, use_ema=True)['w'].item() == 1


def test_a_features_only_backbone_loads_a_classification_checkpoint(tmp_path, reference):
    ref = reference('van_b0')
    torch.save(van_training_checkpoint(ref.state_dict), tmp_path / 'van.pth.tar')
    backbone = _load(tmp_path / 'van.pth.tar', 'van_b0', features_only=True, out_indices=(1, 3))
    full = _load(tmp_path / 'van.pth.tar', 'van_b0')
    with torch.no_grad():
        features = backbone(ref.inputs[0])
        torch.testing.assert_close(features[-1], full.forward_features(ref.inputs[0]))
    assert [f.shape[1] for f in features] == [64, 256]


@pytest.mark.parametrize('model_name,model_side', [
    ('od_resnet18_4x', 'kernel_num 4, widths 64..512'),  # wrong kernel_num
    ('od_resnet50', 'kernel_num 1, widths 64..2048'),  # wrong width
])
def test_checkpoint_of_another_configuration_names_both_sides(reference, model_name, model_side):
    model = timm.create_model(model_name, device='meta')
    with pytest.raises(CheckpointMismatchError, match='checkpoint has kernel_num 1, widths 64..512, '
                                                      f'model has {model_side}'):
        ODCONV_RESNET_LAYOUTS.convert(reference('od_resnet18').state_dict, model)


@pytest.mark.parametrize('route', ['load_state_dict', 'features_only', 'checkpoint_path', 'load_checkpoint'])
def test_load_state_dict_refuses_an_official_layout_and_names_the_converting_call(tmp_path, reference, route):
    """Conversion happens in one place, the pretrained filter (create_model_from_checkpoint); load_state_dict, on every
    model form, and the timm routes built on it load zoo's keys only."""
    ref = reference('van_b0')
    path = tmp_path / 'van_tiny_754.pth.tar'
    torch.save(van_training_checkpoint(ref.state_dict), path)
    with pytest.raises(CheckpointError, match=r'in the official layout of VAN checkpoints, which load_state_dict does '
                                              r'not convert: create the model from the file with '
                                              r'zoo\.models\.create_model_from_checkpoint\(MODEL, PATH\)'):
        if route == 'checkpoint_path':
            timm.create_model('van_b0', checkpoint_path=str(path))
        elif route == 'load_checkpoint':
            timm.models.load_checkpoint(timm.create_model('van_b0'), str(path))
        else:
            timm.create_model('van_b0', features_only=route == 'features_only').load_state_dict(ref.state_dict)
    model = create_model_from_checkpoint('van_b0', path).eval()  # the route the error names
    with torch.no_grad():
        assert_logits_close(model(ref.inputs[0]), ref.outputs[0])


def test_a_partial_state_dict_of_the_models_own_keys_loads_as_before():
    model = timm.create_model('van_b0')
    result = model.load_state_dict({'stages.0.downsample.conv.weight': torch.zeros(32, 3, 7, 7)}, strict=False)
    assert 'stages.0.downsample.conv.weight' not in result.missing_keys and 'head.weight' in result.missing_keys
    assert model.stages[0].downsample.conv.weight.abs().sum() == 0
