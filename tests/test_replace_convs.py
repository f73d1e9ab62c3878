"""Plug-and-play: ``zoo.replace_convs`` puts ODConv and X-volution into timm, torchvision and user CNNs, carrying the
weights over; the converted models train, script, trace, reparameterize, round-trip through ``local-dir:``, and the
X-volution warm-start tags load timm's ResNet weights."""
import copy

import pytest
import timm
import torch
import torchvision
from timm.utils import reparameterize_model
from torch import nn

import zoo
from zoo.hub import export_hub_folder
from zoo.layers import ODConv2d, XVolution2d
from tests.helpers import lay_out_hub_cache, relative_error, run_python_offline


def _calibrated(model: nn.Module, size: int = 96) -> nn.Module:
    """``model`` in eval mode as after training: BatchNorm affines drawn away from their init (timm zero-initialises
    the last norm of each residual block, which would hide the branch) and statistics of a few forward passes."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=generator) * 0.4 - 0.2)
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def _images(batch: int = 2, size: int = 96) -> torch.Tensor:
    """Image-like inputs: smooth, normalised colour fields rather than white noise."""
    low = torch.rand(batch, 3, size // 8, size // 8, generator=torch.Generator().manual_seed(7))
    return (nn.functional.interpolate(low, size=size, mode='bilinear') - 0.45) / 0.25


class _DetectionBackbone(nn.Module):
    """torchvision's Faster R-CNN ResNet-50 FPN backbone, with its feature pyramid flattened to one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([f.flatten(1) for f in self.body(x).values()], dim=1)


NETWORKS = {
    'timm_resnet18': lambda: timm.create_model('resnet18'),
    'timm_resnet50': lambda: timm.create_model('resnet50'),
    'timm_mobilenetv2_100': lambda: timm.create_model('mobilenetv2_100'),
    'timm_efficientnet_b0': lambda: timm.create_model('efficientnet_b0'),
    'torchvision_resnet50': lambda: torchvision.models.resnet50(),
    'torchvision_detection_backbone': _DetectionBackbone,
}
# X-volution's placement: the stride-16 stage's dense 3x3 convs; MobileNetV2 and EfficientNet have none there, their
# dense 3x3 conv is the stem; the detection backbone's ResNet is under body.body
XVOLUTION_INCLUDE = {'timm_mobilenetv2_100': ['conv_stem'], 'timm_efficientnet_b0': ['conv_stem'],
                     'torchvision_detection_backbone': ['body.body.layer3.*']}


@pytest.fixture(scope='module')
def calibrated_networks():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = _calibrated(NETWORKS[name]())
        return copy.deepcopy(cache[name])
    return get


def _replaced(network: nn.Module, name: str, op: str):
    include = XVOLUTION_INCLUDE.get(name) if op.startswith('xvolution') else None
    return zoo.replace_convs(network, op, include=include)


@pytest.mark.parametrize('name', NETWORKS)
def test_xvolution_computes_exactly_what_the_original_computed(calibrated_networks, name):
    original = calibrated_networks(name)
    converted, report = _replaced(calibrated_networks(name), name, 'xvolution')
    assert report.replaced and all(isinstance(converted.get_submodule(n), XVolution2d) for n, _ in report.replaced)
    x = _images()
    with torch.no_grad():
        assert relative_error(converted.eval()(x), original(x)) <= 1e-5


@pytest.mark.parametrize('kernel_num', [1, 4])
@pytest.mark.parametrize('name', NETWORKS)
def test_odconv_computes_what_the_original_computed(calibrated_networks, name, kernel_num):
    """Zero attention heads make every attention constant: the converted network starts as the original (in float64,
    so that the random networks' amplification of float32 rounding, up to 3e-3 in EfficientNet, stays out of it)."""
    original = calibrated_networks(name).double()
    converted, report = zoo.replace_convs(calibrated_networks(name).double(), 'odconv', kernel_num=kernel_num)
    assert len(report.replaced) == sum(isinstance(m, nn.Conv2d) for m in original.modules()) - 1  # all but the stem
    x = _images().double()
    with torch.no_grad():
        assert relative_error(converted.eval()(x), original(x)) <= 1e-9


