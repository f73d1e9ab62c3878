"""Official checkpoints of every family, in every published layout and container, load through timm's public path
(``pretrained_cfg_overlay=dict(file=...)``) and reproduce the official logits; every published key maps; the
architectures have the official parameter counts; weights that are not on the Hub are pointed to."""
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from zoo.convert import EFFICIENTMOD_LAYOUTS, ODCONV_MOBILENETV2_LAYOUTS, ODCONV_RESNET_LAYOUTS, VAN_LAYOUTS
from tests.helpers import (assert_logits_close, efficientmod_training_checkpoint, odconv_training_checkpoint,
                           official_state_dict_keys, perturbed, van_training_checkpoint)

# model -> (its official state dict in official_state_dict_keys.json, official parameter count in millions)
OFFICIAL = {
    'van_b0': ('van/van_b0', 4.106), 'van_b1': ('van/van_b1', 13.862), 'van_b2': ('van/van_b2', 26.578),
    'van_b3': ('van/van_b3', 44.766),
    'od_resnet18': ('odconv/od_resnet18(kernel_num=1)', 11.944),
    'od_resnet18_4x': ('odconv/od_resnet18(kernel_num=4)', 44.902),
    'od_resnet34': ('odconv/od_resnet34(kernel_num=1)', 22.290),
    'od_resnet34_4x': ('odconv/od_resnet34(kernel_num=4)', 85.551),
    'od_resnet50': ('odconv/od_resnet50(kernel_num=1)', 28.635),
    'od_resnet50_4x': ('odconv/od_resnet50(kernel_num=4)', 90.671),
    'od_resnet101': ('odconv/od_resnet101(kernel_num=1)', 50.819),
    'od_resnet101_2x': ('odconv/od_resnet101(kernel_num=2)', 90.442),
    'od_mobilenetv2_050': ('odconv/od_mobilenetv2_050(kernel_num=1)', 2.426),
    'od_mobilenetv2_050_4x': ('odconv/od_mobilenetv2_050(kernel_num=4)', 4.436),
    'od_mobilenetv2_075': ('odconv/od_mobilenetv2_075(kernel_num=1)', 3.507),
    'od_mobilenetv2_075_4x': ('odconv/od_mobilenetv2_075(kernel_num=4)', 7.496),
    'od_mobilenetv2_100': ('odconv/od_mobilenetv2_100(kernel_num=1)', 4.940),
    'od_mobilenetv2_100_4x': ('odconv/od_mobilenetv2_100(kernel_num=4)', 11.512),
    'efficientmod_xxs': ('efficientmod/efficientMod_xxs', 4.736),
    'efficientmod_xs': ('efficientmod/efficientMod_xs', 6.628),
    'efficientmod_s': ('efficientmod/efficientMod_s', 12.897),
    'efficientmod_s_conv': ('efficientmod/efficientMod_s_Conv', 12.872),
}
# the same weights published in Hugging Face transformers' layout
TRANSFORMERS = {'van_b0': 'transformers/van-tiny', 'van_b1': 'transformers/van-small',
                'van_b2': 'transformers/van-base', 'van_b3': 'transformers/van-large'}
LAYOUTS = {'van': VAN_LAYOUTS, 'od_resnet': ODCONV_RESNET_LAYOUTS, 'od_mobilenetv2': ODCONV_MOBILENETV2_LAYOUTS,
           'efficientmod': EFFICIENTMOD_LAYOUTS}
TINY_VAN = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), mlp_ratios=(8, 8, 4, 4))


def _layouts(model_name: str):
    return next(layouts for prefix, layouts in LAYOUTS.items() if model_name.startswith(prefix))


def _from_file(path, model_name: str = 'van_b0', **kwargs) -> torch.nn.Module:
    """The public loading path."""
    return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **kwargs).eval()


