"""Workarounds for megatron-core behaviour our checkpoints depend on, in one place.

Each function names the megatron-core version and code path that needs it
(seen on 0.16.1, the version pip picks for Python 3.11; setup.py pins
`megatron-core>=0.16,<0.17`). When the pin moves, this file is the checklist:
rerun tests/test_resume.py and drop what the new version no longer needs.
"""
from __future__ import annotations

import pickle  # _PickledQueue: the write results of this rank's own writer processes, never a file

import torch

# Distributed-optimizer state in a layout-independent format: a run saved at one TP/PP/DP
# layout resumes at any other (megatron-core 0.16 `DistributedOptimizer.sharded_state_dict`).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _inner_optimizers(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def prime_optimizer_state(optimizer) -> None:
    """Give every parameter an (empty) AdamW state: step 0, zero moments.

    megatron-core 0.16's DistributedOptimizer builds its sharded state dict from the
    live torch AdamW state, which torch only creates at the first step: loading into
    a fresh optimizer, or saving one that has not stepped yet (a checkpoint before the
    generator's first update at TTUR > 1), fails (`assert len(steps) == 1` in
    distrib_optimizer.py). A primed state is exactly what AdamW's first step would
    create, so priming changes no update.
    """
    for opt in _inner_optimizers(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def unshare_adam_steps(optimizer) -> None:
    """After a checkpoint load: give each parameter its own AdamW "step" tensor.

    megatron-core 0.16's DistributedOptimizer.load_state_dict (torch-AdamW path)
    puts one shared step tensor into every parameter's state; torch's AdamW then
    increments it in place once per parameter per step, so bias correction would
    use a step count ~number-of-parameters too large.
    """
    for opt in _inner_optimizers(optimizer):
        for st in opt.optimizer.state.values():
            if "step" in st:
                st["step"] = st["step"].clone()


def keep_adam_step_on_load(optimizer) -> None:
    """megatron-core 0.16 on the torch-AdamW path (no TransformerEngine / apex).

    There the distributed optimizer keeps AdamW's "step" in each parameter's
    state, saves it apart from the per-parameter tensors, and on load
    (`load_parameter_state_from_fully_reshardable` -> `_set_main_param_and_optimizer_states`,
    optimizer/distrib_optimizer.py) copies every state key from the loaded
    tensors, which lack "step": KeyError. "step" was already restored from the
    common state by then, so it is passed through unchanged.
    """
    for opt in _inner_optimizers(optimizer):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None:
            continue

        def set_states(model_param, tensors, _opt=opt, _set=setter):
            if "step" not in tensors:
                g, o = _opt.model_param_group_index_map[model_param]
                state = _opt.optimizer.state[_opt.optimizer.param_groups[g]["params"][o]]
                if "step" in state:
                    tensors = {**tensors, "step": state["step"]}
            return _set(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states


_results_manager = None


def _own_write_results_queue() -> None:
    """megatron-core 0.16's FileSystemWriterAsync, which every torch_dist save goes through (synchronous ones
    too), starts a multiprocessing Manager server (spawn context) at the first save and never stops it: a rank
    that ends with os._exit, or is killed, leaves that ~270 MB server running, holding the rank's stdout and
    stderr open, so whoever reads them (torchrun's caller, a test) waits for ever. We start that server
    ourselves instead, SIGKILLed when this process dies (PR_SET_PDEATHSIG), and stop it in `shutdown()`."""
    global _results_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    import multiprocessing as mp
    import os
    from multiprocessing.managers import SyncManager

    from .procs import die_with_parent, stderr_to_devnull

    _results_manager = SyncManager(ctx=mp.get_context("spawn"))
    # The server starts with /dev/null as its stderr and keeps it: a rank killed while its server starts (reading
    # its start-up data, or sending its address back) leaves the server a traceback that, in the rank's stderr,
    # would sit under the launcher's one line about the killed rank. The server's failures show in the rank
    # itself, as a broken queue. It dies with the rank (die_with_parent); a light module: the spawned server
    # imports what its initializer's module imports.
    with stderr_to_devnull():
        _results_manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = _PickledQueue(_results_manager.Queue())


class _PickledQueue:
    """The results queue as megatron-core uses it (`put`, `get_nowait`), with the write results pickled on this
    side. A Manager's server unpickles what it stores: megatron's WriteResults made it import torch at the first
    save, 2.7 s of CPU (measured) and a few hundred MB in every rank. It now stores bytes and imports nothing. The
    bytes come from this rank's own writer processes (forked from it), never from a file."""

    def __init__(self, queue):
        self._queue = queue

    def put(self, item, *args, **kwargs) -> None:
        self._queue.put(pickle.dumps(item), *args, **kwargs)

    def get_nowait(self):
        return pickle.loads(self._queue.get_nowait())


def shutdown() -> None:
    """End of a process that saved checkpoints: stop the helper process megatron-core's writer uses."""
    global _results_manager
    if _results_manager is not None:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        filesystem_async._results_queue = None
        _results_manager.shutdown()
        _results_manager = None


def dist_save(sharded_state_dict: dict, directory: str, async_save: bool = False):
    """megatron-core's dist_checkpointing.save (collective), without leaving a helper process behind."""
    from megatron.core import dist_checkpointing

    _own_write_results_queue()
    return dist_checkpointing.save(sharded_state_dict, directory, async_sharded_save=async_save)


def save_optimizer(role_module, optimizer, directory: str, async_save: bool = False) -> list:
    """The distributed optimizer's state in `directory` (collective); with `async_save`, the AsyncRequest."""
    if not any(opt.optimizer.state for opt in _inner_optimizers(optimizer)):
        prime_optimizer_state(optimizer)  # a save before this role's first update
    sd = optimizer.sharded_state_dict(role_module.sharded_state_dict(), metadata=OPTIMIZER_METADATA)
    request = dist_save(sd, directory, async_save)
    return [request] if async_save else []


def load_optimizer(role_module, optimizer, directory: str) -> None:
    """Load `save_optimizer`'s state at any layout: prime -> load -> unshare (the order 0.16 needs)."""
    from megatron.core import dist_checkpointing

    prime_optimizer_state(optimizer)
    sd = optimizer.sharded_state_dict(role_module.sharded_state_dict(), is_loading=True, metadata=OPTIMIZER_METADATA)
    optimizer.load_state_dict(dist_checkpointing.load(sd, directory))
    unshare_adam_steps(optimizer)
