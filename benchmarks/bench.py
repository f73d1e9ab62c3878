"""Throughput benchmark for zoo models against timm baselines, measured in one run on one machine.

For every model and baseline: images/s of inference (eval mode, no grad) and of a training step (forward, backward,
SGD step) at each batch size, in NCHW and channels_last, for the training form and, where the model can fuse, its
``timm.utils.reparameterize_model`` form; with ``--modes onnx`` also of the (fused) model exported to ONNX and run by
onnxruntime on the CPU with the same number of threads, after checking its outputs against PyTorch's. Each figure is
the median of ``--repeats`` timed runs after ``--warmup`` untimed ones, with torch's intra-op threads pinned; the forms
of one configuration take turns run by run. Results
are appended to benchmarks/RESULTS.md with a description of the machine.

    python benchmarks/bench.py --models van_b0 --baselines resnet18 mobilenetv2_100 --batch-sizes 1 16

``--plot FILE.png`` also draws the run as a bar chart.
"""
import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import torch
import timm
from timm.utils import reparameterize_model

import zoo  # noqa: F401  (registers the zoo models)

RESULTS = Path(__file__).parent / 'RESULTS.md'
MEMORY_FORMATS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}


@dataclass
class Measurement:
    model: str
    form: str  # 'eval' (training form in eval mode), 'reparam', 'onnx' or 'train'
    memory_format: str
    batch_size: int
    images_per_s: float
    ms_per_batch: float


