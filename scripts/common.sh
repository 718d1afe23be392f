# Shared by the scripts in scripts/: sourced, not run.
#
# What every run script does: build its data if missing (llmpy data ...), check its flags
# (scripts/check_flags.py: llmpy.train.parse_args + validate, without training), then run
# `llmpy train` again and again with -y 1 until the DONE marker of its last step exists
# (llm.c's loop, but bounded), on one GPU with python or on several with torchrun.
#
# Knobs (environment variables, all optional):
#   NGPU         processes on this machine (default: the visible GPUs, 1 without any)
#   OUT_DIR      output dir: main.log, checkpoints (default: the script's log_* name)
#   DATA_ROOT    where datasets live (default: $LLMPY_CACHE, else ~/.cache/llmpy)
#   EXTRA_ARGS   flags appended to the recipe; the last one wins, e.g. "-b 32 -r 1" to save
#                memory (same total batch -d, more gradient accumulation) or "--engine torch"
#   MAX_RETRIES  runs before the resume loop gives up (default 20)
#   RETRY_SLEEP  seconds between a crash and the resume (default 10)
#   DRY_RUN=1    print the data and train commands and check the flags; build, download and
#                train nothing
#   PYTHON       the python to use (default: python3)
#   CPU_OK=1     no warning when training without a GPU (sweep_lr.sh's default size)

SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPTS_DIR")"
PYTHON="${PYTHON:-python3}"
DATA_ROOT="${DATA_ROOT:-${LLMPY_CACHE:-$HOME/.cache/llmpy}}"
MAX_RETRIES="${MAX_RETRIES:-20}"
RETRY_SLEEP="${RETRY_SLEEP:-10}"
DRY_RUN="${DRY_RUN:-0}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
# run from a checkout without installing the package
if [ -d "$REPO_ROOT/llmpy" ]; then
    export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

log() { echo "[$(basename "$0") $(date '+%Y-%m-%d %H:%M:%S')] $*"; }
die() { echo "$(basename "$0"): error: $*" >&2; exit "${2:-1}"; }

# Visible GPUs: CUDA_VISIBLE_DEVICES if set, else nvidia-smi, else 0.
count_gpus() {
    if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
        [ -z "$CUDA_VISIBLE_DEVICES" ] && { echo 0; return; }
        echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}
NGPU="${NGPU:-$(count_gpus)}"
NPROC=$(( NGPU > 0 ? NGPU : 1 ))

# The launcher for $NPROC processes on this machine.
train_launcher() {
    if [ "$NPROC" -gt 1 ]; then
        echo torchrun --standalone --nproc_per_node="$NPROC" -m llmpy train
    else
        echo "$PYTHON" -m llmpy train
    fi
}

# ensure_shards NAME DIR PREFIX [BUILD_ARGS...]: build DIR/PREFIX_{train,val}_*.bin with
# `llmpy data NAME --out DIR BUILD_ARGS...` unless they are there already.
ensure_shards() {
    local name="$1" dir="$2" prefix="$3"; shift 3
    if compgen -G "$dir/${prefix}_train_*.bin" >/dev/null &&
       compgen -G "$dir/${prefix}_val_*.bin" >/dev/null; then
        log "data: $dir/${prefix}_{train,val}_*.bin found"
        return 0
    fi
    local cmd=("$PYTHON" -m llmpy data "$name" --out "$dir" "$@")
    if [ "$DRY_RUN" = 1 ]; then
        log "data (dry run: not built): $(printf '%q ' "${cmd[@]}")"
        return 0
    fi
    "$PYTHON" -m llmpy data "$name" --help >/dev/null 2>&1 ||
        die "\`llmpy data $name\` is not available in this llmpy; put the shards in $dir\
 (${prefix}_train_*.bin, ${prefix}_val_*.bin, llm.c's format) and rerun"
    log "data: $(printf '%q ' "${cmd[@]}")"
    "${cmd[@]}" || die "building $name into $dir failed"
}

