"""ODConv2d: each of its computations against the official layer fixtures and against the paper's formula evaluated
here in float64 (independently of zoo's code), in forward and backward, in both memory formats, at batch 1 and 3,
trained and evaluated, scripted, traced, exported and compiled."""
import re
from typing import Callable, List, Tuple

import pytest
import torch
import torch.nn.functional as F

from zoo.layers import ODConv2d, fuse_conv_bn, set_temperature
from tests.helpers import FIXTURES, assert_logits_close, load_reference

LAYER_FIXTURES = sorted(p.stem for p in FIXTURES.glob('odconv2d_*.safetensors'))


def paper_odconv(layer: ODConv2d, x: torch.Tensor) -> torch.Tensor:
    """Eq. 2 of the paper with the official attention branch, one sample at a time, from the layer's parameters only:
    y = (sum_i a_ki * a_f * a_c * a_s * W_i) conv x. The attention BatchNorm normalises with the batch statistics in
    training (batch > 1) and the running ones otherwise; this function does not update them."""
    att = layer.attention
    b = x.shape[0]
    pooled = x.mean((2, 3))
    hidden = pooled @ att.fc.weight.flatten(1).t()
    bn = att.bn
    if att.training and b > 1:
        mean, var = hidden.mean(0), hidden.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    hidden = torch.relu((hidden - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)

    def head(fc: torch.nn.Conv2d) -> torch.Tensor:
        return (hidden @ fc.weight.flatten(1).t() + fc.bias) / att.temperature

    n, o, i, k = layer.kernel_num, layer.out_chs, layer.in_chs // layer.groups, layer.kernel_size
    bank = layer.weight.reshape(n, o, i, k, k)
    a_c = torch.sigmoid(head(att.channel_fc))  # (B, C_in)
    a_f = torch.sigmoid(head(att.filter_fc)) if att.filter_fc is not None else torch.ones(b, o, dtype=x.dtype)
    a_s = torch.sigmoid(head(att.spatial_fc)) if att.spatial_fc is not None else torch.ones(b, k * k, dtype=x.dtype)
    a_k = torch.softmax(head(att.kernel_fc), 1) if att.kernel_fc is not None else torch.ones(b, 1, dtype=x.dtype)
    # input channel j of output channel c's group is channel (c // (C_out / groups)) * (C_in / groups) + j
    input_index = (torch.arange(o) // (o // layer.groups)).view(o, 1) * i + torch.arange(i).view(1, i)
    outs = []
    for s in range(b):
        kernel = sum(a_k[s, m] * bank[m] for m in range(n))
        kernel = kernel * a_s[s].view(1, 1, k, k) * a_c[s][input_index].view(o, i, 1, 1) * a_f[s].view(o, 1, 1, 1)
        out = F.conv2d(x[s:s + 1], kernel, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        outs.append(out)
    return torch.cat(outs)


def _layer_from_fixture_name(name: str) -> ODConv2d:
    c, o, k, s, g, n = map(int, re.fullmatch(r'odconv2d_c(\d+)_o(\d+)_k(\d+)_s(\d+)_g(\d+)_n(\d+)', name).groups())
    return ODConv2d(c, o, k, stride=s, groups=g, kernel_num=n)


def _force(layer: ODConv2d, computation: str) -> ODConv2d:
    """``layer`` set, through its documented rule attributes, to run ``computation`` in eager mode on CPU
    (``per_sample_columns`` of a k x k conv runs only scripted or exported: see the scripted tests)."""
    layer.columns_device = 'cpu' if computation != 'grouped' else 'none'
    layer.columns_max_positions = 10 ** 9
    layer.columns_tile_bytes = 4096  # several blocks of output channels, the last one short at some batch sizes
    layer.columns_conv_min_rows = 0 if layer.stride == 1 else 10 ** 9  # both routes of a static kernel's GEMM
    layer.stacked_max_extra_positions = 10 ** 9 if computation == 'stacked_columns' else 0
    return layer


# (in, out, kernel, stride, groups, kernel_num, input size, the computation it takes on CPU when forced)
CASES = [
    (8, 12, 3, 1, 1, 4, 9, 'grouped'), (8, 12, 3, 2, 1, 1, 9, 'grouped'), (8, 8, 3, 1, 8, 4, 7, 'grouped'),
    (8, 12, 3, 1, 2, 2, 6, 'grouped'), (6, 6, 5, 1, 1, 1, 8, 'grouped'), (8, 12, 1, 2, 1, 4, 9, 'grouped'),
    (8, 32, 3, 1, 1, 1, 6, 'gated_columns'), (8, 32, 3, 2, 1, 1, 7, 'gated_columns'),
    (8, 12, 3, 1, 1, 4, 6, 'gated_columns'), (8, 12, 3, 2, 1, 2, 7, 'gated_columns'),
    (8, 2, 3, 1, 1, 3, 5, 'gated_columns'),  # one block of output channels
    (8, 12, 3, 1, 1, 4, 6, 'stacked_columns'), (8, 12, 3, 2, 1, 2, 7, 'stacked_columns'),
    (8, 96, 1, 1, 1, 1, 2, 'gated_columns'), (8, 96, 1, 2, 1, 1, 3, 'gated_columns'),
    (8, 12, 1, 1, 1, 1, 9, 'per_sample_columns'), (8, 12, 1, 2, 1, 4, 9, 'per_sample_columns'),
]
CASE_IDS = ['c{}_o{}_k{}_s{}_g{}_n{}_{}px_{}'.format(*case) for case in CASES]


def _make(case, batch_size: int, train: bool, memory_format=torch.contiguous_format,
          dtype=torch.float64) -> Tuple[ODConv2d, torch.Tensor]:
    c, o, k, s, g, n, size, computation = case
    torch.manual_seed(0)
    layer = _force(ODConv2d(c, o, k, stride=s, groups=g, kernel_num=n), computation).to(dtype).train(train)
    with torch.no_grad():  # non-trivial attention BatchNorm statistics
        layer.attention.bn.running_mean.uniform_(-0.5, 0.5)
        layer.attention.bn.running_var.uniform_(0.5, 2.)
    x = torch.randn(batch_size, c, size, size, dtype=dtype)
    return layer.to(memory_format=memory_format), x.to(memory_format=memory_format)


def _output_and_grads(layer: ODConv2d, x: torch.Tensor, forward: Callable) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    x = x.clone().requires_grad_()
    out = forward(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    return out.detach(), grads


def _assert_equals_paper(layer: ODConv2d, x: torch.Tensor, forward: Callable, tolerance: float = 1e-10) -> None:
    """Outputs and gradients (input and every parameter) of ``forward`` equal :func:`paper_odconv`'s."""
    out, grads = _output_and_grads(layer, x, lambda x: paper_odconv(layer, x))
    out_forward, grads_forward = _output_and_grads(layer, x, forward)
    torch.testing.assert_close(out_forward, out, rtol=tolerance, atol=tolerance)
    for grad_forward, grad in zip(grads_forward, grads):
        torch.testing.assert_close(grad_forward, grad, rtol=tolerance, atol=tolerance)


def test_all_six_official_layer_fixtures_are_here():
    assert len(LAYER_FIXTURES) == 6


@pytest.mark.parametrize('computation', ['rule', 'grouped', 'scripted'])
@pytest.mark.parametrize('name', LAYER_FIXTURES)
def test_reproduces_the_official_layer(name, computation):
    ref = load_reference(name)
    layer = _layer_from_fixture_name(name)
    layer.load_state_dict(ref.state_dict)  # strict: the parameters map 1:1 onto the official ones
    layer.eval()
    if computation == 'grouped':
        _force(layer, 'grouped')
    run = torch.jit.script(layer) if computation == 'scripted' else layer
    with torch.no_grad():
        assert_logits_close(run(ref.inputs[0]), ref.outputs[0])
        assert_logits_close(paper_odconv(layer, ref.inputs[0]), ref.outputs[0])  # the test's formula, too


def test_the_cases_take_every_eager_computation():
    for case in CASES:
        layer, x = _make(case, 3, train=False)
        assert layer.computation(x) == case[-1]
    assert {case[-1] for case in CASES} == {'grouped', 'gated_columns', 'stacked_columns', 'per_sample_columns'}


@pytest.mark.parametrize('case', CASES, ids=CASE_IDS)
@pytest.mark.parametrize('batch_size', [1, 3])
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last], ids=['nchw', 'nhwc'])
def test_equals_the_paper_in_outputs_and_gradients(case, batch_size, train, memory_format):
    layer, x = _make(case, batch_size, train, memory_format)
    _assert_equals_paper(layer, x, layer)


@pytest.mark.parametrize('case', CASES, ids=CASE_IDS)
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last], ids=['nchw', 'nhwc'])
def test_inference_without_autograd_equals_the_paper_and_keeps_the_memory_format(case, memory_format):
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        layer, x = _make(case, 3, train=False, memory_format=memory_format, dtype=dtype)
        with torch.no_grad():
            out = layer(x)
            torch.testing.assert_close(out, paper_odconv(layer, x), rtol=tolerance, atol=tolerance)
        assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('case', CASES[:6], ids=CASE_IDS[:6])
