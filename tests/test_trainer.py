"""The SenseFlow trainer on the tiny recipe: layouts agree, both generator paths agree, IDA moves the
fp32 masters, methods and families run, the NaN guard skips and aborts, TensorBoard reads back."""
from __future__ import annotations

import json

import math
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.trainer_helpers import make_teacher, metrics, train_inprocess

pytestmark = pytest.mark.slow

COMMON = ["checkpoint.every=0", "checkpoint.at_end=false", "logging.log_every=1"]
TERMS = ["gen/dmd", "gen/isg", "gen/gan", "fake/fm", "disc/loss", "disc/logit_real", "disc/logit_fake"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "ckpt")


# (world, tp, pp, extra overrides): the global batch is 4 samples in every layout
LAYOUTS = {
    "tp1pp1dp1": (1, 1, 1, ["data.micro_batch_size=4"]),
    "tp2": (2, 2, 1, ["data.micro_batch_size=4"]),
    "pp2": (2, 1, 2, ["data.micro_batch_size=2", "parallel.num_microbatches=2"]),
    "dp2": (2, 1, 1, ["data.micro_batch_size=2"]),
    "tp2pp2": (4, 2, 2, ["data.micro_batch_size=2", "parallel.num_microbatches=2"]),
}


# the production recipes' discriminator (the heads' update carries the generator's GAN gradient, which under
# PP only the last stage computes; the authors' spectral norm)
AUTHORS_DISCRIMINATOR = ["roles.discriminator.generator_grad=carried", "roles.discriminator.spectral_norm=authors"]


@pytest.fixture(scope="module")
def layout_runs(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for name, (world, tp, pp, extra) in LAYOUTS.items():
        d = root / name
        train_inprocess(world, [f"roles.teacher.checkpoint={teacher}", "train.max_steps=4", f"train.output_dir={d}",
                                *COMMON, *AUTHORS_DISCRIMINATOR, *extra], tp=tp, pp=pp)
        out[name] = metrics(d)
        # checkpoint.at_end=false (with every=0): the run ends as done and writes no checkpoint
        assert json.loads((d / "DONE").read_text()) == {"step": 4} and not list(d.glob("checkpoints/step_*")), name
    return out


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "tp1pp1dp1"])
def test_layouts_give_the_same_losses(layout_runs, layout):
    """(TP, PP, DP) = (2,1,1), (1,2,1), (1,1,2), (2,2,1) against (1,1,1): every loss term of the first
    four iterations (two generator updates with IDA, four fake and discriminator updates), with the authors'
    discriminator update: a carried generator gradient missing on some rank would show from iteration 2 on."""
    base, other = layout_runs["tp1pp1dp1"], layout_runs[layout]
    assert len(base) == len(other) == 4
    compared = 0
    for a, b in zip(base, other):
        for k in TERMS:
            if k in a:
                assert k in b, (layout, k)
                # a mean logit is a sum of terms of both signs: its rounding is absolute, not relative
                tol = dict(rel=2e-5, abs=2e-6 if k.startswith("disc/logit") else 1e-7)
                assert b[k] == pytest.approx(a[k], **tol), (layout, a["step"], k, a[k], b[k])
                compared += 1
    assert compared >= 17


def _generator_grads(env, teacher, two_pass):
    from megatron_senseflow.config import load_config
    from megatron_senseflow.trainer import Trainer

    cfg = load_config("tiny", [f"roles.teacher.checkpoint={teacher}", "train.output_dir=/nonexistent"])
    tr = Trainer(cfg, env, force_two_pass=two_pass)
    batch = next(iter(tr.data))
    batch["image"] = tr.codec.decode(batch["latent"])
    tr.objective.begin(0)
    st = tr.objective.student_input(batch)
    tr.objective.reference_maps(st)
    v0 = tr.objective.generator_update(st)
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads([tr.G.ddp])
    grads = {n: p.main_grad.clone() for n, p in tr.G.module.named_parameters()}
    return {"grads": grads, "v0": v0, "logs": {k: v for k, v in st.logs.items() if k.startswith("gen/")}}


def test_single_pass_and_two_pass_generator_updates_give_the_same_gradients(teacher):
    one = run_distributed(_generator_grads, 1, str(teacher), False)[0]
    two = run_distributed(_generator_grads, 1, str(teacher), True)[0]
    assert torch.equal(one["v0"], two["v0"])
    for k, v in one["logs"].items():
        assert two["logs"][k] == pytest.approx(v, rel=1e-6, abs=1e-9)
    assert set(one["grads"]) == set(two["grads"])
    worst = max(((one["grads"][k] - two["grads"][k]).norm() / one["grads"][k].norm().clamp_min(1e-12)).item()
                for k in one["grads"])
    assert worst < 1e-6
    assert sum(g.norm().item() for g in one["grads"].values()) > 0  # the test would notice missing grads


