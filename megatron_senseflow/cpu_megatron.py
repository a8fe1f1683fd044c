"""Let unmodified megatron-core run on CPU with gloo: CPU runs only (tests, the demo).

Why this exists: megatron-core 0.16 asks for CUDA in a few places that have
nothing to do with the maths we test. `install()` is called by the
distributed bootstrap only when the run is on CPU (no CUDA); a GPU run never
imports this module, so nothing here can change what a GPU run does.

What it covers, and why each piece is needed (megatron-core 0.16.1 paths):
- `torch.cuda.current_device()` is used as a `device=` argument for new
  tensors: pipeline p2p receive buffers (pipeline_parallel/p2p_communication.py),
  DDP param/grad buffers (distributed/param_and_grad_buffer.py), the distributed
  optimizer's shard buffers, gather buffers in tensor_parallel/layers.py.
  We make it return a sentinel and map every CUDA device request to CPU with a
  torch function mode (`_CudaToCpu`), which also turns `.cuda()` / `.to("cuda")`
  into no-ops.
- `torch.cuda.synchronize()`, streams and events (p2p_communication.py after
  batch_isend_irecv, DDP's communication stream): no-ops on CPU.
- The CUDA RNG tracker (tensor_parallel/random.py) forks a CUDA generator for
  TP-split initialisation and dropout; `CpuRNGStatesTracker` keeps the same
  interface (add / fork / get_states / set_states / reset) on CPU generator states.
- Activation recompute (tensor_parallel/random.py CheckpointFunction) stashes
  and restores the CUDA RNG state through `torch.cuda.random.get_rng_state`
  and `_set_cuda_rng_state`; both are pointed at the CPU generator.
- The optimizers (optimizer/optimizer.py, optimizer/distrib_optimizer.py,
  optimizer/clip_grads.py) dispatch on `param.type() == 'torch.cuda.FloatTensor'`;
  the function mode reports CPU tensors' legacy type string with `.cuda.`.

One more piece is about time, not correctness: `leave_fusions_uncompiled()` (called by the entry points before
megatron-core is imported, and only when the process sees no CUDA).
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE: "_CudaToCpu | None" = None
# where CUDA device requests go: "cpu", or "meta" inside memory_probe's shape-only forward, so that
# megatron's own buffers (TP gathers) land on the same device as the model
_TARGET = ["cpu"]


@contextlib.contextmanager
def cuda_requests_to(device: str):
    _TARGET.append(device)
    try:
        yield
    finally:
        _TARGET.pop()


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare int means a CUDA ordinal to torch
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrite CUDA device arguments of tensor factories and moves to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # hot path: every torch call of a CPU run passes here, so the common case is two checks
        if kwargs:
            dev = kwargs.get("device")
            if dev is not None and _is_cuda(dev):
                kwargs = {**kwargs, "device": _TARGET[-1]}
        else:
            kwargs = {}
        special = _SPECIAL.get(func)
        if special is None:
            return func(*args, **kwargs)
        return special(func, args, kwargs)


def _cuda(func, args, kwargs):
    return args[0]


def _to(func, args, kwargs):
    if len(args) > 1 and _is_cuda(args[1]):
        args = (args[0], _TARGET[-1], *args[2:])
    return func(*args, **kwargs)


def _type(func, args, kwargs):
    if len(args) == 1 and not kwargs:
        # megatron's optimizers dispatch on the legacy type string ('torch.cuda.FloatTensor')
        t = func(*args)
        return t.replace("torch.", "torch.cuda.", 1) if t.startswith("torch.") and ".cuda." not in t else t
    return func(*args, **kwargs)


_SPECIAL = {
    torch.Tensor.cuda: _cuda,
    torch.Tensor.pin_memory: _cuda,
    torch.Tensor.to: _to,
    torch.Tensor.type: _type,
}


class _NullStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NullEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class CpuRNGStatesTracker:
    """Same interface as megatron's CudaRNGStatesTracker, on CPU generator states."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def install() -> None:
    """Idempotent. Call once per process before building megatron modules on CPU."""
    global _INSTALLED, _MODE
    if _INSTALLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_megatron.install() is for CPU-only runs; this process sees CUDA.")
    cuda = torch.cuda
    cuda.current_device = lambda: _TARGET[-1]
    cuda.synchronize = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: None
    cuda.manual_seed_all = lambda seed: None
    cuda.random.get_rng_state = lambda *a, **k: torch.get_rng_state()

    from megatron.core.tensor_parallel import random as mp_random

    # activation recompute (CheckpointFunction) saves and restores the "CUDA" RNG state
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # initialize_rng_tracker(force_reset=True), called by model_parallel_cuda_manual_seed,
    # instantiates this name: point it at ours so seeding keeps working.
    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    _MODE = _CudaToCpu()
    _MODE.__enter__()
    _INSTALLED = True


def leave_fusions_uncompiled() -> None:
    """A process that sees no CUDA, before megatron-core is imported: its fused kernels stay plain functions.

    megatron-core wraps its fused kernels (bias + GeLU / SwiGLU / dropout, its norms) in `torch.compile` when their
    modules are imported, which imports TorchInductor: 1.1 s of every CPU process's start (each rank of every test
    run, every `senseflow` verb). Our DiTs never call those kernels, and a CPU has no kernel to fuse them into. So
    `megatron.core.jit` is provided here with the same names and a decorator that returns the function unchanged
    (what megatron-core itself does when torch.compile is unavailable). A process with CUDA, or one that has
    already imported megatron-core, is left as it is."""
    if "megatron.core" in sys.modules or torch.cuda.is_available():
        return
    if not any(isinstance(f, _UncompiledJit) for f in sys.meta_path):
        sys.meta_path.insert(0, _UncompiledJit())


class _UncompiledJit(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Provides `megatron.core.jit` with megatron's names and a decorator that returns the function unchanged. A
    finder, not a sys.modules entry, so that `megatron` and `megatron.core` still import normally first."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "megatron.core.jit" else None

    def create_module(self, spec):
        return None

    def exec_module(self, jit):
        jit.__doc__ = "megatron-core's JIT fuser, left uncompiled in a CPU-only process (megatron_senseflow/cpu_megatron.py)"
        jit.noop_decorator = lambda func: func
        jit.jit_fuser = jit.noop_decorator
        jit.enable_jit_fuser = jit.disable_jit_fuser = lambda: None


def installed() -> bool:
    return _INSTALLED


@contextlib.contextmanager
def suspended():
    """Run plain-torch code (a reference model in a benchmark) without the CUDA->CPU function mode."""
    if _MODE is None:
        yield
        return
    _MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _MODE.__enter__()
