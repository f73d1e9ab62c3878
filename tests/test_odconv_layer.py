"""ODConv2d: the official numerics whichever computation serves a call, in forward and backward, in both memory
formats, scripted, traced and compiled."""
import re

import pytest
import torch

from zoo.layers import ODConv2d, fuse_conv_bn, odconv_fast, set_temperature
from zoo.layers.odconv_fast import ConvForm, ODConvPath, plan_odconv
from tests.helpers import FIXTURES, assert_logits_close, load_reference

LAYER_FIXTURES = sorted(p.stem for p in FIXTURES.glob('odconv2d_*.safetensors'))


def _layer_from_fixture_name(name: str) -> ODConv2d:
    c, o, k, s, g, n = map(int, re.fullmatch(r'odconv2d_c(\d+)_o(\d+)_k(\d+)_s(\d+)_g(\d+)_n(\d+)', name).groups())
    return ODConv2d(c, o, k, stride=s, groups=g, kernel_num=n)


def test_all_six_official_layer_fixtures_are_here():
    assert len(LAYER_FIXTURES) == 6


@pytest.mark.parametrize('name', LAYER_FIXTURES)
def test_reproduces_the_official_layer(name):
    ref = load_reference(name)
    layer = _layer_from_fixture_name(name)
    layer.load_state_dict(ref.state_dict)  # strict: the parameters map 1:1 onto the official ones
    layer.eval()
    with torch.no_grad():
        assert_logits_close(layer(ref.inputs[0]), ref.outputs[0])
        assert_logits_close(layer.forward_reference(ref.inputs[0]), ref.outputs[0])


# (in, out, kernel, stride, groups, kernel_num, input size), chosen so that together they take every computation
# (test_the_shapes_take_every_computation checks it): both sides of the small / large map switch (28 x 28 output
# positions), on small maps with several kernels both the one GEMM with all kernels (5 x 5 output at kernel_num 2) and
# the GEMM per sample (10 x 10 at kernel_num 4), 8 x 8 at kernel_num 4 (the first with autograd, the second without),
# and at 6 x 6 with 32 output channels kernel tiles that span the samples; without autograd a static kernel's GEMM
# runs as a 1x1 conv over the columns at 9 x 9 with 12 output channels, as a GEMM at 6 x 6 with 32; kernels larger
# than the maps scale the maps (a grouped 3x3 conv on 3 x 3, 1x1 convs to 96 channels on 2 x 2)
SHAPES = [
    (8, 12, 1, 1, 1, 1, 9), (8, 12, 1, 2, 1, 4, 9), (8, 12, 1, 1, 1, 2, 30), (8, 96, 1, 1, 1, 1, 2),
    (8, 12, 3, 1, 1, 1, 9), (8, 32, 3, 1, 1, 1, 6), (8, 12, 3, 2, 1, 1, 11),
    (8, 12, 3, 1, 1, 4, 10), (8, 12, 3, 2, 1, 2, 9), (8, 12, 3, 1, 1, 4, 8), (8, 32, 3, 1, 1, 4, 6),
    (8, 12, 3, 1, 1, 1, 30), (8, 12, 3, 1, 1, 4, 29), (8, 8, 3, 1, 8, 4, 9), (8, 8, 3, 2, 8, 1, 30),
    (8, 12, 3, 1, 2, 4, 9), (6, 6, 5, 1, 1, 1, 8), (16, 32, 3, 1, 2, 2, 3),
]
SHAPE_IDS = ['c{}_o{}_k{}_s{}_g{}_n{}_{}px'.format(*s) for s in SHAPES]


def _make_pair(shape, batch_size: int, train: bool, dtype: torch.dtype = torch.float64):
    c, o, k, s, g, n, size = shape
    torch.manual_seed(0)
    layer = ODConv2d(c, o, k, stride=s, groups=g, kernel_num=n).to(dtype).train(train)
    with torch.no_grad():  # non-trivial attention BatchNorm statistics
        layer.attention.bn.running_mean.uniform_(-0.5, 0.5)
        layer.attention.bn.running_var.uniform_(0.5, 2.)
    x = torch.randn(batch_size, c, size, size, dtype=dtype)
    return layer, x


def _plan(layer: ODConv2d, x: torch.Tensor) -> odconv_fast.ODConvPlan:
    _, _, spatial, kernels = layer.attention(x)
    return plan_odconv(x, layer.weight, spatial, kernels, layer.kernel_size, layer.stride, layer.padding,
                       layer.dilation, layer.groups)