@pytest.mark.parametrize('op', ['odconv', 'xvolution'])
@pytest.mark.parametrize('name', ['timm_resnet18', 'timm_mobilenetv2_100'])
def test_converted_models_train_reparameterize_and_script(calibrated_networks, name, op):
    converted, report = _replaced(calibrated_networks(name), name, op)
    before = {n for n, _ in calibrated_networks(name).named_parameters()}
    optimizer = torch.optim.SGD(converted.parameters(), lr=1e-3)
    for _ in range(2):  # zero-initialised last layers (ODConv's heads, X-volution's norm) pass gradients from step 2
        optimizer.zero_grad()
        converted.train()(_images()).logsumexp(dim=1).mean().backward()
        optimizer.step()
    new = [(n, p) for n, p in converted.named_parameters() if n not in before]
    assert new and all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in new), \
        [n for n, p in new if p.grad is None or p.grad.abs().sum() == 0]
    converted.zero_grad()
    # deployment forms in float64: a random MobileNetV2 amplifies float32 rounding to about 1e-5 by itself
    converted.eval().double()
    fused = reparameterize_model(converted)
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in fused.named_modules()
                   if any(n.startswith(r) for r, _ in report.replaced))
    x = _images().double()
    with torch.no_grad():
        expected = converted(x)
        assert relative_error(fused(x), expected) <= 1e-9
        assert relative_error(torch.jit.script(converted)(x), expected) <= 1e-9
        assert relative_error(torch.jit.trace(converted, x[:1])(x), expected) <= 1e-9


def test_layers_it_cannot_convert_are_skipped_with_the_reason(calibrated_networks):
    _, report = zoo.replace_convs(calibrated_networks('timm_mobilenetv2_100'), 'xvolution',
                                  include=['blocks.4.*', 'conv_stem'])
    reasons = dict(report.skipped)
    assert reasons and all(why.startswith('groups=') for why in reasons.values())  # depthwise 3x3 convs
    assert [n for n, _ in report.replaced] == ['conv_stem']
    assert 'skipped: groups=' in str(report) and 'parameters:' in str(report) and 'MACs at' in str(report)


class _SmallCnn(nn.Module):
    """A user's own network: three conv-BN-ReLU layers (one with a bias and no norm) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(torch.relu(self.conv3(x)).mean((2, 3)))


@pytest.mark.parametrize('op', ['odconv', 'xvolution'])
def test_a_users_own_cnn_converts_trains_and_deploys(op):
    torch.manual_seed(0)
    model, report = zoo.replace_convs(_SmallCnn(), op, include=['*'])
    if op == 'xvolution':
        assert dict(report.skipped) == {'conv3': "has a bias (X-volution's conv branch has none)"}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 3, (16,))
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model.train()(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    deployed = reparameterize_model(model.eval())
    with torch.no_grad():
        expected = model(x)
        assert relative_error(deployed(x), expected) <= 1e-5
        torch.testing.assert_close(torch.jit.trace(deployed, x[:1])(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('op', ['odconv', 'xvolution'])
def test_a_converted_timm_model_round_trips_through_local_dir(tmp_path, calibrated_networks, op):
    converted, _ = _replaced(calibrated_networks('timm_resnet18'), 'timm_resnet18', op)
    export_hub_folder(converted.eval(), tmp_path / 'out')
    reloaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    assert reloaded.pretrained_cfg['architecture'] == 'replaced_convs'
    kind = ODConv2d if op == 'odconv' else XVolution2d
    assert sum(isinstance(m, kind) for m in reloaded.modules()) == sum(isinstance(m, kind) for m in converted.modules())
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), converted(x), rtol=0, atol=0)


def test_replaced_convs_builds_a_replaced_timm_model_by_name_that_exports_and_reloads(tmp_path):
    model = timm.create_model('replaced_convs', base='resnet34', op='xvolution_sa', num_classes=5).eval()
    assert sum(isinstance(m, XVolution2d) for m in model.modules()) == 12  # both 3x3 convs of layer3's 6 blocks
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == (1, 5)
    export_hub_folder(model, tmp_path / 'out', verify=True)
    reloaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="unknown op 'dynamic': use one of odconv, xvolution, xvolution_sa"):
        zoo.replace_convs(_SmallCnn(), 'dynamic')


_LOAD_WARM_START = '''
import sys, torch, timm, zoo
x, expected = torch.load(sys.argv[1])
model = timm.create_model('xvolution_resnet50.a1_in1k', pretrained=True).eval()
with torch.no_grad():
    print((model(x) - expected).abs().max().item() / expected.abs().max().item())
'''


@pytest.mark.slow
def test_xvolution_warm_start_loads_timm_resnet50_weights_from_the_hub_cache(tmp_path):
    """``xvolution_resnet50.a1_in1k``: timm's resnet50.a1_in1k weights in the convolution branches, so the model
    equals timm's resnet50 with those weights (offline: a Hub cache laid out on disk)."""
    from safetensors.torch import save_file
    resnet = _calibrated(timm.create_model('resnet50'))
    save_file(resnet.state_dict(), tmp_path / 'model.safetensors')
    lay_out_hub_cache(tmp_path / 'hub', 'timm/resnet50.a1_in1k',
                      {'model.safetensors': (tmp_path / 'model.safetensors').read_bytes()})
    x = _images()
    with torch.no_grad():
        torch.save((x, resnet(x)), tmp_path / 'io.pt')
    result = run_python_offline(_LOAD_WARM_START, tmp_path / 'io.pt', hub_cache=tmp_path / 'hub')
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) <= 1e-5
