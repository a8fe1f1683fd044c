# shellcheck shell=bash source-path=SCRIPTDIR
# Body of every senseflow batch job: environment, logs, one srun, preemption and requeue.
#
# Sourced (not executed) by the batch scripts that `senseflow slurm` writes, so
# that the USR1 trap below lives in the batch shell itself: `#SBATCH
# --signal=B:USR1@N` signals that shell and nothing else. The contract with the
# trainer is in slurm/README.md; in short:
#   USR1 reaches the batch shell (time limit near, or `scancel --batch -s USR1`)
#     -> forwarded to every training process -> they save at the next step
#     boundary, write STOPPED and exit 0 -> `scontrol requeue` -> the job runs
#     again with the same command and output directory and resumes. Ranks still
#     alive SENSEFLOW_TEARDOWN_GRACE s after STOPPED (hung in NCCL teardown) do
#     not hold the requeue back.
#   Training reached train.max_steps -> the trainer wrote OUTPUT_DIR/DONE -> the
#     job ends with the trainer's exit status.
#   A failure (a lost node, a crashed rank) -> the failing rank writes FAILED; a
#     step that a lost node's unreachable tasks keep alive is ended here past the
#     grace -> requeue when the run published a
#     newer checkpoint since this (re)start; without one, at most
#     SENSEFLOW_RETRIES_WITHOUT_PROGRESS times in a row (a run that crashes at
#     start must not requeue for ever). Exit codes that name a cause a rerun
#     cannot fix (2-5, 130: megatron_senseflow/errors.py) never requeue.
#
# Inputs, set by the batch script before sourcing:
#   SENSEFLOW_OUTPUT_DIR                absolute output directory (train.output_dir)
#   SENSEFLOW_CMD                       bash array: the command srun starts once per task
#   SENSEFLOW_SRUN_ARGS                 bash array (optional): extra srun options (containers, binding)
#   SENSEFLOW_MAX_RESTARTS              refuse to requeue after this many restarts
#   SENSEFLOW_RETRIES_WITHOUT_PROGRESS  failures in a row without a new checkpoint that still requeue
#   SENSEFLOW_SIGNAL_LEAD               seconds between USR1 and the time limit (the trainer warns when saves
#                                       would not fit in it)
#   SENSEFLOW_TEARDOWN_GRACE            seconds ranks get to exit after the first one ended (srun --wait) or
#                                       after the stop-save
#   SENSEFLOW_KILL_SLACK                seconds beyond the grace that srun gets to kill the step itself after a
#                                       rank failed (OUTPUT_DIR/FAILED) before this script ends it (default 30)
#   SENSEFLOW_SCRIPT                    where the batch script was written (for messages)
#
# Exit codes of this script's own decisions (the trainer's, 0-5 and 130, pass through):
#   64 the batch script is malformed       65 --max-restarts reached
#   66 `scontrol requeue` failed           67 failed too often in a row without a new checkpoint
#
# Layout it writes:
#   OUTPUT_DIR/logs/slurm-<job>.out                 this shell's messages, every restart appended
#   OUTPUT_DIR/logs/job<job>-restart<n>.log         the training processes' output of one run
#                                                   (srun --label: each line starts with the rank)
#   OUTPUT_DIR/logs/failures-without-progress       the count behind SENSEFLOW_RETRIES_WITHOUT_PROGRESS

# No `set -e`: every exit status below is read and acted upon, and a failing
# helper (sacct without a database exits 1) must not kill the job silently.
set -uo pipefail

_SF_EXIT_SETUP=64
_SF_EXIT_MAX_RESTARTS=65
_SF_EXIT_REQUEUE_FAILED=66
_SF_EXIT_NO_PROGRESS=67

: "${SENSEFLOW_OUTPUT_DIR:?the batch script must set SENSEFLOW_OUTPUT_DIR}"
: "${SENSEFLOW_MAX_RESTARTS:=100}"
: "${SENSEFLOW_RETRIES_WITHOUT_PROGRESS:=1}"
: "${SENSEFLOW_TEARDOWN_GRACE:=60}"
: "${SENSEFLOW_KILL_SLACK:=30}"
: "${SENSEFLOW_SCRIPT:=the batch script}"
if [ "$(declare -p SENSEFLOW_CMD 2>/dev/null | cut -c1-10)" != "declare -a" ]; then
    echo "senseflow job: the batch script must set SENSEFLOW_CMD as a bash array" >&2
    exit $_SF_EXIT_SETUP
fi
if [ "$(declare -p SENSEFLOW_SRUN_ARGS 2>/dev/null | cut -c1-10)" != "declare -a" ]; then
    SENSEFLOW_SRUN_ARGS=()
fi

_sf_say() { echo "[senseflow $(date '+%F %T')] $*"; }

