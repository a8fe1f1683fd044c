"""Distillation objectives as methods over the same roles: each owns one whole iteration.

`Objective.step(batch, step) -> logs` is the iteration (docs/design.md, "One iteration"):
1. student input at anchor tau_i: a real latent noised to tau_i, or (with
   probability `backward_sim_prob`) G run from pure noise down to tau_i;
2. x0_hat = G(x_tau);
3. every `ttur`-th iteration a generator update (DMD / SiD, ISG, GAN), then
   IDA into the fake score and the EMA;
4. every iteration a fake-score update (flow matching on sg(x0_hat)) and a
   discriminator update (hinge, real vs sg(decode(x0_hat))).
The trainer owns the loop around it: data, the NaN policy (`UpdateGuard`),
signals, checkpoints and logging.

Generator update, two paths with the same gradients (tested):
- single pass (PP = 1): the grad forward's own detached output feeds the
  teacher / fake-score targets inside the loss;
- two passes (PP > 1): the targets need other pipelines, so a no-grad G pass
  comes first and megatron's forward-backward then trains G against fixed targets.
All randomness comes from per-sample streams (rng.py) drawn in a fixed order,
so a resumed run repeats the uninterrupted one exactly, on any layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from . import flow, losses
from .config import Config
from .rng import BatchRandom, sample_ids
from .roles import Roles, ida_blend


class UpdateGuard(Protocol):
    """The trainer's NaN policy for one role update (trainer.py): step it, or skip it on every rank."""

    def __call__(self, role, terms: dict, prefix: str, logs: dict) -> bool: ...


@dataclass
class IterState:
    """Tensors one iteration shares between its steps (full local batch, every rank of a replica)."""

    x_tau: torch.Tensor
    tau: torch.Tensor
    tau_next: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor
    neg_text: torch.Tensor | None
    neg_pooled: torch.Tensor | None
    guidance: torch.Tensor
    real_image: torch.Tensor | None
    ref_maps: list[torch.Tensor] | None = None
    x0_hat: torch.Tensor | None = None
    logs: dict[str, float] = field(default_factory=dict)