def _authors_disc_update_body(env, teacher, mode):
    """One generator iteration of the tiny recipe with the authors' discriminator switches; returns the heads'
    grads as the discriminator's step receives them and what the authors' lines give from the same inputs."""
    import copy

    from torch.nn.utils import parametrize

    from megatron_senseflow import losses
    from megatron_senseflow.config import load_config
    from megatron_senseflow.trainer import Trainer

    cfg = load_config("tiny", [f"roles.teacher.checkpoint={teacher}", "train.output_dir=/nonexistent",
                               f"roles.discriminator.generator_grad={mode}", "roles.discriminator.spectral_norm=authors"])
    tr = Trainer(cfg, env)
    D = tr.roles.discriminator
    start = copy.deepcopy(D.net)  # the heads and their u, v before the iteration
    calls, seen = [], {}
    forward, step, hinge = D.net.forward, D.step, losses.hinge_d_terms

    def record_forward(images, text, refs):
        calls.append((images.detach().clone(), text.detach().clone(), [r.detach().clone() for r in refs]))
        return forward(images, text, refs)

    def record_step():
        seen["grads"] = [p.grad.clone() for p in D.net.trainable_parameters()]
        return step()

    def record_hinge(real, fake, w):
        seen["w"] = w.detach().clone()
        return hinge(real, fake, w)

    D.net.forward, D.step, losses.hinge_d_terms = record_forward, record_step, record_hinge
    try:
        logs = tr.objective.step(next(iter(tr.data)), 1)  # ttur 2: iteration 1 updates the generator
    finally:
        losses.hinge_d_terms = hinge
    assert "gen/gan" in logs and len(calls) == 3  # the generator's GAN term, then real, then fake

    # the authors' lines (F train(), V): heads in training mode, so each forward advances u, v once
    net = start
    for m in net.heads.modules():
        if parametrize.is_parametrized(m, "weight"):
            m.parametrizations.weight[0].train()
    w, gan_weight = seen["w"], cfg.distill.gan_weight
    (gen_img, text, refs), (real_img, _, _), (fake_img, _, _) = calls
    # l_g_gan = gan_weight * cri_gan(fake_g_pred, True, is_disc=False, keepdim=True); generator_loss +=
    # (timew * l_g_gan).mean(); generator_loss.backward() (DMD and ISG do not reach the heads)
    l_g_gan = gan_weight * -net(gen_img, text, refs).mean(dim=1)
    if mode != "dropped":  # ('dropped': the pass happens, advancing u and v, but leaves nothing on the heads)
        (w * l_g_gan).mean().backward()
    # optimizer_d is not zeroed here: l_d_real.backward(); l_d_fake.backward()
    torch.mean(torch.relu(1 - net(real_img, text, refs)).mean(dim=1) * w).backward()
    torch.mean(torch.relu(1 + net(fake_img, text, refs)).mean(dim=1) * w).backward()
    return {"got": seen["grads"], "want": [p.grad.clone() for p in net.heads.parameters()],
            "carried": logs.get("disc/carried_grad_norm")}


@pytest.mark.parametrize("mode", ["carried", "dropped"])
def test_discriminator_update_is_the_authors_on_generator_iterations(teacher, mode):
    """roles.discriminator.generator_grad=carried: the heads' update on a generator iteration is the generator's
    GAN gradient plus the hinge's, as the authors' train() leaves it (optimizer_d zeroed only after its step),
    with their spectral norm advancing at each of the three passes; 'dropped' leaves the hinge's alone."""
    r = run_distributed(_authors_disc_update_body, 1, str(teacher), mode)[0]
    assert len(r["got"]) == len(r["want"]) > 0
    for g, w in zip(r["got"], r["want"]):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-7), (g - w).abs().max()
    if mode == "carried":  # large enough that leaving it out would fail the comparison above
        assert r["carried"] > 0.01 * math.sqrt(sum(float(w.square().sum()) for w in r["want"]))


