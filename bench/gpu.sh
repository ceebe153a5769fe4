#!/usr/bin/env bash
# One-GPU benchmark, under 8 minutes on one H100 (see docs/performance.md):
#   1. jaxclip ViT-B-16 at 224, bf16 compute, ring loss, the largest batch that fits
#      (found from XLA's memory analysis): samples/s, MFU, compile time;
#   2. OpenCLIP (PyTorch eager, amp_bf16) on the same batch, in its own process so
#      that each framework has the whole GPU: samples/s;
#   3. bench/loss.py's GPU rows, where that benchmark exists.
#
#   bash bench/gpu.sh [OUTDIR]        # JSON results land in OUTDIR (default $OUT or /tmp)
#   GPU_BENCH_SMOKE=1 bash bench/gpu.sh /tmp/smoke   # the same stages, tiny, on any
#       device (the CPU too): batch 8, one timed step, a small loss row. It checks the
#       script end to end where no GPU is at hand; its numbers mean nothing.
#
# The GPU machine has JAX and torch but no internet. Other wheels travel with the tree:
# fill bench/wheels/ beforehand (on a machine with internet) with
#   pip download --no-deps -d bench/wheels flax optax ml_collections orbax-checkpoint \
#       tensorboardX chex etils msgpack tensorstore simplejson humanize open_clip_torch==3.3.0
# Missing Python packages are installed from there (no index); open_clip_torch is only
# unpacked onto PYTHONPATH (no dependencies), since torch is already present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-/tmp}}"
mkdir -p "$OUTDIR"
START=$SECONDS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92  # jaxclip runs alone in its process

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"

if ! python -c "import flax, optax, ml_collections, orbax.checkpoint, tensorboardX" 2>/dev/null; then
  if [ -d bench/wheels ]; then
    pip install -q --no-index --find-links bench/wheels \
      flax optax ml_collections orbax-checkpoint tensorboardX || true
  fi
fi
if ! python -c "import importlib.util as u; assert u.find_spec('open_clip')" 2>/dev/null; then
  wheel=$(ls bench/wheels/open_clip_torch-*.whl 2>/dev/null | head -1)
  if [ -n "$wheel" ]; then
    python -m zipfile -e "$wheel" /tmp/open_clip_site
    export PYTHONPATH="$PYTHONPATH:/tmp/open_clip_site"
  fi
fi

if [ -n "${GPU_BENCH_SMOKE:-}" ]; then
  STEPS="--warmup=1 --steps=1 --rounds=1"; FIT="--batch=8"
  LOSS_ROWS="--platform=cpu --sizes=1024 --dims=64 --losses=clip --time-max=1024"
else
  STEPS="--warmup=5 --steps=10 --rounds=2"; FIT="--batch=-1"
  LOSS_ROWS="--platform=gpu --sizes=32768,131072 --dims=512 --losses=clip --time-max=131072"
fi

echo "== jaxclip: ViT-B-16, bf16, ring loss, largest batch"
timeout 300 python bench/train.py --workloads=ViT-B-16 --dtype=bfloat16 \
  --loss_impl=ring $FIT --openclip=0 $STEPS --json="$OUTDIR/gpu_jaxclip.json"
BATCH=$(python -c "import json; r = json.load(open('$OUTDIR/gpu_jaxclip.json')); print(r['workloads']['ViT-B-16']['batch_size'])" 2>/dev/null || echo 256)

echo "== OpenCLIP: ViT-B-16, amp_bf16, batch $BATCH"
if python -c "import importlib.util as u; assert u.find_spec('open_clip')" 2>/dev/null; then
  timeout 150 python bench/train.py --workloads=ViT-B-16 --jaxclip=0 \
    --openclip_precision=amp_bf16 --batch="$BATCH" $STEPS \
    --json="$OUTDIR/gpu_openclip.json"
else
  echo "open_clip_torch is not available here (no bench/wheels/open_clip_torch-*.whl)"
fi

if [ -f bench/loss.py ] && [ $((SECONDS - START)) -lt 400 ]; then
  echo "== bench/loss.py, GPU rows"
  timeout $((470 - (SECONDS - START))) python bench/loss.py $LOSS_ROWS \
    --json="$OUTDIR/gpu_loss.json"
fi

python - "$OUTDIR" <<'EOF'
import json, sys, os
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path))["workloads"]["ViT-B-16"] if os.path.exists(path) else {}
jax_run, oc_run = load("gpu_jaxclip.json").get("jaxclip"), load("gpu_openclip.json").get("openclip")
print("\n| ViT-B-16 @224, bf16 | samples/s | MFU | compile s |\n|---|---:|---:|---:|")
if jax_run:
    print(f"| jaxclip (ring loss) | {jax_run['samples_per_s']:.0f} | {jax_run['mfu']:.1%} | {jax_run['compile_s']:.0f} |")
if oc_run:
    print(f"| OpenCLIP amp_bf16 | {oc_run['samples_per_s']:.0f} | {oc_run['mfu']:.1%} | – |")
if jax_run and oc_run:
    print(f"\nratio jaxclip / OpenCLIP: {jax_run['samples_per_s'] / oc_run['samples_per_s']:.2f}")
EOF
echo "total $((SECONDS - START)) s"
