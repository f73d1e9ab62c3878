"""What the benchmark scripts share: timing (interleaved medians, CUDA events on a GPU), the timed inference,
training and onnxruntime steps, calibrated models, model sizes, the machine's description and RESULTS.md.

The scripts in this folder import it by name (``python benchmarks/SCRIPT.py`` puts this folder first on ``sys.path``).
"""
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import zoo  # noqa: F401  (registers the zoo models)
from zoo.layers import OmniAttention

__all__ = ['MEMORY_FORMATS', 'RESULTS', 'append_results', 'autocast', 'calibrated_model', 'describe_machine',
           'elapsed_seconds', 'gmacs', 'inference_step', 'interleaved_median_seconds', 'interleaved_seconds',
           'onnx_step', 'params_m', 'peak_training_memory_mb', 'pyplot', 'training_step', 'utc_heading']

RESULTS = Path(__file__).parent / 'RESULTS.md'
MEMORY_FORMATS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}


def utc_heading(title: str) -> str:
    """A RESULTS.md section heading: the time now (UTC) and ``title``."""
    return f'## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC — {title}'


def append_results(path: Path, lines: Sequence[str]) -> None:
    """Append a section (``lines``, the heading first) to the markdown file ``path``."""
    with open(path, 'a', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n\n')


def elapsed_seconds(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one ``step``: CUDA events on a GPU (the queued kernels included), the wall clock elsewhere."""
    if device.type != 'cuda':
        start = time.perf_counter()
        step()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    step()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def interleaved_seconds(steps: Dict[str, Callable[[], None]], warmup: int, repeats: int,
                        device: torch.device = torch.device('cpu')) -> Dict[str, List[float]]:
    """Seconds of each step in each of ``repeats`` rounds. The steps take turns, so a slow spell of the machine hits
    all of them alike, in an order rotated by one every round, so that each runs in every position and none twice
    in a row (what a step finds in the caches and the allocator's free lists depends on the step before it)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(elapsed_seconds(steps[name], device))
    return times


def interleaved_median_seconds(steps: Dict[str, Callable[[], None]], warmup: int, repeats: int,
                               device: torch.device = torch.device('cpu')) -> Dict[str, float]:
    """Median seconds of each step over the rounds of :func:`interleaved_seconds`."""
    return {name: statistics.median(t) for name, t in interleaved_seconds(steps, warmup, repeats, device).items()}


def autocast(device: torch.device, amp: str = None) -> torch.autocast:
    """torch.autocast to ``amp`` ('bf16' / 'fp16') on ``device``, or a disabled one."""
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def inference_step(model: torch.nn.Module, x: torch.Tensor, amp: str = None) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), autocast(x.device, amp):
            model(x)
    return step


def training_step(model: torch.nn.Module, x: torch.Tensor, amp: str = None) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    target = torch.randint(0, model.num_classes, (x.shape[0],), device=x.device)
    scaler = torch.amp.GradScaler(x.device.type, enabled=amp == 'fp16')

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(x.device, amp):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def onnx_step(model: torch.nn.Module, x: torch.Tensor, threads: int) -> Tuple[Callable[[], None], float]:
    """onnxruntime inference of ``model`` exported at ``x``'s shape, and the max abs difference of its outputs from
    PyTorch's; fails beyond 1e-4."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / 'model.onnx')
        torch.onnx.export(model, (x.contiguous(),), path, dynamo=True, verbose=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        # idle onnxruntime workers otherwise spin after each run, stealing the cores from the next model's turn
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: x.contiguous().numpy()}
    with torch.inference_mode():
        diff = (torch.from_numpy(session.run(None, feed)[0]) - model(x)).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f'onnxruntime output differs from PyTorch by {diff:.3g} (max abs)')
    return (lambda: session.run(None, feed)), diff



def calibrated_model(name: str) -> torch.nn.Module:
    """The model with non-trivial BatchNorm statistics (a few training-mode passes), X-volution's attention branch
    switched on and ODConv's attention heads scaled down.

    Freshly initialised ODConv heads make the per-sample kernels of a deep MobileNetV2 chaotic in eval mode: float32
    PyTorch itself then differs from float64 by more than the logits' size, so no float32 comparison could pass.
    Heads at 0.03x keep every attention sample-dependent and the network well conditioned (1e-5 from float64).
    """
    torch.manual_seed(0)
    model = timm.create_model(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
            if hasattr(m, 'attn') and hasattr(m.attn, 'bn'):
                m.attn.bn.weight.fill_(0.2)
            if isinstance(m, OmniAttention):
                for head in (m.channel_fc, m.filter_fc, m.spatial_fc, m.kernel_fc):
                    if head is not None:
                        head.weight.mul_(0.03)
        model.train()
        for seed in range(2):
            model(torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


_PEAK_MEMORY_PROBE = """
import re, sys, torch, timm, zoo
name, batch_size, img_size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = timm.create_model(name).train()
x = torch.randn(batch_size, 3, img_size, img_size)
optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
status = lambda key: int(re.search(key + r':\\s+(\\d+) kB', open('/proc/self/status').read())[1])
open('/proc/self/clear_refs', 'w').write('5')  # peak resident memory := current, so imports do not count
before = status('VmRSS')
for _ in range(2):
    optimizer.zero_grad()
    model(x).logsumexp(dim=1).mean().backward()
    optimizer.step()
print((status('VmHWM') - before) / 1024)
"""


def peak_training_memory_mb(name: str, batch_size: int, img_size: int) -> float:
    """Peak resident memory (MiB) of two training steps of ``name`` above the memory held before them, measured in a
    fresh process (Linux: the peak is reset through /proc/self/clear_refs)."""
    result = subprocess.run(
        [sys.executable, '-c', _PEAK_MEMORY_PROBE, name, str(batch_size), str(img_size), str(torch.get_num_threads())],
        capture_output=True, text=True, check=True)
    return float(result.stdout.strip())


def params_m(name: str) -> float:
    """Parameters of the training form, in millions."""
    model = timm.create_model(name, device='meta')  # shapes only
    return sum(p.numel() for p in model.parameters()) / 1e6


def gmacs(name: str, img_size: int = 224) -> float:
    """Multiply-accumulates (G) of one image through the training form in eval mode, by torch's FLOP counter."""
    model = timm.create_model(name).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, img_size, img_size))
    return counter.get_total_flops() / 2e9


def describe_machine(threads: int, device: str = 'cpu') -> str:
    cpu = platform.processor() or 'unknown CPU'
    if Path('/proc/cpuinfo').exists():
        names = [line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                 if line.startswith('model name')]
        cpu = names[0] if names else cpu
    gpu = f'{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); ' if device == 'cuda' else ''
    return (f'{gpu}{cpu}, {os.cpu_count()} logical CPUs, {threads} torch threads; {platform.system()} '
            f'{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, '
            f'timm {timm.__version__}')



def pyplot():
    """matplotlib.pyplot, drawing to files only."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt
    return plt