def _ida_bf16_body(env, lam):
    """G and F differ; IDA then one fake-score step with zero gradient: AdamW moves nothing, so the
    weights must be the blend. If IDA blended only the bf16 weights, the step would write F's old
    fp32 master back."""
    from megatron_senseflow.config import OptimizerConfig, ParallelConfig
    from megatron_senseflow.roles import build_role
    from megatron_senseflow.weights import ida_blend
    from megatron_senseflow.models import transformer_config
    from megatron_senseflow.models.configs import make_arch

    arch = make_arch("tiny-flux", {"guidance_embeds": False})
    tc = transformer_config(arch, tp=env.tp, params_dtype=torch.bfloat16)
    par = ParallelConfig(tp=env.tp, distributed_optimizer=True)

    def init(seed):
        def fn(module):
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
        return fn

    opt = OptimizerConfig(lr=1e-2, clip_grad=0.0)
    roles = [build_role(n, arch, tc, spec="local", pp_split=None, tokens=(16, 4), optimizer_cfg=opt, parallel=par,
                        init_fn=init(s)) for n, s in (("generator", 1), ("fake_score", 2))]
    G, F = roles
    theta = [p.detach().float().clone() for p in G.module.parameters()]
    phi = [p.detach().float().clone() for p in F.module.parameters()]
    ida_blend(F, G, lam)
    F.zero_grad()
    ok, _ = F.step()  # zero grads everywhere
    want = [(lam * f + (1 - lam) * t).to(torch.bfloat16).float() for f, t in zip(phi, theta)]
    got = [p.detach().float() for p in F.module.parameters()]
    before = max((g - w).abs().max().item() for g, w in zip(got, want))
    stale = max((g - f).abs().max().item() for g, f in zip(got, phi))
    return {"ok": ok, "err": before, "moved": stale, "n_main": len(__import__("megatron_senseflow.weights", fromlist=["x"]).main_param_shards(F.optimizer))}


def test_ida_blends_fp32_main_weights_of_the_distributed_optimizer():
    for r in run_distributed(_ida_bf16_body, 4, 0.75, tp=2):  # TP=2 x DP=2, bf16, ZeRO-1
        assert r["n_main"] > 0  # bf16 params have fp32 masters to blend
        assert r["err"] == 0.0, r  # exactly the bf16 rounding of the fp32 blend
        assert r["moved"] > 0.1  # the weights did move to the blend


def _ida_gathered_body(env, directory, phase):
    """phase 'split': blend at this layout and save; phase 'whole': blend at TP1/PP1 and compare."""
    from megatron_senseflow.config import OptimizerConfig, ParallelConfig
    from megatron_senseflow.roles import build_role
    from megatron_senseflow.weights import ida_blend
    from megatron_senseflow.models import transformer_config
    from megatron_senseflow.models.checkpoint_io import load_model, save_model
    from megatron_senseflow.models.configs import make_arch

    arch = make_arch("tiny-flux", {"guidance_embeds": False})
    tc = transformer_config(arch, tp=env.tp, pp=env.pp)
    par = ParallelConfig(tp=env.tp, pp=env.pp)

    def init_from(path):
        return lambda m: load_model(m, arch, path)

    opt = OptimizerConfig(lr=1e-3)
    G = build_role("generator", arch, tc, spec="local", pp_split=None, tokens=(16, 4), optimizer_cfg=opt,
                   parallel=par, init_fn=init_from(f"{directory}/g"))
    F = build_role("fake_score", arch, tc, spec="local", pp_split=None, tokens=(16, 4), optimizer_cfg=opt,
                   parallel=par, init_fn=init_from(f"{directory}/f"))
    ida_blend(F, G, 0.9)
    save_model(F.module, arch, f"{directory}/blend_{phase}")
    return True


def _make_two_models(env, directory):
    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.checkpoint_io import save_model
    from megatron_senseflow.models.configs import make_arch

    arch = make_arch("tiny-flux", {"guidance_embeds": False})
    for name, seed in (("g", 3), ("f", 4)):
        torch.manual_seed(seed)
        m = build_model(arch, transformer_config(arch))
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.1)
        save_model(m, arch, f"{directory}/{name}")
    return True


def _compare_ckpts(env, a, b):
    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.checkpoint_io import load_model
    from megatron_senseflow.models.configs import make_arch

    arch = make_arch("tiny-flux", {"guidance_embeds": False})
    ma, mb = (build_model(arch, transformer_config(arch)) for _ in range(2))
    load_model(ma, arch, a), load_model(mb, arch, b)
    return max((p - q).abs().max().item() for p, q in zip(ma.parameters(), mb.parameters()))


def test_ida_gathered_over_tp_pp_equals_blend_of_gathered(tmp_path):
    run_distributed(_make_two_models, 1, str(tmp_path))
    run_distributed(_ida_gathered_body, 4, str(tmp_path), "split", tp=2, pp=2)
    run_distributed(_ida_gathered_body, 1, str(tmp_path), "whole")
    assert run_distributed(_compare_ckpts, 1, str(tmp_path / "blend_split"), str(tmp_path / "blend_whole")) == [0.0]


@pytest.mark.parametrize("method,terms,absent", [
    ("dmd2", ["gen/dmd", "gen/gan", "disc/loss"], ["gen/isg", "ida/phi_minus_theta"]),
    ("sid", ["gen/sid"], ["gen/isg", "gen/gan", "disc/loss", "ida/phi_minus_theta"]),
])
def test_other_objectives_share_the_loop(teacher, tmp_path, method, terms, absent):
    train_inprocess(1, [f"roles.teacher.checkpoint={teacher}", f"method={method}", "train.max_steps=2",
                        f"train.output_dir={tmp_path}", *COMMON])
    first = metrics(tmp_path)[1]  # iteration 2: the first generator update (ttur=2)
    for k in terms:
        assert k in first and math.isfinite(first[k]), (k, first)
    for k in absent:
        assert k not in first, (k, first)


