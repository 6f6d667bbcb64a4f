#!/usr/bin/env bash
# GPU benchmarks of mltl in one call (target: under 8 minutes on one H100, after the machine has started).
#
#   bash benchmarks/gpu.sh                  # on the GPU machine (repo root or anywhere)
#   OUT=/tmp/gpuout PYTHON=/work/venv/bin/python bash benchmarks/gpu.sh --cpu-dry-run
#                                           # rehearsal on a CPU box: --device cpu --quick, no nvidia-smi,
#                                           # no pip install, small generated data
#
# Writes into "$OUT" (default <repo>/gpu-out): env.txt (machine, driver, versions), pytest.txt, throughput.jsonl
# (benchmarks/train_throughput.py: mltl vs bare PyTorch vs ImageFolder+DataLoader, GFE-II 150 px and
# ResNet-18 224 px, batch 64, 3 channels), chain.jsonl (benchmarks/chain_time.py: the demo chain and the
# paper-scale projection) and log.txt (everything printed). The GPU machine has no internet and no
# ../shared/data, so the image folder is generated from the CT phantom (3 classes x 300 PNGs, 256x256).
# Also compile.jsonl (train.compile = true against eager: the mltl and bare loops, GFE-II 150 px) and, only
# when the machine has more than one GPU, ddp.jsonl (benchmarks/ddp_scaling.py: one process against
# torchrun --nproc-per-node <GPUs>, same global batch).
# Knobs (environment): PYTHON (default python3), SKIP_TESTS=1, TP_EPOCHS (measured epochs, default 10),
# PER_CLASS (default 300), SKIP_COMPILE=1, SKIP_DDP=1.
set -euo pipefail

DRY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --cpu-dry-run or nothing)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute, as given relative to the caller's directory
cd "$ROOT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MLTL_QUIET=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export MLTL_CACHE_DIR="${MLTL_CACHE_DIR:-${TMPDIR:-/tmp}/mltl-bench-cache}"
exec > >(tee -a "$OUT/log.txt") 2>&1

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  TP_ARGS=(--quick --epochs "${TP_EPOCHS:-2}" --channels 3 --backbones gfe-2:64:64)
  CHAIN_ARGS=(--quick)
  PER_CLASS="${PER_CLASS:-24}"
  TP_TIMEOUT=400; CHAIN_TIMEOUT=300
  COMPILE_ARGS=(--quick --epochs 2 --channels 3 --backbones gfe-2:64:64); COMPILE_TIMEOUT=300
  DDP_ARGS=(--device cpu --images 200 --size 64 --epochs 3 --batch 32 --channels 1); DDP_TIMEOUT=300
else
  DEVICE=cuda
  TP_ARGS=(--epochs "${TP_EPOCHS:-10}" --channels 3
           --backbones gfe-2:150:64,resnet18:224:64)
  CHAIN_ARGS=()
  PER_CLASS="${PER_CLASS:-300}"
  TP_TIMEOUT=270; CHAIN_TIMEOUT=180
  COMPILE_ARGS=(--epochs 4 --channels 3 --backbones gfe-2:150:64); COMPILE_TIMEOUT=180
  DDP_ARGS=(--device cuda); DDP_TIMEOUT=240
fi

step() { echo; echo "== $(date -u +%H:%M:%S) $*"; }
T0=$(date +%s)

step "environment -> $OUT/env.txt"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "mode: $([ "$DRY" = 1 ] && echo 'cpu dry run' || echo gpu)"
  echo "uname: $(uname -a)"
  echo "nproc: $(nproc)"
  echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo 'unknown (no .git)')"
  lscpu 2>/dev/null | head -n 15 || true
  free -g 2>/dev/null || true
  if [ "$DRY" = 0 ]; then
    echo; nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
  fi
  echo; echo "python: $(command -v "$PY") $("$PY" --version 2>&1)"
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "threads", torch.get_num_threads())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.1f} GiB", "sm", f"{p.major}.{p.minor}",
          "SMs", p.multi_processor_count)
from importlib.metadata import PackageNotFoundError, version
for m in ("torchvision", "timm", "pluggy", "attrs", "rich", "scikit-learn", "safetensors", "numpy", "pillow",
          "matplotlib"):
    try:
        print(m, version(m))
    except PackageNotFoundError:
        print(m, "MISSING")
EOF
} 2>&1 | tee "$OUT/env.txt"

if [ "$DRY" = 0 ]; then
  step "install mltl and its plugins (editable, no dependencies)"
  install=(--no-deps --no-build-isolation -e . -e plugins/mltl-gfe -e plugins/mltl-ct
           -e plugins/mltl-samala -e plugins/mltl-roc)
  "$PY" -m pip install -q "${install[@]}" || PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -q "${install[@]}"
