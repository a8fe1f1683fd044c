# shellcheck shell=bash source-path=SCRIPTDIR
# Body of every senseflow batch job: environment, logs, one srun, preemption and requeue.
#
# Sourced (not executed) by the batch scripts that `senseflow slurm` writes, so
# that the USR1 trap below lives in the batch shell itself: `#SBATCH
# --signal=B:USR1@N` signals that shell and nothing else. The contract with the
# trainer is in slurm/README.md; in short:
#   USR1 reaches the batch shell (time limit near, or `scancel --batch -s USR1`)
#     -> forwarded to every training process -> they save at the next step
#     boundary and exit 0 -> no DONE marker -> `scontrol requeue` -> the job
#     runs again with the same command and output directory and resumes.
#   Training reached train.max_steps -> the trainer wrote OUTPUT_DIR/DONE -> the
#     job ends with the trainer's exit status.
#   A failure (non-zero exit, no stop requested) -> the job fails, no requeue:
#     requeueing a crash would only repeat it.
#
# Inputs, set by the batch script before sourcing:
#   SENSEFLOW_OUTPUT_DIR    absolute output directory (train.output_dir)
#   SENSEFLOW_CMD           bash array: the command srun starts once per task
#   SENSEFLOW_MAX_RESTARTS  refuse to requeue after this many restarts
#   SENSEFLOW_SCRIPT        where the batch script was written (for messages)
#
# Layout it writes:
#   OUTPUT_DIR/logs/slurm-<job>.out                 this shell's messages, every restart appended
#   OUTPUT_DIR/logs/job<job>-restart<n>.log         the training processes' output of one run
#                                                   (srun --label: each line starts with the rank)

# No `set -e`: every exit status below is read and acted upon, and a failing
# helper (sacct without a database exits 1) must not kill the job silently.
set -uo pipefail

: "${SENSEFLOW_OUTPUT_DIR:?the batch script must set SENSEFLOW_OUTPUT_DIR}"
: "${SENSEFLOW_MAX_RESTARTS:=100}"
: "${SENSEFLOW_SCRIPT:=the batch script}"
if [ "$(declare -p SENSEFLOW_CMD 2>/dev/null | cut -c1-10)" != "declare -a" ]; then
    echo "senseflow job: the batch script must set SENSEFLOW_CMD as a bash array" >&2
    exit 2
fi

_sf_say() { echo "[senseflow $(date '+%F %T')] $*"; }

# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

_sf_restart=${SLURM_RESTART_COUNT:-0}
_sf_log_dir=$SENSEFLOW_OUTPUT_DIR/logs
_sf_log=$_sf_log_dir/job${SLURM_JOB_ID}-restart${_sf_restart}.log
_sf_done=$SENSEFLOW_OUTPUT_DIR/DONE
mkdir -p "$_sf_log_dir" || exit 1

# srun does not inherit --cpus-per-task from the allocation since Slurm 22.05;
# without this every rank would be bound to one CPU and its loader workers starve.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi

_sf_say "job ${SLURM_JOB_ID} restart ${_sf_restart}: ${SLURM_NTASKS:-?} processes on ${SLURM_JOB_NUM_NODES:-?} node(s) (${SLURM_JOB_NODELIST:-?})"
_sf_say "command: ${SENSEFLOW_CMD[*]}"
_sf_say "training log: $_sf_log"

# A DONE left by an earlier run (say, before max_steps was raised) must not make
# this run look finished; the trainer writes it again when it reaches the end.
rm -f "$_sf_done"

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
if [ "$_sf_stop_requested" = 0 ]; then
    # --kill-on-bad-exit: one rank dying ends the step instead of leaving the
    # others blocked in a collective until the NCCL timeout.
    srun --kill-on-bad-exit=1 --label "${SENSEFLOW_CMD[@]}" >>"$_sf_log" 2>&1 &
    _sf_srun_pid=$!
    # `wait` returns early whenever the trap runs; wait again until srun is gone,
    # then read its status (bash keeps the status of a reaped background job).
    while kill -0 "$_sf_srun_pid" 2>/dev/null; do
        wait "$_sf_srun_pid"
    done
    wait "$_sf_srun_pid"
    _sf_rc=$?
    _sf_say "training processes exited with status $_sf_rc"
fi

if [ -e "$_sf_done" ]; then
    _sf_say "finished: $_sf_done exists"
    exit "$_sf_rc"
fi

# Requeue when the run stopped on a stop request: the batch shell saw USR1, or
# the trainer exited 0 without DONE (it saved on a USR1/TERM sent straight to the
# steps, e.g. `#SBATCH --signal=USR1@N` without B:, or `scancel -s USR1 <job>`).
if [ "$_sf_stop_requested" = 1 ] || [ "$_sf_rc" = 0 ]; then
    if [ "$_sf_rc" != 0 ]; then
        _sf_say "warning: stop requested but training exited with status $_sf_rc; it resumes from its last complete checkpoint"
    fi
    if [ "$_sf_restart" -ge "$SENSEFLOW_MAX_RESTARTS" ]; then
        _sf_say "not requeueing: the job already restarted $_sf_restart times (limit $SENSEFLOW_MAX_RESTARTS, --max-restarts); resubmit $SENSEFLOW_SCRIPT to continue"
        exit 3
    fi
    _sf_say "not finished: requeueing job ${SLURM_JOB_ID} (restart $((_sf_restart + 1))); it resumes from the latest checkpoint in $SENSEFLOW_OUTPUT_DIR"
    if scontrol requeue "$SLURM_JOB_ID"; then
        # The job is back in the queue; Slurm ends this shell within moments.
        # Exiting first could record this run's status on the requeued job.
        sleep 300 &
        wait $!
        exit 0
    fi
    _sf_rc=$?
    _sf_say "scontrol requeue failed with status $_sf_rc; resubmit $SENSEFLOW_SCRIPT to continue"
    exit 4
fi

_sf_say "failed: training exited with status $_sf_rc without a stop request and without $_sf_done; not requeueing (see $_sf_log)"
exit "$_sf_rc"
