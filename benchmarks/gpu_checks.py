"""Checks that need a CUDA GPU, run by benchmarks/gpu_check.sh: one model per family, forward and backward on CUDA
against the CPU in float32 (TF32 off), under autocast bf16 and fp16 against float32, and torch.compile against eager.
Prints one line per check, writes them to ``--out`` (markdown) and exits 1 if any check fails."""
import argparse
import copy
import sys
import time
from pathlib import Path
from typing import List, Tuple

import torch

import zoo  # noqa: F401  (registers the zoo models)
from benchlib import calibrated_model

MODELS = ['van_b0', 'od_resnet18', 'od_mobilenetv2_050_4x', 'efficientmod_xxs', 'xvolution_resnet34',
          'xvolution_sa_resnet34']


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float().cpu() - expected.float().cpu()).abs().max() / expected.abs().max()).item()


def checks(name: str) -> List[Tuple[str, float, float]]:
    """(check, measured, bound) of one model."""
    cpu = calibrated_model(name)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    results = []
    cpu.train()
    gpu.train()
    out_cpu, out_gpu = cpu(x), gpu(x.cuda())
    out_cpu.square().mean().backward()
    out_gpu.square().mean().backward()
    results.append(('train forward, CUDA vs CPU', _relative(out_gpu, out_cpu), 1e-4))
    worst = max(_relative(pg.grad, pc.grad) for pc, pg in zip(cpu.parameters(), gpu.parameters())
                if pc.grad is not None and pc.grad.abs().max() > 0)
    results.append(('gradients, CUDA vs CPU (worst parameter)', worst, 1e-3))
    gpu.eval()
    with torch.no_grad():
        expected = gpu(x.cuda())
        for dtype, label in ((torch.bfloat16, 'bf16'), (torch.float16, 'fp16')):
            with torch.autocast('cuda', dtype=dtype):
                results.append((f'autocast {label} vs float32', _relative(gpu(x.cuda()), expected), 3e-2))
        compiled = torch.compile(gpu)
        results.append(('torch.compile vs eager', _relative(compiled(x.cuda()), expected), 1e-4))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--models', nargs='+', default=MODELS)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32
    lines = [f'## GPU checks on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})',
             '', '| model | check | measured | bound | |', '|---|---|---:|---:|---|']
    failed = 0
    for name in args.models:
        start = time.perf_counter()
        for check, value, bound in checks(name):
            ok = value <= bound
            failed += not ok
            lines.append(f'| {name} | {check} | {value:.2e} | {bound:.0e} | {"ok" if ok else "FAILED"} |')
            print(f'{name:<24}{check:<44}{value:10.2e}  (bound {bound:.0e}) {"ok" if ok else "FAILED"}', flush=True)
        print(f'{name}: {time.perf_counter() - start:.1f} s', flush=True)
    args.out.write_text('\n'.join(lines) + '\n')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
