"""SiD as SiD-DiT runs it: the generator gradient is autograd of the SiD loss through the teacher and the
fake score with respect to their input (written out here with plain modules), at TP1, TP2 and PP2, and it
depends on alpha."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.trainer_helpers import make_teacher

pytestmark = pytest.mark.slow

# SiD-DiT's recipe on the tiny FLUX teacher: data-free, shared k, CFG with the scale as FLUX's guidance
# embedding too (teacher 2.0, fake score 1.5), a student that keeps the embedder
SID = ["method=sid", "model.student_guidance_embeds=true", "distill.guidance_mode=cfg_and_embedding",
       "distill.dmd_guidance=[2.0,2.0]", "distill.fake_guidance=1.5", "distill.backward_sim_prob=1.0",
       "distill.anchor_draw=per_iteration", "distill.shift=1.0", "distill.ttur=1",
       "distill.dmd_timesteps.kind=logit_normal", "distill.dmd_timesteps.mean=0.6931472", "distill.dmd_timesteps.std=1.6",
       "distill.sid_weighting=one_minus_sigma", "distill.sid_loss_scale=100.0", "checkpoint.every=0",
       "checkpoint.at_end=false",
       "data.micro_batch_size=2"]
STEP = 3  # an iteration whose shared anchor draw needs backward simulation through G


def _trainer(env, teacher, alpha, extra=()):
    from megatron_senseflow.config import load_config
    from megatron_senseflow.trainer import Trainer

    cfg = load_config("tiny", [f"roles.teacher.checkpoint={teacher}", "train.output_dir=/nonexistent", *SID,
                               f"distill.sid_alpha={alpha}", f"parallel.tp={env.tp}", f"parallel.pp={env.pp}", *extra])
    tr = Trainer(cfg, env)
    batch = next(iter(tr.data))
    tr.objective.begin(STEP)
    return tr, tr.objective.student_input(batch)


def _ours(env, teacher, alpha, out, extra=()):
    """The trainer's SiD generator update at this layout; G's reduced gradients saved as a role checkpoint."""
    from megatron.core.distributed import finalize_model_grads

    from megatron_senseflow.models.checkpoint_io import save_model

    tr, st = _trainer(env, teacher, alpha, extra)
    tr.objective.generator_update(st)
    finalize_model_grads([tr.G.ddp])
    with torch.no_grad():
        for p in tr.G.module.parameters():
            p.copy_(p.main_grad)
    save_model(tr.G.module, tr.G.arch, out)
    return int(st.idx[0])


def _reference(env, teacher, alpha):
    """SiD-DiT's generator loss by hand on whole (TP1) modules, autograd through everything:
    x_g = x - tau G(x); x_t = (1 - s) x_g + s eps; y = x_t - s CFG_c(net(x_t)) for teacher and fake score;
    L = lsg * mean_b (1 - s_b) sum (y_r - y_f) ((y_r - x_g) - alpha (y_r - y_f))."""
    from megatron_senseflow import flow
    from megatron_senseflow.methods import draw_sigma

    tr, st = _trainer(env, teacher, alpha)
    d = tr.cfg.distill
    s = draw_sigma(d.dmd_timesteps, tr.objective.rnd)  # the draws generator_targets makes, in its order
    eps = tr.objective.rnd.randn_like(st.x_tau)
    b = st.x_tau.shape[0]

    def vel(role, x, sigma, text, pooled, g):
        den = role.denoiser
        return den.velocity(role.module(**den.kwargs(x, sigma, text, pooled, g)), x)

    def cfg_vel(role, x, scale):
        g = torch.full((b,), scale)  # cfg_and_embedding: the scale is the guidance embedding too
        v_c, v_u = vel(role, x, s, st.text, st.pooled, g), vel(role, x, s, st.neg_text, st.neg_pooled, g)
        return v_u + scale * (v_c - v_u)

    for p in [*tr.T.module.parameters(), *tr.F.module.parameters()]:
        p.requires_grad_(False)
    v = vel(tr.G, st.x_tau, st.tau, st.text, st.pooled, torch.ones(b))
    x_g = st.x_tau - st.tau.view(-1, 1, 1, 1) * v
    x_t = (1 - s.view(-1, 1, 1, 1)) * x_g + s.view(-1, 1, 1, 1) * eps
    y_r = x_t - s.view(-1, 1, 1, 1) * cfg_vel(tr.T, x_t, d.dmd_guidance[0])
    y_f = x_t - s.view(-1, 1, 1, 1) * cfg_vel(tr.F, x_t, d.fake_guidance)
    per = ((y_r - y_f) * ((y_r - x_g) - alpha * (y_r - y_f))).flatten(1).sum(1)
    loss = d.sid_loss_scale * ((1 - s) * per).mean()
    names = [n for n, _ in tr.G.module.named_parameters()]
    grads = torch.autograd.grad(loss, list(tr.G.module.parameters()))
    assert flow  # (imported for the reader: the conventions are flow.py's)
    return {tr.G.module.global_name(n): g for n, g in zip(names, grads)}


def _load_grads(env, directory):
    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.checkpoint_io import checkpoint_arch, load_model

    arch = checkpoint_arch(directory)
    m = build_model(arch, transformer_config(arch))
    load_model(m, arch, directory)
    return {m.global_name(n): p.detach().clone() for n, p in m.named_parameters()}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("sid_teacher") / "ckpt")


@pytest.fixture(scope="module")
def reference(teacher):
    return {a: run_distributed(_reference, 1, str(teacher), a)[0] for a in (1.0, 1.2)}


def _worst(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)).item() for k in want)


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_sid_generator_gradient_is_autograd_through_teacher_and_fake_score(teacher, reference, tmp_path, layout):
    world, tp, pp, extra = {"tp1": (1, 1, 1, ()), "tp2": (2, 2, 1, ()),
                            "pp2": (2, 1, 2, ("data.micro_batch_size=1", "parallel.num_microbatches=2"))}[layout]
    out = tmp_path / "grads"
    idx = run_distributed(_ours, world, str(teacher), 1.2, str(out), extra, tp=tp, pp=pp)[0]
    assert idx > 0  # the student input went through backward simulation
    got = run_distributed(_load_grads, 1, str(out))[0]
    assert sum(g.norm().item() for g in got.values()) > 0
    assert _worst(got, reference[1.2]) < 2e-4, layout


def test_alpha_changes_the_gradient(reference):
    """With y_r and y_f detached the loss is linear in x_g and its gradient does not depend on alpha at all
    (exactly equal); through the networks, alpha's term -alpha |y_r - y_f|^2 has a gradient of its own
    (small here: the fake score starts as the teacher, so y_r - y_f is only the guidance difference)."""
    assert _worst(reference[1.0], reference[1.2]) > 1e-4