def _assert_reproduces(model: torch.nn.Module, ref) -> None:
    with torch.no_grad():
        for x, expected in zip(ref.inputs, ref.outputs):
            assert_logits_close(model(x), expected)


@pytest.mark.parametrize('model_name', OFFICIAL)
def test_parameter_count_equals_the_official_one(model_name):
    model = timm.create_model(model_name, device='meta')
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == OFFICIAL[model_name][1]


@pytest.mark.parametrize('model_name, source', [(m, s) for m, (s, _) in OFFICIAL.items()] + list(TRANSFORMERS.items()),
                         ids=[s for s, _ in OFFICIAL.values()] + list(TRANSFORMERS.values()))
def test_every_published_key_maps_with_its_shape(model_name, source):
    keys = official_state_dict_keys()[source]
    state_dict = {k: torch.empty(shape, device='meta') for k, shape in keys.items()}
    model = timm.create_model(model_name, device='meta')
    converted = _layouts(model_name).convert(state_dict, model)  # raises on a missing, unexpected, mis-shaped key
    assert set(converted) == set(model.state_dict())
    assert len(converted) == len([k for k in keys if not k.startswith('van.layernorm.')])  # unused by transformers


def test_a_model_without_published_weights_says_so_and_how_to_load_ones_own():
    """(Where the official weights come from, and what a user is told when no source gives them, is
    test_pretrained_weights.py's.)"""
    with pytest.raises(RuntimeError, match=r'has no pretrained weights \(no official code or weights exist'
                                           r'.*pretrained_cfg_overlay=dict\(file='):
        timm.create_model('xvolution_resnet50', pretrained=True)


class TestVan:
    def test_original_training_checkpoint(self, tmp_path, reference):
        ref = reference('van_b0')
        torch.save(van_training_checkpoint(ref.state_dict), tmp_path / 'van_tiny_754.pth.tar')
        _assert_reproduces(_from_file(tmp_path / 'van_tiny_754.pth.tar'), ref)

    def test_tiny_config_original_training_checkpoint(self, tmp_path, reference):
        ref = reference('van_tiny_config')
        torch.save(van_training_checkpoint(ref.state_dict), tmp_path / 'tiny.pth.tar')
        _assert_reproduces(_from_file(tmp_path / 'tiny.pth.tar', **TINY_VAN), ref)

    def test_transformers_state_dict(self, tmp_path, reference):
        ref = reference('van_tiny_config_transformers')
        torch.save(ref.state_dict, tmp_path / 'pytorch_model.bin')
        _assert_reproduces(_from_file(tmp_path / 'pytorch_model.bin', **TINY_VAN), ref)

    def test_safetensors_file(self, tmp_path, reference):
        ref = reference('van_tiny_config_transformers')
        save_file(ref.state_dict, tmp_path / 'model.safetensors')
        _assert_reproduces(_from_file(tmp_path / 'model.safetensors', **TINY_VAN), ref)

    def test_ddp_and_compile_prefixes(self, tmp_path, reference):
        ref = reference('van_tiny_config')
        torch.save({'state_dict': {f'module._orig_mod.{k}': v for k, v in ref.state_dict.items()}}, tmp_path / 'a.pth')
        _assert_reproduces(_from_file(tmp_path / 'a.pth', **TINY_VAN), ref)

    def test_in_memory_state_dict(self, reference):
        """timm's ``state_dict`` source goes through the same conversion."""
        ref = reference('van_tiny_config')
        model = timm.create_model('van_b0', pretrained=True, num_classes=10, **TINY_VAN,
                                  pretrained_cfg_overlay=dict(state_dict=ref.state_dict, num_classes=10))
        _assert_reproduces(model.eval(), ref)

    def test_mmpretrain_checkpoint(self, tmp_path, reference):
        # mmpretrain's names for the official VAN modules (mmpretrain/models/backbones/van.py, LinearClsHead)
        official_to_mmpretrain = (
            (r'^patch_embed(\d)\.proj\.', r'backbone.patch_embed\1.projection.'),
            (r'^(patch_embed\d\.norm|norm\d)\.', r'backbone.\1.'),
            (r'^block(\d)\.', r'backbone.blocks\1.'),
            (r'\.conv0\.', '.DW_conv.'),
            (r'\.conv_spatial\.', '.DW_D_conv.'),
            (r'\.mlp\.dwconv\.dwconv\.', '.mlp.dwconv.'),
            (r'^head\.', 'head.fc.'),
        )
        ref = reference('van_tiny_config')
        state_dict = {}
        for key, value in ref.state_dict.items():
            for pattern, replacement in official_to_mmpretrain:
                key = re.sub(pattern, replacement, key)
            state_dict[key] = value
        torch.save({'meta': {'mmpretrain_version': '1.2.0'}, 'state_dict': state_dict}, tmp_path / 'mm.pth')
        _assert_reproduces(_from_file(tmp_path / 'mm.pth', **TINY_VAN), ref)

    def test_zoo_layout_round_trips(self, tmp_path, reference):
        ref = reference('van_tiny_config')
        torch.save(ref.state_dict, tmp_path / 'official.pth')
        torch.save(_from_file(tmp_path / 'official.pth', **TINY_VAN).state_dict(), tmp_path / 'zoo.pth')
        _assert_reproduces(_from_file(tmp_path / 'zoo.pth', **TINY_VAN), ref)

    @pytest.mark.parametrize('source, layout', [('van/van_b0', 'official'), ('transformers/van-tiny', 'transformers')])
    def test_layout_is_recognised_from_the_keys(self, source, layout):
        keys = official_state_dict_keys()[source]
        assert VAN_LAYOUTS.detect({k: torch.empty(s, device='meta') for k, s in keys.items()}).name == layout


