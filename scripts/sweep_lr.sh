#!/usr/bin/env bash
# A learning-rate sweep: one short run per LR on the same data, then one plot of all of them.
#
# The default runs on a CPU: a 4-layer GPT on tinyshakespeare, 300 steps of 1,024 tokens
# per LR (1-2 s a step on 2 cores, most of it the 50,257-way classifier; lower STEPS for a
# quicker look). On a GPU pick a real model and dataset through the knobs:
#
#   scripts/sweep_lr.sh                                   LRS="3e-4 1e-3 3e-3 1e-2", CPU size
#   LRS="3e-4 6e-4 1.2e-3" MODEL=d12 STEPS=2000 TRAIN="$HOME/.cache/llmpy/fineweb10B/fineweb_train_*.bin" \
#       VAL="$HOME/.cache/llmpy/fineweb10B/fineweb_val_*.bin" B=64 T=1024 D=524288 scripts/sweep_lr.sh
#   DRY_RUN=1 scripts/sweep_lr.sh                         print and check every run's flags
#
# Each run writes $SWEEP_DIR/lr_<LR>/ and resumes like the other scripts (rerunning the
# sweep skips finished runs); the plot is $SWEEP_DIR/sweep.png. More knobs: scripts/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LRS="${LRS:-3e-4 1e-3 3e-3 1e-2}"
SWEEP_DIR="${SWEEP_DIR:-sweep_lr}"
MODEL="${MODEL:-L=4,C=128,NH=4,T=128}"
STEPS="${STEPS:-300}"
[ "$MODEL" = "L=4,C=128,NH=4,T=128" ] && CPU_OK=1
B="${B:-16}"
T="${T:-64}"
D="${D:-$((B * T * NPROC))}"
WARMUP="${WARMUP:-$((STEPS / 20))}"
if [ -z "${TRAIN:-}" ]; then    # default data: the embedded tinyshakespeare
    TS="$DATA_ROOT/tinyshakespeare"
    if [ ! -f "$TS/tiny_shakespeare_train.bin" ]; then
        if [ "$DRY_RUN" = 1 ]; then
            log "data (dry run: not built): $PYTHON -m llmpy data tinyshakespeare --out $TS"
        else
            "$PYTHON" -m llmpy data tinyshakespeare --out "$TS"
        fi
    fi
    TRAIN="$TS/tiny_shakespeare_train.bin"
    VAL="$TS/tiny_shakespeare_val.bin"
fi

for lr in $LRS; do
    OUT_DIR="$SWEEP_DIR/lr_$lr"
    log "sweep: lr $lr -> $OUT_DIR"
    train_until_done \
        -i "$TRAIN" -j "${VAL:?set VAL with TRAIN}" -o "$OUT_DIR" \
        -e "$MODEL" -b "$B" -t "$T" -d "$D" -x "$STEPS" \
        -l "$lr" -u "$WARMUP" -q 0.1 -c 0.1 \
        -v "$(( STEPS / 10 > 0 ? STEPS / 10 : 1 ))" -m 20 -s 0 -n 0 -y 1
done

plot=("$PYTHON" -m llmpy plot "$SWEEP_DIR"/lr_* -o "$SWEEP_DIR/sweep.png" --smooth 10)
if [ "$DRY_RUN" = 1 ]; then
    log "plot (dry run): $PYTHON -m llmpy plot $SWEEP_DIR/lr_* -o $SWEEP_DIR/sweep.png --smooth 10"
else
    "${plot[@]}"
fi
