#!/usr/bin/env bash
# GPT-2 (124M) on 2 nodes with torchrun's rendezvous: the run_gpt2_124M.sh recipe with -b 32,
# so 2 nodes x 8 GPUs x 32 x 1024 = 524,288 tokens per step, no gradient accumulation.
#
# Start the same command on every node (torchrun's c10d rendezvous pairs them up and
# assigns the ranks; MASTER_ADDR is any one of the nodes, reachable from all):
#
#   MASTER_ADDR=node0 scripts/multi_node/torchrun_2nodes.sh          # on node0 and on node1
#   DRY_RUN=1 scripts/multi_node/torchrun_2nodes.sh                  # check the flags only
#
# Knobs: NNODES (2), NGPU (GPUs per node; default the visible ones), MASTER_ADDR,
# MASTER_PORT (29500), RDZV_ID (a job name shared by the nodes), OUT_DIR, DATA_ROOT,
# EXTRA_ARGS, ... (scripts/common.sh). OUT_DIR and DATA_ROOT must be on a filesystem every
# node sees: rank 0 writes main.log and the model files, every rank its state file, and
# each node's resume loop waits for the same DONE marker. If one node fails, torchrun
# stops the others; each node's loop then restarts it and they meet again at the
# rendezvous, resuming from the newest complete checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

NNODES="${NNODES:-2}"
[ "$NGPU" -gt 0 ] || NPROC="${NPROC_DRY:-8}"    # no GPU here: check the flags for 8 per node
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-llmpy_gpt2_124M}"
if [ -z "${MASTER_ADDR:-}" ]; then
    [ "$DRY_RUN" = 1 ] || die "set MASTER_ADDR to the address of one of the nodes"
    MASTER_ADDR=node0
fi
OUT_DIR="${OUT_DIR:-log_gpt2_124M_2nodes}"
DATA="$DATA_ROOT/fineweb10B"
HELLASWAG="$DATA_ROOT/hellaswag/hellaswag_val.bin"
ensure_shards fineweb "$DATA" fineweb --version 10B      # every node: a shared dir is a no-op
ensure_eval_file hellaswag "$HELLASWAG"

with_extra_args \
    -i "$DATA/fineweb_train_*.bin" -j "$DATA/fineweb_val_*.bin" -o "$OUT_DIR" \
    -e d12 -b 32 -t 1024 -d 524288 -x 18865 \
    -l 0.0006 -u 700 -q 0.0 -c 0.1 -r 0 -z 1 \
    -v 250 -m 20 -s 20000 -g 144 -h 1 --hellaswag-file "$HELLASWAG" \
    -n 5000 -y 1
check_flags "$((NNODES * NPROC))" "${FLAGS[@]}"
launch_until_done torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID" \
    -m llmpy train "${FLAGS[@]}"
