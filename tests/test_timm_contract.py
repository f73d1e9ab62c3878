"""Every zoo model honours the model contract of timm's own tests/test_models.py.

Same checks as timm applies to its built-in models: forward (also in channels_last memory), backward with a gradient
for every parameter, default cfgs (pool_size, num_features, head_hidden_size, classifier / first conv names, head
resets), TorchScript, features_only, forward_intermediates, and torch.fx forward / backward through timm's tracer
settings; TorchScript and torch.fx on one model of each design (``ONE_PER_DESIGN``). Reparameterized (deploy) forms keep
the inference part of it.
"""
import math
from typing import Iterable

import pytest
import torch
import timm
from timm.layers import set_layer_config
from timm.models import get_notrace_functions, get_notrace_modules
from timm.utils import reparameterize_model
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from zoo.models import list_zoo_models

# the quick tier (-m "not slow") checks the smallest model of each family; the full run checks all 29
QUICK = ('van_b0', 'od_resnet18', 'od_mobilenetv2_050_4x', 'efficientmod_xxs', 'xvolution_resnet34',
         'xvolution_sa_resnet34')


def _tiered(names: Iterable[str]) -> list:
    return [name if name in QUICK else pytest.param(name, marks=pytest.mark.slow) for name in names]


MODELS = _tiered(list_zoo_models())
# TorchScript and torch.fx compile every module instance, so variants that differ from these only in depth or width
# add minutes and no code path (timm's CI likewise leaves its large models out of these checks)
ONE_PER_DESIGN = ('van_b0', 'od_resnet18', 'od_resnet18_4x', 'od_resnet50', 'od_resnet50_4x', 'od_mobilenetv2_050',
                  'od_mobilenetv2_050_4x', 'efficientmod_xxs', 'efficientmod_s_conv', 'xvolution_resnet34',
                  'xvolution_resnet50', 'xvolution_sa_resnet34', 'xvolution_sa_resnet50')
COMPILED_MODELS = _tiered(name for name in list_zoo_models() if name in ONE_PER_DESIGN)


def _input(model: torch.nn.Module, target: int, batch_size: int = 1) -> torch.Tensor:
    size = [min(s, target) for s in model.pretrained_cfg['input_size'][1:]]
    return torch.randn(batch_size, model.pretrained_cfg['input_size'][0], *size)


def _fx_model(model: torch.nn.Module) -> torch.nn.Module:
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)


def test_every_model_name_of_the_design_is_registered():
    expected = {f'van_b{i}' for i in range(7)} | {'efficientmod_xxs', 'efficientmod_xs', 'efficientmod_s',
                                                   'efficientmod_s_conv'}
    expected |= {f'od_resnet{d}{k}' for d in (18, 34, 50) for k in ('', '_4x')} | {'od_resnet101', 'od_resnet101_2x'}
    expected |= {f'od_mobilenetv2_{w}{k}' for w in ('050', '075', '100') for k in ('', '_4x')}
    expected |= {f'xvolution{a}_resnet{d}' for a in ('', '_sa') for d in (34, 50)}
    assert set(list_zoo_models()) == expected


@pytest.mark.parametrize('model_name', MODELS)
def test_forward(model_name):
    model = timm.create_model(model_name).eval()
    x = _input(model, 224)
    with torch.no_grad():
        out = model(x)
        model.set_grad_checkpointing()
        out_ckpt = model(x)
    assert out.shape == (1, 1000)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out_ckpt, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('model_name', MODELS)
def test_channels_last_forward_equals_nchw(model_name):
    """``model.to(memory_format=torch.channels_last)``, as timm's train.py --channels-last runs it."""
    model = timm.create_model(model_name).eval()
    x = _input(model, 128, batch_size=2)
    with torch.no_grad():
        out = model(x)
        out_channels_last = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out_channels_last, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('model_name', MODELS)
