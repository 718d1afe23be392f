#!/usr/bin/env bash
# GPT-2 (124M) on 2 nodes with mpirun: the run_gpt2_124M.sh recipe with -b 32, so
# 2 nodes x 8 GPUs x 32 x 1024 = 524,288 tokens per step, no gradient accumulation.
#
# Run it once, on HOST1 (mpirun starts every process on both hosts over ssh). Each process
# takes its rank and world size from MPI's environment (-pi mpi; mpi4py is not needed) and
# the processes meet over TCP at MASTER_ADDR:MASTER_PORT, which mpirun exports to all.
#
#   HOST1=node0 HOST2=node1 scripts/multi_node/mpirun.sh
#   DRY_RUN=1 scripts/multi_node/mpirun.sh                           # check the flags only
#
# Knobs: HOST1, HOST2, NGPU (GPUs per node, default 8), MASTER_PORT (29500), OUT_DIR,
# DATA_ROOT, EXTRA_ARGS, ... (scripts/common.sh). The repo, its python environment,
# DATA_ROOT and OUT_DIR must be at the same paths on both hosts (a shared filesystem is
# simplest). Open MPI syntax; for MPICH use -hosts and -genv instead of --host and -x.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

HOST1="${HOST1:-node0}"
HOST2="${HOST2:-node1}"
PER_NODE="${NGPU_PER_NODE:-$([ "$NGPU" -gt 0 ] && echo "$NGPU" || echo 8)}"
WORLD=$((2 * PER_NODE))
MASTER_PORT="${MASTER_PORT:-29500}"
OUT_DIR="${OUT_DIR:-log_gpt2_124M_mpi}"
DATA="$DATA_ROOT/fineweb10B"
HELLASWAG="$DATA_ROOT/hellaswag/hellaswag_val.bin"
ensure_shards fineweb "$DATA" fineweb --version 10B
ensure_eval_file hellaswag "$HELLASWAG"

with_extra_args \
    -i "$DATA/fineweb_train_*.bin" -j "$DATA/fineweb_val_*.bin" -o "$OUT_DIR" \
    -e d12 -b 32 -t 1024 -d 524288 -x 18865 \
    -l 0.0006 -u 700 -q 0.0 -c 0.1 -r 0 -z 1 \
    -v 250 -m 20 -s 20000 -g 144 -h 1 --hellaswag-file "$HELLASWAG" \
    -n 5000 -y 1 -pi mpi
check_flags "$WORLD" "${FLAGS[@]}"
EXPORTS=(-x MASTER_ADDR="$HOST1" -x MASTER_PORT="$MASTER_PORT" -x PATH)
for var in PYTHONPATH LLMPY_CACHE NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_DISABLE; do
    if [ -n "${!var:-}" ]; then EXPORTS+=(-x "$var"); fi    # only what is set here
done
launch_until_done mpirun -np "$WORLD" --host "$HOST1:$PER_NODE,$HOST2:$PER_NODE" \
    "${EXPORTS[@]}" "$PYTHON" -m llmpy train "${FLAGS[@]}"
