# shellcheck shell=bash
# Environment of every senseflow Slurm job: NCCL, networking, timeouts, logging.
#
# This is the ONE place for these settings. The batch shell sources it before
# `srun`, and srun passes the environment on to every training process on every
# node. Each variable is set only when the submitting environment (or the
# cluster's module system) has not set it already: `FOO=bar senseflow slurm ...
# --submit`, or an `export FOO=bar` before `sbatch`, wins. Site-wide choices
# (which NIC, which HCA) belong in the user's environment, not here; the
# defaults below are the ones that are safe on any cluster.
#
# Sourced by slurm/job.sh; safe to source by hand (`source slurm/env.sh; env`).

# Export VAR=default unless VAR is already set (even to an empty string).
_sf_default() {
    if [ -z "${!1+set}" ]; then
        export "$1=$2"
    else
        export "${1?}"
    fi
}

# --- failure handling: a dead or stuck rank must end the job, never hang it ---
# Abort the NCCL communicators and tear the process down when a collective
# fails or times out; with srun --kill-on-bad-exit the other ranks follow, the
# job ends, and the output directory's latest checkpoint is what a resubmission
# resumes from. (torch's default, 3, skips the communicator abort, which can
# leave peers blocked in a collective until their own timeout.)
_sf_default TORCH_NCCL_ASYNC_ERROR_HANDLING 1
# The watchdog's own heartbeat: if it is stuck inside a CUDA/NCCL call this long,
# the monitoring thread kills the process instead of letting the job idle to its
# time limit. 10 min leaves room for a slow distributed-checkpoint save.
_sf_default TORCH_NCCL_ENABLE_MONITORING 1
_sf_default TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC 600
# Keep the last collectives of every rank in a ring buffer (the flight
# recorder) and dump them on a timeout: the dump names the rank and collective
# that desynchronised. Older torch releases read TORCH_NCCL_TRACE_BUFFER_SIZE
# instead (newer ones warn on every rank when it is set); export that one
# yourself on such a torch.
_sf_default TORCH_FR_BUFFER_SIZE 2000
_sf_default TORCH_NCCL_DUMP_ON_TIMEOUT 1
# The collective timeout itself is init_distributed()'s timeout_min (30 min by
# default, set in the trainer); it must exceed the slowest checkpoint save.

# --- InfiniBand / RoCE ---
# Verbs retransmission timeout 4.096 us * 2^N: 22 (~17 s) rides out the link
# flaps and switch reconfigurations that large fabrics see, where NCCL's default
# (18 or 20 depending on the version) turns them into failed collectives.
_sf_default NCCL_IB_TIMEOUT 22
_sf_default NCCL_IB_RETRY_CNT 7
# Which HCAs to use is site-specific; NCCL picks all of them when unset.
# Example: export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3
# NCCL's bootstrap (TCP) interface: NCCL already skips lo and docker* when
# another interface exists. Set it when nodes have several routable NICs and
# only one reaches the other nodes, e.g. export NCCL_SOCKET_IFNAME=ib0 (or
# bond0); gloo (CPU runs) reads GLOO_SOCKET_IFNAME the same way.

# --- AWS EFA (p4d / p5): only when the node has an EFA device ---
if compgen -G "/sys/class/infiniband/*efa*" >/dev/null 2>&1; then
    _sf_default FI_PROVIDER efa
    # GPUDirect RDMA over EFA; without it traffic bounces through host memory.
    _sf_default FI_EFA_USE_DEVICE_RDMA 1
    # Data loader workers fork after libfabric is initialised; older libfabric
    # corrupts registered memory on fork unless told to be fork-safe.
    _sf_default FI_EFA_FORK_SAFE 1
fi

# --- logging ---
# WARN shows real problems without the INFO flood of 8 lines per rank per
# communicator; set NCCL_DEBUG=INFO when debugging the network.
_sf_default NCCL_DEBUG WARN
# Unbuffered Python output: the per-restart log shows the last step a rank
# reached even when the process is killed.
_sf_default PYTHONUNBUFFERED 1

# --- Megatron-core ---
# Megatron-core needs kernels queued in issue order for its tensor-parallel
# communication overlap (and warns about sequence parallel without it).
_sf_default CUDA_DEVICE_MAX_CONNECTIONS 1
# Three large models per rank: expandable segments cut the fragmentation that
# otherwise costs several GiB per GPU.
_sf_default PYTORCH_CUDA_ALLOC_CONF expandable_segments:True
# One OpenMP thread per CPU Slurm gave the task, not one per core of the node
# (8 ranks x all cores each would oversubscribe the node).
_sf_default OMP_NUM_THREADS "${SLURM_CPUS_PER_TASK:-1}"
# Compute nodes are often offline and 64 ranks must not race to download:
# every model path in a recipe is local.
_sf_default HF_HUB_OFFLINE 1

unset -f _sf_default