def _output_and_grads(layer, x, forward):
    x = x.clone().requires_grad_()
    out = forward(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    return out.detach(), grads


def _assert_same_outputs_and_grads(layer: ODConv2d, x: torch.Tensor, forward, reference_forward,
                                   tolerance: float = 1e-10) -> None:
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    out, grads = _output_and_grads(layer, x, forward)
    layer.load_state_dict(state)  # undo the running-statistics update of the first pass
    ref_out, ref_grads = _output_and_grads(layer, x, reference_forward)
    torch.testing.assert_close(out, ref_out, rtol=tolerance, atol=tolerance)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=tolerance, atol=tolerance)


def test_the_shapes_take_every_computation():
    taken = set()
    for shape in SHAPES:
        for grad in (False, True):
            for batch_size in (1, 3):
                layer, x = _make_pair(shape, batch_size, train=False)
                with torch.set_grad_enabled(grad):
                    plan = _plan(layer, x)
                    channels_last_plan = _plan(layer, x.to(memory_format=torch.channels_last))
                taken.add(('path', plan.path))
                if plan.path == ODConvPath.COLUMNS_SHARED_KERNEL:
                    taken.add(('columns_as_conv', plan.columns_as_conv))
                if plan.path in (ODConvPath.PER_SAMPLE_FOLDED, ODConvPath.PER_SAMPLE):
                    taken |= {('conv', plan.conv), ('conv', channels_last_plan.conv)}
    every = {('path', path) for path in ODConvPath if path != ODConvPath.PORTABLE}  # PORTABLE: the trace tests
    every |= {('conv', conv) for conv in ConvForm} | {('columns_as_conv', True), ('columns_as_conv', False)}
    assert every <= taken, every - taken


