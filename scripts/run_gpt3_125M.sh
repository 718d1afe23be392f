#!/usr/bin/env bash
# GPT-3 (125M) on FineWeb 100B, llm.c's recipe (its scripts/run_gpt3_125M.sh).
# GPT-3 Small: 12 layers, C=768, context 2048 (GPT-2's is 1024), 125M parameters on 300B
# tokens: 572,204 steps of 524,288 tokens, lr 6e-4 with 700 warmup steps, cosine to 10%,
# weight decay 0.1; updates with an outlier loss or grad norm (z-score > 7) are skipped;
# checkpoints every 10,000 steps, the last 5 kept plus every 50,000th. llm.c: ~24 hours on
# 8 A100s.
#
#   scripts/run_gpt3_125M.sh               all GPUs of this machine (torchrun); resumes itself
#   DRY_RUN=1 scripts/run_gpt3_125M.sh     print the commands and check the flags only
# More knobs: scripts/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

OUT_DIR="${OUT_DIR:-log_gpt3_125M}"
DATA="$DATA_ROOT/fineweb100B"
HELLASWAG="$DATA_ROOT/hellaswag/hellaswag_val.bin"
ensure_shards fineweb "$DATA" fineweb --version 100B
ensure_eval_file hellaswag "$HELLASWAG"

train_until_done \
    -i "$DATA/fineweb_train_*.bin" -j "$DATA/fineweb_val_*.bin" -o "$OUT_DIR" \
    -e gpt3:c768 -b 32 -t 2048 -d 524288 -x 572204 \
    -l 0.0006 -u 700 -q 0.1 -c 0.1 -r 0 -z 1 -sl 7.0 -sg 7.0 \
    -v 250 -m 20 -s 20000 -g 144 -h 1 --hellaswag-file "$HELLASWAG" \
    -n 10000 -nk 5 -nm 50000 -y 1
