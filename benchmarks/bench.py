"""Throughput benchmark for zoo models against timm baselines, measured in one run on one machine.

For every model and baseline: images/s of inference (eval mode, no grad) and of a training step (forward, backward,
SGD step) at each batch size, in NCHW and channels_last, for the training form and, where the model can fuse, its
``timm.utils.reparameterize_model`` form; with ``--modes compile`` also of the ``torch.compile``d training form, with
``--modes onnx`` of the (fused) model exported to ONNX and run by onnxruntime on the CPU with the same number of
threads, after checking its outputs against PyTorch's. On CUDA (``--device cuda``) steps are timed with CUDA events
after a warm-up, optionally under ``--amp bf16|fp16``. Each figure is the median of ``--repeats`` timed runs after
``--warmup`` untimed ones, with torch's intra-op threads pinned; the forms of one configuration take turns run by run.
Parameters and GMACs (torch's FLOP counter, one 224 px image) go with every model. Results are appended to
benchmarks/RESULTS.md with a description of the machine.

    python benchmarks/bench.py --models van_b0 --baselines resnet18 mobilenetv2_100 --batch-sizes 1 16

``--plot FILE.png`` draws img/s of each family against its baselines; ``--plot-accuracy FILE.png`` img/s against the
reported ImageNet top-1 of the models with weights (the papers' figure 1, measured here).
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
from torch.utils.flop_counter import FlopCounterMode

import zoo  # noqa: F401  (registers the zoo models)
from zoo.layers import OmniAttention
from zoo.models import FAMILY_MODULES, load_manifest

RESULTS = Path(__file__).parent / 'RESULTS.md'
MEMORY_FORMATS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}


@dataclass
class Measurement:
    model: str
    form: str  # 'eval' (training form in eval mode), 'reparam', 'compile', 'onnx' or 'train'
    memory_format: str
    batch_size: int
    images_per_s: float
    ms_per_batch: float


def _elapsed(step: Callable[[], None], device: torch.device) -> float:
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


def interleaved_median_seconds(steps: Dict[str, Callable[[], None]], warmup: int, repeats: int,
                               device: torch.device = torch.device('cpu')) -> Dict[str, float]:
    """Median seconds of each step; the steps take turns, so a slow spell of the machine hits all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(_elapsed(step, device))
    return {name: statistics.median(t) for name, t in times.items()}


def _autocast(device: torch.device, amp: str = None):
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _inference_step(model: torch.nn.Module, x: torch.Tensor, amp: str = None) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), _autocast(x.device, amp):
            model(x)
    return step


def _training_step(model: torch.nn.Module, x: torch.Tensor, amp: str = None) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    target = torch.randint(0, model.num_classes, (x.shape[0],), device=x.device)
    scaler = torch.amp.GradScaler(x.device.type, enabled=amp == 'fp16')

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(x.device, amp):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
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


def _steps(name: str, memory_format: torch.memory_format, x: torch.Tensor, args: argparse.Namespace,
           onnx_diffs: Dict[str, float]) -> Dict[str, Callable[[], None]]:
    """The timed steps of one model: inference of the training form (and of the fused form, the compiled form, and
    of its ONNX export, whose max abs difference from PyTorch goes into ``onnx_diffs``), and a training step."""
    steps, modes, device = {}, args.modes, x.device
    if {'infer', 'onnx', 'compile'} & set(modes):
        # calibrated, so that the ONNX check compares logits of a real size (random ODConv MobileNetV2s give 1e-27)
        model = calibrated_model(name).to(device, memory_format=memory_format).eval()
        deployed = reparameterize_model(model) if _can_fuse(model) else model
        if 'infer' in modes:
            steps['eval'] = _inference_step(model, x, args.amp)
            if deployed is not model:
                steps['reparam'] = _inference_step(deployed, x, args.amp)
        if 'compile' in modes:
            steps['compile'] = _inference_step(torch.compile(model), x, args.amp)
        if 'onnx' in modes and memory_format == torch.contiguous_format and device.type == 'cpu':
            steps['onnx'], onnx_diffs[f'{name} b{x.shape[0]}'] = _onnx_step(deployed, x, torch.get_num_threads())
    if 'train' in modes:
        model = timm.create_model(name).to(device, memory_format=memory_format).train()
        steps['train'] = _training_step(model, x, args.amp)
    return steps


def measure_configuration(names: List[str], format_name: str, batch_size: int, args: argparse.Namespace,
                          onnx_diffs: Dict[str, float]) -> List[Measurement]:
    """All models and forms of one (memory format, batch size), taking turns; their models are released on return so
    that one configuration's models never share memory with the next one's."""
    memory_format = MEMORY_FORMATS[format_name]
    x = torch.randn(batch_size, 3, args.img_size, args.img_size, device=args.device).to(memory_format=memory_format)
    steps = {(name, form): step for name in names
             for form, step in _steps(name, memory_format, x, args, onnx_diffs).items()}
    seconds_of = interleaved_median_seconds(steps, args.warmup, args.repeats, torch.device(args.device))
    return [Measurement(name, form, format_name, batch_size, batch_size / seconds, seconds * 1e3)
            for (name, form), seconds in seconds_of.items()]


def measure(names: List[str], args: argparse.Namespace, onnx_diffs: Dict[str, float]) -> Iterator[Measurement]:
    """Every model in every requested configuration."""
    for format_name in args.memory_formats:
        for batch_size in args.batch_sizes:
            yield from measure_configuration(names, format_name, batch_size, args, onnx_diffs)


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


