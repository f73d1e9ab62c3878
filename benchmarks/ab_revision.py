"""A/B of zoo's code at a git revision ("before") against the working tree ("after"), in one process.

The package at ``--before`` is extracted from git as ``zoo_before``; each model is built from it and from the
working tree's entrypoint (taken before ``zoo_before`` registers over it), with the same weights. Before, after and
the model's timm baseline take turns run by run (inference and a training step), so a slow spell of the shared
machine hits all three alike. Results are appended to benchmarks/RESULTS.md.

    python benchmarks/ab_revision.py --before 3676cb7 --models od_resnet18:resnet18 efficientmod_xxs:mobilenetv2_100
    python benchmarks/ab_revision.py --before 7b1010c --channels-last --models od_resnet18:resnet18
"""
import argparse
import datetime
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import timm

from benchlib import RESULTS, describe_machine, inference_step, interleaved_seconds, training_step

REPO = Path(__file__).resolve().parent.parent


def import_revision(revision: str, into: Path):
    """zoo as of ``revision``, imported as the package ``zoo_before`` (with the manifest beside it)."""
    archive = subprocess.run(['git', '-C', str(REPO), 'archive', revision, 'zoo', 'weights_manifest.yaml'],
                             capture_output=True, check=True).stdout
    subprocess.run(['tar', '-x', '-C', str(into)], input=archive, check=True)
    (into / 'zoo').rename(into / 'zoo_before')
    for path in (into / 'zoo_before').rglob('*.py'):
        source = path.read_text()
        path.write_text(re.sub(r'\bzoo\.', 'zoo_before.', re.sub(r'^(\s*)(from|import) zoo\b', r'\1\2 zoo_before',
                                                                 source, flags=re.M)))
    sys.path.insert(0, str(into))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the two packages register the same model names
        return importlib.import_module('zoo_before')


def build_pairs(names: List[str], revision: str, workdir: Path) -> Dict[str, Tuple[torch.nn.Module, torch.nn.Module]]:
    """(before, after) of each model, the after one holding the before one's weights.

    The working tree's entrypoints are taken before the revision registers its own over them (``benchlib`` has imported
    the working tree's ``zoo`` already, so importing it again would not register it again).
    """
    after_entrypoints = {name: timm.models.model_entrypoint(name) for name in names}
    import_revision(revision, workdir)
    before = {name: timm.create_model(name) for name in names}
    pairs = {}
    for name in names:
        after = after_entrypoints[name]()
        if type(after).__module__ == type(before[name]).__module__:
            raise RuntimeError(f'{name}: before and after were built from the same code ({type(after).__module__})')
        after.load_state_dict(before[name].state_dict())
        pairs[name] = (before[name], after)
    return pairs


def check_equal(pairs: Dict[str, Tuple[torch.nn.Module, torch.nn.Module]], img_size: int) -> None:
    x = torch.randn(2, 3, img_size, img_size)
    for name, (before, after) in pairs.items():
        with torch.inference_mode():
            diff = (before.eval()(x) - after.eval()(x)).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f'{name}: before and after differ by {diff:.3g}')


def measure(pairs, baselines: Dict[str, str],
            args: argparse.Namespace) -> List[Tuple[str, str, float, float, float, float]]:
    """(model, mode, before ms, after ms, baseline ms, after / before) per model and mode: medians of interleaved
    runs, and the median of each round's after / before (the two ran back to back, so a slow spell that spans the
    round cancels out)."""
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size).to(memory_format=args.memory_format)
    rows = []
    for name, (before, after) in pairs.items():
        baseline = timm.create_model(baselines[name])
        for model in (before, after, baseline):
            model.to(memory_format=args.memory_format)
        for mode, step in (('inference', inference_step), ('training step', training_step)):
            for model in (before, after, baseline):
                model.train(mode != 'inference')
            steps: Dict[str, Callable[[], None]] = {
                'before': step(before, x), 'after': step(after, x), 'baseline': step(baseline, x)}
            times = interleaved_seconds(steps, args.warmup, args.repeats)
            seconds = {k: statistics.median(t) for k, t in times.items()}
            paired = statistics.median(a / b for a, b in zip(times['after'], times['before']))
            rows.append((name, mode, *(seconds[k] * 1e3 for k in ('before', 'after', 'baseline')), paired))
            print(f'{name:<22}{mode:<15}' + '  '.join(f'{k} {v * 1e3:8.1f} ms' for k, v in seconds.items())
                  + f'  after / before {paired:.3f}', flush=True)
    return rows


def render(rows, baselines: Dict[str, str], args: argparse.Namespace) -> str:
    lines = [
        f'## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC — A/B: {args.before} (before) vs '
        f'the working tree (after)',
        '',
        f'Machine: {describe_machine(torch.get_num_threads())}. `benchmarks/ab_revision.py`: before, after and the '
        f'timm baseline in one process, the same weights, taking turns run by run; batch {args.batch_size}, '
        f'{args.img_size}x{args.img_size}, {args.format_name}, median of {args.repeats} runs after {args.warmup} '
        f'warm-up runs; after / before is the median of the rounds\' ratios. '
        f'Ratio = baseline ms / model ms (the model\'s speed as a fraction of its baseline\'s).',
        '',
        '| model | mode | before (ms) | after (ms) | after / before | baseline | ratio before | ratio after |',
        '|---|---|---:|---:|---:|---|---:|---:|',
    ]
    for name, mode, before, after, baseline, paired in rows:
        lines.append(f'| {name} | {mode} | {before:.1f} | {after:.1f} | {paired:.3f} | {baselines[name]} '
                     f'{baseline:.1f} ms | {baseline / before:.3f} | {baseline / after:.3f} |')
    return '\n'.join(lines) + '\n\n'


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--before', required=True, help='git revision of the "before" code')
    parser.add_argument('--models', nargs='+', required=True, metavar='MODEL:BASELINE')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--channels-last', action='store_true', help='models and input in channels_last memory')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=21)
    parser.add_argument('--out', type=Path, default=RESULTS, help='markdown file the results are appended to')
    args = parser.parse_args()
    args.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    args.format_name = 'channels_last' if args.channels_last else 'NCHW'
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    baselines = dict(pair.split(':') for pair in args.models)
    with tempfile.TemporaryDirectory() as workdir:
        pairs = build_pairs(list(baselines), args.before, Path(workdir))
        check_equal(pairs, args.img_size)
        rows = measure(pairs, baselines, args)
    with open(args.out, 'a', encoding='utf-8') as f:
        f.write(render(rows, baselines, args))


if __name__ == '__main__':
    main()
