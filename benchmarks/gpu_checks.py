"""Checks that need a CUDA GPU, run by benchmarks/gpu_check.sh: one model per family, forward and backward on CUDA
against the CPU in float32 (TF32 off), under autocast bf16 and fp16 against float32, and torch.compile against eager.
Prints one line per check and appends it to ``--out`` (markdown) as soon as it is measured, so a cut run keeps what it
checked; exits 1 if any check fails."""
import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Iterator, Tuple

import torch

import zoo  # noqa: F401  (registers the zoo models)
from benchlib import calibrated_model

MODELS = ['van_b0', 'od_resnet18', 'od_mobilenetv2_050_4x', 'efficientmod_xxs', 'xvolution_resnet34',
          'xvolution_sa_resnet34']


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float().cpu() - expected.float().cpu()).abs().max() / expected.abs().max()).item()


def checks(name: str) -> Iterator[Tuple[str, float, float]]:
    """(check, measured, bound) of one model, each as soon as it is measured."""
    cpu = calibrated_model(name)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    cpu.train()
    gpu.train()
    out_cpu, out_gpu = cpu(x), gpu(x.cuda())
    out_cpu.square().mean().backward()
    out_gpu.square().mean().backward()
    yield 'train forward, CUDA vs CPU', _relative(out_gpu, out_cpu), 1e-4
    worst = max(_relative(pg.grad, pc.grad) for pc, pg in zip(cpu.parameters(), gpu.parameters())
                if pc.grad is not None and pc.grad.abs().max() > 0)
    yield 'gradients, CUDA vs CPU (worst parameter)', worst, 1e-3
    gpu.eval()
    with torch.no_grad():
        expected = gpu(x.cuda())
    for dtype, label in ((torch.bfloat16, 'bf16'), (torch.float16, 'fp16')):
        with torch.no_grad(), torch.autocast('cuda', dtype=dtype):
            error = _relative(gpu(x.cuda()), expected)
        yield f'autocast {label} vs float32', error, 3e-2
    with torch.no_grad():
        error = _relative(torch.compile(gpu)(x.cuda()), expected)
    yield 'torch.compile vs eager', error, 1e-4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--models', nargs='+', default=MODELS)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32
    header = [f'## GPU checks on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})',
              '', '| model | check | measured | bound | |', '|---|---|---:|---:|---|']
    args.out.write_text('\n'.join(header) + '\n')
    failed = 0
    for name in args.models:
        start = time.perf_counter()
        for check, value, bound in checks(name):
            ok = value <= bound
            failed += not ok
            with open(args.out, 'a', encoding='utf-8') as f:
                f.write(f'| {name} | {check} | {value:.2e} | {bound:.0e} | {"ok" if ok else "FAILED"} |\n')
            print(f'{name:<24}{check:<44}{value:10.2e}  (bound {bound:.0e}) {"ok" if ok else "FAILED"}', flush=True)
        print(f'{name}: {time.perf_counter() - start:.1f} s', flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