@pytest.mark.parametrize('model_name', ['od_resnet18', 'od_mobilenetv2_050_4x'])
def test_odconv_official_training_checkpoint(tmp_path, reference, model_name):
    ref = reference(model_name)
    torch.save(odconv_training_checkpoint(ref.state_dict), tmp_path / 'checkpoint.pth.tar')
    _assert_reproduces(_from_file(tmp_path / 'checkpoint.pth.tar', model_name), ref)


@pytest.fixture(scope='module')
def checkpoint_file(tmp_path_factory, reference):
    """efficientmod_xxs in the authors' timm training container, with other weights as its EMA."""
    state_dict = reference('efficientmod_xxs').state_dict
    path = tmp_path_factory.mktemp('efficientmod') / 'efficientMod_xxs_best.pth.tar'
    torch.save(efficientmod_training_checkpoint(state_dict, perturbed(state_dict)), path)
    return path


class TestEfficientMod:
    def test_training_checkpoint_gives_its_plain_weights_and_the_official_logits(self, checkpoint_file, reference):
        _assert_reproduces(_from_file(checkpoint_file, 'efficientmod_xxs'), reference('efficientmod_xxs'))

    def test_ema_weights_when_asked_for(self, checkpoint_file, reference):
        model = _from_file(checkpoint_file, 'efficientmod_xxs', pretrained_use_ema=True)
        expected = EFFICIENTMOD_LAYOUTS.convert(perturbed(reference('efficientmod_xxs').state_dict), model)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)

    def test_features_only_backbone(self, checkpoint_file, reference):
        full = _from_file(checkpoint_file, 'efficientmod_xxs')
        backbone = _from_file(checkpoint_file, 'efficientmod_xxs', features_only=True, out_indices=(1, 3))
        x = reference('efficientmod_xxs').inputs[0]
        with torch.no_grad():
            features = backbone(x)
            _, expected = full.forward_intermediates(x, indices=(1, 3))
        assert [f.shape[1] for f in features] == [64, 256]
        for got, want in zip(features, expected):
            torch.testing.assert_close(got, want)
