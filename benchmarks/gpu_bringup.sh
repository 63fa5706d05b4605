#!/usr/bin/env bash
# First run of cg_fast on a GPU (one H200): build, check, time, in at most 5 minutes and 8 files under $OUT.
#
#   bash benchmarks/gpu_bringup.sh                  # on the device machine, from the repository root
#   bash benchmarks/gpu_bringup.sh --dry-run        # anywhere: the plumbing only (each stage sleeps $DRY_SLEEP s)
#
# Through the device tool: run(command="bash benchmarks/gpu_bringup.sh", timeout_s=420) (the script ends by
# itself within BRINGUP_BUDGET=300 s; the rest covers start-up). Nothing is installed: the image's python3
# has torch, triton, pytest and pytest-xdist. Then copy $OUT/gpu_suite.json and models.json (with the GPU
# kind from bringup.json) to benchmarks/results/.
#
# Each stage runs in its own process under `timeout` (its whole process group is killed at its limit), so a
# hang, a crash or a sticky CUDA error costs that stage only. A stage gets min(its cap, time left - what the
# later stages are promised); the timing suite gets whatever is left at the end (at least SUITE_MIN s).
#
#   stage     cap (s)  what
#   build        90    python setup.py build_ext --inplace: the C++ and CUDA step operators (sm_90 only)
#   triton       50    Triton vs the PyTorch reference over every kernel variant and dtype (pytest -n 8)
#   graphs       35    whole-step CUDA graphs vs eager, graphed denoiser / classifier, unbatched CFG
#   models       60    ADM-64 fp16 + its classifier, DiT-XL/2 bf16 with CFG: eager vs cudagraph (random weights)
#   csrc         25    the CUDA csrc op vs Triton, eagerly and in a CUDA graph; sampling with it; vs the CPU op
#   suite      rest    benchmarks/gpu_suite.py: env, kernels (graph replays + host cost), sampling, forward
#                      (at least 40 s; more when the stages above finish early)
#
# Files under $OUT (4 of the 8 allowed, none in a folder): bringup.log (every stage's output, in order),
# bringup.json (per stage: cap, seconds, exit code, timed out; the GPU), models.json and gpu_suite.json (the
# suite's merged results: copy them to benchmarks/results/).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-$ROOT/out/bringup}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${BRINGUP_BUDGET:-300}"       # seconds for the whole script
SUITE_MIN="${BRINGUP_SUITE_MIN:-40}"  # promised to the timing suite
LOG="$OUT/bringup.log"
STAGES_TSV="$(mktemp)"
trap 'rm -f "$STAGES_TSV"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
unset TRITON_INTERPRET
START=$(date +%s)
: > "$LOG"

elapsed() { echo $(( $(date +%s) - START )); }

write_json() {  # bringup.json from the stage table (rewritten after every stage: a hard kill keeps it)
  "$PY" - "$STAGES_TSV" "$OUT/bringup.json" "$BUDGET" "$(elapsed)" "$DRY" <<'EOF'
import json, os, subprocess, sys
tsv, out, budget, elapsed, dry = sys.argv[1:]
stages = []
for line in open(tsv):
    name, cap, secs, rc = line.rstrip("\n").split("\t")
    stages.append({"stage": name, "cap_s": int(cap), "seconds": int(secs), "returncode": None if rc == "-" else int(rc),
                   "timed_out": rc in ("124", "137"), "skipped": rc == "-"})
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=10).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    gpu = None
doc = {"gpu": gpu, "dry_run": dry == "1", "budget_s": int(budget), "elapsed_s": int(elapsed), "stages": stages,
       "ok": all(s["returncode"] == 0 for s in stages)}
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(doc, f, indent=1)
os.replace(tmp, out)
EOF
}

