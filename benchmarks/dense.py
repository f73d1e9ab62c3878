"""Dense prediction benchmarks; results are appended to benchmarks/RESULTS.md.

``memory``: the peak resident memory of one training step (forward, backward) of Faster R-CNN on
``zoo.dense_backbone(MODEL)`` at one SIZE x SIZE image (800 px, detection's resolution), each model in a fresh
interpreter, against its plain ResNet: what X-volution's attention branch costs at detection resolutions.

``shapes``: ``zoo finetune --task detect`` with the embedded shapes recipe, the same for every backbone (from
scratch), one run after another: best validation mAP@0.5 and training images per second.

    python benchmarks/dense.py memory --models resnet34 xvolution_resnet34 xvolution_sa_resnet34
    OMP_NUM_THREADS=1 python benchmarks/dense.py shapes --epochs 1 --models van_b0 od_mobilenetv2_050 \
        efficientmod_xxs xvolution_resnet34 resnet18 mobilenetv2_100
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

import torch

from benchlib import RESULTS, append_results, describe_machine, utc_heading

_STEP = '''
import json, resource, sys, time, timm, torch, zoo
from zoo.dense import dense_backbone, detector
name, size = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = detector('fasterrcnn', dense_backbone(timm.create_model(name)), 91, size).train()
images = [torch.rand(3, size, size)]
targets = [dict(boxes=torch.tensor([[100., 100., 400., 500.]]), labels=torch.tensor([1]))]
built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
sum(model(images, targets).values()).backward()
seconds = time.perf_counter() - start
print(json.dumps(dict(built_mib=built / 1024, peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      seconds=seconds)))
'''


def memory(models: List[str], size: int) -> List[str]:
    rows = ['| backbone | resident after building (MiB) | peak in the step (MiB) | step increase (MiB) | step (s) |',
            '|---|---|---|---|---|']
    for name in models:
        result = subprocess.run([sys.executable, '-c', _STEP, name, str(size)], capture_output=True, text=True,
                                check=True)
        m = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(f'| {name} | {m["built_mib"]:.0f} | {m["peak_mib"]:.0f} | {m["peak_mib"] - m["built_mib"]:.0f} | '
                    f'{m["seconds"]:.1f} |')
        print(rows[-1], flush=True)
    return [f'Faster R-CNN (FPN 256, torchvision defaults) on `zoo.dense_backbone(MODEL)`, one training step '
            f'(forward + backward) of one {size} x {size} image, each model in a fresh interpreter; peak resident '
            f'memory (ru_maxrss) of the process.', ''] + rows


def shapes(models: List[str], epochs: int) -> List[str]:
    from zoo.finetune import recipe_for_run
    from zoo.finetune.dense_trainer import finetune_dense
    rows = ['| backbone | best mAP@0.5 | mAP@0.5:0.95 | train img/s (last epoch) | minutes |', '|---|---|---|---|---|']
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            recipe = recipe_for_run(dict(task='detect', model=name, epochs=epochs, workers=0,
                                         output=str(Path(tmp) / name)))
            result = finetune_dense(recipe)
            metrics = (Path(tmp) / name / 'metrics.csv').read_text().splitlines()
            img_s = float(metrics[-1].split(',')[5])
            rows.append(f'| {name} | {result.best["map50"]:.3f} | {result.best["map"]:.3f} | {img_s:.1f} | '
                        f'{result.seconds / 60:.1f} |')
            print(rows[-1], flush=True)
    return [f'`zoo finetune --task detect --model MODEL --epochs {epochs}` (the embedded shapes recipe: FCOS, FPN 64, '
            f'96 px, batch 8, AdamW, from scratch), one model after another.', ''] + rows


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('what', choices=('memory', 'shapes'))
    parser.add_argument('--models', nargs='+', required=True)
    parser.add_argument('--size', type=int, default=800, help='memory: the image size')
    parser.add_argument('--epochs', type=int, default=8, help='shapes: epochs per run')
    args = parser.parse_args(argv)
    lines = memory(args.models, args.size) if args.what == 'memory' else shapes(args.models, args.epochs)
    header = [utc_heading(f'dense {args.what}: {", ".join(args.models)}'), '',
              f'Machine: {describe_machine(torch.get_num_threads())}.', '']
    append_results(RESULTS, header + lines)


if __name__ == '__main__':
    main()
