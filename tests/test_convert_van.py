"""VAN checkpoints of every published layout load through timm's public path and reproduce the official logits."""
import re

import pytest
import torch
import timm

from zoo.convert import VAN_LAYOUTS, convert_van, detect_layout, unwrap_state_dict
from conftest import assert_logits_close, training_checkpoint

TINY = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), mlp_ratios=(8, 8, 4, 4), num_classes=10,
            checkpoint_classes=10)


def create_from_file(path, model_name='van_b0', checkpoint_classes=1000, **kwargs):
    """The public loading path; ``checkpoint_classes`` tells timm the size of the checkpoint's classifier."""
    overlay = dict(file=str(path), num_classes=checkpoint_classes)
    return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


def assert_reproduces(model, ref):
    with torch.no_grad():
        for x, expected in zip(ref.inputs, ref.outputs):
            assert_logits_close(model(x), expected)


class TestOfficialParity:
    def test_van_b0_original_training_checkpoint(self, tmp_path, reference):
        ref = reference('van_b0')
        torch.save(training_checkpoint(ref.state_dict), tmp_path / 'van_tiny_754.pth.tar')
        assert_reproduces(create_from_file(tmp_path / 'van_tiny_754.pth.tar'), ref)

    def test_tiny_config_original_training_checkpoint(self, tmp_path, reference):
        ref = reference('van_tiny_config')
        torch.save(training_checkpoint(ref.state_dict), tmp_path / 'tiny.pth.tar')
        assert_reproduces(create_from_file(tmp_path / 'tiny.pth.tar', **TINY), ref)

    def test_tiny_config_transformers_state_dict(self, tmp_path, reference):
        ref = reference('van_tiny_config_transformers')
        torch.save(ref.state_dict, tmp_path / 'pytorch_model.bin')
        assert_reproduces(create_from_file(tmp_path / 'pytorch_model.bin', **TINY), ref)

    def test_safetensors_file(self, tmp_path, reference):
        from safetensors.torch import save_file
        ref = reference('van_tiny_config_transformers')
        save_file(ref.state_dict, tmp_path / 'model.safetensors')
        assert_reproduces(create_from_file(tmp_path / 'model.safetensors', **TINY), ref)

    def test_ddp_and_compile_prefixes(self, tmp_path, reference):
        ref = reference('van_tiny_config')
        wrapped = {f'module._orig_mod.{k}': v for k, v in ref.state_dict.items()}
        torch.save({'state_dict': wrapped}, tmp_path / 'ddp.pth')
        assert_reproduces(create_from_file(tmp_path / 'ddp.pth', **TINY), ref)

    def test_state_dict_source(self, reference):
        """timm's in-memory ``state_dict`` source goes through checkpoint_filter_fn."""
        ref = reference('van_tiny_config')
        overlay = dict(state_dict=ref.state_dict, num_classes=10)
        model = timm.create_model('van_b0', pretrained=True, embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1),
                                  num_classes=10, pretrained_cfg_overlay=overlay)
        assert_reproduces(model.eval(), ref)


# mmpretrain's names for the official VAN modules (mmpretrain/models/backbones/van.py, LinearClsHead)
_OFFICIAL_TO_MMPRETRAIN = (
    (r'^patch_embed(\d)\.proj\.', r'backbone.patch_embed\1.projection.'),
    (r'^(patch_embed\d\.norm|norm\d)\.', r'backbone.\1.'),
    (r'^block(\d)\.', r'backbone.blocks\1.'),
    (r'\.conv0\.', '.DW_conv.'),
    (r'\.conv_spatial\.', '.DW_D_conv.'),
    (r'\.mlp\.dwconv\.dwconv\.', '.mlp.dwconv.'),
    (r'^head\.', 'head.fc.'),
)