class Objective:
    """SenseFlow: DMD + ISG + IDA + GAN. Subclasses switch terms off or replace DMD."""

    name = "senseflow"
    use_isg = True
    use_ida = True
    uses_discriminator = True

    @classmethod
    def wants_discriminator(cls, cfg: Config) -> bool:
        """The one place that decides whether a run builds and trains the discriminator."""
        return cls.uses_discriminator and cfg.roles.discriminator.enabled

    def __init__(self, cfg: Config, roles: Roles, taus: list[float], env, guard: UpdateGuard,
                 force_two_pass: bool = False):
        self.cfg, self.d = cfg, cfg.distill
        self.roles = roles
        self.G, self.F, self.T, self.D = roles.generator, roles.fake_score, roles.teacher, roles.discriminator
        self.taus = taus
        self.env = env
        self.guard = guard
        self.local_batch = cfg.data.micro_batch_size * cfg.parallel.num_microbatches
        self.rnd: BatchRandom | None = None
        self.gen_aug_rnd: BatchRandom | None = None
        self.disc_aug_rnd: BatchRandom | None = None
        self.use_gan = self.D is not None
        self.two_pass = force_two_pass or self.G.pp > 1

    # ------------------------------------------------------------------ one iteration
    def step(self, batch: dict, step: int) -> dict[str, float]:
        """One iteration: generator update every `ttur`-th, then fake score and discriminator."""
        if self.D is not None and "image" not in batch:
            with torch.no_grad():  # shards without pixels: the real image is the decoded real latent
                batch["image"] = self.D.codec.decode(batch["latent"].float())
        self.begin(step)
        st = self.student_input(batch)
        self.reference_maps(st)
        logs: dict[str, float] = {}
        # the fake score and discriminator update every iteration, the generator every ttur-th, after
        # the fake score had ttur - 1 updates of its own (and on logged steps when log_every % ttur == 0)
        if (step + 1) % self.d.ttur == 0:
            v0 = self.generator_update(st)
            if self.guard(self.G, st.logs, "gen/", logs):
                self.after_generator_update(logs)
        else:
            v0 = self.g_velocity(st, st.x_tau, st.tau)
        st.x0_hat = flow.x0_from_v(st.x_tau, st.tau, v0).detach()
        self.fake_update(st)
        self.guard(self.F, st.logs, "fake/", logs)
        if self.D is not None:
            self.discriminator_update(st, logs)
        logs.update(st.logs)
        return logs

    def after_generator_update(self, logs: dict) -> None:
        """IDA into the fake score and the generator EMA, after each generator update."""
        if self.use_ida:
            sq = ida_blend(self.F, self.G, self.d.ida_lambda)
            logs["ida/phi_minus_theta"] = math.sqrt(self.env.sum_over_model_parallel(sq))
        if self.roles.ema is not None:
            self.roles.ema.update()

    # ------------------------------------------------------------------ randomness
    def begin(self, step: int) -> None:
        """Per-sample random streams of this iteration (rng.py).

        Three streams: noise and timesteps; the augmentation of the generator's GAN
        term, which under PP only the last stage evaluates; the augmentation of the
        discriminator step, which every rank runs. Separate streams keep the last two
        in step on all ranks.
        """
        seed, dev = self.cfg.train.seed, self.env.device
        ids = sample_ids(step, self.local_batch * self.env.dp, self.env.dp_rank, self.local_batch)
        self.rnd = BatchRandom(seed, 0, step, ids, dev)
        self.gen_aug_rnd = BatchRandom(seed, 1, step, ids, dev)
        self.disc_aug_rnd = BatchRandom(seed, 2, step, ids, dev)

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        return self.rnd.randn_like(like)

    def _rand(self) -> torch.Tensor:
        return self.rnd.rand()

    def _timesteps(self, kind: str) -> torch.Tensor:
        d = self.d
        if kind == "uniform":
            return flow.uniform(self.rnd.rand(), d.dmd_t_min, d.dmd_t_max)
        return flow.logit_normal(self.rnd.randn(), d.logit_normal_mean, d.logit_normal_std)

    def student_guidance(self, st: IterState):
        return st.guidance if self.G.arch.guidance_embeds else None

    def g_velocity(self, st: IterState, x, sigma):
        return self.G.forward(x, sigma, st.text, st.pooled, self.student_guidance(st))

    def teacher_velocity(self, st: IterState, x, sigma):
        """Teacher with guidance: FLUX's guidance embedding, or real CFG with the empty-prompt branch."""
        if self.d.guidance_mode == "embedding":
            return self.T.forward(x, sigma, st.text, st.pooled, st.guidance)
        g_in = torch.ones_like(st.guidance) if self.T.arch.guidance_embeds else None
        v_c = self.T.forward(x, sigma, st.text, st.pooled, g_in)
        if bool((st.guidance == 1.0).all()):
            return v_c  # scale 1 is the conditional model: skip the empty-prompt pass
        v_u = self.T.forward(x, sigma, st.neg_text, st.neg_pooled, g_in)
        return v_u + flow.bcast(st.guidance, v_c) * (v_c - v_u)

    # ------------------------------------------------------------------ step 1
    def student_input(self, batch: dict) -> IterState:
        x0 = batch["latent"]
        b, k = x0.shape[0], len(self.taus)
        idx = self.rnd.randint(k)
        use_sim = self._rand() < self.d.backward_sim_prob
        guidance = flow.uniform(self._rand(), self.d.guidance_min, self.d.guidance_max)
        st = IterState(
            x_tau=x0,
            tau=flow.anchor_values(self.taus, idx),
            tau_next=flow.next_anchor(self.taus, idx),
            text=batch["text"],
            pooled=batch["pooled"],
            neg_text=batch.get("neg_text"),
            neg_pooled=batch.get("neg_pooled"),
            guidance=guidance,
            real_image=batch.get("image"),
        )
        eps = self._randn(x0)
        x_real = flow.noise(x0, eps, st.tau)
        # backward simulation: G from pure noise down to tau_i, fresh noise at each re-noise.
        # Every sample draws all its noises up front, so its stream does not depend on
        # how far the other samples of this (layout-dependent) local batch simulate.
        x_sim = self._randn(x0)
        renoise = [self._randn(x0) for _ in range(k - 1)]
        for step in range(k - 1):
            active = use_sim & (idx > step)
            if not bool(active.any()):
                break  # the same decision on every rank of the replica (same samples)
            sigma = torch.full((b,), self.taus[step], device=x0.device)
            x0_sim = flow.x0_from_v(x_sim, sigma, self.g_velocity(st, x_sim, sigma))
            renoised = flow.noise(x0_sim, renoise[step], torch.full_like(sigma, self.taus[step + 1]))
            x_sim = torch.where(flow.bcast(active, x0).bool(), renoised, x_sim)
        st.x_tau = torch.where(flow.bcast(use_sim, x0).bool(), x_sim, x_real)
        st.logs["backward_sim_fraction"] = float(use_sim.float().mean())
        return st

    # ------------------------------------------------------------------ generator targets and loss
    def generator_targets(self, st: IterState, v0: torch.Tensor) -> dict:
        x0_hat = flow.x0_from_v(st.x_tau, st.tau, v0)
        t = self._timesteps(self.d.dmd_t_sampling)
        x_t = flow.noise(x0_hat, self._randn(x0_hat), t)
        x0_real = flow.x0_from_v(x_t, t, self.teacher_velocity(st, x_t, t))
        x0_fake = flow.x0_from_v(x_t, t, self.F.forward(x_t, t, st.text, st.pooled))
        targets = self.distribution_targets(x0_hat, x0_real, x0_fake, t)
        if self.use_isg:
            # t_mid strictly inside (tau_{i+1}, tau_i)
            u = self._rand().clamp(1e-3, 1 - 1e-3)
            t_mid = st.tau_next + (st.tau - st.tau_next) * u
            x_mid = flow.euler(st.x_tau, st.tau, t_mid, self.teacher_velocity(st, st.x_tau, st.tau))
            targets["x_tar"] = flow.euler(x_mid, t_mid, st.tau_next, self.g_velocity(st, x_mid, t_mid))
        return targets

    def distribution_targets(self, x0_hat, x0_real, x0_fake, t) -> dict:
        return {"dmd_grad": losses.dmd_gradient(x0_hat, x0_real, x0_fake)}

    def distribution_loss(self, x0, targets, sl) -> tuple[str, torch.Tensor, float]:
        return "dmd", losses.dmd_loss(x0, targets["dmd_grad"][sl]), self.d.dmd_weight

    def generator_loss(self, st: IterState, v: torch.Tensor, targets: dict, sl: slice):
        x_tau, tau, tau_next = st.x_tau[sl], st.tau[sl], st.tau_next[sl]
        x0 = flow.x0_from_v(x_tau, tau, v)
        name, term, weight = self.distribution_loss(x0, targets, sl)
        total = weight * term
        logs = {f"gen/{name}": term.detach()}
        if self.use_isg:
            isg = losses.isg_loss(flow.euler(x_tau, tau, tau_next, v), targets["x_tar"][sl], self.d.pseudo_huber_c)
            total = total + self.d.isg_weight * isg
            logs["gen/isg"] = isg.detach()
        if self.use_gan:
            fake = self.D.augment(self.D.codec.decode(x0), self.gen_aug_rnd.sub(sl))
            refs = [r[sl] for r in st.ref_maps]
            with _frozen(self.D.net.heads):
                logits = self.D.net(fake, st.pooled[sl], refs)
            gan = losses.gan_generator_loss(logits, losses.gan_weight(tau, self.d.gan_weight_power))
            total = total + self.d.gan_weight * gan
            logs["gen/gan"] = gan.detach()
        logs["gen/total"] = total.detach()
        return total, logs

    def generator_update(self, st: IterState) -> torch.Tensor:
        """Accumulates G's grads; returns the detached velocity of this iteration's G forward."""
        g = self.student_guidance(st)
        self.G.zero_grad()
        if self.two_pass:
            v0 = self.g_velocity(st, st.x_tau, st.tau)
            targets = self.generator_targets(st, v0)
            logs = self.G.loss_backward(st.x_tau, st.tau, st.text, st.pooled, g,
                                        lambda v, sl: self.generator_loss(st, v, targets, sl))
        else:
            box = {}

            def single_pass(v, sl):
                box["v0"] = v.detach()
                return self.generator_loss(st, v, self.generator_targets(st, v.detach()), sl)

            logs = self.G.loss_backward(st.x_tau, st.tau, st.text, st.pooled, g, single_pass)
            v0 = box["v0"]
        st.logs.update(logs)
        return v0

    # ------------------------------------------------------------------ fake score and discriminator
    def fake_update(self, st: IterState):
        self.F.zero_grad()
        x0 = st.x0_hat
        t = self._timesteps("logit_normal")
        eps = self._randn(x0)
        x_t = flow.noise(x0, eps, t)

        def fm(v, sl):
            loss = losses.flow_matching_loss(v, eps[sl], x0[sl])
            return loss, {"fake/fm": loss.detach()}

        st.logs.update(self.F.loss_backward(x_t, t, st.text, st.pooled, None, fm))

    def reference_maps(self, st: IterState):
        if self.use_gan:
            with torch.no_grad():
                st.ref_maps = self.D.net.reference_maps(st.real_image)

    def discriminator_update(self, st: IterState, logs: dict) -> None:
        self.D.zero_grad()
        self.D.net.advance_spectral_norm()
        with torch.no_grad():
            fake = self.D.codec.decode(st.x0_hat)
        real_logits = self.D.net(self.D.augment(st.real_image, self.disc_aug_rnd), st.pooled, st.ref_maps)
        fake_logits = self.D.net(self.D.augment(fake, self.disc_aug_rnd), st.pooled, st.ref_maps)
        loss = losses.hinge_d_loss(real_logits, fake_logits)
        st.logs.update({"disc/loss": float(loss.detach()), "disc/logit_real": float(real_logits.detach().mean()),
                        "disc/logit_fake": float(fake_logits.detach().mean())})
        loss.backward()
        self.guard(self.D, st.logs, "disc/", logs)


class DMD2(Objective):
    """The baseline: DMD + GAN, without IDA and ISG."""

    name = "dmd2"
    use_isg = False
    use_ida = False


class SiD(Objective):
    """Score identity Distillation for flow models; fake score trained with the same flow-matching loss."""

    name = "sid"
    use_isg = False
    use_ida = False
    uses_discriminator = False

    def distribution_targets(self, x0_hat, x0_real, x0_fake, t) -> dict:
        return {"y_real": x0_real, "y_fake": x0_fake, "w": losses.sid_weight(t, self.d.sid_weighting)}

    def distribution_loss(self, x0, targets, sl):
        term = losses.sid_loss(x0, targets["y_real"][sl], targets["y_fake"][sl], targets["w"][sl], self.d.sid_alpha)
        return "sid", term, self.d.dmd_weight


OBJECTIVES = {"senseflow": Objective, "dmd2": DMD2, "sid": SiD}


class _frozen:
    """Stop the generator's GAN term from writing discriminator grads (it still differentiates through D)."""

    def __init__(self, module: torch.nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
        return False
