"""Roles on this rank: a DiT pipeline stage with, when trainable, Megatron DDP + optimizer + LR schedule.

Generator, fake score and teacher are built with the same TP/PP layout, so
their local shards line up elementwise (IDA needs no communication).

A role offers two calls; both take full local-batch tensors that every rank
of the replica holds, so the algorithm in methods.py is written once:
- `forward(...)`: no-grad velocity, returned on every pipeline stage
  (PP > 1: megatron's forward-only schedule, then a broadcast from the last stage);
- `loss_backward(..., loss_fn)`: forward with grad, `loss_fn(v, sl)` on the
  last stage, backward (PP > 1: megatron's 1F1B schedule over microbatches).

Tensor legend: x latents [B, C, H, W], sigma [B], text [B, L, D], pooled [B, P].
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_senseflow.models import family_of
from megatron_senseflow.models.configs import Arch

from .weights import trainable_params

LossFn = Callable[[torch.Tensor, slice], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Denoiser:
    """(latent, sigma) -> the model's inputs and its output -> velocity, as the architecture's family says
    (models/family.py); every role and every sampler goes through it."""

    def __init__(self, arch: Arch, dtype: torch.dtype = torch.float32):
        self.arch = arch
        self.family = family_of(arch)
        self.dtype = dtype  # of the model's weights: inputs are cast to it, velocities come back in fp32

    def kwargs(self, x, sigma, text, pooled, guidance=None) -> dict:
        x, text, pooled = x.to(self.dtype), text.to(self.dtype), pooled.to(self.dtype)
        return self.family.model_inputs(self.arch, x, sigma, text, pooled, guidance)

    def velocity(self, out, x) -> torch.Tensor:
        out = self.family.velocity(self.arch, out, x)
        return out.float() if out.dtype != torch.float32 else out

    def seq_length(self, x, text) -> int:
        return text.shape[1] + self.family.image_tokens(self.arch, *x.shape[-2:])


@dataclass
class Role:
    name: str
    arch: Arch
    module: torch.nn.Module  # models.DiTBase: this rank's pipeline stage
    ddp: torch.nn.Module | None = None
    optimizer: object | None = None
    scheduler: object | None = None
    num_microbatches: int = 1
    forward_calls: int = field(default=0, init=False)
    backward_calls: int = field(default=0, init=False)

    def __post_init__(self):
        config = getattr(self.module, "config", None)
        self.denoiser = Denoiser(self.arch, getattr(config, "params_dtype", torch.float32))
        self.pp = ps.get_pipeline_model_parallel_world_size()

    @property
    def trainable(self) -> bool:
        return self.optimizer is not None

    @property
    def model(self) -> torch.nn.Module:
        return self.ddp if self.ddp is not None else self.module

    # ------------------------------------------------------------------ no grad
    @torch.no_grad()
    def forward(self, x, sigma, text, pooled, guidance=None) -> torch.Tensor:
        self.forward_calls += 1
        if self.pp == 1:
            out = self.model(**self.denoiser.kwargs(x, sigma, text, pooled, guidance))
            return self.denoiser.velocity(out, x)
        outs: list[torch.Tensor] = []

        def loss_fn(v, sl):
            outs.append(v.detach())
            return v.new_zeros(()), {}

        self._schedule(x, sigma, text, pooled, guidance, loss_fn, forward_only=True)
        v = torch.cat(outs) if outs else torch.empty_like(x)
        return _from_last_stage(v)

    # ------------------------------------------------------------------ differentiable in the input
    def velocity_with_vjp(self, x, sigma, text, pooled, guidance=None):
        """The velocity and a function g -> J^T g, J its Jacobian with respect to x (not the weights): SiD's
        generator loss backpropagates through the teacher and the fake score into G's output. The caller
        keeps a trainable role's weights frozen (`frozen(role.module)`) until the function has run.

        PP = 1: one forward with a graph, reused by the function. PP > 1: the forward-only pipeline for the
        value; the function runs megatron's forward-backward schedule with <v, g> as the loss and the first
        stage's input as a leaf (one more forward), and broadcasts d/dx over the pipeline group, so every
        rank gets it as if the model were whole.
        """
        if self.pp > 1:
            v = self.forward(x, sigma, text, pooled, guidance)
            return v, lambda g: self.input_grad(x, sigma, text, pooled, guidance, g)
        self.forward_calls += 1
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            v = self.denoiser.velocity(self.module(**self.denoiser.kwargs(leaf, sigma, text, pooled, guidance)), x)

        def vjp(g):
            # .backward, not autograd.grad: megatron's activation recompute refuses .grad(); the weights are
            # frozen, so only the leaf receives a gradient
            self.backward_calls += 1
            v.backward(g)
            return leaf.grad

        return v.detach(), vjp

    def input_grad(self, x, sigma, text, pooled, guidance, grad_v: torch.Tensor) -> torch.Tensor:
        """J^T grad_v for the velocity's Jacobian J with respect to x, through the pipeline (PP > 1)."""
        self.forward_calls += 1
        self.backward_calls += 1
        m = self.num_microbatches
        leaves: list[torch.Tensor] = []

        def make_input(sl):
            leaf = x[sl].detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf

        def loss_fn(v, sl):
            # the schedule divides a microbatch's loss by m; the sum over microbatches is then <v, grad_v>
            return (v * grad_v[sl]).sum() * m, {}

        self._schedule(x, sigma, text, pooled, guidance, loss_fn, forward_only=False, model=self.module,
                       make_input=make_input)
        if ps.is_pipeline_first_stage():
            g = torch.cat([leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves])
        else:
            g = torch.empty_like(x)
        dist.broadcast(g, src=ps.get_pipeline_model_parallel_first_rank(), group=ps.get_pipeline_model_parallel_group())
        return g

    # ------------------------------------------------------------------ with grad
    def loss_backward(self, x, sigma, text, pooled, guidance, loss_fn: LossFn) -> dict[str, float]:
        """Accumulate this role's grads of loss_fn; returns the loss terms (batch means) on every rank."""
        self.forward_calls += 1
        self.backward_calls += 1
        if self.pp == 1:
            out = self.model(**self.denoiser.kwargs(x, sigma, text, pooled, guidance))
            loss, logs = loss_fn(self.denoiser.velocity(out, x), slice(None))
            loss.backward()
            return {k: float(v) for k, v in logs.items()}
        stats = self._schedule(x, sigma, text, pooled, guidance, loss_fn, forward_only=False)
        return _objects_from_last_stage(stats)

    def _schedule(self, x, sigma, text, pooled, guidance, loss_fn: LossFn, forward_only: bool, model=None,
                  make_input=None):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        b, m = x.shape[0], self.num_microbatches
        if b % m:
            raise ValueError(f"local batch {b} is not divisible into {m} microbatches.")
        mbs = b // m
        slices = [slice(i * mbs, (i + 1) * mbs) for i in range(m)]

        def forward_step(it, model):
            sl = next(it)
            g = guidance[sl] if guidance is not None else None
            x_in = make_input(sl) if make_input is not None else x[sl]
            out = model(**self.denoiser.kwargs(x_in, sigma[sl], text[sl], pooled[sl], g))

            def on_last_stage(o):
                loss, logs = loss_fn(self.denoiser.velocity(o, x[sl]), sl)
                # the schedule divides `loss` in place by the microbatch count; logs must not alias it
                return loss, {k: v.detach().clone() for k, v in logs.items()}

            return out, on_last_stage

        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(slices),
            model=[model if model is not None else self.model],
            num_microbatches=m,
            seq_length=self.denoiser.seq_length(x, text),
            micro_batch_size=mbs,
            forward_only=forward_only,
        )
        if not ps.is_pipeline_last_stage() or forward_only:
            return None
        keys = results[0].keys() if results else []
        return {k: float(sum(float(r[k]) for r in results) / len(results)) for k in keys}

    # ------------------------------------------------------------------ optimizer
    def zero_grad(self):
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> tuple[bool, float]:
        """Reduce grads (DP, TP-replicated norms, PP-replicated embedders), clip, AdamW."""
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.ddp])
        ok, grad_norm, _ = self.optimizer.step()
        return bool(ok), float(grad_norm) if grad_norm is not None else float("nan")

    def step_schedule(self) -> None:
        """Advance the LR schedule by one iteration, whether or not this role updated in it (the authors
        step every schedule every iteration, F947: warm-up counts iterations)."""
        self.scheduler.step(increment=1)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ checkpoint part
    def save_state(self, step_dir: Path, async_save: bool = False) -> list:
        """Collective: weights (`NAME/`, a role checkpoint the export tools read), optimizer (`NAME_optim/`)
        and LR schedule (`NAME_scheduler.json`)."""
        from megatron_senseflow.models.checkpoint_io import save_model

        from .mcore_compat import save_optimizer

        requests = save_model(self.module, self.arch, step_dir / self.name, async_save)
        odir = step_dir / f"{self.name}_optim"
        if dist.get_rank() == 0:
            odir.mkdir()
        dist.barrier()
        requests += save_optimizer(self.module, self.optimizer, str(odir), async_save)
        if dist.get_rank() == 0:
            (step_dir / f"{self.name}_scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))
        return requests

    def load_state(self, step_dir: Path) -> None:
        from megatron_senseflow.models.checkpoint_io import load_model

        from .mcore_compat import load_optimizer

        load_model(self.module, self.arch, step_dir / self.name)
        load_optimizer(self.module, self.optimizer, str(step_dir / f"{self.name}_optim"))
        self.scheduler.load_state_dict(json.loads((step_dir / f"{self.name}_scheduler.json").read_text()))


def _from_last_stage(t: torch.Tensor) -> torch.Tensor:
    dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return t


def _objects_from_last_stage(obj):
    box = [obj]
    dist.broadcast_object_list(
        box, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
    )
    return box[0]


# ---------------------------------------------------------------------- building


def build_role(
    name: str,
    arch: Arch,
    tconfig,
    *,
    spec: str,
    pp_split: list[int] | None,
    tokens: tuple[int, int],
    optimizer_cfg=None,
    parallel=None,
    max_steps: int = 1,
    num_microbatches: int = 1,
    init_fn=None,
) -> Role:
    """A role with its model stage; trainable when `optimizer_cfg` is given (Megatron DDP + optimizer).

    `init_fn(module)` loads weights before DDP and the optimizer copy them into
    their buffers and fp32 main weights.
    """
    from megatron_senseflow.models import build_model

    module = build_model(arch, tconfig, spec=spec, pp_split=pp_split, tokens=tokens)
    if init_fn is not None:
        init_fn(module)
    if optimizer_cfg is None:
        module.requires_grad_(False).eval()
        return Role(name, arch, module, num_microbatches=num_microbatches)

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from .mcore_compat import keep_adam_step_on_load

    ddp = DistributedDataParallel(
        config=tconfig,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=parallel.overlap_grad_reduce,
            use_distributed_optimizer=parallel.distributed_optimizer,
            check_for_nan_in_grad=False,  # the trainer's NaN guard decides what to do
        ),
        module=module,
    )
    o = optimizer_cfg
    bf16 = tconfig.params_dtype == torch.bfloat16
    offload = o.cpu_offload != "none"
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=tconfig.params_dtype,
        use_distributed_optimizer=parallel.distributed_optimizer,
        # all AdamW states and the update on the host; megatron copies grads down and
        # weights back per step (and overlaps those copies with the update)
        optimizer_cpu_offload=offload,
        optimizer_offload_fraction=1.0 if offload else 0.0,
    )
    with cpu_adam_backend(o.cpu_offload):
        optimizer = get_megatron_optimizer(opt_config, [ddp])
    keep_adam_step_on_load(optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(max_steps, o.warmup_steps + 1),
        lr_decay_style="constant",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(max_steps, 1),
        wd_incr_style="constant",
    )
    return Role(name, arch, module, ddp=ddp, optimizer=optimizer, scheduler=scheduler, num_microbatches=num_microbatches)


