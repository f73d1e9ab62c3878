"""ODConv2d: the official numerics, whichever computation serves a layer shape, in forward and backward."""
import re

import pytest
import torch

from zoo.layers import ODConv2d, set_temperature
from conftest import FIXTURES, assert_logits_close, load_reference

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


# (in, out, kernel, stride, groups, kernel_num, input size): every computation path, incl. both sides of the
# small / large feature-map switch (28 x 28 output positions) and, on small maps with several kernels, both the one
# GEMM with all kernels (5 x 5 output at kernel_num 2) and the GEMM per sample (10 x 10 at kernel_num 4), and 8 x 8 at
# kernel_num 4, which takes the first with autograd and the second without; at 6 x 6 with 32 output channels the
# per-sample GEMM's kernel tiles span the samples instead of the channels. Without autograd, a static kernel's GEMM
# runs as a 1x1 conv over the columns at 9 x 9 with 12 output channels, as a GEMM at 6 x 6 with 32
SHAPES = [
    (8, 12, 1, 1, 1, 1, 9), (8, 12, 1, 2, 1, 4, 9), (8, 12, 1, 1, 1, 2, 30),
    (8, 12, 3, 1, 1, 1, 9), (8, 32, 3, 1, 1, 1, 6), (8, 12, 3, 2, 1, 1, 11),
    (8, 12, 3, 1, 1, 4, 10), (8, 12, 3, 2, 1, 2, 9), (8, 12, 3, 1, 1, 4, 8), (8, 32, 3, 1, 1, 4, 6),
    (8, 12, 3, 1, 1, 1, 30), (8, 12, 3, 1, 1, 4, 29), (8, 8, 3, 1, 8, 4, 9), (8, 8, 3, 2, 8, 1, 30),
    (8, 12, 3, 1, 2, 4, 9), (6, 6, 5, 1, 1, 1, 8),
]


def _make_pair(shape, batch_size: int, train: bool):
    c, o, k, s, g, n, size = shape
    torch.manual_seed(0)
    layer = ODConv2d(c, o, k, stride=s, groups=g, kernel_num=n).double().train(train)
    with torch.no_grad():  # non-trivial attention BatchNorm statistics
        layer.attention.bn.running_mean.uniform_(-0.5, 0.5)
        layer.attention.bn.running_var.uniform_(0.5, 2.)
    x = torch.randn(batch_size, c, size, size, dtype=torch.float64)
    return layer, x


def _output_and_grads(layer, x, forward):
    x = x.clone().requires_grad_()
    out = forward(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    return out.detach(), grads


def _assert_same_outputs_and_grads(layer: ODConv2d, x: torch.Tensor, forward, reference_forward) -> None:
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    out, grads = _output_and_grads(layer, x, forward)
    layer.load_state_dict(state)  # undo the running-statistics update of the first pass
    ref_out, ref_grads = _output_and_grads(layer, x, reference_forward)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


def _assert_fast_path_equals_official_computation(layer: ODConv2d, x: torch.Tensor) -> None:
    _assert_same_outputs_and_grads(layer, x, layer, layer.forward_reference)


@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'c{}_o{}_k{}_s{}_g{}_n{}_{}px'.format(*s))
@pytest.mark.parametrize('batch_size', [1, 3])
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_fast_path_equals_official_computation(shape, batch_size, train):
    _assert_fast_path_equals_official_computation(*_make_pair(shape, batch_size, train))


@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'c{}_o{}_k{}_s{}_g{}_n{}_{}px'.format(*s))
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_channels_last_layer_equals_official_computation_and_stays_channels_last(shape, train):
    layer, x = _make_pair(shape, 3, train)
    layer, x = layer.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    _assert_fast_path_equals_official_computation(layer, x)
    with torch.no_grad():
        assert layer(x).is_contiguous(memory_format=torch.channels_last)


# float32 runs on oneDNN / MKL kernels that float64 does not reach (e.g. the 1x1 conv over the columns)
@pytest.mark.parametrize('dtype, tolerance', [(torch.float64, 1e-10), (torch.float32, 1e-5)],
                         ids=['float64', 'float32'])
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'c{}_o{}_k{}_s{}_g{}_n{}_{}px'.format(*s))
def test_inference_without_autograd_equals_official_computation(shape, dtype, tolerance):
    layer, x = _make_pair(shape, 3, train=False)  # no_grad: the columns are written in place
    layer, x = layer.to(dtype), x.to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.forward_reference(x), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('shape, batch_size', [((8, 12, 3, 1, 1, 4, 10), 5), ((8, 32, 3, 1, 1, 4, 6), 3)],
                         ids=['tiles_of_a_few_samples', 'tiles_of_a_few_channels'])
def test_kernels_mixed_a_tile_at_a_time_equal_official_computation(shape, batch_size, train):
    # 4 kernels x 32 channels outweigh 3 samples x 36 positions of columns: there the tiles hold all samples
    layer, x = _make_pair(shape, batch_size, train)
    layer.stacked_kernels_max_extra_positions = layer.stacked_kernels_max_extra_positions_autograd = 0  # per sample
    row_bytes = layer.weight[0, 0].numel() * layer.weight.element_size()
    layer.mixed_kernels_max_bytes = 2 * layer.out_chs * row_bytes  # 2 samples a tile
    layer.mixed_kernel_blocks_max_bytes = batch_size * 5 * row_bytes  # 5 channels a tile
    _assert_fast_path_equals_official_computation(layer, x)


@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'c{}_o{}_k{}_s{}_g{}_n{}_{}px'.format(*s))
@pytest.mark.parametrize('batch_size', [1, 3])
def test_folded_output_affine_equals_scaling_and_shifting_the_output(shape, batch_size):
    layer, x = _make_pair(shape, batch_size, train=False)
    scale, shift = torch.rand(layer.out_chs, dtype=x.dtype) + 0.5, torch.randn(layer.out_chs, dtype=x.dtype)
    with torch.no_grad():
        expected = layer(x) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        layer.fuse_output_affine(scale, shift)
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.forward_reference(x), expected, rtol=1e-10, atol=1e-10)
    x.requires_grad_()  # the autograd forms too
    torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-10, atol=1e-10)


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
