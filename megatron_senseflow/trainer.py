"""The training loop: builds the roles from one config, runs the objective, checkpoints, monitors.

The objective owns one iteration (`Objective.step(batch, step)`, methods.py);
the trainer owns what surrounds it: data, the NaN policy (`_guarded_update`,
one rule for every role), signals, checkpoints (a registry of parts that save
and load themselves, checkpoint.py) and logging. Everything a resumed run needs
to repeat the uninterrupted one bit for bit on CPU is in the step checkpoint.
"""
from __future__ import annotations

import gc
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_senseflow.models import family_of, transformer_config
from megatron_senseflow.models.checkpoint_io import load_model
from megatron_senseflow.models.flops import forward_flops, image_tokens

from . import flow, preflight, signals
from .checkpoint import DONE_MARKER, FAILED_MARKER, STOP_MARKER, CheckpointManager
from .codec import build_codec
from .config import Config, ConfigError, dump_config
from .data_source import build_data_source
from .discriminator import (
    DiffAugment,
    DiscriminatorRole,
    TextCondition,
    VFMDiscriminator,
    build_dinov2,
    clip_text_projection,
)
from .distributed import DistEnv
from .errors import TrainingAborted
from .methods import OBJECTIVES
from .monitor import Monitor, device_peak_tflops, image_grid
from .roles import EMA, Roles, build_role
from .sampling import sample_student


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, force_two_pass: bool = False):
        self._startup = None  # the start-up phases' progress bar (_phase), closed when the loop begins
        if (cfg.parallel.tp, cfg.parallel.pp) != (env.tp, env.pp):
            raise ConfigError(
                f"the config asks for tp={cfg.parallel.tp} pp={cfg.parallel.pp} but the process groups were built "
                f"with tp={env.tp} pp={env.pp}; initialise distributed from the same config."
            )
        preflight.check(cfg, env.world_size)
        missing = preflight.missing_assets(cfg)
        if missing:
            raise ConfigError(missing[0])
        uses_fp8 = "fp8" in (cfg.roles.teacher.precision, cfg.roles.fake_score.precision)
        if uses_fp8 and cfg.model.fp8_recipe == "mxfp8" and torch.cuda.is_available():
            cc = torch.cuda.get_device_capability()
            if cc[0] < 10:
                raise ConfigError(f"model.fp8_recipe=mxfp8 needs a Blackwell GPU (compute capability 10 or later); this "
                                  f"GPU is {cc[0]}.{cc[1]}: use delayed or tensorwise.")
        offloads = [r for r in ("generator", "fake_score") if getattr(cfg.roles, r).optimizer.cpu_offload != "none"]
        if offloads and env.device.type != "cuda":
            raise ConfigError(f"roles.{offloads[0]}.optimizer.cpu_offload moves AdamW from the GPU to the host, but this "
                              "run has no GPU and keeps everything on the host already; set it to none.")
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.train.output_dir)
        self.dtype = torch.bfloat16 if cfg.model.params_dtype == "bfloat16" else torch.float32
        self.dev = env.device
        c = cfg
        self.t_arch, self.s_arch = c.model.teacher_arch(), c.model.student_arch()

        vae_dtype = torch.bfloat16 if c.roles.discriminator.precision == "bf16" else torch.float32
        self.codec = build_codec(c.roles.discriminator.vae, self.t_arch, vae_dtype).to(self.dev)
        self.latent_channels, self.latent_side = self.t_arch.latent_channels, c.data.resolution // self.codec.factor
        self.num_img = image_tokens(self.t_arch, self.latent_side, self.latent_side)
        tokens = (self.num_img, c.data.text_max_length)
        self.local_batch = c.data.micro_batch_size * c.parallel.num_microbatches
        # what a person can get wrong in the config or the data is refused here, before minutes of model building
        d = c.distill
        self.taus = flow.student_anchors(d.num_steps, d.shift, self.t_arch, self.num_img, d.anchor_rounding)
        method = OBJECTIVES[c.method]
        method.check(c, self.taus)
        self.data = build_data_source(c, env, self.latent_channels, self.latent_side, self.t_arch, self.dev)

        def tconf(arch, recompute, precision="bf16", fp8_format="hybrid", fp8_param=False):
            fp8 = fp8_format if precision == "fp8" else None
            return transformer_config(arch, tp=c.parallel.tp, pp=c.parallel.pp, sequence_parallel=c.parallel.sequence_parallel,
                                      params_dtype=self.dtype, recompute=recompute, fp8=fp8,
                                      fp8_recipe=c.model.fp8_recipe, fp8_param=fp8 is not None and fp8_param)

        common = dict(spec=c.model.spec, pp_split=c.parallel.pp_split, tokens=tokens, parallel=c.parallel,
                      max_steps=c.train.max_steps, num_microbatches=c.parallel.num_microbatches)
        r = c.roles
        from megatron_senseflow.models.flops import param_count

        n = param_count(self.t_arch)
        size = f"{self.t_arch.label} {n / 1e9:.2f} B" if n >= 1e8 else f"{self.t_arch.label} {n / 1e6:.2f} M"
        # teacher: forward only, so E4M3 throughout; fake score: E4M3 forward, E5M2 gradients
        with self._phase(f"building the teacher ({size} parameters, tp={c.parallel.tp} pp={c.parallel.pp})"
                         + (f" from {r.teacher.checkpoint}" if r.teacher.checkpoint else " with random weights")):
            self.T = build_role("teacher", self.t_arch, tconf(self.t_arch, "none", r.teacher.precision, "e4m3",
                                                              r.teacher.fp8_weights), **common)
            self._init_teacher()
        what = ("copies of the teacher" if not (r.generator.lora.enabled or r.fake_score.lora.enabled)
                else "LoRA adapters over the teacher's weights where lora.rank > 0")
        with self._phase(f"building the generator and the fake score ({what}) and their optimizers"):
            self.G = build_role("generator", self.s_arch, tconf(self.s_arch, c.model.recompute),
                                optimizer_cfg=c.roles.generator.optimizer,
                                init_fn=self._student_init_for(r.generator.lora), **common)
            self.F = build_role("fake_score", self.s_arch, tconf(self.s_arch, c.model.recompute, r.fake_score.precision),
                                optimizer_cfg=c.roles.fake_score.optimizer,
                                init_fn=self._student_init_for(r.fake_score.lora), **common)
        ema = EMA(self.G, c.roles.generator.ema_decay) if c.roles.generator.ema_decay > 0 else None
        self.ema = ema

        self.global_batch = self.local_batch * env.dp
        self.D = None
        if preflight.wants_discriminator(c):
            with self._phase("building the discriminator (DINOv2, heads, VAE decoder)"):
                self.D = self._build_discriminator()
        self.roles = Roles(self.G, self.F, self.T, self.D, ema)
        self.objective = method(c, self.roles, self.taus, env, self._guarded_update, force_two_pass)
        self.evaluator = None
        if c.eval.every:
            from .evaluation import InLoopEval

            with self._phase(f"preparing the in-loop evaluation ({c.eval.num_samples} samples, reference features)"):
                self.evaluator = InLoopEval(self)
        parts = {"generator": self.G, "fake_score": self.F, "ema": ema, "discriminator": self.D, "data": self.data,
                 "trainer": self}
        self.ckpt = CheckpointManager(self.out / "checkpoints", c.checkpoint.keep_last,
                                      {k: v for k, v in parts.items() if v is not None}, verify=c.checkpoint.verify,
                                      expected_bytes=self._expected_save_bytes,
                                      log=lambda m: print(m, flush=True) if env.is_main else None)
        self.step = 0
        self.updates = {"generator": 0, "fake_score": 0, "discriminator": 0}
        self.nan_in_a_row = 0
        self.nan_total = 0
        self._lead_checked = False
        self.fixed = None  # conditioning of the sample grids, taken from the first batch
        self._flops = {r.name: forward_flops(r.arch, self.local_batch, self.num_img, c.data.text_max_length)
                       for r in (self.G, self.F, self.T)}

    # ------------------------------------------------------------------ building
    def _phase(self, what: str):
        """A progress line on rank 0 when a long start-up phase begins, and how long it took (12B models take
        minutes to build and load)."""
        import contextlib

        from . import progress

        @contextlib.contextmanager
        def phase():
            t0 = time.time()
            if self._startup is None:  # one bar over the start-up's phases (a terminal only)
                self._startup = progress.bar(desc="start-up", unit="phase", main=self.env.is_main,
                                             bar_format="{desc}: {n} phases done [{elapsed}] {postfix}")
            self._startup.set_postfix_str(what[:70])
            if self.env.is_main:
                progress.write(f"[senseflow] {what} ...")
            yield
            self._startup.update(1)
            if self.env.is_main:
                progress.write(f"[senseflow]   done in {time.time() - t0:.1f} s")

        return phase()

    def _init_teacher(self):
        path = self.cfg.roles.teacher.checkpoint
        if path:
            load_model(self.T.module, self.t_arch, path)

    def _student_init(self, module):
        """Generator and fake score start as the teacher (FLUX: without its guidance embedder)."""
        path = self.cfg.roles.teacher.checkpoint
        if path:
            load_model(module, self.s_arch, path, allow_guidance_drop=True)
            return
        teacher = dict(self.T.module.named_parameters())
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(teacher[name])

    def _student_init_for(self, lora):
        """Full fine-tuning: a copy of the teacher. LoRA: the teacher's own weight tensors as the frozen base (one
        copy in memory for all three roles) plus adapters, the same initial adapters for both roles (B = 0, so
        generator and fake score start as the teacher, as with full copies)."""
        if not lora.enabled:
            return self._student_init

        def init(module):
            from megatron_senseflow.models.lora import LoRASpec, add_lora

            teacher = dict(self.T.module.named_parameters())
            for name, p in list(module.named_parameters()):
                owner, _, leaf = name.rpartition(".")
                t = teacher[name]  # FLUX: the student lacks only the teacher's guidance embedder
                if t.shape != p.shape or t.dtype != p.dtype:
                    raise RuntimeError(f"LoRA base {name}: teacher {tuple(t.shape)} {t.dtype} vs student "
                                       f"{tuple(p.shape)} {p.dtype}")
                module.get_submodule(owner)._parameters[leaf] = t
            add_lora(module, LoRASpec(lora.rank, lora.alpha or lora.rank, tuple(lora.targets)),
                     self.s_arch.attention_head_dim, seed=self.cfg.train.seed)
            module.lora_base = self.cfg.roles.teacher.checkpoint  # written into role checkpoints' metadata

        return init

    def _build_discriminator(self) -> DiscriminatorRole:
        dc = self.cfg.roles.discriminator
        size = dc.image_size or self.cfg.data.resolution
        projection = None
        how = family_of(self.t_arch).clip_condition
        if dc.text_condition == "clip_l" and how == "project":
            projection = clip_text_projection(dc.clip).to(self.dev)
        text = TextCondition(dc.text_condition, how, self.t_arch.pooled_dim, projection)
        # every rank holds the same replicated discriminator: its init must not depend on
        # how much of the global RNG stream each rank's model stage consumed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            dinov2 = build_dinov2(dc.dinov2, max(dc.feature_layers) + 1, size)
            net = VFMDiscriminator(dinov2, dc.feature_layers, text.dim, dc.image_size, dc.patch_features,
                                   dc.head_downsample, torch.bfloat16 if dc.precision == "bf16" else torch.float32,
                                   dc.spectral_norm)
        net = net.to(self.dev).eval()
        o = dc.optimizer
        kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        params = list(net.trainable_parameters())
        if self.env.dp > 1:
            # the authors' heads hold 0.77 B parameters: their AdamW states (6 GB in fp32) are sharded over data
            # parallel as megatron's distributed optimizer does for the DiTs (each rank updates its share)
            from torch.distributed.optim import ZeroRedundancyOptimizer

            opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW,
                                          process_group=ps.get_data_parallel_group(), **kw)
        else:
            opt = torch.optim.AdamW(params, **kw)
        return DiscriminatorRole(net, self.codec, opt, DiffAugment(dc.diffaug), text, o.clip_grad, o.warmup_steps)

    # ------------------------------------------------------------------ one iteration
    def train_step(self, batch: dict) -> dict[str, float]:
        return self.objective.step(batch, self.step)

    def _guarded_update(self, role, terms: dict, prefix: str, logs: dict) -> bool:
        """The NaN policy, one rule for every role: step it when all of its loss terms are finite on
        every rank, else drop its grads and count a skip (one decision for all ranks: a skipped update
        must be skipped everywhere or collectives hang)."""
        key = prefix.rstrip("/")
        vals = [float(v) for k, v in terms.items() if k.startswith(prefix)]
        flag = torch.tensor([1.0 if all(math.isfinite(v) for v in vals) else 0.0], device=self.dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() > 0:
            _, norm = role.step()
            logs[f"{key}/grad_norm"], logs[f"{key}/lr"] = norm, role.lr()
            self.updates[role.name] += 1
            return True
        role.zero_grad()
        logs[f"nan/skipped_{key}"] = 1.0
        return False

    def _mean_over_dp(self, logs: dict) -> dict:
        """Loss terms as global-batch means (each DP rank logged its own samples)."""
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float)))
        t = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=self.dev)
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        return {**logs, **{k: float(v) / self.env.dp for k, v in zip(keys, t.tolist())}}

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        c = self.cfg
        resumed = self._maybe_resume()
        if self._startup is not None:
            self._startup.close()
            self._startup = None
        self.monitor = Monitor(self.out, self.env.is_main, c.logging.tensorboard, resume_step=self.step,
                               max_steps=c.train.max_steps)
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(c))
            (self.out / DONE_MARKER).unlink(missing_ok=True)
            (self.out / STOP_MARKER).unlink(missing_ok=True)
            (self.out / FAILED_MARKER).unlink(missing_ok=True)
            print(f"[senseflow] {c.method} on {self.env.world_size} rank(s) tp={self.env.tp} pp={self.env.pp} "
                  f"dp={self.env.dp}; anchors {[round(t, 4) for t in self.taus]}; "
                  + (f"resumed at step {self.step}" if resumed else "fresh start"), flush=True)
            for line in preflight.stand_ins(c):
                print(f"[senseflow] stand-in: {line}", flush=True)
            for line in preflight.notes(c):
                print(f"[senseflow] note: {line}", flush=True)
            if self.step >= c.train.max_steps:
                print(f"[senseflow] nothing to do: {self.out} is at step {self.step} and train.max_steps is "
                      f"{c.train.max_steps}; raise train.max_steps to train further.", flush=True)
        if c.checkpoint.save_on_signal:
            signals.install()  # idempotent; `senseflow train` already did it before importing torch
        data_iter = iter(self.data)
        # megatron-core's distributed optimizer runs a full gc.collect() for every checkpoint it shards (0.5 s
        # per role per save on a CPU process); what exists now (modules, models, optimizers) lives for the whole
        # run, so move it out of the collector's sight: every later collection scans only newer objects
        gc.freeze()
        t_last, last_step = time.time(), self.step
        try:
            while self.step < c.train.max_steps:
                batch = next(data_iter)
                if self.fixed is None:
                    self.fixed = {k: batch[k][: min(4, self.local_batch)].clone() for k in ("text", "pooled")}
                logs = self.train_step(batch)
                self.step += 1
                self._nan_guard(logs)
                evals = {}
                if self.evaluator is not None and self.step % c.eval.every == 0:
                    t_eval = time.time()
                    evals = self.evaluator.run()
                    t_last += time.time() - t_eval  # throughput counts training only
                if c.logging.log_every and self.step % c.logging.log_every == 0:
                    now = time.time()
                    logs = self._mean_over_dp(logs)
                    logs.update(self._perf(now - t_last, self.step - last_step))
                    t_last, last_step = now, self.step
                    self.monitor.scalars(self.step, {**logs, **evals})
                elif evals:
                    self.monitor.scalars(self.step, evals)
                if c.logging.image_every and self.step % c.logging.image_every == 0:
                    self.log_samples()
                self.ckpt.maybe_finalize()
                stop = self._stop_requested()
                periodic = c.checkpoint.every and self.step % c.checkpoint.every == 0
                if stop and self.ckpt.pending is not None:
                    # a save is being written: it becomes the stop-save; a second full save (340 GB for
                    # FLUX) would not fit the signal lead, and the few steps since it began are retrained
                    saved = self.ckpt.pending[0]
                    self.ckpt.finalize()
                    self._stopped(stop, saved)
                    return 0
                if periodic or stop or (self.step == c.train.max_steps and c.checkpoint.at_end):
                    self.save(wait=bool(stop) or self.step == c.train.max_steps)
                    self._check_signal_lead(time.time() - t_last, max(self.step - last_step, 1))
                    # a stop that arrived while this save was written needs no second save of its own
                    stop = stop or (periodic and self._stop_requested())
                if stop:
                    self.ckpt.finalize()
                    self._stopped(stop, self.step)
                    return 0
            self.ckpt.finalize()
            dist.barrier()
            if self.env.is_main:
                (self.out / DONE_MARKER).write_text(json.dumps({"step": self.step}) + "\n")
            return 0
        finally:
            self.data.shutdown()
            self.monitor.close()

    def _nan_guard(self, logs: dict):
        skipped = any(k.startswith("nan/") for k in logs)
        if skipped:
            self.nan_in_a_row += 1
            self.nan_total += 1
            bad = {k: v for k, v in logs.items() if isinstance(v, float) and not math.isfinite(v)}
            if self.env.is_main:
                print(f"[senseflow] step {self.step}: non-finite loss {bad}; update skipped "
                      f"({self.nan_in_a_row} in a row)", flush=True)
                self.monitor.text(self.step, "nan", f"non-finite loss {bad}; update skipped")
            if self.nan_in_a_row >= self.cfg.train.nan_max_consecutive:
                raise TrainingAborted(
                    f"{self.nan_in_a_row} consecutive steps had non-finite losses (last at step {self.step}: {bad}); "
                    f"the last checkpoint is intact. Lower the learning rates or check the data, then rerun."
                )
        else:
            self.nan_in_a_row = 0
        logs["nan/total_skipped"] = float(self.nan_total)

    def _perf(self, seconds: float, steps: int) -> dict[str, float]:
        e = self.env
        flops = 0.0
        for r in (self.G, self.F, self.T):
            bwd = 3.0 if self.cfg.model.recompute == "full" and r.trainable else 2.0
            flops += self._flops[r.name] * (r.forward_calls + bwd * r.backward_calls)
            r.forward_calls = r.backward_calls = 0
        per_gpu = flops / (e.tp * e.pp) / max(seconds, 1e-9)
        out = {
            "perf/samples_per_s": self.local_batch * e.dp * steps / max(seconds, 1e-9),
            "perf/step_time_s": seconds / max(steps, 1),
            "perf/tflops_per_gpu": per_gpu / 1e12,
        }
        peak = self.cfg.logging.peak_tflops or device_peak_tflops(self.dev)
        if peak:
            out["perf/mfu"] = per_gpu / 1e12 / peak
        if self.dev.type == "cuda":
            out["mem/max_allocated_gb"] = torch.cuda.max_memory_allocated(self.dev) / 2**30
        else:
            import psutil

            out["mem/rss_gb"] = psutil.Process().memory_info().rss / 2**30
        return out

    @torch.no_grad()
    def log_samples(self):
        """4-step stochastic and Euler samples of the fixed conditioning into TensorBoard."""
        if self.fixed is None:
            return
        text, pooled = self.fixed["text"], self.fixed["pooled"]
        g = torch.Generator(device=self.dev).manual_seed(self.cfg.train.seed)
        noise = torch.randn(text.shape[0], self.latent_channels, self.latent_side, self.latent_side,
                            generator=g, device=self.dev)
        rows = []
        guide = self.objective.student_guidance(text)
        for mode in ("stochastic", "euler"):
            x0 = sample_student(lambda x, s: self.G.forward(x, s, text, pooled, guide), noise, self.taus, mode, g)
            rows.append(self.codec.decode(x0.float()))
        self.monitor.images(self.step, "samples/stochastic_top_euler_bottom", image_grid(torch.cat(rows), text.shape[0]))

    # ------------------------------------------------------------------ signals
    def _stop_requested(self) -> str | None:
        """Signals reach ranks at different times; stop when any rank has one, all at the same step."""
        if not self.cfg.checkpoint.save_on_signal:
            return None
        mine = signals.received()
        flag = torch.tensor([1.0 if mine else 0.0], device=self.dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            return mine or "signal on another rank"
        return None

    def _stopped(self, why: str, saved: int):
        dist.barrier()
        if self.env.is_main:
            (self.out / STOP_MARKER).write_text(json.dumps({"step": saved, "stopped_at": self.step}) + "\n")
            since = f" ({self.step - saved} step(s) since are retrained after the requeue)" if saved < self.step else ""
            print(f"[senseflow] {why}: saved step {saved}{since}, exiting for requeue", flush=True)

    def _check_signal_lead(self, seconds: float, steps: int):
        """Under Slurm the job script says how long before the time limit the stop signal comes
        (SENSEFLOW_SIGNAL_LEAD); warn once when a step plus two saves would not fit in it (the second
        save is the margin for a stop that arrives while the storage is still busy with the first)."""
        lead = os.environ.get("SENSEFLOW_SIGNAL_LEAD")
        save_s = self.ckpt.last_save_seconds
        if self._lead_checked or not lead or save_s is None or not self.env.is_main:
            return
        self._lead_checked = True
        need = seconds / steps + 2 * save_s
        if float(lead) < need:
            print(f"[senseflow] warning: a save took {save_s:.0f} s and a step {seconds / steps:.0f} s, so a stop "
                  f"needs up to {need:.0f} s but Slurm signals only {float(lead):.0f} s before the time limit; "
                  f"raise --signal-lead to at least {int(need * 1.2) + 1} s or the requeue may lose the stop-save",
                  flush=True)

    # ------------------------------------------------------------------ checkpoints
    def save(self, wait: bool = False):
        """A checkpoint of this step (CheckpointManager says when it is published); asynchronous
        (checkpoint.async_save) unless the run is about to end."""
        self.ckpt.save(self.step, async_save=self.cfg.checkpoint.async_save and not wait)

    def _expected_save_bytes(self) -> float:
        """Size of a first checkpoint from the parameter counts: per trainable DiT its weights, fp32 main copy
        (bf16 weights) and two AdamW moments; the EMA in fp32; the discriminator heads with AdamW."""
        from megatron_senseflow.models.flops import param_count

        elem = 2 if self.dtype == torch.bfloat16 else 4
        n = param_count(self.s_arch)
        total = 2 * n * (elem + (4 if elem == 2 else 0) + 8)
        if self.ema is not None:
            total += 4 * n
        if self.D is not None:
            total += 12 * sum(p.numel() for p in self.D.net.trainable_parameters())
        return float(total)

    def _maybe_resume(self) -> bool:
        if not self.cfg.checkpoint.resume:
            return False
        with self._phase("checking the checkpoints to resume from"):
            latest = self.ckpt.resume_point()
        if latest is None:
            return False
        with self._phase(f"loading {latest}"):
            self.ckpt.load(latest)
        return True

    # the trainer's own checkpoint part: loop counters, NaN counters, the resolved config and the
    # conditioning of the sample grids
    STATE_FILE = "trainer_state.json"

    def save_state(self, step_dir: Path, async_save: bool = False) -> list:
        if not self.env.is_main:
            return []
        state = {
            "step": self.step,
            "updates": self.updates,
            "nan_in_a_row": self.nan_in_a_row,
            "nan_total": self.nan_total,
            "world": {"tp": self.env.tp, "pp": self.env.pp, "dp": self.env.dp},
        }
        (step_dir / self.STATE_FILE).write_text(json.dumps(state, indent=1))
        (step_dir / "config.yaml").write_text(dump_config(self.cfg))
        if self.fixed is not None:
            torch.save(self.fixed, step_dir / "fixed_samples.pt")
        return []

    def load_state(self, step_dir: Path) -> None:
        state = json.loads((step_dir / self.STATE_FILE).read_text())
        self.step = state["step"]
        self.updates = state["updates"]
        self.nan_in_a_row, self.nan_total = state["nan_in_a_row"], state["nan_total"]
        if state["world"] != {"tp": self.env.tp, "pp": self.env.pp, "dp": self.env.dp} and self.env.is_main:
            print(f"[senseflow] resuming {step_dir} (saved at {state['world']}) on tp={self.env.tp} pp={self.env.pp} "
                  f"dp={self.env.dp}; weights and optimizer states are resharded at load.", flush=True)
        fixed = step_dir / "fixed_samples.pt"
        if fixed.is_file():
            self.fixed = torch.load(fixed, map_location=self.dev, weights_only=True)


def run_training(cfg: Config, env: DistEnv) -> int:
    """Build and run (the Trainer checks the config first); a run that cannot go on raises errors.RunEnded (its
    exit code says why)."""
    return Trainer(cfg, env).run()


