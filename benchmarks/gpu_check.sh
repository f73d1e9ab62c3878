#!/usr/bin/env bash
# On a machine with one CUDA GPU: a 30-second smoke step (torch, CUDA, the GPU, one forward and backward of
# od_resnet18), then the CUDA checks of every family (benchmarks/gpu_checks.py) and the GPU benchmark of one model per
# family against its timm baselines (bf16 autocast, eager, reparameterized and compiled). Each step has its own time
# limit and writes its output as it goes to $OUT/gpu_check-DATE/STEP.log (benchmarks/gpu/DATE/ without $OUT), so a
# hang shows at once and a cut run keeps what it measured. The interpreter is $PYTHON (default python3: on some GPU
# machines `python` is not the one with torch). Without a GPU it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1  # every line reaches the log when it is printed
if ! "$py" -c 'import torch' 2> /dev/null; then
    echo "gpu_check: $py cannot import torch: set PYTHON to the interpreter zoo is installed in" >&2
    exit 1
fi
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU on this machine: nothing to check"
    exit 0
fi
stamp="$(date -u +%Y%m%d-%H%M)"
if [ -n "${OUT:-}" ]; then out="$OUT/gpu_check-$stamp"; else out="benchmarks/gpu/$stamp"; fi
mkdir -p "$out"
status=0

# step NAME SECONDS COMMAND...: COMMAND under its own time limit, its output shown and written to $out/NAME.log
step() {
    local name=$1 seconds=$2
    shift 2
    echo "gpu_check: $name (at most ${seconds} s)"
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$out/$name.log"
    local code=${PIPESTATUS[0]}
    if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
        echo "gpu_check: $name did not finish in ${seconds} s" | tee -a "$out/$name.log"
        status=1
    elif [ "$code" -ne 0 ]; then
        echo "gpu_check: $name failed (exit status $code)" | tee -a "$out/$name.log"
        status=1
    fi
}

step smoke 30 "$py" - << 'SMOKE'
import time
import torch
import timm
import zoo  # noqa: F401  (registers the zoo models)
print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}', flush=True)
start = time.perf_counter()
model = timm.create_model('od_resnet18').cuda().train()
loss = model(torch.randn(2, 3, 224, 224, device='cuda')).square().mean()
loss.backward()
torch.cuda.synchronize()
print(f'od_resnet18 forward + backward on CUDA: loss {loss.item():.4g}, {time.perf_counter() - start:.1f} s', flush=True)
SMOKE
if [ "$status" -ne 0 ]; then
    echo "gpu_check: the smoke step failed: the longer steps are skipped; results in $out"
    exit 1
fi
step nvidia-smi 30 nvidia-smi
step checks 600 "$py" benchmarks/gpu_checks.py --out "$out/checks.md"
step bench 900 "$py" benchmarks/bench.py --device cuda --amp bf16 --threads 4 --memory-formats nchw channels_last \
    --batch-sizes 1 64 --modes infer train compile --repeats 20 --warmup 5 \
    --models van_b0 od_resnet18 od_resnet18_4x od_mobilenetv2_100 efficientmod_xxs xvolution_resnet50 \
    --baselines resnet18 resnet50 mobilenetv2_100 \
    --out "$out/RESULTS.md" --plot "$out/throughput.png"
echo "gpu_check: results in $out"
exit $status
