"""``zoo finetune`` against timm's own ``train.py`` on the README's default recipe, as a user would run them.

The recipe is zoo's embedded default (``DIGITS_DEFAULTS``: van_b0 from scratch, scikit-learn's digits at 32 px, batch
64, 12 epochs, AdamW lr 2e-3, weight decay 0.05, one warmup epoch, cosine per update, label smoothing 0.1, no flips,
crops of 60-100% of the area). The digits' train / validation split is written once as one ImageFolder
(``train/`` and ``val/``), which both tools read; train.py gets the same recipe through its flags (its defaults that
differ from zoo's are set to zoo's: warmup and final lr, per-update schedule, the training interpolation). Each seed
runs both tools one after the other, train.py first for even seeds and zoo first for odd ones (give as many of each:
the second of two runs can be the slower one); every run is timed from start to exit
(start-up, data reading, training, validation and the files each writes). Results are appended to
benchmarks/RESULTS.md; the runs' logs stay in ``--work``.

timm's train.py is not in the timm wheel: pass the path of a checkout's train.py (``--train-py`` or TIMM_TRAIN_PY).

    python benchmarks/finetune_vs_timm_train.py --train-py ~/pytorch-image-models/train.py --seeds 0 1 2 3
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import yaml

from benchlib import RESULTS, append_results, describe_machine, utc_heading
from zoo.finetune import DIGITS_DEFAULTS, read_image_folder
from zoo.finetune.digits import digits_folder

ZOO = str(Path(sys.executable).parent / 'zoo')
# train.py as a script, with zoo's models registered with timm first (train.py knows only timm's own)
_WITH_ZOO = 'import runpy, sys, zoo; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")'


def write_split(root: Path) -> Path:
    """The digits' default split (20% of each class held out, seed 0) as ``root/train/C/*.png`` and
    ``root/val/C/*.png``."""
    if (root / 'val').is_dir():
        return root
    split = read_image_folder(digits_folder(), val_fraction=0.2, seed=0)
    tmp = root.with_name(root.name + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    for name, samples in (('train', split.train), ('val', split.val)):
        for path, index in samples:
            folder = tmp / name / split.classes[index]
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, folder / path.name)
    tmp.rename(root)
    return root


def train_py_command(train_py: Path, data: Path, output: Path, seed: int, workers: int, epochs: int) -> List[str]:
    """train.py's flags for the recipe of ``DIGITS_DEFAULTS`` (for ``epochs``)."""
    r = DIGITS_DEFAULTS
    return [
        sys.executable, '-c', _WITH_ZOO, str(train_py), str(data), '--train-split', 'train', '--val-split', 'val',
        '--model', r['model'], '--num-classes', '10', '--img-size', str(r['img_size']), '-b', str(r['batch_size']),
        '--epochs', str(epochs), '--opt', 'adamw', '--lr', str(r['lr']), '--weight-decay', str(r['weight_decay']),
        '--sched', 'cosine', '--sched-on-updates', '--warmup-epochs', str(r['warmup_epochs']), '--warmup-lr', '1e-6',
        '--min-lr', '1e-6', '--hflip', str(r['hflip']), '--scale', *map(str, r['scale']),
        '--smoothing', str(r['label_smoothing']), '--train-interpolation', 'bicubic', '-j', str(workers),
        '--seed', str(seed), '--device', 'cpu', '--output', str(output), '--experiment', f'seed{seed}',
        '--checkpoint-hist', '1']


def zoo_command(data: Path, output: Path, seed: int, workers: int, recipe: Path) -> List[str]:
    return [ZOO, 'finetune', '--config', str(recipe), '--data', str(data), '--seed', str(seed), '--workers',
            str(workers), '--output', str(output)]


def best_top1(tool: str, stdout: str) -> float:
    pattern = r'\*\*\* Best metric: ([\d.]+)' if tool == 'train.py' else r'best validation top-1 ([\d.]+)%'
    found = re.search(pattern, stdout)
    if not found:
        raise RuntimeError(f'{tool} printed no best top-1; its output ends:\n{stdout[-2000:]}')
    return float(found[1])


def run(tool: str, command: List[str], log: Path, timeout: float) -> Dict[str, float]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    log.write_text(f'$ {" ".join(command)}\n{result.stdout}\n--- stderr ---\n{result.stderr}')
    if result.returncode:
        raise RuntimeError(f'{tool} failed ({result.returncode}); see {log}')
    return dict(seconds=seconds, top1=best_top1(tool, result.stdout + result.stderr))


def render(runs: List[Dict], workers: int, epochs: int) -> List[str]:
    lines = [
        utc_heading('`zoo finetune` vs timm\'s train.py: the default digits recipe'),
        '',
        f'Machine: {describe_machine(torch.get_num_threads())}; load average {os.getloadavg()[2]:.1f} over the '
        f'last 15 minutes (these runs use 2 cores). '
        f'`benchmarks/finetune_vs_timm_train.py`: van_b0 from scratch on the digits\' default split written as one '
        f'ImageFolder (1,438 training, 359 validation images), 32 px, batch 64, {epochs} epochs, AdamW lr 2e-3, weight '
        f'decay 0.05, 1 warmup epoch, cosine per update, label smoothing 0.1, {workers} loader workers; each seed runs '
        f'both tools, train.py first for even seeds; wall time of the whole command.',
        '',
        '| seed | first | train.py s | zoo s | train.py best top-1 | zoo best top-1 |',
        '|---:|---|---:|---:|---:|---:|',
    ]
    by_seed: Dict[int, Dict[str, Dict]] = {}
    for r in runs:
        by_seed.setdefault(r['seed'], {})[r['tool']] = r
    for seed, tools in by_seed.items():
        t, z = tools.get('train.py'), tools.get('zoo')
        first = min(tools.values(), key=lambda r: r['order'])['tool']
        lines.append(f'| {seed} | {first} | {t["seconds"]:.0f} | {z["seconds"]:.0f} | {t["top1"]:.2f}% | '
                     f'{z["top1"]:.2f}% |' if t and z else f'| {seed} | {first} | incomplete | | | |')
    for tool in ('train.py', 'zoo'):
        done = [r for r in runs if r['tool'] == tool]
        if done:
            top1 = [r['top1'] for r in done]
            lines.append('')
            lines.append(f'{tool}: median {statistics.median(r["seconds"] for r in done):.0f} s, best top-1 '
                         f'{min(top1):.2f}-{max(top1):.2f}% over {len(done)} seeds.')
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--train-py', type=Path, default=os.environ.get('TIMM_TRAIN_PY'),
                        help="timm's train.py (default: $TIMM_TRAIN_PY)")
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3])
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--epochs', type=int, default=DIGITS_DEFAULTS['epochs'], help='fewer for a quick check')
    parser.add_argument('--work', type=Path, default=Path('runs/finetune_vs_timm_train'),
                        help='folder for the data split, the run folders and the logs')
    parser.add_argument('--timeout', type=float, default=1800, help='seconds per run')
    parser.add_argument('--out', type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.train_py or not args.train_py.is_file():
        parser.error("give timm's train.py with --train-py or TIMM_TRAIN_PY (it is not part of the timm wheel)")
    args.work.mkdir(parents=True, exist_ok=True)
    data = write_split(args.work / 'digits_split')
    recipe = args.work / 'digits_recipe.yaml'
    settings = dict(DIGITS_DEFAULTS, epochs=args.epochs)
    recipe.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}))
    runs: List[Dict] = []
    for seed in args.seeds:
        output = args.work / f'seed{seed}'
        shutil.rmtree(output, ignore_errors=True)
        commands = {'train.py': train_py_command(args.train_py, data, output / 'train_py', seed, args.workers,
                                                 args.epochs),
                    'zoo': zoo_command(data, output / 'zoo', seed, args.workers, recipe)}
        for tool in (['train.py', 'zoo'] if seed % 2 == 0 else ['zoo', 'train.py']):
            result = run(tool, commands[tool], args.work / f'seed{seed}-{tool}.log', args.timeout)
            runs.append(dict(seed=seed, tool=tool, order=len(runs), **result))
            print(json.dumps(runs[-1]), flush=True)  # partial results, as they come
    lines = render(runs, args.workers, args.epochs)
    print('\n'.join(lines))
    append_results(args.out, lines)


if __name__ == '__main__':
    main()