class _DeepSpeedCPUAdam:
    """Built lazily: DeepSpeed's compiled CPU AdamW with the constructor megatron's hybrid optimizer calls."""

    _cls = None

    @classmethod
    def get(cls):
        if cls._cls is None:
            try:
                from deepspeed.ops.adam import DeepSpeedCPUAdam
                from deepspeed.ops.adam import cpu_adam as ds_cpu_adam
            except ImportError as e:
                raise RuntimeError(
                    "optimizer.cpu_offload=deepspeed needs DeepSpeed: pip install --no-build-isolation deepspeed "
                    f"(after torch; see README). Import failed: {e}"
                ) from None
            ds_cpu_adam.CPUAdamBuilder = _without_debug_info(ds_cpu_adam.CPUAdamBuilder)

            class CPUAdamW(DeepSpeedCPUAdam):
                def __init__(self, params, lr, weight_decay, betas, eps, bias_correction=True, fused=None):
                    # `fused` is torch AdamW's flag; DeepSpeed's kernel is always fused
                    super().__init__(params, lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                     weight_decay=weight_decay, adamw_mode=True, fp32_optimizer_states=True)

            cls._cls = CPUAdamW
        return cls._cls


def _without_debug_info(builder: type) -> type:
    """DeepSpeed's op builder, compiling without `-g`: a node's first offloading run compiles the cpu_adam op just in
    time, and debug information made that 38% slower (cpu_adam_impl.cpp: 49.7 s against 30.9 s on one core here).
    The machine code is the same; only the symbols for a debugger are left out. A prebuilt op (DS_BUILD_CPU_ADAM=1)
    is loaded as it was built."""
    if getattr(builder, "_senseflow_no_debug_info", False):
        return builder

    class NoDebugInfo(builder):
        _senseflow_no_debug_info = True

        def cxx_args(self):
            return [a for a in super().cxx_args() if a != "-g"]

    NoDebugInfo.__name__ = NoDebugInfo.__qualname__ = builder.__name__
    return NoDebugInfo


