#!/usr/bin/env bash
# GPU benchmarks of mltl in one call (target: under 8 minutes on one H100/H200, after the machine has started).
#
#   bash benchmarks/gpu.sh --prepare        # HERE (with .git), just before: gpu-out/prep/ = commit, git status,
#                                           # the "before" train.py for loop_ab (AB_BEFORE, default HEAD)
#   bash benchmarks/gpu.sh                  # on the GPU machine (repo root or anywhere); carry gpu-out/prep
#   OUT=/tmp/gpuout PYTHON=/work/venv/bin/python bash benchmarks/gpu.sh --cpu-dry-run
#                                           # rehearsal on a CPU box: --device cpu --quick, no nvidia-smi,
#                                           # no pip install, small generated data
#
# Writes into "$OUT" (default <repo>/gpu-out): env.txt (machine, driver, versions), meta.json (commit, date,
# mode), throughput.jsonl (benchmarks/train_throughput.py: mltl vs bare PyTorch vs ImageFolder+DataLoader,
# GFE-II 150 px and ResNet-18 224 px, batch 64, 3 channels, bf16; images/s, training FLOPs per image,
# achieved TFLOP/s, fraction of the dense BF16 peak, peak GPU memory), chain.jsonl (benchmarks/chain_time.py:
# the demo chain and the paper-scale projection), loop_ab_before.jsonl (benchmarks/loop_ab.py: the prepared
# "before" fit against the working tree's, on the GPU) and loop_ab_stream.jsonl (resident against streamed
# data), pytest.txt, compile.jsonl (train.compile = true against eager: the mltl and bare loops, GFE-II
# 150 px), steps.tsv (seconds and exit status of every step), summary.json + summary.md (everything the
# issue asks for in one place; benchmarks/gpu_summary.py) and log.txt (everything printed). The GPU machine
# has no internet and no ../shared/data, so the image folder is generated from the CT phantom (3 classes x
# 300 PNGs, 256x256). Only when the machine has more than one GPU: ddp.jsonl (benchmarks/ddp_scaling.py:
# one process against torchrun --nproc-per-node <GPUs>, same global batch).
# Knobs (environment): PYTHON (default python3), SKIP_TESTS=1, TP_EPOCHS (measured epochs, default 10),
# PER_CLASS (default 300), SKIP_COMPILE=1, SKIP_DDP=1, SKIP_AB=1, AB_BEFORE (git ref for --prepare, default
# HEAD), PREP (default <repo>/gpu-out/prep), COMMIT (overrides the recorded commit), PYTEST_FILES,
# BUDGET_S (seconds for the whole script, default 480 on the GPU; later optional steps shrink or are skipped
# to stay inside it).
set -euo pipefail

DRY=0
PREPARE_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    --prepare) PREPARE_ONLY=1 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --cpu-dry-run, --prepare or nothing)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREP="${PREP:-$ROOT/gpu-out/prep}"

# prepare: what the GPU machine cannot find out itself, as it gets the working tree without .git
prepare() {
  local ref="${AB_BEFORE:-HEAD}" rel
  mkdir -p "$PREP"
  git -C "$ROOT" rev-parse HEAD > "$PREP/commit.txt"
  git -C "$ROOT" describe --always --dirty > "$PREP/describe.txt"
  git -C "$ROOT" status --short -- core plugins benchmarks tests examples pyproject.toml > "$PREP/status.txt"
  date -u '+%Y-%m-%d %H:%M:%S UTC' > "$PREP/prepared.txt"
  rm -f "$PREP/before_train.py" "$PREP/before_ref.txt"
  for rel in core/mltl/training/train.py core/mltl/train.py; do
    if git -C "$ROOT" show "$ref:$rel" > "$PREP/before_train.py" 2>/dev/null; then
      echo "$ref $(git -C "$ROOT" rev-parse --short "$ref") $rel" > "$PREP/before_ref.txt"
      break
    fi
    rm -f "$PREP/before_train.py"
  done
  echo "prepared $PREP: commit $(cat "$PREP/describe.txt"), before = $(cat "$PREP/before_ref.txt" 2>/dev/null || echo none)," \
       "$(wc -l < "$PREP/status.txt") changed paths under core/ plugins/ benchmarks/ tests/ examples/"
}
if git -C "$ROOT" rev-parse HEAD > /dev/null 2>&1; then
  prepare
elif [ "$PREPARE_ONLY" = 1 ]; then
  echo "--prepare needs the git repository (run it on the machine with .git)" >&2; exit 2
fi
[ "$PREPARE_ONLY" = 1 ] && exit 0
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
  AB_ARGS=(--device cpu --size 64 --channels 3 --per-class 0 --epochs 2 --rounds 2 --threads 1); AB_TIMEOUT=200
  COMPILE_ARGS=(--quick --epochs 2 --channels 3 --backbones gfe-2:64:64); COMPILE_TIMEOUT=300
  DDP_ARGS=(--device cpu --images 200 --size 64 --epochs 3 --batch 32 --channels 1); DDP_TIMEOUT=300
  BUDGET_S="${BUDGET_S:-2400}"
