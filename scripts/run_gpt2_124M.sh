#!/usr/bin/env bash
# GPT-2 (124M) on FineWeb 10B, llm.c's recipe (its scripts/run_gpt2_124M.sh).
# 124M parameters on 10B tokens: 18,865 steps of 524,288 tokens, lr 6e-4 with 700 warmup
# steps, cosine to 0, weight decay 0.1. llm.c: about 90 minutes on 8 A100s, HellaSwag 29.9;
# OpenAI's GPT-2 124M: val loss 3.4250 on FineWeb val, HellaSwag 29.45.
#
#   scripts/run_gpt2_124M.sh               all GPUs of this machine (torchrun); resumes itself
#   NGPU=1 scripts/run_gpt2_124M.sh        one GPU: same result, 8x the gradient accumulation
#   EXTRA_ARGS="-b 32" scripts/...         less memory, same -d
#   DRY_RUN=1 scripts/run_gpt2_124M.sh     print the commands and check the flags only
#   llmpy plot log_gpt2_124M -o 124M.png   the loss curves (baseline picked from the name)
# More knobs: scripts/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

OUT_DIR="${OUT_DIR:-log_gpt2_124M}"
DATA="$DATA_ROOT/fineweb10B"
HELLASWAG="$DATA_ROOT/hellaswag/hellaswag_val.bin"
ensure_shards fineweb "$DATA" fineweb --version 10B
ensure_eval_file hellaswag "$HELLASWAG"

train_until_done \
    -i "$DATA/fineweb_train_*.bin" -j "$DATA/fineweb_val_*.bin" -o "$OUT_DIR" \
    -e d12 -b 64 -t 1024 -d 524288 -x 18865 \
    -l 0.0006 -u 700 -q 0.0 -c 0.1 -r 0 -z 1 \
    -v 250 -m 20 -s 20000 -g 144 -h 1 --hellaswag-file "$HELLASWAG" \
    -n 5000 -y 1
