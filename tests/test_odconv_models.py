"""ODConv ResNets and MobileNetV2s: the official architectures and checkpoints, through timm's public loading path."""
import copy

import pytest
import timm
import torch
from timm.utils import reparameterize_model

import zoo
from zoo.convert import CheckpointMismatchError, convert_odconv_mobilenetv2, convert_odconv_resnet
from zoo.layers import ODConv2d
from conftest import assert_logits_close, load_reference, relative_error, with_random_batchnorm_statistics

OFFICIAL = {
    'od_resnet18': ('od_resnet18(kernel_num=1)', 11.944), 'od_resnet18_4x': ('od_resnet18(kernel_num=4)', 44.902),
    'od_resnet34': ('od_resnet34(kernel_num=1)', 22.290), 'od_resnet34_4x': ('od_resnet34(kernel_num=4)', 85.551),
    'od_resnet50': ('od_resnet50(kernel_num=1)', 28.635), 'od_resnet50_4x': ('od_resnet50(kernel_num=4)', 90.671),
    'od_resnet101': ('od_resnet101(kernel_num=1)', 50.819), 'od_resnet101_2x': ('od_resnet101(kernel_num=2)', 90.442),
    'od_mobilenetv2_050': ('od_mobilenetv2_050(kernel_num=1)', 2.426),
    'od_mobilenetv2_050_4x': ('od_mobilenetv2_050(kernel_num=4)', 4.436),
    'od_mobilenetv2_075': ('od_mobilenetv2_075(kernel_num=1)', 3.507),
    'od_mobilenetv2_075_4x': ('od_mobilenetv2_075(kernel_num=4)', 7.496),
    'od_mobilenetv2_100': ('od_mobilenetv2_100(kernel_num=1)', 4.940),
    'od_mobilenetv2_100_4x': ('od_mobilenetv2_100(kernel_num=4)', 11.512),
}


def official_training_checkpoint(state_dict):
    """What the official DDP training script saves."""
    optimizer = {'state': {}, 'param_groups': [{'lr': 1e-4, 'momentum': 0.9, 'params': []}]}
    return {'epoch': 100, 'state_dict': {f'module.{k}': v for k, v in state_dict.items()}, 'acc': 72.9,
            'best_acc': 73.05, 'optimizer': optimizer}


@pytest.mark.parametrize('model_name', ['od_resnet18', 'od_mobilenetv2_050_4x'])
def test_reproduces_the_official_logits(tmp_path, model_name):
    ref = load_reference(model_name)
    torch.save(official_training_checkpoint(ref.state_dict), tmp_path / 'checkpoint.pth.tar')
    model = timm.create_model(model_name, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'checkpoint.pth.tar'))).eval()
    with torch.no_grad():
        assert_logits_close(model(ref.inputs[0]), ref.outputs[0])


@pytest.mark.parametrize('model_name', OFFICIAL)
def test_every_official_key_maps_and_parameters_match(official_keys, model_name):
    source, params_m = OFFICIAL[model_name]
    with torch.device('meta'):
        model = timm.create_model(model_name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == params_m
    state_dict = {k: torch.empty(shape, device='meta') for k, shape in official_keys[f'odconv/{source}'].items()}
    convert = convert_odconv_mobilenetv2 if 'mobilenet' in model_name else convert_odconv_resnet
    assert set(convert(state_dict, model)) == set(model.state_dict())


@pytest.mark.parametrize('model_name,model_side', [
    ('od_resnet18_4x', 'kernel_num 4, widths 64..512'),  # wrong kernel_num
    ('od_resnet50', 'kernel_num 1, widths 64..2048'),  # wrong width
])
def test_checkpoint_of_another_configuration_names_both_sides(model_name, model_side):
    ref = load_reference('od_resnet18')
    with torch.device('meta'):
        model = timm.create_model(model_name)
    with pytest.raises(CheckpointMismatchError, match='checkpoint has kernel_num 1, widths 64..512, '
                                                      f'model has {model_side}'):
        convert_odconv_resnet(ref.state_dict, model)


def test_pretrained_without_a_file_says_where_the_weights_are():
    with pytest.raises(RuntimeError, match=r'od_resnet18\.in1k weights are not on the Hugging Face Hub; they are '
                                           r'published at https://drive\.google\.com/.*pretrained_cfg_overlay'):
        timm.create_model('od_resnet18', pretrained=True)


def test_every_block_conv_is_dynamic_and_the_stem_and_shortcuts_static():
    model = timm.create_model('od_resnet50')
    dynamic = {name for name, m in model.named_modules() if isinstance(m, ODConv2d)}
    static = {name for name, m in model.named_modules() if type(m) is torch.nn.Conv2d and '.attention.' not in name}
    assert dynamic == {f'layer{i}.{j}.conv{c}' for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)
                       for c in (1, 2, 3)}
    assert static == {'conv1'} | {f'layer{i}.0.downsample.0' for i in range(1, 5)}


def test_mobilenetv2_convs_are_dynamic_but_the_stem():
    model = timm.create_model('od_mobilenetv2_100')
    static = [name for name, m in model.named_modules() if type(m) is torch.nn.Conv2d and '.attention.' not in name]
    assert static == ['features.0.0']
    assert sum(isinstance(m, ODConv2d) for m in model.modules()) == 1 + 2 + 16 * 3  # first block has no expansion


def test_temperature_schedule_and_setter():
    assert [zoo.odconv_temperature(e) for e in (0, 5, 10, 20)] == [30., 15.5, 1., 1.]
    model = timm.create_model('od_resnet18_4x')
    zoo.set_temperature(model, zoo.odconv_temperature(2.5))
    temperatures = {m.temperature for m in model.modules() if hasattr(m, 'temperature')}
    assert temperatures == {22.75}


def test_training_with_a_batch_of_one():
    model = timm.create_model('od_resnet18_4x', num_classes=3).train()
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


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
    """timm's --channels-last runs ``model.to(memory_format=torch.channels_last)``, which converts 5-D tensors too:
    the (kernel_num, C_out, C_in, k, k) kernel banks keep their shape and get taps-outermost memory."""
    model = with_random_batchnorm_statistics(timm.create_model(model_name)).double()
    converted = copy.deepcopy(model).to(memory_format=torch.channels_last)
    bank = converted.get_submodule('layer1.0.conv1' if model_name.startswith('od_resnet') else 'features.1.conv.1')
    assert isinstance(bank, ODConv2d) and bank.weight.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in converted.state_dict().items()} == shapes
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)  # 32 x 32 in the first stage: per-sample and column forms
    out, out_converted = model(x), converted(x.to(memory_format=torch.channels_last))
    assert relative_error(out_converted, out) <= 1e-10
    out.square().sum().backward()
    out_converted.square().sum().backward()
    for (name, p), p_converted in zip(model.named_parameters(), converted.parameters()):
        assert relative_error(p_converted.grad, p.grad) <= 1e-9, name
