#!/usr/bin/env bash
# GPT-2 (1558M) on FineWeb-Edu 100B, llm.c's recipe (its scripts/run_gpt2_1558M.sh).
# 1.6B parameters on ~33.5B tokens: 32,000 steps of 1,048,576 tokens, lr 6e-4 with 700
# warmup steps, cosine to 10% (-q 0.1), weight decay 0.1 (llm.c's recipe also fuses GELU into
# the matmul with -ge 1; llm.py's default -ge -1 fuses it, forward and backward, on the triton
# engine with CUDA). llm.c: 24 hours on 8 H100s. OpenAI's GPT-2 1558M: val loss 2.8313 on
# FineWeb val, HellaSwag 48.89.
#
#   scripts/run_gpt2_1558M.sh              all GPUs of this machine (torchrun); resumes itself
#   DRY_RUN=1 scripts/run_gpt2_1558M.sh    print the commands and check the flags only
# More knobs: scripts/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

OUT_DIR="${OUT_DIR:-log_gpt2_1558M}"
DATA="$DATA_ROOT/edu_fineweb100B"
HELLASWAG="$DATA_ROOT/hellaswag/hellaswag_val.bin"
ensure_shards edu_fineweb "$DATA" edu_fineweb --version 100B
ensure_eval_file hellaswag "$HELLASWAG"

train_until_done \
    -i "$DATA/edu_fineweb_train_*.bin" -j "$DATA/edu_fineweb_val_*.bin" -o "$OUT_DIR" \
    -e d48 -b 16 -t 1024 -d 1048576 -x 32000 \
    -k cosine -l 0.0006 -u 700 -q 0.1 -c 0.1 -r 0 -z 1 \
    -v 250 -m 20 -s 300000 -g 384 -h 1 --hellaswag-file "$HELLASWAG" \
    -n 2000 -y 1