else
  DEVICE=cuda
  TP_ARGS=(--epochs "${TP_EPOCHS:-10}" --channels 3
           --backbones gfe-2:150:64,resnet18:224:64)
  CHAIN_ARGS=()
  PER_CLASS="${PER_CLASS:-300}"
  TP_TIMEOUT=240; CHAIN_TIMEOUT=150
  AB_ARGS=(--device cuda --size 150 --channels 3 --per-class 0 --epochs 4 --rounds 6); AB_TIMEOUT=90
  COMPILE_ARGS=(--epochs 4 --channels 3 --backbones gfe-2:150:64); COMPILE_TIMEOUT=150
  DDP_ARGS=(--device cuda); DDP_TIMEOUT=120
  BUDGET_S="${BUDGET_S:-480}"
fi
PYTEST_FILES="${PYTEST_FILES:-tests/test_network.py tests/test_chain.py tests/test_errors.py}"

T0=$(date +%s)
STEP_NAME=""; STEP_T0=$T0
echo -e "step\tseconds\texit_status" > "$OUT/steps.tsv"
# step "ID: what": closes the previous step (its seconds go to steps.tsv and the log) and opens the next
step() {
  local now; now=$(date +%s)
  if [ -n "$STEP_NAME" ]; then
    echo "-- ${STEP_NAME%%:*}: $((now - STEP_T0)) s (at $((now - T0)) s of the budget $BUDGET_S s)"
    echo -e "${STEP_NAME%%:*}\t$((now - STEP_T0))\t${STEP_RC:-0}" >> "$OUT/steps.tsv"
  fi
  STEP_NAME="$*"; STEP_T0=$now; STEP_RC=0
  [ -n "$STEP_NAME" ] && { echo; echo "== $(date -u +%H:%M:%S) [$((now - T0)) s] $*"; }
  return 0
}
# left LIMIT: LIMIT, or what is left of BUDGET_S (less 20 s for the summary) when that is smaller
left() {
  local rest=$(( BUDGET_S - ($(date +%s) - T0) - 20 ))
  if [ "$rest" -lt "$1" ]; then echo "$rest"; else echo "$1"; fi
}

# the commit: COMMIT, else what --prepare recorded (the GPU machine has no .git), else unknown
if [ -n "${COMMIT:-}" ]; then COMMIT_TEXT="$COMMIT (COMMIT)"
elif [ -s "$PREP/commit.txt" ]; then
  COMMIT_TEXT="$(cat "$PREP/commit.txt") ($(cat "$PREP/describe.txt"); $(wc -l < "$PREP/status.txt") changed paths; recorded by --prepare at $(cat "$PREP/prepared.txt"))"
else COMMIT_TEXT="unknown (no .git and no $PREP: run 'bash benchmarks/gpu.sh --prepare' first and carry gpu-out/prep)"
fi

step "env: environment -> $OUT/env.txt"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "mode: $([ "$DRY" = 1 ] && echo 'cpu dry run' || echo gpu)"
  echo "uname: $(uname -a)"
  echo "nproc: $(nproc)"
  echo "commit: $COMMIT_TEXT"
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
  step "install: mltl and its plugins (editable, no dependencies)"
  install=(--no-deps --no-build-isolation -e . -e plugins/mltl-gfe -e plugins/mltl-ct
           -e plugins/mltl-samala -e plugins/mltl-roc -e plugins/mltl-timm)
  "$PY" -m pip install -q "${install[@]}" || PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -q "${install[@]}"
fi
"$PY" -c "import mltl; print('mltl', mltl.__version__, 'backbones:', mltl.get_registry().names('backbone'))"
"$PY" - "$OUT/meta.json" "$DRY" "$COMMIT_TEXT" "$PREP" <<'EOF'
import json, sys, time
from pathlib import Path
out, dry, commit_text, prep = sys.argv[1], sys.argv[2] == "1", sys.argv[3], Path(sys.argv[4])
def read(name):
    return (prep / name).read_text().rstrip("\n") if (prep / name).exists() else None
meta = {"mode": "cpu dry run" if dry else "gpu", "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": commit_text.split(" ")[0], "commit_text": commit_text, "describe": read("describe.txt"),
        "changed_paths": (read("status.txt") or "").splitlines(), "prepared_at": read("prepared.txt"),
        "loop_ab_before": read("before_ref.txt")}
Path(out).write_text(json.dumps(meta, indent=1) + "\n")
EOF

step "phantom: CT phantom image folder (3 classes x $PER_CLASS, 256x256 PNG)"
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
# so that one slow step does not cost the measurements of the next. The timeout is cut to what is left of
# BUDGET_S; with less than 30 s left the step is skipped (and recorded as such).
run_step() {
  local file=$1 limit; limit=$(left "$2"); shift 2
  if [ "$limit" -lt 30 ]; then
    echo "!! skipped: only $limit s left of BUDGET_S=$BUDGET_S: $*"
    FAILED+=("$(basename "$file"):skipped"); STEP_RC=skipped; return 0
  fi
  set +e
  timeout --kill-after=15 "$limit" "$@" | tee "$file"
  local rc=${PIPESTATUS[0]}
  set -e
  STEP_RC=$rc
  if [ "$rc" != 0 ]; then
    echo "!! step failed with exit status $rc (timeout $limit s): $*"; FAILED+=("$(basename "$file"):$rc")
  fi
}