def test_backward_reaches_every_parameter(model_name):
    model = timm.create_model(model_name, num_classes=42).train()
    out = model(_input(model, 128, batch_size=2))
    out.mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f'no gradient for {no_grad}'
    assert out.shape == (2, 42)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize('model_name', MODELS)
def test_default_cfg_matches_model(model_name):
    model = timm.create_model(model_name).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg['num_classes'] and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    assert f"{cfg['classifier']}.weight" in state_dict
    assert f"{cfg['first_conv']}.weight" in state_dict
    x = _input(model, 448)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert features.shape[1] == model.num_features and tuple(features.shape[-2:]) == cfg['pool_size']
        assert pre_logits.shape == (1, model.head_hidden_size)

        model.reset_classifier(0)
        assert model.num_classes == 0
        assert model(x).shape == pre_logits.shape
        model.reset_classifier(0, '')
        assert tuple(model(x).shape[-2:]) == cfg['pool_size']

        headless = timm.create_model(model_name, num_classes=0, global_pool='').eval()
        assert headless(x).shape == features.shape


@pytest.mark.parametrize('model_name', COMPILED_MODELS)
def test_torchscript(model_name):
    with set_layer_config(scriptable=True):
        model = timm.create_model(model_name).eval()
    scripted = torch.jit.script(model)
    x = _input(model, 128)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('model_name', MODELS)
def test_features_only(model_name):
    model = timm.create_model(model_name, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 4
    x = _input(model, 96)
    with torch.no_grad():
        features = model(x)
    assert [f.shape[1] for f in features] == channels
    for feature, reduction in zip(features, reductions):
        assert feature.shape[-1] <= math.ceil(x.shape[-1] / reduction) + 1


@pytest.mark.parametrize('model_name', MODELS)
def test_forward_intermediates(model_name):
    model = timm.create_model(model_name).eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = _input(model, 96)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert [t.shape[1] for t in intermediates] == feature_info.channels()
        for t, reduction in zip(intermediates, feature_info.reduction()):
            assert t.shape[-1] <= math.ceil(x.shape[-1] / reduction) + 1
        torch.testing.assert_close(final, model.forward_features(x))
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True)
        assert [t.shape for t in last_two] == [t.shape for t in intermediates[-2:]]

    model.prune_intermediate_layers(indices=[1])
    assert model.num_features == feature_info.channels()[1]
    with torch.no_grad():
        torch.testing.assert_close(model(x), intermediates[1])


@pytest.mark.parametrize('model_name', COMPILED_MODELS)
def test_fx_forward_equals_eager(model_name):
    model = timm.create_model(model_name).eval()
    x = _input(model, 128)
    with torch.inference_mode():
        expected = model(x)
        actual = torch.cat(tuple(_fx_model(model)(x).values()))
    assert torch.equal(actual, expected)


@pytest.mark.parametrize('model_name', COMPILED_MODELS)
def test_fx_backward_reaches_every_parameter(model_name):
    model = timm.create_model(model_name, num_classes=42).train()
    fx_model = _fx_model(model)
    out = torch.cat(tuple(fx_model(_input(model, 128, batch_size=2)).values()))
    out.mean().backward()
    assert out.shape[-1] == 42
    assert all(p.grad is not None for p in fx_model.parameters())


@pytest.mark.parametrize('model_name', ['van_b0', 'efficientmod_xxs', 'xvolution_resnet34', 'xvolution_sa_resnet50',
                                        'od_resnet18', 'od_mobilenetv2_050_4x'])
def test_reparameterized_model_keeps_the_inference_contract(model_name):
    model = reparameterize_model(timm.create_model(model_name).eval())
    x = _input(model, 128)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)
        torch.testing.assert_close(torch.cat(tuple(_fx_model(model)(x).values())), expected)
        final, intermediates = model.forward_intermediates(x)
    assert [t.shape[1] for t in intermediates] == [info['num_chs'] for info in model.feature_info]
    torch.testing.assert_close(model.forward_head(final), expected)