def test_mmpretrain_checkpoint(tmp_path, reference):
    ref = reference('van_tiny_config')
    state_dict = {}
    for key, value in ref.state_dict.items():
        for pattern, replacement in _OFFICIAL_TO_MMPRETRAIN:
            key = re.sub(pattern, replacement, key)
        state_dict[key] = value
    torch.save({'meta': {'mmpretrain_version': '1.2.0'}, 'state_dict': state_dict}, tmp_path / 'mm.pth')
    assert_reproduces(create_from_file(tmp_path / 'mm.pth', **TINY), ref)


def test_zoo_layout_round_trips(tmp_path, reference):
    ref = reference('van_tiny_config')
    torch.save(ref.state_dict, tmp_path / 'official.pth')
    model = create_from_file(tmp_path / 'official.pth', **TINY)
    torch.save(model.state_dict(), tmp_path / 'zoo.pth')
    assert_reproduces(create_from_file(tmp_path / 'zoo.pth', **TINY), ref)


@pytest.mark.parametrize('source,model_name', [
    ('van/van_b0', 'van_b0'), ('van/van_b1', 'van_b1'), ('van/van_b2', 'van_b2'), ('van/van_b3', 'van_b3'),
    ('transformers/van-tiny', 'van_b0'), ('transformers/van-small', 'van_b1'),
    ('transformers/van-base', 'van_b2'), ('transformers/van-large', 'van_b3'),
])
def test_every_published_key_maps_with_equal_shapes(official_keys, source, model_name):
    keys = official_keys[source]
    state_dict = {k: torch.zeros(shape) for k, shape in keys.items()}
    with torch.device('meta'):
        model = timm.create_model(model_name)
    converted = convert_van(state_dict, model)  # raises on any missing, unexpected or mis-shaped key
    assert set(converted) == set(model.state_dict())
    expected_layout = 'official' if source.startswith('van/') else 'transformers'
    assert detect_layout(state_dict, VAN_LAYOUTS, 'VAN').name == expected_layout
    dropped = set(keys) - {k for k in keys if not k.startswith('van.layernorm.')}
    assert len(converted) == len(keys) - len(dropped)


class TestAdaptation:
    def test_new_classifier_for_other_num_classes(self, tmp_path, reference):
        ref = reference('van_b0')
        torch.save(training_checkpoint(ref.state_dict), tmp_path / 'van.pth.tar')
        model = create_from_file(tmp_path / 'van.pth.tar', num_classes=7)
        assert model.head.weight.shape == (7, 256)
        torch.testing.assert_close(model.stages[0].downsample.conv.weight,
                                   ref.state_dict['patch_embed1.proj.weight'])

    def test_first_conv_adapted_to_in_chans(self, tmp_path, reference):
        ref = reference('van_b0')
        torch.save(ref.state_dict, tmp_path / 'van.pth')
        model = create_from_file(tmp_path / 'van.pth', in_chans=1)
        expected = ref.state_dict['patch_embed1.proj.weight'].sum(dim=1, keepdim=True)
        torch.testing.assert_close(model.stages[0].downsample.conv.weight, expected)

    def test_features_only_backbone(self, tmp_path, reference):
        ref = reference('van_b0')
        torch.save(ref.state_dict, tmp_path / 'van.pth')
        backbone = timm.create_model('van_b0', pretrained=True, features_only=True, out_indices=(1, 3),
                                     pretrained_cfg_overlay=dict(file=str(tmp_path / 'van.pth'))).eval()
        full = create_from_file(tmp_path / 'van.pth')
        with torch.no_grad():
            features = backbone(ref.inputs[0])
            torch.testing.assert_close(features[-1], full.forward_features(ref.inputs[0]))
        assert [f.shape[1] for f in features] == [64, 256]


def test_unwrap_prefers_ema_only_when_asked():
    plain, ema = {'w': torch.zeros(1)}, {'w': torch.ones(1)}
    checkpoint = {'state_dict': plain, 'state_dict_ema': ema, 'optimizer': {}}
    assert unwrap_state_dict(checkpoint)['w'].item() == 0
    assert unwrap_state_dict(checkpoint, use_ema=True)['w'].item() == 1