step "throughput: train_throughput.py --device $DEVICE ${TP_ARGS[*]} -> $OUT/throughput.jsonl"
run_step "$OUT/throughput.jsonl" "$TP_TIMEOUT" \
  "$PY" benchmarks/train_throughput.py --device "$DEVICE" --data "$DATA" "${TP_ARGS[@]}"

step "chain: chain_time.py --device $DEVICE ${CHAIN_ARGS[*]} -> $OUT/chain.jsonl"
run_step "$OUT/chain.jsonl" "$CHAIN_TIMEOUT" "$PY" benchmarks/chain_time.py --device "$DEVICE" "${CHAIN_ARGS[@]}"

if [ "${SKIP_AB:-0}" = 1 ]; then
  echo "loop_ab: skipped (SKIP_AB=1)"
else
  if [ -s "$PREP/before_train.py" ]; then
    step "loop_ab_before: loop_ab.py --before-file $PREP/before_train.py ${AB_ARGS[*]} -> $OUT/loop_ab_before.jsonl"
    run_step "$OUT/loop_ab_before.jsonl" "$AB_TIMEOUT" "$PY" benchmarks/loop_ab.py --data "$DATA" "${AB_ARGS[@]}" \
      --before-file "$PREP/before_train.py" --before-label "$(cat "$PREP/before_ref.txt")"
  else
    echo "!! loop_ab before/after: skipped, no $PREP/before_train.py" \
         "(run 'bash benchmarks/gpu.sh --prepare' where .git is, and carry gpu-out/prep)"
  fi
  step "loop_ab_stream: loop_ab.py --stream ${AB_ARGS[*]} -> $OUT/loop_ab_stream.jsonl"
  run_step "$OUT/loop_ab_stream.jsonl" "$AB_TIMEOUT" "$PY" benchmarks/loop_ab.py --data "$DATA" "${AB_ARGS[@]}" --stream
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step "pytest: $PYTEST_FILES -> $OUT/pytest.txt (not fatal, 120 s at most)"
  limit=$(left 120)
  if [ "$limit" -lt 30 ]; then
    echo "!! pytest skipped: only $limit s left of BUDGET_S=$BUDGET_S" | tee "$OUT/pytest.txt"; STEP_RC=skipped
  else
    set +e
    # shellcheck disable=SC2086
    timeout "$limit" "$PY" -m pytest -q -x -p no:cacheprovider $PYTEST_FILES 2>&1 | tee "$OUT/pytest.txt"
    rc=${PIPESTATUS[0]}
    set -e
    STEP_RC=$rc
    echo "pytest exit status: $rc" | tee -a "$OUT/pytest.txt"
  fi
fi

if [ "${SKIP_COMPILE:-0}" != 1 ]; then
  step "compile: train_throughput.py --compile --loops bare,mltl ${COMPILE_ARGS[*]} -> $OUT/compile.jsonl"
  run_step "$OUT/compile.jsonl" "$COMPILE_TIMEOUT" \
    "$PY" benchmarks/train_throughput.py --device "$DEVICE" --data "$DATA" --loops bare,mltl --compile "${COMPILE_ARGS[@]}"
fi

NGPU=0
if [ "$DRY" = 0 ]; then NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
if [ "${SKIP_DDP:-0}" = 1 ]; then
  echo "ddp: skipped (SKIP_DDP=1)"
elif [ "$DRY" = 1 ] || [ "$NGPU" -gt 1 ]; then
  NP=$([ "$DRY" = 1 ] && echo 2 || echo "$NGPU")
  step "ddp: ddp_scaling.py --nproc $NP ${DDP_ARGS[*]} -> $OUT/ddp.jsonl"
  run_step "$OUT/ddp.jsonl" "$DDP_TIMEOUT" "$PY" benchmarks/ddp_scaling.py --nproc "$NP" "${DDP_ARGS[@]}"
else
  echo "ddp: skipped ($NGPU GPU on this machine; the torchrun comparison needs 2 or more)"
fi

step ""  # closes the last step in steps.tsv, which the summary reads
echo; echo "== $(date -u +%H:%M:%S) [$(( $(date +%s) - T0 )) s] summary -> $OUT/summary.json, $OUT/summary.md"
set +e
"$PY" benchmarks/gpu_summary.py "$OUT"
rc=$?
set -e
if [ "$rc" != 0 ]; then echo "!! gpu_summary.py failed with exit status $rc"; FAILED+=("summary:$rc"); fi
echo "done in $(( $(date +%s) - T0 )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
if [ ${#FAILED[@]} -gt 0 ]; then echo "failed or skipped steps: ${FAILED[*]}"; sleep 1; exit 1; fi
sleep 1  # let tee write the end of log.txt