# stage NAME CAP RESERVE COMMAND: run COMMAND (a bash string) with min(CAP, time left - RESERVE) seconds
stage() {
  local name="$1" cap="$2" reserve="$3" cmd="$4"
  local left=$(( BUDGET - $(elapsed) - reserve ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 5 ]; then
    printf '\n===== %s: skipped, %s s left (t = %s s)\n' "$name" "$left" "$(elapsed)" >> "$LOG"
    printf '%s\t%s\t0\t-\n' "$name" "$cap" >> "$STAGES_TSV"
    write_json
    return
  fi
  cmd="${cmd//\{LIMIT\}/$(( limit > 15 ? limit - 10 : 5 ))}"  # a command's own budget, inside the stage's limit
  printf '\n===== %s (limit %s s, t = %s s): %s\n' "$name" "$limit" "$(elapsed)" "$cmd" >> "$LOG"
  local t0=$(date +%s) rc
  if [ "$DRY" = 1 ]; then  # DRY_SLEEP (or DRY_SLEEP_<stage>) seconds instead of the command; DRY_FAIL=<stage> exits 1
    local sl_var="DRY_SLEEP_$name" code=0
    [ "${DRY_FAIL:-}" = "$name" ] && code=1
    timeout --kill-after=5 "$limit" bash -c "echo '[dry run] would run: '\"\$0\"; sleep ${!sl_var:-${DRY_SLEEP:-0}}; exit $code" "$cmd" >> "$LOG" 2>&1
  else
    timeout --kill-after=5 "$limit" bash -c "$cmd" >> "$LOG" 2>&1
  fi
  rc=$?
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && printf '***** %s: timed out after %s s\n' "$name" "$limit" >> "$LOG"
  printf '===== %s: exit %s in %s s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$LOG"
  printf '%s\t%s\t%s\t%s\n' "$name" "$cap" "$(( $(date +%s) - t0 ))" "$rc" >> "$STAGES_TSV"
  write_json
}

{ echo "cg_fast GPU bring-up $(date -u +%FT%TZ), budget ${BUDGET} s, dry run ${DRY}"; git rev-parse HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | head -3
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
  (nvcc --version 2>&1 | tail -2) ; } >> "$LOG" 2>&1

XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
PYTEST="$PY -m pytest -q -p no:cacheprovider -m 'not slow' tests/test_gpu.py"
#      name    cap reserve (what the later stages are promised)
stage build   90 $(( 50 + 35 + 60 + 25 + SUITE_MIN )) \
  "$PY setup.py build_ext --inplace && $PY -c \"from cg_fast.kernels import csrc_ops as c; print('csrc cpu', c.available('cpu'), 'cuda', c.available('cuda'), c.load_error())\""
stage triton  50 $(( 35 + 60 + 25 + SUITE_MIN )) "$PYTEST $XDIST -k 'triton_variants or triton_predictions or triton_equals'"
stage graphs  35 $(( 60 + 25 + SUITE_MIN )) "$PYTEST -k 'whole_step or cached_step or global_rng or graphed_denoiser or deferred or keeps_both'"
stage models  60 $(( 25 + SUITE_MIN )) "$PY benchmarks/gpu_suite.py --sections models --budget {LIMIT} --out '$OUT' --name models.json"
stage csrc    25 "$SUITE_MIN" "$PYTEST tests/test_kernels_csrc.py $XDIST -k 'csrc_cuda or cuda_matches'"
SUITE_LEFT=$(( BUDGET - $(elapsed) - 5 ))
stage suite "$SUITE_LEFT" 0 "$PY benchmarks/gpu_suite.py --sections env kernels sampling forward --budget {LIMIT} --out '$OUT'"

printf '\n===== done in %s s (budget %s s)\n' "$(elapsed)" "$BUDGET" >> "$LOG"
write_json
tail -n 40 "$LOG"
"$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); [print(f\"{s['stage']:8s} cap {s['cap_s']:4d} s  took {s['seconds']:4d} s  rc {s['returncode']}{'  TIMED OUT' if s['timed_out'] else ''}\") for s in d['stages']]" "$OUT/bringup.json"
