"""ODConv ResNets and MobileNetV2s: the official architectures, the temperature schedule, the deploy form, memory
formats and a traced graph that serves every batch size (official checkpoints: test_official_checkpoints.py)."""
import copy

import pytest
import timm
import torch
from timm.utils import reparameterize_model

import zoo
from zoo.layers import ODConv2d
from tests.helpers import assert_logits_close, relative_error, with_random_batchnorm_statistics


def test_every_block_conv_is_dynamic_and_the_stem_and_shortcuts_static():
    model = timm.create_model('od_resnet50', device='meta')
    dynamic = {name for name, m in model.named_modules() if isinstance(m, ODConv2d)}
    static = {name for name, m in model.named_modules() if type(m) is torch.nn.Conv2d and '.attention.' not in name}
    assert dynamic == {f'layer{i}.{j}.conv{c}' for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)
                       for c in (1, 2, 3)}
    assert static == {'conv1'} | {f'layer{i}.0.downsample.0' for i in range(1, 5)}


def test_mobilenetv2_convs_are_dynamic_but_the_stem():
    model = timm.create_model('od_mobilenetv2_100', device='meta')
    static = [name for name, m in model.named_modules() if type(m) is torch.nn.Conv2d and '.attention.' not in name]
    assert static == ['features.0.0']
    assert sum(isinstance(m, ODConv2d) for m in model.modules()) == 1 + 2 + 16 * 3  # first block has no expansion


def test_temperature_schedule_and_setter():
    assert [zoo.odconv_temperature(e) for e in (0, 5, 10, 20)] == [30., 15.5, 1., 1.]
    model = timm.create_model('od_resnet18_4x', device='meta')
    zoo.set_temperature(model, zoo.odconv_temperature(2.5))
    temperatures = {m.temperature for m in model.modules() if hasattr(m, 'temperature')}
    assert temperatures == {22.75}


@pytest.mark.parametrize('model_name', ['od_resnet18', 'od_resnet18_4x', 'od_resnet50', 'od_mobilenetv2_050',
                                        'od_mobilenetv2_050_4x'])
def test_reparameterized_equals_the_training_form(model_name):
    model = with_random_batchnorm_statistics(timm.create_model(model_name))
    fused = reparameterize_model(model)
    # every BatchNorm after a block conv is gone; the stem keeps its own
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules()) == 1
    assert all(m.bias is not None for m in fused.modules() if isinstance(m, ODConv2d))
    for batch_size in (1, 2):  # the batch of one has its own computation
        x = torch.randn(batch_size, 3, 128, 128)  # 32 x 32 in the first stage: both the per-sample and the column forms
        with torch.no_grad():
            assert relative_error(fused(x), model(x)) <= 1e-5


@pytest.mark.parametrize('model_name', ['od_resnet18', 'od_mobilenetv2_050_4x'])
def test_channels_last_conversion_keeps_outputs_gradients_and_state_dict(model_name):
    """timm's --channels-last runs ``model.to(memory_format=torch.channels_last)``: the (kernel_num * C_out, C_in, k,
    k) kernel banks convert like conv weights, and the state dict keeps the official (kernel_num, C_out, C_in, k, k)
    layout."""
    model = with_random_batchnorm_statistics(timm.create_model(model_name)).double()
    converted = copy.deepcopy(model).to(memory_format=torch.channels_last)
    bank_name = 'layer1.0.conv1' if model_name.startswith('od_resnet') else 'features.1.conv.1'
    bank = converted.get_submodule(bank_name)
    assert isinstance(bank, ODConv2d) and bank.weight.is_contiguous(memory_format=torch.channels_last)
    assert converted.state_dict()[bank_name + '.weight'].shape == bank.kernel_bank().shape
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in converted.state_dict().items()} == shapes
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)  # 32 x 32 in the first stage: per-sample and column forms
    out, out_converted = model(x), converted(x.to(memory_format=torch.channels_last))
    assert relative_error(out_converted, out) <= 1e-10
    out.square().sum().backward()
    out_converted.square().sum().backward()
    for (name, p), p_converted in zip(model.named_parameters(), converted.parameters()):
        assert relative_error(p_converted.grad, p.grad) <= 1e-9, name


@pytest.mark.parametrize('model_name', ['od_resnet18', 'od_mobilenetv2_050_4x'])
def test_traced_at_batch_one_equals_eager_at_batch_four(model_name):
    """torch.jit.trace, and the legacy ONNX exporter built on it, record one graph for every batch size."""
    model = with_random_batchnorm_statistics(timm.create_model(model_name))
    x = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        traced = torch.jit.trace(model, x[:1])
        assert relative_error(traced(x), model(x)) <= 1e-5


@pytest.mark.parametrize('model_name', ['od_resnet18', 'od_mobilenetv2_050_4x'])
def test_official_logits_from_every_computation(reference, model_name):
    """The official checkpoints' logits as the rule chooses (columns on the small maps and the 1x1 convs), with only
    the conv over the batch (as on a GPU), in channels_last, and with autograd on (the columns' autograd forms)."""
    ref = reference(model_name)
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=ref.state_dict))
    model.eval()
    x, expected = ref.inputs[0], ref.outputs[0]
    with torch.no_grad():
        assert_logits_close(model(x), expected)
        assert_logits_close(model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last)),
                            expected)
    assert_logits_close(model(x).detach(), expected)
    for m in model.modules():
        if isinstance(m, ODConv2d):
            m.columns_device = 'none'
    with torch.no_grad():
        assert_logits_close(model(x), expected)
