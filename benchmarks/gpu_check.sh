#!/usr/bin/env bash
# On a machine with one CUDA GPU, in a few minutes: the CUDA checks of every family (benchmarks/gpu_checks.py) and the
# GPU benchmark of one model per family against its timm baselines (bf16 autocast, eager, reparameterized and
# compiled), all written under benchmarks/gpu/DATE/. Without a GPU it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c 'import torch' 2> /dev/null; then
    echo "gpu_check: python cannot import torch: activate the environment zoo is installed in" >&2
    exit 1
fi
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU on this machine: nothing to check"
    exit 0
fi
out="benchmarks/gpu/$(date -u +%Y%m%d-%H%M)"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
status=0
python benchmarks/gpu_checks.py --out "$out/checks.md" 2>&1 | tee "$out/checks.log" || status=1
python benchmarks/bench.py --device cuda --amp bf16 --threads 4 --memory-formats nchw channels_last \
    --batch-sizes 1 64 --modes infer train compile --repeats 20 --warmup 5 \
    --models van_b0 od_resnet18 od_resnet18_4x od_mobilenetv2_100 efficientmod_xxs xvolution_resnet50 \
    --baselines resnet18 resnet50 mobilenetv2_100 \
    --out "$out/RESULTS.md" --plot "$out/throughput.png" 2>&1 | tee "$out/bench.log" || status=1
echo "gpu_check: results in $out"
exit $status
