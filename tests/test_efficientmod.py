"""EfficientMod: the official architectures and checkpoints through timm's public loading path, the modulation
operator, the deploy-time fusion and ONNX export."""
import argparse

import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath
from timm.utils import reparameterize_model

from zoo.convert import CheckpointError, convert_efficientmod
from zoo.layers import EfficientModulation
from zoo.models.efficientmod import AttentionBlock, ModulationBlock
from conftest import assert_logits_close, load_reference

OFFICIAL = {
    'efficientmod_xxs': ('efficientMod_xxs', 4.736), 'efficientmod_xs': ('efficientMod_xs', 6.628),
    'efficientmod_s': ('efficientMod_s', 12.897), 'efficientmod_s_conv': ('efficientMod_s_Conv', 12.872),
}


def _perturbed(state_dict):
    """Other weights of the same shapes, standing in for the EMA copy of a training run."""
    return {k: v * 0.9 + 0.01 if v.is_floating_point() else v for k, v in state_dict.items()}


def timm_training_checkpoint(state_dict, state_dict_ema):
    """What the authors' timm training script saves (``--model-ema --amp``)."""
    return {
        'epoch': 299, 'arch': 'efficientMod_xxs', 'state_dict': state_dict, 'state_dict_ema': state_dict_ema,
        'optimizer': {'state': {0: {'exp_avg': torch.ones(3)}}, 'param_groups': [{'lr': 4e-3, 'params': [0]}]},
        'amp_scaler': {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
                       '_growth_tracker': 120},
        'version': 2, 'metric': 77.1,
        'args': argparse.Namespace(model='efficientMod_xxs', lr=4e-3, model_ema=True, distillation_type='soft'),
    }


@pytest.fixture(scope='module')
def official_xxs():
    return load_reference('efficientmod_xxs')


@pytest.fixture(scope='module')
def checkpoint_file(tmp_path_factory, official_xxs):
    path = tmp_path_factory.mktemp('efficientmod') / 'efficientMod_xxs_best.pth.tar'
    torch.save(timm_training_checkpoint(official_xxs.state_dict, _perturbed(official_xxs.state_dict)), path)
    return path


def _load(path, **kwargs):
    return timm.create_model('efficientmod_xxs', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **kwargs).eval()


class TestOfficialCheckpoints:
    def test_training_checkpoint_gives_its_plain_weights_and_the_official_logits(self, checkpoint_file, official_xxs):
        model = _load(checkpoint_file)
        with torch.no_grad():
            assert_logits_close(model(official_xxs.inputs[0]), official_xxs.outputs[0])

    def test_ema_weights_when_asked_for(self, checkpoint_file, official_xxs):
        model = _load(checkpoint_file, pretrained_use_ema=True)
        expected = convert_efficientmod(_perturbed(official_xxs.state_dict), model)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)

    def test_ema_asked_for_but_absent(self, tmp_path, official_xxs):
        torch.save({'epoch': 1, 'state_dict': official_xxs.state_dict}, tmp_path / 'no_ema.pth')
        with pytest.raises(CheckpointError, match='EMA weights were asked for, but the checkpoint has none'):
            _load(tmp_path / 'no_ema.pth', pretrained_use_ema=True)

    def test_loaded_model_does_not_keep_the_weights_in_its_pretrained_cfg(self, checkpoint_file):
        model = _load(checkpoint_file)
        assert 'state_dict' not in model.pretrained_cfg
        assert model.pretrained_cfg['file'] == str(checkpoint_file)

    def test_features_only_backbone_with_official_weights(self, checkpoint_file, official_xxs):
        full = _load(checkpoint_file)
        backbone = timm.create_model('efficientmod_xxs', pretrained=True, features_only=True, out_indices=(1, 3),
                                     pretrained_cfg_overlay=dict(file=str(checkpoint_file))).eval()
        x = official_xxs.inputs[0]
        with torch.no_grad():
            features = backbone(x)
            _, expected = full.forward_intermediates(x, indices=(1, 3))
        assert [f.shape[1] for f in features] == [64, 256]
        for got, want in zip(features, expected):
            torch.testing.assert_close(got, want)

    def test_new_classifier_for_other_num_classes(self, checkpoint_file):
        model = _load(checkpoint_file, num_classes=7)
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)

    @pytest.mark.parametrize('model_name', OFFICIAL)
    def test_every_official_key_maps_and_parameters_match(self, official_keys, model_name):
        source, params_m = OFFICIAL[model_name]
        with torch.device('meta'):
            model = timm.create_model(model_name)
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == params_m
        state_dict = {k: torch.empty(shape, device='meta')
                      for k, shape in official_keys[f'efficientmod/{source}'].items()}
        assert set(convert_efficientmod(state_dict, model)) == set(model.state_dict())

    def test_pretrained_without_a_file_says_where_the_weights_are(self):
        with pytest.raises(RuntimeError, match=r'efficientmod_s\.in1k weights are not on the Hugging Face Hub; '
                                               r'they are published at https://drive\.google\.com/'):
            timm.create_model('efficientmod_s', pretrained=True)