class cpu_adam_backend:
    """While building an offloading optimizer, make megatron-core's HybridDeviceOptimizer use the
    chosen host AdamW: 'megatron' keeps its own (torch AdamW, fused), 'deepspeed' swaps in
    DeepSpeedCPUAdam. The class is stored in the optimizer's defaults, so it survives the
    distributed optimizer rebuilding its hybrid optimizer over the DP shard."""

    def __init__(self, backend: str):
        self.backend = backend

    def __enter__(self):
        if self.backend == "deepspeed":
            import megatron.core.optimizer as mopt

            self._saved = mopt.CPUAdam
            mopt.CPUAdam = _DeepSpeedCPUAdam.get()
        return self

    def __exit__(self, *exc):
        if self.backend == "deepspeed":
            import megatron.core.optimizer as mopt

            mopt.CPUAdam = self._saved
        return False


# ---------------------------------------------------------------------- IDA / EMA


@dataclass
class Roles:
    """Everything an objective trains or consults, built by the trainer from one config."""

    generator: Role
    fake_score: Role
    teacher: Role
    discriminator: object | None = None  # discriminator.DiscriminatorRole when the method uses one
    ema: "EMA | None" = None


class EMA:
    """fp32 exponential moving average of this rank's generator shards; checkpointed in `ema/` as a
    role checkpoint of the generator's architecture (fp32), so export and sampling read it alike."""

    name = "ema"

    def __init__(self, generator: Role, decay: float):
        self.generator = generator
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in trainable_params(generator.module)]

    @torch.no_grad()
    def update(self):
        for s, p in zip(self.shadow, trainable_params(self.generator.module)):
            s.mul_(self.decay).add_(p.float(), alpha=1 - self.decay)

    def state(self) -> list[torch.Tensor]:
        return self.shadow

    def _sharded(self) -> dict:
        """The generator's sharded state dict with every parameter replaced by its shadow."""
        import dataclasses

        module = self.generator.module
        by_param = {id(p): s for p, s in zip(trainable_params(module), self.shadow)}
        return {k: dataclasses.replace(v, data=by_param[id(v.data)])
                for k, v in module.sharded_state_dict().items() if id(v.data) in by_param}

    def save_state(self, step_dir: Path, async_save: bool = False) -> list:
        from megatron_senseflow.models.checkpoint_io import write_meta

        from .mcore_compat import dist_save

        directory = step_dir / self.name
        if dist.get_rank() == 0:
            directory.mkdir()
        dist.barrier()
        request = dist_save(self._sharded(), str(directory), async_save)
        if dist.get_rank() == 0:
            from megatron_senseflow.models.checkpoint_io import lora_meta

            write_meta(directory, self.generator.arch, torch.float32, lora_meta(self.generator.module))
        return [request] if async_save else []

    def load_state(self, step_dir: Path) -> None:
        from megatron.core import dist_checkpointing

        sd = self._sharded()
        loaded = dist_checkpointing.load(sd, str(step_dir / self.name))
        for k, v in sd.items():
            v.data.copy_(loaded[k])
