#!/usr/bin/env bash
# One-GPU end-to-end check (target: <= 8 minutes on one H100 / H200), run from anywhere in the repository:
#   1. `dvc repro` of params/gpu-quick.yaml in a temporary copy of the repository (all four kernels, evaluator);
#   2. the paper-size training-step benchmark: benchmarks/train_step.py --config paper --batch 64 --steps 5;
#   3. the paper-size sampling benchmark: benchmarks/sampling.py --config paper;
# then ONE summary table (per stage: seconds, device, tokens/s + MFU or samples/s), also written as JSON to
# benchmarks/results/gpu_check_cuda.json (the two benchmarks' own JSON files go beside it). The table and the toy
# sizes come from benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh [--dry-run] [--results DIR]
#
# --dry-run: the same three parts on the CPU at toy sizes (the tests' tiny corpus, model and evaluator, the mask
#            kernel only, a few steps; the step benchmark on the toy params' model instead of the 110M one), in
#            about two minutes on 2 idle cores. Its benchmark JSON files stay in the temporary copy; only the summary
#            is written (gpu_check_dry_run.json).
# A failed or timed-out part is marked in the table, the others still run, and the exit status is 1.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DRY=0
RESULTS=$REPO/benchmarks/results
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --results) RESULTS=$(mkdir -p "$2" && cd "$2" && pwd); shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1; use --dry-run and/or --results DIR" >&2; exit 2 ;;
  esac
  shift
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
COPY=$WORK/repo
export PYTHONPATH=$COPY DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1
export GIT_AUTHOR_NAME=gpu_check GIT_AUTHOR_EMAIL=gpu_check@semdlm.invalid
export GIT_COMMITTER_NAME=gpu_check GIT_COMMITTER_EMAIL=gpu_check@semdlm.invalid
unset MLFLOW_TRACKING_URI

# the working tree as git sees it (tracked + untracked, not ignored), without outputs of an earlier run
mkdir -p "$COPY"
(cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) \
  | tar -C "$COPY" -xf -
rm -rf "$COPY/dvc.lock" "$COPY/metrics" "$COPY/reports"
cd "$COPY" || exit 1
git init -q && git add -A && git commit -qm "gpu_check copy" || exit 1
python -m pipeline use-profile params/gpu-quick.yaml >/dev/null || exit 1

if [ $DRY = 1 ]; then
  LIMIT_REPRO=900 LIMIT_STEP=300 LIMIT_SAMPLING=300  # a busy 2-core machine takes minutes
  # toy sizes on the CPU: the tests' tiny params and evaluator over the gpu-quick profile
  python benchmarks/gpu_check.py toy "$WORK" || exit 1
  python -m pipeline use-profile "$WORK/toy.yaml" >/dev/null || exit 1
  STEP_ARGS=(--config params --params params.yaml --steps 2 --device cpu --out "$WORK/train_step.json")
  SAMPLING_ARGS=(--config paper --profile params.yaml --vocab 256 --lengths 16,1024 --batch 2 --steps 4 --device cpu
                 --out "$WORK/sampling.json")
  SUMMARY=$RESULTS/gpu_check_dry_run.json
else
  LIMIT_REPRO=600 LIMIT_STEP=300 LIMIT_SAMPLING=300
  STEP_ARGS=(--config paper --batch 64 --steps 5 --out "$RESULTS/train_step_paper_cuda.json")
  SAMPLING_ARGS=(--config paper --out "$RESULTS/sampling_paper_cuda.json")
  SUMMARY=$RESULTS/gpu_check_cuda.json
fi
git commit -qam "gpu_check params" || exit 1
mkdir -p "$RESULTS"

part() {  # part NAME LIMIT_S COMMAND...: run with a time limit, keep the log with a time stamp per line
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" >&2
  local t0=${EPOCHREALTIME/,/.}  # (a locale may write a decimal comma)
  timeout -k 10 "$limit" "$@" 2>&1 | while IFS= read -r line; do printf '%s %s\n' "${EPOCHREALTIME/,/.}" "$line"; done \
    | tee "$WORK/$name.log" | cut -d' ' -f2- >&2
  local rc=${PIPESTATUS[0]}
  printf '{"rc": %d, "start": %s, "end": %s, "limit_s": %d}\n' "$rc" "$t0" "${EPOCHREALTIME/,/.}" "$limit" \
    > "$WORK/$name.status"
}

# the dry run stops at the stages the summary reports (summary, report and track add only process start-ups)
if [ $DRY = 1 ]; then TARGETS=(evaluate@mask reference dispersion); else TARGETS=(); fi
part repro "$LIMIT_REPRO" dvc repro "${TARGETS[@]}"
part train_step "$LIMIT_STEP" python benchmarks/train_step.py "${STEP_ARGS[@]}"
part sampling "$LIMIT_SAMPLING" python benchmarks/sampling.py "${SAMPLING_ARGS[@]}"

python benchmarks/gpu_check.py summary "$WORK" "${STEP_ARGS[-1]}" "${SAMPLING_ARGS[-1]}" "$SUMMARY" $DRY
