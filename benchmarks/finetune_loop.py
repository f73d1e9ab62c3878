"""What ``zoo finetune``'s loop costs beyond the work itself, and whether data loading keeps up.

Three measurements on the same model, data, loader and optimizer, taking turns epoch by epoch (median of
``--repeats``): an epoch of zoo's training loop (``train_one_epoch`` on the epoch's seeded loader: schedule, EMA,
temperature, progress bar), an epoch of a bare loop (forward, cross-entropy, backward, optimizer step over the same
batches), and an epoch of the loader alone (the images decoded and transformed, no model). Results are appended to
benchmarks/RESULTS.md.

    python benchmarks/finetune_loop.py                                   # the embedded default: van_b0, digits, 32 px
    python benchmarks/finetune_loop.py --model od_resnet18 --img-size 128 --batch-size 16
"""
import argparse
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from benchlib import RESULTS, append_results, describe_machine, utc_heading
from zoo.finetune import DIGITS_DEFAULTS, resolve_recipe
from zoo.finetune.distributed import join_processes
from zoo.finetune.trainer import Run, prepare_run, train_one_epoch


def zoo_epoch(run: Run) -> None:
    train_one_epoch(run.state, run.train_model, run.start_epoch(), run.recipe, run.processes, run.mixup,
                    run.amp_dtype, run.temperature)


def bare_epoch(run: Run) -> None:
    """The same batches through the plainest training loop."""
    model, optimizer = run.state.model.train(), run.state.optimizer
    for images, targets in run.start_epoch():
        loss = F.cross_entropy(model(images), targets, label_smoothing=run.recipe.label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def loading_epoch(run: Run) -> None:
    for _ in run.start_epoch():
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default=DIGITS_DEFAULTS['model'])
    parser.add_argument('--img-size', type=int, default=DIGITS_DEFAULTS['img_size'])
    parser.add_argument('--batch-size', type=int, default=DIGITS_DEFAULTS['batch_size'])
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--out', type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    recipe = resolve_recipe(DIGITS_DEFAULTS, dict(model=args.model, img_size=args.img_size,
                                                  batch_size=args.batch_size, workers=args.workers))
    run = prepare_run(recipe, join_processes())
    loader = run.train_loader
    images = len(loader) * recipe.batch_size if loader.drop_last else len(loader.sampler)  # read per epoch
    steps: Dict[str, Callable[[Run], None]] = {"zoo's loop": zoo_epoch, 'bare loop': bare_epoch,
                                               'loading alone': loading_epoch}
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, step in steps.items():
            start = time.perf_counter()
            step(run)  # each epoch of the run draws the same batches: its epoch counter stays at 0
            if repeat:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in medians.items():
        print(f'{name:<14}{seconds:8.2f} s / epoch  {images / seconds:8.1f} img/s')
    ratio = medians["zoo's loop"] / medians['bare loop']
    print(f"zoo's loop / bare loop: {ratio:.3f}")
    lines = [
        utc_heading(f'fine-tuning loop overhead: {args.model}, {args.img_size} px, batch {args.batch_size}'),
        '',
        f'Machine: {describe_machine(torch.get_num_threads())}. `benchmarks/finetune_loop.py`: one epoch of the '
        f'digits training split ({images} images, {args.workers} loader workers) through zoo\'s training loop, a bare '
        f'forward / backward / step loop over the same loader, and the loader alone, taking turns; median of '
        f'{args.repeats} epochs after one warm-up round.',
        '',
        '| loop | s / epoch | img/s |',
        '|---|---:|---:|',
        *[f'| {name} | {seconds:.2f} | {images / seconds:.1f} |' for name, seconds in medians.items()],
        '',
        f"zoo's loop / bare loop: {ratio:.3f}.",
    ]
    append_results(args.out, lines)


if __name__ == '__main__':
    main()