def test_scripted_per_sample_columns_equal_the_paper_in_outputs_and_gradients(case, memory_format):
    """TorchScript runs ``per_sample_columns`` for every conv (k x k, strided, grouped, depthwise)."""
    layer, x = _make(case, 3, train=True, memory_format=memory_format)
    scripted = torch.jit.script(layer)  # shares the parameters
    _assert_equals_paper(layer, x, scripted)
    with torch.no_grad():
        assert scripted(x).is_contiguous(memory_format=memory_format)


def test_the_rule_runs_the_columns_on_cpu_only_and_grouped_convs_and_large_maps_grouped():
    for kernel_num in (1, 4):
        layer = ODConv2d(8, 32, 3, kernel_num=kernel_num)
        with torch.no_grad():
            assert layer.computation(torch.randn(2, 8, 6, 6)) == 'gated_columns'
        assert layer.computation(torch.randn(2, 8, 6, 6)) == ('stacked_columns' if kernel_num > 1 else 'gated_columns')
        assert layer.computation(torch.randn(2, 8, 14, 14)) == 'gated_columns'  # 3 x 196 extra rows: too many
        assert layer.computation(torch.randn(2, 8, 6, 6, device='meta')) == 'grouped'  # any other device
        assert layer.computation(torch.randn(2, 8, 28, 28)) == 'grouped'  # 28 x 28 output positions
    assert ODConv2d(8, 8, 3, groups=8).computation(torch.randn(2, 8, 6, 6)) == 'grouped'
    assert ODConv2d(8, 96, 1, kernel_num=1).computation(torch.randn(2, 8, 2, 2)) == 'gated_columns'  # kernel > maps
    assert ODConv2d(8, 12, 1).computation(torch.randn(2, 8, 56, 56)) == 'per_sample_columns'  # 1x1: any size