fi
"$PY" -c "import mltl; print('mltl', mltl.__version__, 'backbones:', mltl.get_registry().names('backbone'))"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step "pytest tests/test_network.py tests/test_chain.py -> $OUT/pytest.txt (not fatal, 120 s at most)"
  set +e
  timeout 120 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_network.py tests/test_chain.py 2>&1 | tee "$OUT/pytest.txt"
  rc=${PIPESTATUS[0]}
  set -e
  echo "pytest exit status: $rc" | tee -a "$OUT/pytest.txt"
fi

step "CT phantom image folder (3 classes x $PER_CLASS, 256x256 PNG)"
DATA=$("$PY" - "$PER_CLASS" <<'EOF'
import sys, time
sys.path.insert(0, "benchmarks")
import bench_common as bc
t = time.perf_counter()
root = bc.phantom_folder(per_class=int(sys.argv[1]), size=256, seed=0)
print(f"phantom folder ready in {time.perf_counter() - t:.1f} s: {root}", file=sys.stderr)
print(root)
EOF
)
echo "data: $DATA"

FAILED=()
# run_step FILE TIMEOUT CMD...: stdout to FILE (and the log); a failure or timeout is recorded, not fatal,
# so that one slow step does not cost the measurements of the next
run_step() {
  local file=$1 limit=$2; shift 2
  set +e
  timeout --kill-after=15 "$limit" "$@" | tee "$file"
  local rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" != 0 ]; then echo "!! step failed with exit status $rc: $*"; FAILED+=("$(basename "$file"):$rc"); fi
}

step "train_throughput.py --device $DEVICE ${TP_ARGS[*]} -> $OUT/throughput.jsonl"
run_step "$OUT/throughput.jsonl" "$TP_TIMEOUT" \
  "$PY" benchmarks/train_throughput.py --device "$DEVICE" --data "$DATA" "${TP_ARGS[@]}"

step "chain_time.py --device $DEVICE ${CHAIN_ARGS[*]} -> $OUT/chain.jsonl"
run_step "$OUT/chain.jsonl" "$CHAIN_TIMEOUT" "$PY" benchmarks/chain_time.py --device "$DEVICE" "${CHAIN_ARGS[@]}"

if [ "${SKIP_COMPILE:-0}" != 1 ]; then
  step "train_throughput.py --compile --loops bare,mltl ${COMPILE_ARGS[*]} -> $OUT/compile.jsonl"
  run_step "$OUT/compile.jsonl" "$COMPILE_TIMEOUT" \
    "$PY" benchmarks/train_throughput.py --device "$DEVICE" --data "$DATA" --loops bare,mltl --compile "${COMPILE_ARGS[@]}"
fi

NGPU=0
if [ "$DRY" = 0 ]; then NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
if [ "${SKIP_DDP:-0}" = 1 ]; then
  echo "ddp: skipped (SKIP_DDP=1)"
elif [ "$DRY" = 1 ] || [ "$NGPU" -gt 1 ]; then
  NP=$([ "$DRY" = 1 ] && echo 2 || echo "$NGPU")
  step "ddp_scaling.py --nproc $NP ${DDP_ARGS[*]} -> $OUT/ddp.jsonl"
  run_step "$OUT/ddp.jsonl" "$DDP_TIMEOUT" "$PY" benchmarks/ddp_scaling.py --nproc "$NP" "${DDP_ARGS[@]}"
else
  echo "ddp: skipped ($NGPU GPU on this machine; the torchrun comparison needs 2 or more)"
fi

step "summary"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("throughput.jsonl", "chain.jsonl", "compile.jsonl", "ddp.jsonl"):
    path = out / name
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("{")] if path.exists() else []
    if not lines:
        print(name, "no output")
        continue
    s = json.loads(lines[-1])
    keep = {k: s[k] for k in ("vs_bare", "vs_imagefolder", "vs_bare_train_only", "vs_bare_best", "vs_imagefolder_best",
                              "per_backbone", "demo_total_seconds",
                              "demo_stage_seconds", "projected_hours", "projected_total_hours", "device_name",
                              "speedup", "images_per_s", "processes")
            if k in s}
    print(name, json.dumps(keep, indent=1))
EOF
echo "done in $(( $(date +%s) - T0 )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
if [ ${#FAILED[@]} -gt 0 ]; then echo "failed steps: ${FAILED[*]}"; sleep 1; exit 1; fi
sleep 1  # let tee write the end of log.txt
