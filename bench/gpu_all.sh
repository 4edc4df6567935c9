#!/usr/bin/env bash
# Every check this project runs on a GPU machine, in one command (about 10 minutes on one H100):
#   1. bench/gpu_check.py: a ~1B DUS variant, 50 compiled bf16 CPT steps, MFU vs a measured bf16 ceiling
#   2. the CUDA tests (tests/test_gpu.py: surgery, generation, MoE, CPT and perplexity on the GPU)
#   3. bench/gpu_check.py again without torch.compile (eager)
#   4. the smoke study on the GPU (python -m ablate.study --device cuda)
#   5. FSDP: tests/_fsdp_worker.py (fsdp training, gathered checkpoint) and the smoke study as one worker of
#      G processes with train.distributed=fsdp (torchrun; G = 2 with 2+ GPUs, else 1)
#   6. the default study on the GPU
# Logs and the studies' results.csv go to $OUT (default gpu_logs/), the study folders to $RUNS.
# Each step has its own time limit (cut to what is left of BUDGET_S, default 540 s) and a failing
# step does not stop the later ones; the exit code is the number of steps that failed or had no
# time left. STEPS picks some of them by name (default all).
#
#   bash bench/gpu_all.sh
#   STEPS="gpu_tests smoke_study" bash bench/gpu_all.sh
set -u
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# the package from this checkout, installed or not (a GPU image may hold torch but not ablate)
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
export ABLATE_HOME=${ABLATE_HOME:-$(mktemp -d)}
RUNS=${RUNS:-$(mktemp -d)}
failed=0
deadline=$((SECONDS + ${BUDGET_S:-540}))  # the whole script ends by then (default 9 minutes)

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, report the time
    local name=$1 limit=$2
    shift 2
    case " ${STEPS:-all} " in *" all "* | *" $name "*) ;; *) return ;; esac
    local left=$((deadline - SECONDS - 5))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 0 ]; then echo "=== $name: skipped, no time left"; failed=$((failed + 1)); return; fi
    local t0=$SECONDS
    echo "=== $name: $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 4 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step gpu_check 240 "$PY" bench/gpu_check.py
step gpu_tests 180 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
step gpu_check_eager 240 "$PY" bench/gpu_check.py --no-compile
step smoke_study 180 "$PY" -m ablate.study --config studies/smoke.yaml --trials 3 --device cuda \
    --out "$RUNS" --quiet
NGPU=$(nvidia-smi --list-gpus | wc -l)
G=$([ "$NGPU" -ge 2 ] && echo 2 || echo 1)
step fsdp_train 120 "$PY" -m torch.distributed.run --nproc_per_node "$G" tests/_fsdp_worker.py "$RUNS/fsdp-train" fsdp
step fsdp_study 180 "$PY" -m torch.distributed.run --nproc_per_node "$G" -m ablate.study --config studies/smoke.yaml \
    --trials 3 --device cuda --out "$RUNS" --study smoke-fsdp --quiet --set train.distributed=fsdp \
    --set train.tokens_per_step=1024
step default_study 600 "$PY" -m ablate.study --trials 20 --device cuda \
    --out "$RUNS" --quiet
for csv in "$RUNS"/*/results.csv; do [ -f "$csv" ] && cp "$csv" "$OUT/$(basename "$(dirname "$csv")").csv"; done
exit "$failed"
