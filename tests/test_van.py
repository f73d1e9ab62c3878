"""VAN: the architecture of the paper, its options, and its deploy-time fusion."""
import pytest
import torch
import timm
import timm.optim
from timm.utils import reparameterize_model
from torch import nn

from zoo.layers import LargeKernelAttention, with_input_affine
from zoo.models.van import VAN
from tests.helpers import load_reference, relative_error


def _official_van_b0() -> VAN:
    """van_b0 with the reference weights: random BatchNorm statistics and layer scales far from their init."""
    ref = load_reference('van_b0')
    return timm.create_model('van_b0', pretrained=True, pretrained_cfg_overlay=dict(state_dict=ref.state_dict)).eval()


class TestLargeKernelAttention:
    def test_receptive_field_is_the_paper_kernel_rounded_up_to_23x23(self):
        """5x5 then 7x7 with dilation 3 reach 2 + 9 = 11 pixels each side: K = 21 rounded up to a whole tap."""
        lka = LargeKernelAttention(4)
        attn_map = lambda x: lka.conv_pw(lka.conv_dw_dilated(lka.conv_dw(x)))  # noqa: E731
        x = torch.randn(1, 4, 41, 41, requires_grad=True)
        attn_map(x)[0, :, 20, 20].sum().backward()
        rows, cols = torch.nonzero(x.grad.abs().sum(dim=(0, 1)), as_tuple=True)
        assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (9, 31, 9, 31)


class TestOptions:
    def test_num_classes_and_in_chans(self):
        model = timm.create_model('van_b0', num_classes=5, in_chans=1).eval()
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)

    def test_odd_input_sizes(self):
        model = timm.create_model('van_b0').eval()
        assert model(torch.randn(1, 3, 97, 75)).shape == (1, 1000)

    def test_layer_decay_gives_the_stem_every_block_and_the_final_norms_a_group(self):
        model = timm.create_model('van_b0')
        optimizer = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, layer_decay=0.75)
        scales = sorted({group['lr_scale'] for group in optimizer.param_groups})
        assert len(scales) == sum(len(s.blocks) for s in model.stages) + 2


class TestReparameterize:
    @pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
    def test_fused_model_equals_training_form(self, memory_format):
        model = _official_van_b0().to(memory_format=memory_format)
        fused = reparameterize_model(model)
        x = load_reference('van_b0').inputs[0].to(memory_format=memory_format)
        with torch.no_grad():
            assert relative_error(fused(x), model(x)) <= 1e-5
            assert relative_error(fused.forward_features(x), model.forward_features(x)) <= 1e-5

    def test_fused_model_has_the_same_input_gradient(self):
        model = _official_van_b0()
        fused = reparameterize_model(model)
        x = torch.randn(2, 3, 64, 64)
        grads = []
        for m in (model, fused):
            xi = x.clone().requires_grad_()
            m(xi).logsumexp(dim=1).sum().backward()
            grads.append(xi.grad)
        assert relative_error(grads[1], grads[0]) <= 1e-4

    def test_removes_every_batchnorm_and_layer_scale_multiply(self):
        model = _official_van_b0()
        fused = reparameterize_model(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), 'the original must be left untouched'

    def test_is_idempotent_and_scriptable(self):
        fused = reparameterize_model(_official_van_b0())
        twice = reparameterize_model(fused)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(twice(x), fused(x))
            torch.testing.assert_close(torch.jit.script(fused)(x), fused(x))


def test_input_affine_fold_refuses_a_padded_conv():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    with pytest.raises(ValueError, match='padded or grouped'):
        with_input_affine(conv, torch.ones(4), torch.zeros(4))
