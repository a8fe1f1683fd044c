"""Run a test body in N real torch.distributed (gloo) processes.

`run_distributed(fn, world_size, ...)` forks N processes, each initialises
torch.distributed + megatron-core parallel_state through the product's own
bootstrap (`megatron_senseflow.distributed.init_distributed`, which installs
the CPU harness), runs `fn(env, *args)` and sends its return value back. The
first failing rank's traceback is re-raised in the test process.

fork, not spawn: importing torch + megatron-core costs ~6 s per process on our
2-core machines; forked children share the parent's imports. Set
SENSEFLOW_TEST_START=spawn to use spawn (fn must then be importable).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable

import torch

from megatron_senseflow.distributed import free_port

DEFAULT_TIMEOUT = float(os.environ.get("SENSEFLOW_TEST_TIMEOUT", "600"))


def _hard_exit(code: int, q) -> None:
    """os._exit skips atexit, which would orphan the Manager server that megatron's async
    checkpoint writer spawns (~190 MB each); run multiprocessing's finalizers first."""
    import multiprocessing.util

    q.close()
    q.join_thread()  # flush the result / traceback before the hard exit
    multiprocessing.util._exit_function()
    os._exit(code)


def _child(fn, rank, world_size, port, parallel_kwargs, seed, args, kwargs, q):
    try:
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        import torch

        torch.set_num_threads(1)
        from megatron_senseflow.config import ParallelConfig
        from megatron_senseflow.distributed import destroy_distributed, init_distributed

        env = init_distributed(ParallelConfig(**parallel_kwargs), seed=seed, device="cpu", timeout_min=10)
        result = fn(env, *args, **kwargs)
        # tensors as bytes: torch's shared-memory handoff would need this process alive until the parent reads
        buf = io.BytesIO()
        torch.save(result, buf)
        q.put((rank, "ok", buf.getvalue()))
        destroy_distributed()
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        q.put((rank, "error", traceback.format_exc()))
        _hard_exit(1, q)
    _hard_exit(0, q)


def _share_checkpoint_queue() -> None:
    """Create megatron's async-writer results queue once in the test process.

    megatron's FileSystemWriterAsync spawns a multiprocessing Manager (a fresh
    interpreter) the first time a process saves; forked test ranks would each pay
    that start-up. A queue created here is inherited by every fork instead.
    Test support only: a training process saves from one long-lived process.
    """
    if os.environ.get("SENSEFLOW_TEST_START", "fork") != "fork":
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._get_write_results_queue()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    seed: int = 1234,
    timeout: float = DEFAULT_TIMEOUT,
    parallel: dict[str, Any] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run fn(env, *args, **kwargs) on `world_size` gloo ranks; return the per-rank results."""
    ctx = mp.get_context(os.environ.get("SENSEFLOW_TEST_START", "fork"))
    _share_checkpoint_queue()
    port = free_port()
    q = ctx.Queue()
    parallel_kwargs = {"tp": tp, "pp": pp, "cp": cp, **(parallel or {})}
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, r, world_size, port, parallel_kwargs, seed, args, kwargs, q),
            daemon=False,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    error: str | None = None
    try:
        while len(results) < world_size and error is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                error = f"timed out after {timeout:.0f}s waiting for ranks {sorted(set(range(world_size)) - set(results))}"
                break
            try:
                rank, status, payload = q.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
                if dead:
                    # give a failing rank a moment to flush its traceback
                    try:
                        rank, status, payload = q.get(timeout=2.0)
                    except queue.Empty:
                        error = f"rank {dead[0][0]} died with exit code {dead[0][1]} and no traceback"
                        break
                else:
                    continue
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=True)
            else:
                error = f"rank {rank} failed:\n{payload}"
    finally:
        for p in procs:
            p.join(timeout=5 if error is None else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if error is not None:
        raise AssertionError(error)
    return [results[r] for r in range(world_size)]
