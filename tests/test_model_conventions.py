"""timm's current model conventions, in every family: ``device`` / ``dtype`` reach every module, any architecture
argument can be overridden through ``timm.create_model``, stochastic depth rises over the blocks, the classifier
resets on the model's device and dtype, layer-wise lr decay follows the stages, training with a batch of one works."""
import pytest
import timm
import timm.optim
import torch
from timm.layers import DropPath

from zoo.layers import ODConv2d, XVolution2d
from zoo.models import list_zoo_models

MODELS = list_zoo_models()
ONE_PER_FAMILY = ['van_b0', 'od_resnet18_4x', 'od_mobilenetv2_050_4x', 'efficientmod_xxs', 'xvolution_resnet34',
                  'xvolution_sa_resnet34']


def _tensors(model: torch.nn.Module):
    return [*model.parameters(), *model.buffers()]


@pytest.mark.parametrize('model_name', MODELS)
def test_builds_on_the_meta_device_with_nothing_left_on_cpu(model_name):
    model = timm.create_model(model_name, device='meta')
    assert {t.device.type for t in _tensors(model)} == {'meta'}


@pytest.mark.parametrize('model_name', ONE_PER_FAMILY)
def test_a_meta_model_infers_its_output_shape_without_memory(model_name):
    model = timm.create_model(model_name, device='meta', num_classes=7)
    assert model(torch.empty(2, 3, 64, 64, device='meta')).shape == (2, 7)


@pytest.mark.parametrize('model_name', MODELS)
def test_builds_in_bfloat16(model_name):
    model = timm.create_model(model_name, device='meta', dtype=torch.bfloat16)
    assert {t.dtype for t in _tensors(model) if t.is_floating_point()} == {torch.bfloat16}


@pytest.mark.parametrize('model_name', ONE_PER_FAMILY)
def test_reset_classifier_keeps_device_and_dtype(model_name):
    model = timm.create_model(model_name, device='meta', dtype=torch.bfloat16)
    model.reset_classifier(7)
    head = model.get_classifier()
    assert (head.weight.device.type, head.weight.dtype, head.weight.shape[0]) == ('meta', torch.bfloat16, 7)


class TestOverrides:
    def test_kernel_num(self):
        model = timm.create_model('od_resnet18', kernel_num=2, device='meta')
        assert {m.kernel_num for m in model.modules() if isinstance(m, ODConv2d)} == {2}

    def test_width_mult(self):
        default = timm.create_model('od_mobilenetv2_100', device='meta')
        model = timm.create_model('od_mobilenetv2_100', width_mult=0.5, device='meta')
        assert model.features[0][0].out_channels == default.features[0][0].out_channels // 2 == 16

    def test_attention(self):
        model = timm.create_model('xvolution_resnet34', attention='sa', device='meta')
        attentions = {type(m.attn).__name__ for m in model.modules() if isinstance(m, XVolution2d)}
        assert attentions == {'GlobalSelfAttention'}

    def test_block_layout(self):
        model = timm.create_model('od_resnet18', layers=(1, 1, 1, 1), device='meta')
        assert [len(getattr(model, f'layer{i}')) for i in range(1, 5)] == [1, 1, 1, 1]

    def test_embed_dims(self):
        model = timm.create_model('van_b0', embed_dims=(8, 16, 24, 32), device='meta')
        assert model.num_features == 32


@pytest.mark.parametrize('model_name, blocks', [('van_b0', 13), ('efficientmod_xxs', 15), ('od_mobilenetv2_050', 17)])
def test_drop_path_rates_rise_linearly_over_the_blocks(model_name, blocks):
    model = timm.create_model(model_name, drop_path_rate=0.2, device='meta')
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    steps = [round(rate / (0.2 / (blocks - 1)), 3) for rate in rates]  # block index of each rate
    assert rates and all(step == int(step) for step in steps)
    assert steps == sorted(steps) and steps[-1] >= blocks - 2  # MobileNetV2's last block has no residual


@pytest.mark.parametrize('model_name', ['efficientmod_xxs', 'od_mobilenetv2_050', 'od_resnet18', 'xvolution_resnet34'])
def test_layer_decay_groups_follow_the_model_group_matcher(model_name):
    model = timm.create_model(model_name)
    optimizer = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, layer_decay=0.75)
    scales = sorted({group['lr_scale'] for group in optimizer.param_groups})
    assert len(scales) > 4 and scales[-1] == 1.0 and scales[0] < 0.75 ** 4


@pytest.mark.parametrize('model_name', ONE_PER_FAMILY)
def test_training_with_a_batch_of_one_gives_every_parameter_a_finite_gradient(model_name):
    model = timm.create_model(model_name, num_classes=3).train()
    out = model(torch.randn(1, 3, 64, 64))
    out.square().sum().backward()
    assert out.shape == (1, 3)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