# sbatch exports the submitting environment. What a login profile or an interactive
# allocation leaves there must not reach the ranks: another launcher's rank and
# rendezvous variables (a MASTER_ADDR=localhost hangs a multi-node job), and the
# memory request of another allocation (srun refuses SLURM_MEM_PER_CPU next to
# SLURM_MEM_PER_NODE; without either, a step gets the job's own memory).
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK MASTER_ADDR MASTER_PORT \
    TORCHELASTIC_RUN_ID SENSEFLOW_LAUNCHER SENSEFLOW_MASTER_ADDR \
    SLURM_MEM_PER_CPU SLURM_MEM_PER_NODE SLURM_MEM_PER_GPU

# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

_sf_restart=${SLURM_RESTART_COUNT:-0}
_sf_log_dir=$SENSEFLOW_OUTPUT_DIR/logs
_sf_log=$_sf_log_dir/job${SLURM_JOB_ID}-restart${_sf_restart}.log
_sf_done=$SENSEFLOW_OUTPUT_DIR/DONE
_sf_stopped=$SENSEFLOW_OUTPUT_DIR/STOPPED
_sf_failed=$SENSEFLOW_OUTPUT_DIR/FAILED
_sf_latest_file=$SENSEFLOW_OUTPUT_DIR/checkpoints/latest
_sf_failures_file=$_sf_log_dir/failures-without-progress
mkdir -p "$_sf_log_dir" || exit 1

# srun does not inherit --cpus-per-task from the allocation since Slurm 22.05;
# without this every rank would be bound to one CPU and its loader workers starve.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi
export SENSEFLOW_SIGNAL_LEAD=${SENSEFLOW_SIGNAL_LEAD:-}