def render(measurements: List[Measurement], peaks: Dict[str, float], onnx_diffs: Dict[str, float],
           args: argparse.Namespace) -> str:
    amp = f', autocast {args.amp}' if args.amp else ''
    lines = [
        f'## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC — {", ".join(args.models)} '
        f'vs {", ".join(args.baselines)}',
        '',
        f'Machine: {describe_machine(args.threads, args.device)}. Device {args.device}{amp}. Input '
        f'{args.img_size}x{args.img_size}; median of {args.repeats} runs after {args.warmup} warm-up runs. `eval`: '
        f'training form in eval mode; `reparam`: after `timm.utils.reparameterize_model`; `compile`: '
        f'`torch.compile` of the training form; `onnx`: the fused model exported with '
        f'`torch.onnx.export(dynamo=True)`, run by onnxruntime (CPU provider, same threads; outputs checked against '
        f'PyTorch to 1e-4); `train`: forward + backward + SGD step. GMACs: one 224 px image, torch\'s FLOP counter.',
        '',
        '| model | params (M) | GMACs | form | memory format | batch | img/s | ms / batch |',
        '|---|---:|---:|---|---|---:|---:|---:|',
    ]
    names = list(dict.fromkeys(m.model for m in measurements))
    sizes = {name: (params_m(name), gmacs(name)) for name in names}
    lines += [f'| {m.model} | {sizes[m.model][0]:.2f} | {sizes[m.model][1]:.2f} | {m.form} | {m.memory_format} | '
              f'{m.batch_size} | {m.images_per_s:.1f} | {m.ms_per_batch:.1f} |' for m in measurements]
    if peaks:
        lines += ['', f'Peak resident memory added by a training step at batch {max(args.batch_sizes)} (fresh process, '
                      'NCHW):', '', '| model | MiB |', '|---|---:|']
        lines += [f'| {name} | {mib:.0f} |' for name, mib in peaks.items()]
    if onnx_diffs:
        lines += ['', 'onnxruntime vs PyTorch, max abs difference of the logits: ' +
                  ', '.join(f'{key} {diff:.1e}' for key, diff in onnx_diffs.items())]
    return '\n'.join(lines) + '\n\n'


def _family(name: str) -> str:
    """The zoo family of a model, or 'baseline' for a timm model."""
    return next((family for family in FAMILY_MODULES if name in timm.list_models(module=family)), 'baseline')


def _inference_speed(measurements: List[Measurement]) -> Tuple[Dict[str, float], str]:
    """img/s of each model's training form in eval mode, NCHW, at the largest batch measured, and its axis label."""
    batch = max(m.batch_size for m in measurements)
    speed = {m.model: m.images_per_s for m in measurements
             if m.form == 'eval' and m.memory_format == 'nchw' and m.batch_size == batch}
    return speed, f'images / s (inference, NCHW, batch {batch}, this machine)'


def plot(measurements: List[Measurement], baselines: List[str], path: Path, title: str) -> None:
    """img/s of each family's models beside the timm baselines, one panel per family."""
    plt = _pyplot()
    speed, label = _inference_speed(measurements)
    families = list(dict.fromkeys(_family(m) for m in speed if _family(m) != 'baseline'))
    fig, axes = plt.subplots(1, len(families), figsize=(3.4 * len(families), 4), squeeze=False, sharey=True)
    for ax, family in zip(axes[0], families):
        names = [m for m in speed if _family(m) == family] + [b for b in baselines if b in speed]
        colors = ['tab:blue' if _family(n) == family else 'tab:gray' for n in names]
        ax.bar(range(len(names)), [speed[n] for n in names], color=colors)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha='right', fontsize=7)
        ax.set_title(family, fontsize=9)
    axes[0][0].set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(measurements: List[Measurement], path: Path, title: str) -> None:
    """img/s against the reported ImageNet-1k top-1 of every measured model with published weights."""
    plt = _pyplot()
    speed, label = _inference_speed(measurements)
    top1 = {tag.split('.')[0]: entry['top1'] for tag, entry in load_manifest().items() if entry['top1'] is not None}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    families = list(dict.fromkeys(_family(m) for m in speed if m in top1))
    for family in families:
        names = [m for m in speed if m in top1 and _family(m) == family]
        ax.plot([speed[n] for n in names], [top1[n] for n in names], 'o', label=family)
        for n in names:
            ax.annotate(n, (speed[n], top1[n]), fontsize=6, xytext=(3, 3), textcoords='offset points')
    ax.set(xlabel=label, ylabel='reported ImageNet-1k top-1 (%)')
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['van_b0'])
    parser.add_argument('--baselines', nargs='*', default=['resnet18', 'mobilenetv2_100'])
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 16])
    parser.add_argument('--memory-formats', nargs='+', choices=list(MEMORY_FORMATS), default=list(MEMORY_FORMATS))
    parser.add_argument('--modes', nargs='+', choices=['infer', 'train', 'compile', 'onnx'], default=['infer', 'train'])
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    parser.add_argument('--amp', choices=['bf16', 'fp16'], help='autocast dtype (bf16 on CPU; bf16 or fp16 on CUDA)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--peak-memory', action='store_true', help='also measure the peak memory of a training step')
    parser.add_argument('--out', type=Path, default=RESULTS, help='markdown file the results are appended to')
    parser.add_argument('--plot', type=Path, help='draw img/s of each family beside its baselines into this PNG')
    parser.add_argument('--plot-accuracy', type=Path, help='draw img/s against reported top-1 into this PNG')
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
    title = f'{describe_machine(args.threads, args.device)}; median of {args.repeats}'.replace('; ', '\n', 1)
    if args.plot:
        plot(measurements, args.baselines, args.plot, title)
    if args.plot_accuracy:
        plot_accuracy(measurements, args.plot_accuracy, title)


if __name__ == '__main__':
    main()
