"""X-volution: the reconstructed operator, its single-operator inference form, and the X-volution ResNets."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from timm.models import save_for_hf
from timm.utils import reparameterize_model

from zoo.convert import CheckpointMismatchError
from zoo.layers import PixelShiftConv2d, XVolution2d, pixel_shift_products
from tests.helpers import calibrated_xvolution, lay_out_hub_cache, relative_error, run_python_offline


def randomize_norms(module: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affines everywhere, the attention's included (its scale starts at 0)."""
    generator = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                for tensor, low, high in ((m.weight, .5, 1.5), (m.bias, -.5, .5), (m.running_mean, -.5, .5),
                                          (m.running_var, .5, 1.5)):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return module


class TestPixelShiftProducts:
    @pytest.mark.parametrize('stride', [1, 2])
    def test_are_the_query_times_each_zero_filled_neighbour_of_the_key(self, stride):
        q, k = torch.randn(2, 3, 7, 6), torch.randn(2, 3, 7, 6)
        # independent derivation: unfold gathers the 3x3 neighbourhood (zero padded), channel-major
        neighbours = F.unfold(k, 3, padding=1).view(2, 3, 9, 7, 6)
        expected = (q.unsqueeze(2) * neighbours).transpose(1, 2).reshape(2, 27, 7, 6)[..., ::stride, ::stride]
        torch.testing.assert_close(pixel_shift_products(q, k, stride), expected)

    def test_gradients(self):
        q = torch.randn(1, 2, 5, 4, dtype=torch.double, requires_grad=True)
        k = torch.randn(1, 2, 5, 4, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: pixel_shift_products(a, b, 2), (q, k))


_OPERATOR_CASES = [  # (in, out, stride, dilation, attention)
    (16, 24, 1, 1, 'pssa'), (16, 24, 2, 1, 'pssa'), (32, 32, 1, 2, 'pssa'), (24, 48, 2, 1, 'pssa'),
    (16, 24, 1, 1, 'sa'), (16, 24, 2, 1, 'sa'), (24, 48, 2, 1, 'sa'),
]


class TestOperator:
    @pytest.mark.parametrize('in_chs,out_chs,stride,dilation,attention', _OPERATOR_CASES)
    def test_fused_form_equals_the_training_form(self, in_chs, out_chs, stride, dilation, attention):
        op = randomize_norms(XVolution2d(in_chs, out_chs, stride, dilation, attention)).eval()
        before = copy.deepcopy(op.state_dict())
        fused = op.fuse()
        assert fused is not op and all(torch.equal(v, before[k]) for k, v in op.state_dict().items())
        if isinstance(fused, PixelShiftConv2d):
            fused.chunk_elements = 1  # one sample per GEMM: the chunked path
        x = torch.randn(3, in_chs, 13, 11)
        with torch.no_grad():
            expected, actual = op(x), fused(x)
        assert actual.shape == op.conv(x).shape
        assert relative_error(actual, expected) <= 1e-5

    def test_pssa_fuses_into_one_operator(self):
        fused = XVolution2d(8, 8).eval().fuse()
        assert isinstance(fused, PixelShiftConv2d)
        assert [type(m) for m in fused.children()] == [nn.Conv2d]  # only the q/k projection besides the GEMM

    @pytest.mark.parametrize('attention', ['pssa', 'sa'])
    def test_gradients_reach_every_parameter(self, attention):
        op = randomize_norms(XVolution2d(8, 12, 2, attention=attention)).train()
        op(torch.randn(2, 8, 9, 9)).square().mean().backward()
        for name, p in op.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    @pytest.mark.parametrize('attention', ['pssa', 'sa'])
    def test_fresh_operator_is_its_convolution_branch(self, attention):
        op = XVolution2d(8, 12, attention=attention).eval()
        x = torch.randn(2, 8, 9, 9)
        with torch.no_grad():
            torch.testing.assert_close(op(x), op.bn(op.conv(x)))

    def test_fused_form_traces_and_exports_for_any_batch(self):
        fused = randomize_norms(XVolution2d(8, 12, 2)).eval().fuse()
        fused.chunk_elements = 1
        x, other = torch.randn(1, 8, 9, 9), torch.randn(3, 8, 9, 9)
        with torch.no_grad():
            traced = torch.jit.trace(fused, x)
            exported = torch.export.export(fused, (other,), dynamic_shapes=({0: torch.export.Dim('batch')},))
            expected = fused(other)
            torch.testing.assert_close(traced(other), expected)
            torch.testing.assert_close(exported.module()(other[:2]), expected[:2])

    def test_rejects_unknown_attention(self):
        with pytest.raises(ValueError, match="unknown X-volution attention 'local': use 'pssa' or 'sa'"):
            XVolution2d(8, 8, attention='local')


MODELS = {'xvolution_resnet34': 'resnet34', 'xvolution_resnet50': 'resnet50',
          'xvolution_sa_resnet34': 'resnet34', 'xvolution_sa_resnet50': 'resnet50'}


