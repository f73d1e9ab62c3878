"""EfficientMod: the modulation operator, the architectures' options, the deploy-time fusion and ONNX export
(official checkpoints: test_official_checkpoints.py)."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from timm.utils import reparameterize_model

from zoo.layers import EfficientModulation
from zoo.models.efficientmod import AttentionBlock, ModulationBlock
from tests.helpers import assert_logits_close, load_reference

def paper_modulation(op: EfficientModulation, x: torch.Tensor) -> torch.Tensor:
    """The official formula from the parameters alone: ``fc2(act(fc1(x)) * ctx(x).repeat(ratio))`` with
    ``ctx = g(gelu(dwconv(f(x))))`` on (B, H, W, C) maps (no activation after fc1 at ratio 1)."""
    ctx = F.linear(x, op.context.f.weight, op.context.f.bias).permute(0, 3, 1, 2)
    ctx = F.gelu(F.conv2d(ctx, op.context.conv.weight, op.context.conv.bias, padding=op.context.conv.padding,
                          groups=ctx.shape[1])).permute(0, 2, 3, 1)
    ctx = F.linear(ctx, op.context.g.weight, op.context.g.bias)
    v = F.linear(x, op.fc1.weight, op.fc1.bias)
    if op.ratio > 1:
        v = F.gelu(v)
    return F.linear(v * ctx.repeat(1, 1, 1, op.ratio), op.fc2.weight, op.fc2.bias)


class TestModulation:
    @pytest.mark.parametrize('batch_size', [1, 2])
    @pytest.mark.parametrize('ratio', [1, 4, 6])
    def test_autograd_form_equals_the_paper_in_outputs_and_gradients(self, ratio, batch_size):
        torch.manual_seed(0)
        op = EfficientModulation(8, ratio).double()
        x = torch.randn(batch_size, 5, 6, 8, dtype=torch.double, requires_grad=True)
        ours, paper = op(x), paper_modulation(op, x)
        torch.testing.assert_close(ours, paper, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(ours)
        got = torch.autograd.grad(ours, [x, *op.parameters()], grad)
        want = torch.autograd.grad(paper, [x, *op.parameters()], grad)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize('batch_size', [1, 2])
    @pytest.mark.parametrize('ratio', [1, 6])
    @pytest.mark.parametrize('chunk_rows', [None, 7])  # whole, or 7 positions at a time with a ragged last chunk
    def test_in_place_inference_equals_the_paper_and_leaves_the_input(self, ratio, chunk_rows, batch_size):
        torch.manual_seed(0)
        op = EfficientModulation(8, ratio).double().eval()
        if chunk_rows:
            op.chunk_elements = chunk_rows * 8 * ratio
        x = torch.randn(batch_size, 5, 6, 8, dtype=torch.double)
        x_before = x.clone()
        with torch.no_grad():
            torch.testing.assert_close(op(x), paper_modulation(op, x), rtol=1e-12, atol=1e-12)
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
    def test_honour_num_classes_and_in_chans(self):
        model = timm.create_model('efficientmod_xxs', num_classes=5, in_chans=1)
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
def official_model():
    ref = load_reference('efficientmod_xxs')
    model = timm.create_model('efficientmod_xxs', pretrained=True,
                              pretrained_cfg_overlay=dict(state_dict=ref.state_dict)).eval()
    return model, ref


def test_official_logits_from_both_computations(official_model):
    """In place without autograd (chunked on CPU, or whole), and the autograd form."""
    model, ref = official_model
    x, expected = ref.inputs[0], ref.outputs[0]
    assert_logits_close(model(x).detach(), expected)
    with torch.no_grad():
        assert_logits_close(model(x), expected)
        whole = copy.deepcopy(model)
        for m in whole.modules():
            if isinstance(m, EfficientModulation):
                m.chunk_elements = 10 ** 9
        assert_logits_close(whole(x), expected)


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


@pytest.mark.slow
def test_onnx_export_matches_onnxruntime_for_any_batch(tmp_path):
    ort = pytest.importorskip('onnxruntime', reason='ONNX export is checked with the [onnx] extra')
    model = timm.create_model('efficientmod_xxs').eval()
    path = tmp_path / 'efficientmod_xxs.onnx'
    torch.onnx.export(model, (torch.randn(2, 3, 224, 224),), str(path), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim('batch')},))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    x = torch.randn(3, 3, 224, 224)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_logits_close(torch.from_numpy(out), model(x))
