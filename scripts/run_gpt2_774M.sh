#!/usr/bin/env bash
# GPT-2 (774M) on FineWeb 100B, llm.c's recipe (its scripts/run_gpt2_774M.sh).
# 774M parameters on ~150B tokens: 286,102 steps of 524,288 tokens, lr 2.5e-4 with 700
# warmup steps, cosine to 0, weight decay 0.1 (10x the 350M run's compute). llm.c: ~5.6 days
# on 8 A100s. OpenAI's GPT-2 774M: HellaSwag 43.20.
#
#   scripts/run_gpt2_774M.sh               all GPUs of this machine (torchrun); resumes itself
#   DRY_RUN=1 scripts/run_gpt2_774M.sh     print the commands and check the flags only
# More knobs: scripts/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

OUT_DIR="${OUT_DIR:-log_gpt2_774M}"
DATA="$DATA_ROOT/fineweb100B"
HELLASWAG="$DATA_ROOT/hellaswag/hellaswag_val.bin"
ensure_shards fineweb "$DATA" fineweb --version 100B
ensure_eval_file hellaswag "$HELLASWAG"

train_until_done \
    -i "$DATA/fineweb_train_*.bin" -j "$DATA/fineweb_val_*.bin" -o "$OUT_DIR" \
    -e d36 -b 32 -t 1024 -d 524288 -x 286102 \
    -l 0.00025 -u 700 -q 0.0 -c 0.1 -r 0 -z 1 \
    -v 250 -m 20 -s 300000 -g 144 -h 1 --hellaswag-file "$HELLASWAG" \
    -n 4000 -y 1