def _official_modulation(op: EfficientModulation, x: torch.Tensor) -> torch.Tensor:
    """The official formula: the context repeated ``ratio`` times along channels, then multiplied."""
    ctx = op.context.g(F.gelu(op.context.conv(op.context.f(x).permute(0, 3, 1, 2))).permute(0, 2, 3, 1))
    v = op.fc1(x)
    if op.ratio > 1:
        return op.fc2(F.gelu(v) * ctx.repeat(1, 1, 1, op.ratio))
    return op.fc2(v * ctx)


class TestModulation:
    @pytest.mark.parametrize('ratio', [1, 4, 6])
    def test_broadcast_equals_the_official_repeat_in_outputs_and_gradients(self, ratio):
        torch.manual_seed(0)
        op = EfficientModulation(8, ratio).double()
        x = torch.randn(2, 5, 6, 8, dtype=torch.double, requires_grad=True)
        ours, official = op(x), _official_modulation(op, x)
        torch.testing.assert_close(ours, official)
        grad = torch.randn_like(ours)
        got = torch.autograd.grad(ours, [x, *op.parameters()], grad)
        want = torch.autograd.grad(official, [x, *op.parameters()], grad)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)

    @pytest.mark.parametrize('ratio', [1, 6])
    @pytest.mark.parametrize('chunk_rows', [None, 7])  # whole, or 7 positions at a time with a ragged last chunk
    def test_inference_reuses_buffers_without_changing_outputs_or_the_input(self, ratio, chunk_rows):
        op = EfficientModulation(8, ratio).eval()
        if chunk_rows:
            op.chunk_elements = chunk_rows * 8 * ratio
        x = torch.randn(2, 5, 6, 8)
        x_before = x.clone()
        with torch.no_grad():
            reused = op(x)
        torch.testing.assert_close(reused, op(x))
        torch.testing.assert_close(x, x_before, rtol=0, atol=0)

    def test_a_graph_traced_without_autograd_serves_any_batch(self):
        model = timm.create_model('efficientmod_xxs').eval()
        for m in model.modules():
            if isinstance(m, EfficientModulation):
                m.chunk_elements = 64 * m.fc1.out_features  # chunked in eager mode even at this size
        x, other = torch.randn(1, 3, 64, 64), torch.randn(3, 3, 64, 64)
        with torch.no_grad():
            traced = torch.jit.trace(model, x)
            torch.testing.assert_close(traced(other), model(other))

    def test_only_expanding_blocks_have_an_activation_after_fc1(self):
        assert isinstance(EfficientModulation(8, 1).act, nn.Identity)
        assert isinstance(EfficientModulation(8, 6).act, nn.GELU)
        assert isinstance(EfficientModulation(8, 6, act_layer=nn.SiLU).act, nn.SiLU)

    def test_refuses_a_fractional_ratio(self):
        with pytest.raises(ValueError, match='whole expansion ratio'):
            EfficientModulation(8, 2.5)


class TestModelFunctions:
    def test_honour_num_classes_drop_path_rate_and_in_chans(self):
        model = timm.create_model('efficientmod_xxs', num_classes=5, drop_path_rate=0.3, in_chans=1)
        rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
        assert max(rates) == pytest.approx(0.3)
        assert len(rates) == 11 + 2 * 3  # every block but the first; attention blocks have two residual branches
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)

    def test_attention_heads_are_at_least_32_channels_wide(self):
        model = timm.create_model('efficientmod_s')
        widths = {m.attn.head_dim for m in model.modules() if isinstance(m, AttentionBlock)}
        assert widths == {32, 39}  # 144 // 8 -> 32, 312 // 8 = 39

    def test_s_conv_has_no_attention_blocks(self):
        model = timm.create_model('efficientmod_s_conv')
        assert not any(isinstance(m, AttentionBlock) for m in model.modules())
        assert sum(isinstance(m, ModulationBlock) for m in model.modules()) == 28


@pytest.fixture(scope='module')
def official_model(official_xxs):
    model = timm.create_model('efficientmod_xxs', pretrained=True,
                              pretrained_cfg_overlay=dict(state_dict=official_xxs.state_dict)).eval()
    return model, official_xxs


class TestDeployFusion:
    @pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
    def test_reparameterized_equals_the_training_form(self, official_model, memory_format):
        model, ref = official_model
        fused = reparameterize_model(model)
        x = ref.inputs[0].to(memory_format=memory_format)
        with torch.no_grad():
            expected, got = model(x), fused(x)
        assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5
        blocks = [m for m in fused.modules() if isinstance(m, ModulationBlock)]
        assert blocks and all(isinstance(b.layer_scale, nn.Identity) for b in blocks)

    def test_is_idempotent_and_scriptable(self, official_model):
        model, ref = official_model
        fused = reparameterize_model(model)
        twice = reparameterize_model(fused)
        x = ref.inputs[0][:1, :, :96, :96]
        with torch.no_grad():
            torch.testing.assert_close(twice(x), fused(x))
            torch.testing.assert_close(torch.jit.script(fused)(x), fused(x))


def test_onnx_export_matches_onnxruntime_for_any_batch(tmp_path):
    model = timm.create_model('efficientmod_xxs').eval()
    path = tmp_path / 'efficientmod_xxs.onnx'
    torch.onnx.export(model, (torch.randn(2, 3, 224, 224),), str(path), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim('batch')},))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    x = torch.randn(3, 3, 224, 224)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_logits_close(torch.from_numpy(out), model(x))