# The rendezvous address: rank 0 runs on the first node. Slurm knows that node's
# address (NodeAddr); its name need not resolve (cloud clusters name nodes freely).
_sf_first_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n 1)
if [ -n "$_sf_first_node" ]; then
    _sf_addr=$(scontrol show node -o "$_sf_first_node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    _sf_addr=${_sf_addr:-$_sf_first_node}
    # a NodeAddr may itself be a name: resolve it here, once, for every rank
    _sf_ip=$(getent ahostsv4 "$_sf_addr" 2>/dev/null | awk 'NR == 1 { print $1 }')
    export SENSEFLOW_MASTER_ADDR=${_sf_ip:-$_sf_addr}
fi

_sf_latest() { cat "$_sf_latest_file" 2>/dev/null || echo none; }
_sf_start_ckpt=$(_sf_latest)

_sf_say "job ${SLURM_JOB_ID} restart ${_sf_restart}: ${SLURM_NTASKS:-?} processes on ${SLURM_JOB_NUM_NODES:-?} node(s) (${SLURM_JOB_NODELIST:-?}); rendezvous ${SENSEFLOW_MASTER_ADDR:-?}; latest checkpoint: $_sf_start_ckpt"
_sf_say "command: ${SENSEFLOW_CMD[*]}"
_sf_say "training log: $_sf_log"

# A DONE, STOPPED or FAILED left by an earlier run (say, before max_steps was raised) must not
# make this run look finished or stopped; the trainer writes them again.
rm -f "$_sf_done" "$_sf_stopped" "$_sf_failed"

_sf_stop_requested=0
_sf_srun_pid=
# shellcheck disable=SC2317  # reached through the trap
_sf_on_usr1() {
    _sf_stop_requested=1
    _sf_say "USR1: stop requested (time limit near or preemption); asking the training processes to save and exit"
    if [ -z "$_sf_srun_pid" ]; then
        return 0  # training not started yet; the check before srun requeues directly
    fi
    # Without --batch/--full, scancel signals every job step but not this shell
    # (checked on Slurm 22.05). It reaches every process of the step, including
    # data-loader workers: the trainer must make them ignore USR1.
    if ! scancel --signal=USR1 "$SLURM_JOB_ID"; then
        _sf_say "scancel failed; signalling srun, which forwards USR1 to its tasks"
        kill -USR1 "$_sf_srun_pid" 2>/dev/null
    fi
}
trap _sf_on_usr1 USR1

_sf_rc=0
_sf_abandoned=0
if [ "$_sf_stop_requested" = 0 ]; then
    # --kill-on-bad-exit: one rank dying ends the step instead of leaving the
    # others blocked in a collective until the NCCL timeout. --wait: ranks still
    # running this long after the first one exited are killed (a rank hung in
    # NCCL teardown must not hold the job until its time limit).
    srun --kill-on-bad-exit=1 --wait="$SENSEFLOW_TEARDOWN_GRACE" --label "${SENSEFLOW_SRUN_ARGS[@]}" \
        "${SENSEFLOW_CMD[@]}" >>"$_sf_log" 2>&1 &
    _sf_srun_pid=$!
    # Poll rather than block in `wait`: after a stop request the trainer writes STOPPED
    # once its checkpoint is published, and from then on nothing is lost by requeueing.
    # A rank that fails writes FAILED; srun itself then waits for the tasks of a lost
    # node until Slurm declares it down (SlurmdTimeout, 300 s by default), which
    # --wait does not bound: past the grace (plus srun's own kill time) the step is ended here.
    _sf_stopped_at=
    _sf_failed_at=
    while kill -0 "$_sf_srun_pid" 2>/dev/null; do
        if [ "$_sf_stop_requested" = 1 ] && [ -e "$_sf_stopped" ]; then
            _sf_stopped_at=${_sf_stopped_at:-$SECONDS}
            if [ $((SECONDS - _sf_stopped_at)) -ge "$SENSEFLOW_TEARDOWN_GRACE" ]; then
                _sf_say "the stop-save is complete ($(_sf_latest)) but training processes still run ${SENSEFLOW_TEARDOWN_GRACE} s later; requeueing without waiting for them"
                _sf_abandoned=1
                break
            fi
        fi
        if [ -e "$_sf_failed" ]; then
            _sf_failed_at=${_sf_failed_at:-$SECONDS}
            if [ $((SECONDS - _sf_failed_at)) -ge $((SENSEFLOW_TEARDOWN_GRACE + SENSEFLOW_KILL_SLACK)) ]; then
                _sf_rc=$(grep -o '"exit_code": *[0-9]*' "$_sf_failed" | grep -o '[0-9]*$')
                _sf_rc=${_sf_rc:-1}
                _sf_say "a rank failed ($(cat "$_sf_failed")) and the step still runs $((SENSEFLOW_TEARDOWN_GRACE + SENSEFLOW_KILL_SLACK)) s later (a lost node's tasks cannot be reached); ending it"
                kill -KILL "$_sf_srun_pid" 2>/dev/null
                wait "$_sf_srun_pid" 2>/dev/null
                _sf_abandoned=1
                break
            fi
        fi
        sleep 1 &
        wait $! 2>/dev/null  # the USR1 trap runs as soon as the signal arrives
    done
    if [ "$_sf_abandoned" = 0 ]; then
        wait "$_sf_srun_pid"
        _sf_rc=$?
        _sf_say "training processes exited with status $_sf_rc"
    fi
fi

if [ -e "$_sf_done" ]; then
    _sf_say "finished: $_sf_done exists"
    rm -f "$_sf_failures_file"
    exit "$_sf_rc"
fi

_sf_requeue() {  # $1: why
    if [ "$_sf_restart" -ge "$SENSEFLOW_MAX_RESTARTS" ]; then
        _sf_say "not requeueing: the job already restarted $_sf_restart times (limit $SENSEFLOW_MAX_RESTARTS, --max-restarts); resubmit $SENSEFLOW_SCRIPT to continue"
        exit $_SF_EXIT_MAX_RESTARTS
    fi
    _sf_say "$1: requeueing job ${SLURM_JOB_ID} (restart $((_sf_restart + 1))); it resumes from $(_sf_latest) in $SENSEFLOW_OUTPUT_DIR"
    scontrol requeue "$SLURM_JOB_ID"
    local rc=$?
    if [ "$rc" = 0 ]; then
        # The job is back in the queue; Slurm ends this shell within moments.
        # Exiting first could record this run's status on the requeued job.
        sleep 300 &
        wait $!
        exit 0
    fi
    _sf_say "scontrol requeue failed with status $rc; resubmit $SENSEFLOW_SCRIPT to continue"
    exit $_SF_EXIT_REQUEUE_FAILED
}

# Stopped on request: the batch shell saw USR1, or the trainer exited 0 without DONE
# (it saved on a USR1/TERM sent straight to the steps, e.g. `scancel -s USR1 <job>`).
if [ "$_sf_stop_requested" = 1 ] || [ "$_sf_rc" = 0 ]; then
    rm -f "$_sf_failures_file"
    if [ "$_sf_rc" != 0 ]; then
        _sf_say "warning: stop requested but training exited with status $_sf_rc; it resumes from its last complete checkpoint"
    fi
    _sf_requeue "not finished"
fi

case "$_sf_rc" in
    2 | 3 | 4 | 5 | 130)
        _sf_say "failed: training exited with status $_sf_rc, a cause a rerun cannot fix (see the last lines of $_sf_log and the exit codes in slurm/README.md); not requeueing"
        exit "$_sf_rc"
        ;;
esac

# A failure a rerun may get past: a lost node, a crashed rank, a NCCL timeout.
_sf_now_ckpt=$(_sf_latest)
if [ "$_sf_now_ckpt" != "$_sf_start_ckpt" ]; then
    rm -f "$_sf_failures_file"
    _sf_requeue "failed with status $_sf_rc after progress ($_sf_start_ckpt -> $_sf_now_ckpt)"
fi
_sf_failures=$(( $(cat "$_sf_failures_file" 2>/dev/null || echo 0) + 1 ))
echo "$_sf_failures" >"$_sf_failures_file"
if [ "$_sf_failures" -le "$SENSEFLOW_RETRIES_WITHOUT_PROGRESS" ]; then
    _sf_requeue "failed with status $_sf_rc without a new checkpoint since the restart (failure $_sf_failures in a row, retry limit $SENSEFLOW_RETRIES_WITHOUT_PROGRESS)"
fi
_sf_say "failed: training exited with status $_sf_rc, $_sf_failures time(s) in a row without a new checkpoint (limit $SENSEFLOW_RETRIES_WITHOUT_PROGRESS); not requeueing (see $_sf_log)"
exit $_SF_EXIT_NO_PROGRESS