@pytest.mark.parametrize('shape', SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize('batch_size', [1, 3])
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_fast_path_equals_official_computation(shape, batch_size, train):
    layer, x = _make_pair(shape, batch_size, train)
    _assert_same_outputs_and_grads(layer, x, layer, layer.forward_reference)


@pytest.mark.parametrize('shape', SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_channels_last_layer_equals_official_computation(shape, train):
    layer, x = _make_pair(shape, 3, train)
    layer, x = layer.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    _assert_same_outputs_and_grads(layer, x, layer, layer.forward_reference)


@pytest.mark.parametrize('shape', SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize('batch_size', [1, 3])
@pytest.mark.parametrize('grad', [False, True], ids=['no_grad', 'grad'])
def test_output_keeps_the_input_memory_format(shape, batch_size, grad):
    layer, x = _make_pair(shape, batch_size, train=False)
    channels_last = x.to(memory_format=torch.channels_last)
    with torch.set_grad_enabled(grad):
        assert layer(x).is_contiguous()
        out = layer(channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    if out.shape[-1] * out.shape[-2] > 1:  # a 1 x 1 map is in both formats
        assert not out.is_contiguous()


# float32 runs on oneDNN / MKL kernels that float64 does not reach (e.g. the 1x1 conv over the columns)
@pytest.mark.parametrize('dtype, tolerance', [(torch.float64, 1e-10), (torch.float32, 1e-5)],
                         ids=['float64', 'float32'])
@pytest.mark.parametrize('shape', SHAPES, ids=SHAPE_IDS)
def test_inference_without_autograd_equals_official_computation(shape, dtype, tolerance):
    layer, x = _make_pair(shape, 3, train=False, dtype=dtype)  # no_grad: the columns are written in place
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.forward_reference(x), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('shape, batch_size', [((8, 12, 3, 1, 1, 4, 10), 5), ((8, 32, 3, 1, 1, 4, 6), 3)],
                         ids=['tiles_of_a_few_samples', 'tiles_of_a_few_channels'])
def test_kernels_mixed_a_tile_at_a_time_equal_official_computation(monkeypatch, shape, batch_size, train):
    # 4 kernels x 32 channels outweigh 3 samples x 36 positions of columns: there the tiles hold all samples
    layer, x = _make_pair(shape, batch_size, train)
    monkeypatch.setattr(odconv_fast, 'STACKED_KERNELS_MAX_EXTRA_POSITIONS', 0)  # a GEMM per sample
    monkeypatch.setattr(odconv_fast, 'STACKED_KERNELS_MAX_EXTRA_POSITIONS_AUTOGRAD', 0)
    row_bytes = layer.weight[0, 0].numel() * layer.weight.element_size()
    monkeypatch.setattr(odconv_fast, 'MIXED_KERNELS_MAX_BYTES', 2 * layer.out_chs * row_bytes)  # 2 samples a tile
    monkeypatch.setattr(odconv_fast, 'MIXED_KERNEL_BLOCKS_MAX_BYTES', batch_size * 5 * row_bytes)  # 5 channels
    assert _plan(layer, x).path == ODConvPath.COLUMNS_MIXED_KERNELS
    _assert_same_outputs_and_grads(layer, x, layer, layer.forward_reference)


def test_cpu_tuned_computations_are_chosen_on_cpu_only():
    layer, x = _make_pair((8, 12, 3, 1, 1, 1, 9), 3, train=False)
    assert _plan(layer, x).path == ODConvPath.COLUMNS_SHARED_KERNEL
    layer, x = layer.to('meta'), x.to('meta')  # any other device
    assert _plan(layer, x).path == ODConvPath.PER_SAMPLE_FOLDED


@pytest.mark.parametrize('shape', SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize('batch_size', [1, 3])
def test_folded_batchnorm_equals_the_layer_then_the_norm(shape, batch_size):
    layer, x = _make_pair(shape, batch_size, train=False)
    bn = torch.nn.BatchNorm2d(layer.out_chs).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        expected = bn(layer(x))
        fused = fuse_conv_bn(layer, bn)
        torch.testing.assert_close(fused(x), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fused.forward_reference(x), expected, rtol=1e-10, atol=1e-10)
    assert layer.bias is None, 'the fold returns a new layer and leaves the original as it is'
    x.requires_grad_()  # the autograd forms too
    torch.testing.assert_close(fused(x).detach(), expected, rtol=1e-10, atol=1e-10)


def test_train_mode_with_a_batch_of_one_uses_the_running_statistics():
    layer, x = _make_pair((8, 12, 3, 1, 1, 4, 9), 1, train=True)
    before = layer.attention.bn.running_mean.clone()
    train_out = layer(x)
    torch.testing.assert_close(layer.attention.bn.running_mean, before)
    torch.testing.assert_close(train_out, layer.eval()(x))


def test_temperature_flattens_the_attentions():
    layer, x = _make_pair((8, 12, 3, 1, 1, 4, 9), 3, train=False)
    sharp = layer.attention(x)[3]
    set_temperature(layer, 30.)
    assert layer.attention.temperature == 30.
    flat = layer.attention(x)[3]
    spread = lambda p: p.max(dim=1).values - p.min(dim=1).values  # noqa: E731
    assert spread(flat).max() < spread(sharp).min()
    torch.testing.assert_close(flat.sum(dim=1), torch.ones(3, dtype=flat.dtype))


def test_scripted_layer_equals_eager_in_outputs_and_gradients():
    layer, x = _make_pair((8, 12, 3, 1, 1, 4, 9), 2, train=False)
    scripted = torch.jit.script(layer)  # shares the parameters; builds the columns without the autograd Function
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), layer(x))
    _assert_same_outputs_and_grads(layer, x, scripted, layer)


# kernel_num 1 and 4, 1x1 and 3x3, depthwise; small maps (columns in eager mode) and large ones
TRACE_SHAPES = [(8, 12, 1, 1, 1, 1, 9), (8, 12, 1, 2, 1, 4, 9), (8, 12, 3, 1, 1, 1, 9), (8, 12, 3, 2, 1, 4, 30),
                (8, 8, 3, 1, 8, 4, 9), (8, 8, 3, 2, 8, 1, 30)]


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('shape', TRACE_SHAPES, ids=['c{}_o{}_k{}_s{}_g{}_n{}_{}px'.format(*s) for s in TRACE_SHAPES])
def test_traced_at_batch_one_equals_eager_at_batch_four(shape, memory_format):
    """torch.jit.trace (and the legacy ONNX exporter built on it) records one graph for every batch size."""
    layer, x = _make_pair(shape, 4, train=False)
    layer, x = layer.to(memory_format=memory_format), x.to(memory_format=memory_format)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x[:1])
        torch.testing.assert_close(traced(x), layer(x), rtol=1e-10, atol=1e-10)
        assert traced(x).is_contiguous(memory_format=memory_format)


@pytest.mark.slow
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_compiled_layer_equals_eager_in_outputs_and_gradients(memory_format):
    """torch.compile (inductor, one graph per input shape): the columns without autograd, the columns' autograd
    fallback with it; at 30 x 30 the per-sample kernels (channels_last: the samples in the channels)."""
    for shape in ((8, 12, 3, 1, 1, 1, 9), (8, 12, 3, 1, 1, 1, 30)):
        layer, x = _make_pair(shape, 2, train=False)
        layer, x = layer.to(memory_format=memory_format), x.to(memory_format=memory_format)
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-10, atol=1e-10)
        _assert_same_outputs_and_grads(layer, x, compiled, layer)
