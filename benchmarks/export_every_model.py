"""Exports every zoo model to ONNX through ``zoo.export.export_onnx`` (the code behind ``zoo export``) with a free
batch dimension, in its training form and reparameterized, and appends what each export measured (seconds, size, the
batch onnxruntime was checked at and its max abs difference from PyTorch) to benchmarks/RESULTS.md.

The tests export one model per family; this script is the evidence for the other 25. Random weights with the
BatchNorm statistics of a few forward passes and tamed ODConv attention heads (``bench.calibrated_model``: freshly
initialised ODConv MobileNetV2s give logits of 1e-27, which would make any comparison pass, and calibrated ones with
full-size heads are chaotic in float32): the check is that the graph computes what the model computes,
at a batch size other than the exported one.

    python benchmarks/export_every_model.py                     # all 29 models, 160 px
    python benchmarks/export_every_model.py --models 'od_*' --img-size 224
"""
import argparse
import datetime
import tempfile
import time
from pathlib import Path
from typing import List

import torch

from zoo.catalogue import summarize_models
from zoo.export import ExportError, export_onnx

from benchlib import RESULTS, calibrated_model, describe_machine


def export_rows(pattern: str, img_size: int) -> List[str]:
    """One markdown row per model and form."""
    rows = []
    for summary in summarize_models(pattern):
        model = calibrated_model(summary.name)
        for reparameterize in (False, True):
            form = 'reparameterized' if reparameterize else 'training form'
            start = time.perf_counter()
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    result = export_onnx(model, Path(tmp) / 'model.onnx', input_size=(3, img_size, img_size),
                                         reparameterize=reparameterize)
            except ExportError as e:  # recorded, so that one failure does not hide the other models
                rows.append(f'| {summary.name} | {form} | failed: {e} | | | | {time.perf_counter() - start:.0f} |')
            else:
                batch = 'free' if result.dynamic_batch else 'fixed'
                seconds = time.perf_counter() - start
                rows.append(f'| {summary.name} | {form} | {batch} | {result.checked_batch} | '
                            f'{result.max_abs_diff:.1e} | {result.bytes / 1e6:.1f} | {seconds:.0f} |')
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default='*', help='shell-style pattern over the zoo model names')
    parser.add_argument('--img-size', type=int, default=160, help='height and width of the exported input')
    parser.add_argument('--out', type=Path, default=RESULTS, help='markdown file the results are appended to')
    args = parser.parse_args()
    rows = export_rows(args.models, args.img_size)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    section = [
        f'## {stamp} — ONNX export of every zoo model ({args.models}), {args.img_size} px', '',
        f'Machine: {describe_machine(torch.get_num_threads())}. `zoo.export.export_onnx` (torch.onnx.export with '
        'dynamo=True, onnx checker, onnxruntime CPU provider); `bench.calibrated_model` weights (random, calibrated '
        'BatchNorm statistics, ODConv attention heads at 0.03x); seconds include the export, the check and the '
        'comparison.', '',
        '| model | form | batch dimension | onnxruntime checked at batch | max abs diff vs PyTorch | MB | seconds |',
        '|---|---|---|---:|---:|---:|---:|', *rows, '']
    with open(args.out, 'a', encoding='utf-8') as f:
        f.write('\n' + '\n'.join(section))


if __name__ == '__main__':
    main()