# ensure_eval_file NAME FILE: build FILE with `llmpy data NAME --out DIR` if missing.
ensure_eval_file() {
    local name="$1" file="$2"
    [ -f "$file" ] && { log "data: $file found"; return 0; }
    local cmd=("$PYTHON" -m llmpy data "$name" --out "$(dirname "$file")")
    if [ "$DRY_RUN" = 1 ]; then
        log "data (dry run: not built): $(printf '%q ' "${cmd[@]}")"
        return 0
    fi
    "${cmd[@]}" || die "building $name into $(dirname "$file") failed"
    [ -f "$file" ] || die "\`${cmd[*]}\` did not write $file"
}

# check_flags NPROC FLAGS...: validate, print the plan, set DONE_FILE (the last step's DONE
# marker in the -o dir). Exits 2 on bad flags.
check_flags() {
    local nproc="$1"; shift
    local out
    out=$("$PYTHON" "$SCRIPTS_DIR/check_flags.py" --nproc "$nproc" --need-resume -- "$@") ||
        die "the flags above do not validate; nothing was run" 2
    echo "$out"
    DONE_FILE="$(tail -n 1 <<<"$out")"
    DONE_FILE="${DONE_FILE#*DONE marker: }"
}

# run_until_done DONE_FILE CMD...: run CMD (which resumes with -y 1) until DONE_FILE exists.
# Exit 2 (bad flags or input) and 130 (Ctrl-C) stop at once; any other failure (a crash, a
# lost node, a killed process) is retried from the newest complete checkpoint.
run_until_done() {
    local done_file="$1"; shift
    local attempt=0 rc
    while [ ! -f "$done_file" ]; do
        if [ "$attempt" -ge "$MAX_RETRIES" ]; then
            die "gave up after $MAX_RETRIES runs without $done_file (MAX_RETRIES)"
        fi
        attempt=$((attempt + 1))
        log "run $attempt/$MAX_RETRIES: $(printf '%q ' "$@")"
        "$@" && rc=0 || rc=$?
        [ -f "$done_file" ] && break
        case "$rc" in
            0) die "training exited cleanly but $done_file is missing (does -x match?)" ;;
            2) die "training rejected its flags or input (exit 2): not retrying" 2 ;;
            130) die "interrupted" 130 ;;
        esac
        log "training exited with $rc; resuming from the newest checkpoint in ${RETRY_SLEEP}s"
        sleep "$RETRY_SLEEP"
    done
    log "done: $done_file exists"
}

# launch_until_done CMD...: print CMD (DRY_RUN=1) or run it in the resume loop until
# $DONE_FILE (set by check_flags) exists.
launch_until_done() {
    if [ "$DRY_RUN" = 1 ]; then
        log "train (dry run: not run; the run ends when $DONE_FILE exists):"
        printf '%q ' "$@"
        echo
        return 0
    fi
    run_until_done "$DONE_FILE" "$@"
}

# with_extra_args FLAGS...: sets FLAGS to the recipe's flags followed by EXTRA_ARGS.
with_extra_args() {
    FLAGS=("$@")
    # shellcheck disable=SC2206  # EXTRA_ARGS is a list of flags, split on spaces on purpose
    [ -n "$EXTRA_ARGS" ] && FLAGS+=($EXTRA_ARGS)
    return 0
}

# train_until_done FLAGS...: the whole job on this machine ($NPROC processes): check the
# flags (with EXTRA_ARGS), then run them with python or torchrun in the resume loop (or
# print the command, DRY_RUN=1).
train_until_done() {
    with_extra_args "$@"
    check_flags "$NPROC" "${FLAGS[@]}"
    if [ "$NGPU" -eq 0 ] && [ "${CPU_OK:-0}" != 1 ]; then
        log "warning: no GPU found; this recipe on a CPU would take a very long time"
    fi
    local launcher
    read -r -a launcher <<<"$(train_launcher)"
    launch_until_done "${launcher[@]}" "${FLAGS[@]}"
}