def test_sd3_family_with_real_cfg(tmp_path):
    t = make_teacher(tmp_path / "sd3_teacher", preset="tiny-sd3")
    sd35_laws = ["distill.shift=3.0", "distill.dmd_timesteps.kind=uniform_index", "distill.dmd_timesteps.shift=3.0",
                 "distill.fake_timesteps.shift=3.0", "distill.isg_grid=scheduler_index", "distill.isg_margin=50",
                 "distill.gan_time_weight=scheduler_table_sq", "distill.dmd_guidance=[2.0,8.0]",
                 "distill.isg_guidance=[2.0,4.0]"]
    train_inprocess(2, [f"roles.teacher.checkpoint={t}", "model.preset=tiny-sd3", "distill.guidance_mode=cfg", *sd35_laws,
                        "train.max_steps=2", f"train.output_dir={tmp_path / 'run'}", *COMMON], tp=2)
    first = metrics(tmp_path / "run")[1]
    assert all(math.isfinite(first[k]) for k in ("gen/dmd", "gen/isg", "gen/gan", "fake/fm"))


def test_bf16_weights_with_discriminator_autocast(teacher, tmp_path):
    """The big recipes' precision (bf16 DiT weights, fp32 masters, bf16 discriminator) runs; inputs are cast."""
    train_inprocess(2, [f"roles.teacher.checkpoint={teacher}", "train.max_steps=2", f"train.output_dir={tmp_path}",
                        "model.params_dtype=bfloat16", "roles.generator.precision=bf16", "roles.fake_score.precision=bf16",
                        "roles.teacher.precision=bf16", "roles.discriminator.precision=bf16", *COMMON])
    second = metrics(tmp_path)[1]
    for k in ("gen/dmd", "gen/isg", "gen/gan", "fake/fm", "disc/loss"):
        assert math.isfinite(second[k]), (k, second)


def _nan_body(env, teacher, out):
    import megatron_senseflow.losses as L
    from megatron_senseflow.config import load_config
    from megatron_senseflow.trainer import Trainer, TrainingAborted

    cfg = load_config("tiny", [f"roles.teacher.checkpoint={teacher}", f"train.output_dir={out}", "train.max_steps=20",
                               "distill.ttur=1", "train.nan_max_consecutive=3", f"parallel.tp={env.tp}", *COMMON])
    tr = Trainer(cfg, env)
    real = L.dmd_loss
    calls = {"n": 0}

    def poisoned(x0, grad):  # generator loss NaN from the second iteration on
        calls["n"] += 1
        out_ = real(x0, grad)
        return out_ * float("nan") if calls["n"] >= 2 else out_

    L.dmd_loss = poisoned
    g_before = None
    try:
        tr.run()
    except TrainingAborted as e:
        g_before = str(e)
    return {"msg": g_before, "step": tr.step}


def test_nan_guard_skips_then_aborts_with_a_message(teacher, tmp_path):
    r = run_distributed(_nan_body, 2, str(teacher), str(tmp_path), tp=2)[0]
    assert r["msg"] is not None and "3 consecutive steps had non-finite losses" in r["msg"]
    assert r["step"] == 4  # one clean iteration, then three skipped ones
    rows = metrics(tmp_path)
    assert rows[0]["nan/total_skipped"] == 0 and "nan/skipped_gen" in rows[1]
    assert all(math.isfinite(rows[i]["fake/fm"]) for i in range(len(rows)))  # the other roles kept training


def test_tensorboard_scalars_and_images_read_back(teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_inprocess(1, [f"roles.teacher.checkpoint={teacher}", "train.max_steps=2", f"train.output_dir={tmp_path}",
                        "logging.image_every=2", *COMMON])
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for k in ("gen/dmd", "gen/isg", "gen/gan", "fake/fm", "disc/logit_real", "disc/logit_fake", "ida/phi_minus_theta",
              "gen/grad_norm", "gen/lr", "perf/samples_per_s", "perf/tflops_per_gpu", "mem/rss_gb"):
        assert k in tags["scalars"], k
    assert [e.step for e in acc.Scalars("fake/fm")] == [1, 2]
    assert acc.Scalars("fake/fm")[0].value == pytest.approx(metrics(tmp_path)[0]["fake/fm"], rel=1e-6)
    assert "samples/stochastic_top_euler_bottom" in tags["images"]
    img = acc.Images("samples/stochastic_top_euler_bottom")[0]
    assert img.step == 2 and img.width > 0 and img.height > 0