@pytest.mark.parametrize('case', CASES, ids=CASE_IDS)
@pytest.mark.parametrize('batch_size', [1, 3])
def test_folded_batchnorm_equals_the_layer_then_the_norm(case, batch_size):
    layer, x = _make(case, batch_size, train=False)
    bn = torch.nn.BatchNorm2d(layer.out_chs).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        expected = bn(paper_odconv(layer, x))
        fused = fuse_conv_bn(layer, bn)
        assert fused.computation(x) == layer.computation(x)
        torch.testing.assert_close(fused(x), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(paper_odconv(fused, x), expected, rtol=1e-10, atol=1e-10)
    assert layer.bias is None, 'the fold returns a new layer and leaves the original as it is'
    _assert_equals_paper(fused, x, fused)  # the autograd forms with a bias


def test_train_mode_with_a_batch_of_one_uses_the_running_statistics():
    layer, x = _make((8, 12, 3, 1, 1, 4, 9, 'grouped'), 1, train=True)
    before = layer.attention.bn.running_mean.clone()
    train_out = layer(x)
    torch.testing.assert_close(layer.attention.bn.running_mean, before)
    torch.testing.assert_close(train_out, layer.eval()(x))


def test_temperature_flattens_the_attentions():
    layer, x = _make((8, 12, 3, 1, 1, 4, 9, 'grouped'), 3, train=False)
    sharp = layer.attention(x).kernels
    set_temperature(layer, 30.)
    assert layer.attention.temperature == 30.
    flat = layer.attention(x).kernels
    spread = lambda p: p.max(dim=1).values - p.min(dim=1).values  # noqa: E731
    assert spread(flat).max() < spread(sharp).min()
    torch.testing.assert_close(flat.sum(dim=1), torch.ones(3, dtype=flat.dtype))
    torch.testing.assert_close(layer(x), paper_odconv(layer, x), rtol=1e-10, atol=1e-10)


TRACE_CASES = [CASES[0], CASES[2], CASES[6], CASES[8], CASES[11]]


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('case', TRACE_CASES, ids=['c{}_o{}_k{}_s{}_g{}_n{}_{}px_{}'.format(*c) for c in TRACE_CASES])
def test_traced_at_batch_one_equals_the_paper_at_batch_four(case, memory_format):
    """torch.jit.trace (and the legacy ONNX exporter built on it) records one graph for every batch size: the
    ``per_sample_columns`` computation."""
    layer, x = _make(case, 4, train=False, memory_format=memory_format)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x[:1])
        out = traced(x)
        torch.testing.assert_close(out, paper_odconv(layer, x), rtol=1e-10, atol=1e-10)
        assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.slow
def test_onnx_export_with_a_free_batch_equals_the_paper(tmp_path):
    """torch.onnx (dynamo) through zoo.export, then onnxruntime at another batch size."""
    onnxruntime = pytest.importorskip('onnxruntime')
    from zoo.export import export_onnx
    for case in (CASES[0], CASES[2], CASES[6]):
        layer, x = _make(case, 2, train=False, dtype=torch.float32)
        path = tmp_path / 'odconv.onnx'
        export_onnx(layer, path, input_size=tuple(x.shape[1:]))
        session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        x3 = torch.randn(3, *x.shape[1:])
        (out,) = session.run(None, {session.get_inputs()[0].name: x3.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), paper_odconv(layer, x3), rtol=1e-5, atol=1e-5)


COMPILE_CASES = [CASES[0], CASES[6], CASES[11]]  # one per eager computation


@pytest.mark.slow
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('case', COMPILE_CASES,
                         ids=['c{}_o{}_k{}_s{}_g{}_n{}_{}px_{}'.format(*c) for c in COMPILE_CASES])
def test_compiled_layer_equals_the_paper_in_outputs_and_gradients(case, memory_format):
    """torch.compile (inductor, one graph per input shape)."""
    torch._dynamo.reset()  # every layer instance compiles ODConv2d.forward anew: stay under the recompile limit
    layer, x = _make(case, 2, train=False, memory_format=memory_format)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), paper_odconv(layer, x), rtol=1e-10, atol=1e-10)
    _assert_equals_paper(layer, x, compiled)
