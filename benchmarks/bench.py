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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import timm
import torch
from timm.utils import reparameterize_model

from benchlib import (MEMORY_FORMATS, RESULTS, append_results, calibrated_model, describe_machine, gmacs,
                      inference_step, interleaved_median_seconds, onnx_step, params_m, peak_training_memory_mb,
                      pyplot, training_step, utc_heading)
from zoo.models import FAMILY_MODULES, load_manifest


@dataclass
class Measurement:
    model: str
    form: str  # 'eval' (training form in eval mode), 'reparam', 'compile', 'onnx' or 'train'
    memory_format: str
    batch_size: int
    images_per_s: float
    ms_per_batch: float


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
            steps['eval'] = inference_step(model, x, args.amp)
            if deployed is not model:
                steps['reparam'] = inference_step(deployed, x, args.amp)
        if 'compile' in modes:
            steps['compile'] = inference_step(torch.compile(model), x, args.amp)
        if 'onnx' in modes and memory_format == torch.contiguous_format and device.type == 'cpu':
            steps['onnx'], onnx_diffs[f'{name} b{x.shape[0]}'] = onnx_step(deployed, x, torch.get_num_threads())
    if 'train' in modes:
        model = timm.create_model(name).to(device, memory_format=memory_format).train()
        steps['train'] = training_step(model, x, args.amp)
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


def render(measurements: List[Measurement], peaks: Dict[str, float], onnx_diffs: Dict[str, float],
           args: argparse.Namespace) -> List[str]:
    amp = f', autocast {args.amp}' if args.amp else ''
    lines = [
        utc_heading(f'{", ".join(args.models)} vs {", ".join(args.baselines)}'),
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
    return lines


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
    plt = pyplot()
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
    plt = pyplot()
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
    append_results(args.out, render(measurements, peaks, onnx_diffs, args))
    title = f'{describe_machine(args.threads, args.device)}; median of {args.repeats}'.replace('; ', '\n', 1)
    if args.plot:
        plot(measurements, args.baselines, args.plot, title)
    if args.plot_accuracy:
        plot_accuracy(measurements, args.plot_accuracy, title)


if __name__ == '__main__':
    main()
