#!/usr/bin/env bash
# The accelerator check (issue 25): every section in its own process, time-boxed with `timeout`, each appending
# one JSON line to ONE results file as it finishes (a kill keeps what finished), then a summary.
#
#   scripts/accelerator_check.sh [--tiny] [--out FILE]
#
# Sections: pytest -m gpu; bf16 logits vs HF torch; prefill MFU + decode MBU at Qwen2.5-7B shapes; one prefill of
# Qwen3-32B / Gemma-2-27B shapes on a >= 141 GB device (peak vs planned memory); the steering sweep vs HF hooks;
# serve throughput (bench_serve.py). Whole run <= 5 minutes on one H100 / H200. --tiny: small configs, every
# section's code on a CPU in about 2 minutes (sections that need an accelerator record "skipped").
# Env: PYTHON (default .venv/bin/python if present, else python), ACCEL_PEAK_TFLOPS / ACCEL_PEAK_TBPS (override
# the device's peaks), ACCEL_TIME_SCALE (multiply every time box, default 1).
set -u
cd "$(dirname "$0")/.."
TINY=""
OUT="bench_results/accelerator_check.jsonl"
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY="--tiny" ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (use --tiny, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
mkdir -p "$(dirname "$OUT")"
: >"$OUT"
# JAX takes memory as it goes (torch shares the device in some sections; bench_serve runs in a child process)
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
SCALE="${ACCEL_TIME_SCALE:-1}"

run() {  # run SECTION SECONDS [extra args]: one section under `timeout`; a kill or a crash is recorded too
  local section="$1" secs="$2"; shift 2
  local budget before after
  budget=$(awk -v s="$secs" -v k="$SCALE" 'BEGIN { t = s * k; printf "%d", (t > 30 ? t - 15 : t / 2 + 1) }')
  secs=$(awk -v s="$secs" -v k="$SCALE" 'BEGIN { printf "%g", s * k }')
  before=$(wc -l <"$OUT")
  echo "== $section ($secs s) $*" >&2
  timeout --kill-after=10 "$secs" "$PYTHON" scripts/accelerator_check.py --section "$section" --out "$OUT" \
    --budget $budget $TINY "$@"
  local rc=$?
  after=$(wc -l <"$OUT")
  if [ "$after" -eq "$before" ]; then  # the process wrote nothing: killed by the time box, or crashed
    local why="exited $rc without a record"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then why="timed out after $secs s"; fi
    printf '{"section": "%s", "error": "%s", "args": "%s"}\n' "$section" "$why" "$*" >>"$OUT"
  fi
}

if [ -n "$TINY" ]; then
  run pytest_gpu 60
  run bf16_parity 60
  run mfu_mbu 60
  run big_prefill 60 --model qwen3-32b
  run big_prefill 60 --model gemma-2-27b-it
  for st in prefill sweep train decode; do run plan_vs_peak 60 --stage $st; done
  run sweep_vs_hf 90
  run serve 120
else  # 300 s together at most; the boxes are estimates (no accelerator was lent yet): stretch with ACCEL_TIME_SCALE
  run pytest_gpu 35
  run bf16_parity 25
  run mfu_mbu 50
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run big_prefill 40 --model qwen3-32b
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run big_prefill 35 --model gemma-2-27b-it
  for st in prefill sweep train decode; do run plan_vs_peak 15 --stage $st; done
  run sweep_vs_hf 30
  run serve 50
fi
"$PYTHON" scripts/accelerator_check.py --summary "$OUT"