def _as_xvolution_keys(plain_state_dict, model):
    """A plain ResNet state dict renamed onto the X-volution ResNet's convolution branches."""
    model_keys = set(model.state_dict())
    out = {}
    for key, value in plain_state_dict.items():
        if key not in model_keys:
            block, name, param = key.rsplit('.', 2)
            key = f'{block}.conv{name[-1]}.conv.{param}' if name.startswith('conv') else \
                f'{block}.conv{name[-1]}.bn.{param}'
        out[key] = value
    return out


class TestModels:
    @pytest.mark.parametrize('model_name', MODELS)
    def test_with_zero_attention_scale_the_model_is_its_plain_resnet(self, model_name):
        plain = randomize_norms(timm.create_model(MODELS[model_name])).eval()
        model = timm.create_model(model_name).eval()
        missing, unexpected = model.load_state_dict(_as_xvolution_keys(plain.state_dict(), model), strict=False)
        assert not unexpected and missing and all('.attn.' in k for k in missing)
        x = torch.randn(2, 3, 96, 96)
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x))

    @pytest.mark.parametrize('model_name', ['xvolution_resnet34', 'xvolution_resnet50'])
    def test_only_stage_3_convolutions_are_xvolutions(self, model_name):
        model = timm.create_model(model_name)
        stages = {name.split('.')[0] for name, m in model.named_modules() if isinstance(m, XVolution2d)}
        per_block = 2 if '34' in model_name else 1
        assert stages == {'layer3'}
        assert sum(isinstance(m, XVolution2d) for m in model.modules()) == 6 * per_block

    @pytest.mark.parametrize('model_name', MODELS)
    def test_reparameterized_equals_the_training_form_and_scripts(self, model_name):
        model = calibrated_xvolution(timm.create_model(model_name))
        fused = reparameterize_model(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.layer3.modules())
        x = torch.randn(2, 3, 96, 96)
        with torch.no_grad():
            expected, actual = model(x), fused(x)
            scripted = torch.jit.script(fused)(x)
        assert relative_error(actual, expected) <= 1e-5
        torch.testing.assert_close(scripted, actual)

    def test_reparameterized_backbone_gives_the_same_features(self):
        model = calibrated_xvolution(timm.create_model('xvolution_resnet50'))
        fused = reparameterize_model(model)
        x = torch.randn(1, 3, 96, 96)
        with torch.no_grad():
            expected = model.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
            actual = fused.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
        for a, e in zip(actual, expected):
            assert relative_error(a, e) <= 1e-5

    def test_grouped_convs_are_refused(self):
        with pytest.raises(ValueError, match='X-volution replaces plain 3x3 convs'):
            timm.create_model('xvolution_resnet50', cardinality=32, base_width=4)


@pytest.fixture(scope='module')
def trained():
    return calibrated_xvolution(timm.create_model('xvolution_resnet34', num_classes=5))


class TestUserWeights:
    """No official weights exist: the weights that matter are the ones users train and publish."""

    def test_file_checkpoint_of_a_training_run(self, tmp_path, trained):
        torch.save({'epoch': 3, 'state_dict': trained.state_dict()}, tmp_path / 'last.pth.tar')
        model = timm.create_model('xvolution_resnet34', pretrained=True, num_classes=5,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / 'last.pth.tar'))).eval()
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(x), trained(x))

    def test_checkpoint_of_the_other_attention_is_refused_by_name(self, tmp_path, trained):
        torch.save(trained.state_dict(), tmp_path / 'pssa.pth')
        with pytest.raises(CheckpointMismatchError, match=r'does not fit XVolutionResNet: .*attn\.v\.weight'):
            timm.create_model('xvolution_sa_resnet34', pretrained=True, pretrained_cfg_overlay=dict(
                file=str(tmp_path / 'pssa.pth')))

    @pytest.mark.slow
    def test_hub_repo_written_by_timm_loads_offline(self, tmp_path, trained):
        save_for_hf(trained, tmp_path / 'folder', safe_serialization=True)
        files = {p.name: p.read_bytes() for p in (tmp_path / 'folder').iterdir()}
        lay_out_hub_cache(tmp_path / 'hub', 'someone/xvolution-resnet34-pets', files)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            torch.save((x, trained(x)), tmp_path / 'io.pt')
        script = ('import sys, torch, timm, zoo\n'
                  'x, expected = torch.load(sys.argv[1])\n'
                  'model = timm.create_model("hf-hub:someone/xvolution-resnet34-pets", pretrained=True).eval()\n'
                  'with torch.no_grad():\n'
                  '    print((model(x) - expected).abs().max().item())\n')
        result = run_python_offline(script, tmp_path / 'io.pt', hub_cache=tmp_path / 'hub')
        assert result.returncode == 0, result.stderr
        assert float(result.stdout) <= 1e-5