def interleaved_median_seconds(steps: Dict[str, Callable[[], None]], warmup: int, repeats: int) -> Dict[str, float]:
    """Median seconds of each step; the steps take turns, so a slow spell of the machine hits all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _inference_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode():
            model(x)
    return step


def _training_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    target = torch.randint(0, model.num_classes, (x.shape[0],))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    return step


def _onnx_step(model: torch.nn.Module, x: torch.Tensor, threads: int) -> Tuple[Callable[[], None], float]:
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


def _can_fuse(model: torch.nn.Module) -> bool:
    return any(hasattr(m, 'reparameterize') or hasattr(m, 'fuse') for m in model.modules())


def _steps(name: str, memory_format: torch.memory_format, x: torch.Tensor, modes: List[str],
           onnx_diffs: Dict[str, float]) -> Dict[str, Callable[[], None]]:
    """The timed steps of one model: inference of the training form (and of the fused form, and of its ONNX
    export, whose max abs difference from PyTorch goes into ``onnx_diffs``), and a training step."""
    steps = {}
    if 'infer' in modes or 'onnx' in modes:
        model = timm.create_model(name).to(memory_format=memory_format).eval()
        deployed = reparameterize_model(model) if _can_fuse(model) else model
        if 'infer' in modes:
            steps['eval'] = _inference_step(model, x)
            if deployed is not model:
                steps['reparam'] = _inference_step(deployed, x)
        if 'onnx' in modes and memory_format == torch.contiguous_format:
            steps['onnx'], onnx_diffs[f'{name} b{x.shape[0]}'] = _onnx_step(deployed, x, torch.get_num_threads())
    if 'train' in modes:
        steps['train'] = _training_step(timm.create_model(name).to(memory_format=memory_format).train(), x)
    return steps


def measure(names: List[str], args: argparse.Namespace, onnx_diffs: Dict[str, float]) -> Iterator[Measurement]:
    """Every model in every requested configuration; per configuration all models and forms take turns."""
    for format_name in args.memory_formats:
        memory_format = MEMORY_FORMATS[format_name]
        for batch_size in args.batch_sizes:
            x = torch.randn(batch_size, 3, args.img_size, args.img_size).to(memory_format=memory_format)
            steps = {(name, form): step for name in names
                     for form, step in _steps(name, memory_format, x, args.modes, onnx_diffs).items()}
            for (name, form), seconds in interleaved_median_seconds(steps, args.warmup, args.repeats).items():
                yield Measurement(name, form, format_name, batch_size, batch_size / seconds, seconds * 1e3)


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
    with torch.device('meta'):  # shapes only
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters()) / 1e6


def describe_machine(threads: int) -> str:
    cpu = platform.processor() or 'unknown CPU'
    if Path('/proc/cpuinfo').exists():
        names = [line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                 if line.startswith('model name')]
        cpu = names[0] if names else cpu
    return (f'{cpu}, {os.cpu_count()} logical CPUs, {threads} torch threads; {platform.system()} '
            f'{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, '
            f'timm {timm.__version__}')


def render(measurements: List[Measurement], peaks: Dict[str, float], onnx_diffs: Dict[str, float],
           args: argparse.Namespace) -> str:
    lines = [
        f'## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC — {", ".join(args.models)} '
        f'vs {", ".join(args.baselines)}',
        '',
        f'Machine: {describe_machine(args.threads)}. Input {args.img_size}x{args.img_size}; median of '
        f'{args.repeats} runs after {args.warmup} warm-up runs. `eval`: training form in eval mode; `reparam`: after '
        f'`timm.utils.reparameterize_model`; `onnx`: the fused model exported with '
        f'`torch.onnx.export(dynamo=True)`, run by '
        f'onnxruntime (CPU provider, same threads; outputs checked against PyTorch to 1e-4); `train`: forward + '
        f'backward + SGD step.',
        '',
        '| model | params (M) | form | memory format | batch | img/s | ms / batch |',
        '|---|---:|---|---|---:|---:|---:|',
    ]
    params = {name: params_m(name) for name in dict.fromkeys(m.model for m in measurements)}
    lines += [f'| {m.model} | {params[m.model]:.2f} | {m.form} | {m.memory_format} | {m.batch_size} | '
              f'{m.images_per_s:.1f} | {m.ms_per_batch:.1f} |' for m in measurements]
    if peaks:
        lines += ['', f'Peak resident memory added by a training step at batch {max(args.batch_sizes)} (fresh process, '
                      'NCHW):', '', '| model | MiB |', '|---|---:|']
        lines += [f'| {name} | {mib:.0f} |' for name, mib in peaks.items()]
    if onnx_diffs:
        lines += ['', 'onnxruntime vs PyTorch, max abs difference of the logits: ' +
                  ', '.join(f'{key} {diff:.1e}' for key, diff in onnx_diffs.items())]
    return '\n'.join(lines) + '\n\n'


def plot(measurements: List[Measurement], path: Path, title: str) -> None:
    """A bar chart of img/s: one group per configuration (memory format, batch), one bar per model and form."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys((m.memory_format, m.batch_size) for m in measurements))
    series = list(dict.fromkeys((m.model, m.form) for m in measurements))
    value = {(m.memory_format, m.batch_size, m.model, m.form): m.images_per_s for m in measurements}
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6., 1.2 * len(series) * len(configs)), 4.5))
    colors = plt.get_cmap('tab20').colors
    for i, (model, form) in enumerate(series):
        xs = [c + i * width for c in range(len(configs))]
        ys = [value.get((fmt, batch, model, form), 0.) for fmt, batch in configs]
        ax.bar(xs, ys, width, label=f'{model} ({form})', color=colors[i % len(colors)])
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(configs))])
    ax.set_xticklabels([f'{fmt}, batch {batch}' for fmt, batch in configs])
    ax.set_ylabel('images / s')
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['van_b0'])
    parser.add_argument('--baselines', nargs='*', default=['resnet18', 'mobilenetv2_100'])
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 16])
    parser.add_argument('--memory-formats', nargs='+', choices=list(MEMORY_FORMATS), default=list(MEMORY_FORMATS))
    parser.add_argument('--modes', nargs='+', choices=['infer', 'train', 'onnx'], default=['infer', 'train'])
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--peak-memory', action='store_true', help='also measure the peak memory of a training step')
    parser.add_argument('--out', type=Path, default=RESULTS, help='markdown file the results are appended to')
    parser.add_argument('--plot', type=Path, help='also draw the run as a bar chart into this PNG (needs matplotlib)')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    measurements, onnx_diffs = [], {}
    for m in measure([*args.models, *args.baselines], args, onnx_diffs):
        print(f'{m.model:<22}{m.form:<9}{m.memory_format:<15}b{m.batch_size:<4}{m.images_per_s:9.1f} img/s',
              flush=True)
        measurements.append(m)
    peaks = {}
    if args.peak_memory:
        for name in [*args.models, *args.baselines]:
            peaks[name] = peak_training_memory_mb(name, max(args.batch_sizes), args.img_size)
            print(f'{name:<22}training step peak memory {peaks[name]:.0f} MiB', flush=True)
    with open(args.out, 'a', encoding='utf-8') as f:
        f.write(render(measurements, peaks, onnx_diffs, args))
    if args.plot:
        plot(measurements, args.plot, f'{describe_machine(args.threads)}; median of {args.repeats}')


if __name__ == '__main__':
    main()
