"""Each row of the recipe-fidelity table against the authors' code, written out by hand here.

References (read, not imported): XingtongGe/SenseFlow at f7da31b, senseflow/trainer/
trainer_flux_senseflow.py (F), trainer_sd35_senseflow.py (S), trainer_sd35_large_senseflow.py (L),
senseflow/models/vfmgan.py and vfmgan_utils.py (V); diffusers' FlowMatchEulerDiscreteScheduler,
whose table the trainers index. Distributions are compared by quantiles over many draws, weights
exactly.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_senseflow import flow
from megatron_senseflow.config import load_config
from megatron_senseflow.methods import draw_sigma, gan_weights, isg_grid, isg_t_mid
from megatron_senseflow.recipe_card import QUANTILES, _Draws
from megatron_senseflow.models.configs import make_arch

N = 200_000


def scheduler_sigmas(shift: float) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift).sigmas before set_timesteps:
    timesteps = linspace(1, 1000, 1000)[::-1]; sigmas = timesteps / 1000, shifted unless dynamic shifting
    (FLUX.1-dev's config has use_dynamic_shifting=True, so its table is unshifted: pass shift=1)."""
    s = np.linspace(1, 1000, 1000, dtype=np.float32)[::-1].copy() / 1000
    return (shift * s / (1 + (shift - 1) * s)).astype(np.float64)


def authors_logit_normal_indexed(shift: float, rng) -> np.ndarray:
    """compute_density_for_timestep_sampling('logit_normal', 0, 1) -> indices = (u * 1000).long() ->
    timesteps = scheduler.timesteps[indices] -> get_sigmas(timesteps) = sigmas[indices] (F1185-1196, S1163-1177)."""
    u = 1 / (1 + np.exp(-rng.normal(0.0, 1.0, N)))
    return scheduler_sigmas(shift)[(u * 1000).astype(np.int64)]


def authors_sd35_dmd(rng) -> np.ndarray:
    """S1092-1099: timesteps = torch.randint(min_step=20, min(max_step + 1, 1000)) -> flip(sigmas)[timesteps]."""
    t = rng.integers(20, 981, N)
    return scheduler_sigmas(3.0)[::-1][t]


def ours(recipe: str, which: str) -> np.ndarray:
    law = getattr(load_config(recipe).distill, which)
    return draw_sigma(law, _Draws(N, seed=1)).double().numpy()


def same_law(a: np.ndarray, b: np.ndarray, table: np.ndarray | None = None):
    qa, qb = np.quantile(a, QUANTILES), np.quantile(b, QUANTILES)
    assert np.allclose(qa, qb, atol=4e-3), (qa, qb)  # sampling error of a quantile at N draws: < 2e-3
    if table is not None:  # and only the authors' table values occur (their table is float32)
        t = np.sort(table)
        i = np.clip(np.searchsorted(t, a), 1, len(t) - 1)
        assert np.minimum(np.abs(a - t[i - 1]), np.abs(a - t[i])).max() < 1e-6


# --------------------------------------------------------------------------- timestep laws


def test_sd35_dmd_timesteps_are_the_shifted_uniform_index():
    rng = np.random.default_rng(0)
    want = authors_sd35_dmd(rng)
    for recipe in ("sd35_medium", "sd35_large"):
        got = ours(recipe, "dmd_timesteps")
        same_law(got, want, scheduler_sigmas(3.0))
    assert np.median(want) == pytest.approx(0.7507, abs=2e-3)  # the "median 0.753"
    assert (want > 0.75).mean() == pytest.approx(0.50, abs=0.01)


def test_sd35_fake_timesteps_are_logit_normal_shifted_by_3():
    want = authors_logit_normal_indexed(3.0, np.random.default_rng(1))
    for recipe in ("sd35_medium", "sd35_large"):
        same_law(ours(recipe, "fake_timesteps"), want, scheduler_sigmas(3.0))
    assert np.median(want) == pytest.approx(0.75, abs=3e-3)


def test_flux_dmd_and_fake_timesteps_are_logit_normal_unshifted():
    want = authors_logit_normal_indexed(1.0, np.random.default_rng(2))
    for which in ("dmd_timesteps", "fake_timesteps"):
        same_law(ours("flux_dev", which), want, scheduler_sigmas(1.0))
    assert np.median(want) == pytest.approx(0.5, abs=3e-3)


def test_sid_timesteps_are_sigmoid_of_a_normal_log2_1p6():
    """sid_dit_sd3_training_loop.py: sigmoid(torch.normal(log(2), 1.6)), no shift, for both phases."""
    want = 1 / (1 + np.exp(-np.random.default_rng(3).normal(math.log(2.0), 1.6, N)))
    for recipe in ("sd3_medium", "sd35_medium_sid", "sd35_large_sid", "flux_dev_sid"):
        for which in ("dmd_timesteps", "fake_timesteps"):
            same_law(ours(recipe, which), want)


# --------------------------------------------------------------------------- anchors and GAN weight


def _anchors(recipe: str):
    cfg = load_config(recipe)
    d = cfg.distill
    taus = flow.student_anchors(d.num_steps, d.shift, make_arch("flux-dev"), 4096, d.anchor_rounding)  # 1024 px: 64 x 64 tokens
    return cfg, taus, [1 - i / d.num_steps for i in range(d.num_steps)]


def test_sd35_gan_weight_is_the_authors_table_read_at_the_step_index():
    """S485 sigmas_timew = noise_scheduler.sigmas (unflipped); S812-818 timew =
    extract_into_tensor(sigmas_timew, clamp_max(timesteps, 999)) ** 2 with timesteps from
    denoising_step_list = range(999, 0, -250)."""
    steps = list(range(999, 0, -250))
    want = [float(scheduler_sigmas(3.0)[min(t, 999)]) ** 2 for t in steps]
    assert [round(w, 4) for w in want] == [0.0, 0.2513, 0.5636, 0.8109]
    for recipe in ("sd35_medium", "sd35_large"):
        cfg, taus, positions = _anchors(recipe)
        assert taus == pytest.approx([float(scheduler_sigmas(3.0)[::-1][t]) for t in steps], abs=1e-6)
        assert gan_weights(cfg, taus, positions) == pytest.approx(want, rel=1e-6)


def test_flux_gan_weight_is_one_minus_sigma_squared_at_the_authors_anchors():
    """F: denoising_step_list = [1000, 904, 759, 512]; timew = (1 - sigmas) ** 2, sigma = t / 1000."""
    theirs = [1000.0, 904.0, 759.0, 512.0]
    cfg, taus, positions = _anchors("flux_dev")
    assert [t * 1000 for t in taus] == pytest.approx(theirs, abs=1e-9)
    assert gan_weights(cfg, taus, positions) == pytest.approx([(1 - t / 1000) ** 2 for t in theirs], rel=1e-12)
    assert gan_weights(cfg, taus, positions)[0] == 0.0  # no GAN gradient at pure noise


# --------------------------------------------------------------------------- ISG


def _draw_t_mid(cfg, taus, positions, k):
    grid = isg_grid(cfg, taus, positions)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(k))
    t_mid, end = isg_t_mid(cfg, grid, torch.full((20000,), k), u)
    return t_mid.double().numpy(), end


def test_flux_isg_t_mid_is_an_integer_timestep_20_inside_the_segment():
    """F724: timestep_mid = torch.randint(ceil(timestep_prev + 20), floor(timestep - 20) + 1) / 1000,
    timestep_prev = the next anchor's step (0 after the last)."""
    cfg, taus, positions = _anchors("flux_dev")
    for k, tau in enumerate(taus):
        t, prev = tau * 1000, (taus[k + 1] * 1000 if k + 1 < len(taus) else 0.0)
        lo, hi = math.ceil(prev + 20), math.floor(t - 20)
        got, end = _draw_t_mid(cfg, taus, positions, k)
        steps = np.round(got * 1000).astype(int)
        assert np.allclose(got * 1000, steps, atol=1e-3)  # integer timesteps
        assert steps.min() == lo and steps.max() == hi
        assert len(np.unique(steps)) == hi - lo + 1  # every step occurs: uniform over the whole range
        assert end[0].item() == pytest.approx(prev / 1000)
    assert [round(t * 1000) for t in taus] == [1000, 904, 759, 512]  # their hard-coded list


def test_sd35_isg_t_mid_is_a_table_index_50_inside_the_segment_then_shifted():
    """S677-679: timestep_mid = torch.randint(prev + 50, t - 50 + 1) on step indices [999, 749, 499, 249],
    prev = the next index (0 after the last); sigma_mid = flip(sigmas)[timestep_mid], and the segment
    ends at flip(sigmas)[prev] (0.003 after the last anchor, not 0)."""
    flipped = scheduler_sigmas(3.0)[::-1]
    steps = [999, 749, 499, 249]
    for recipe in ("sd35_medium", "sd35_large"):
        cfg, taus, positions = _anchors(recipe)
        for k, t in enumerate(steps):
            prev = steps[k + 1] if k + 1 < len(steps) else 0
            got, end = _draw_t_mid(cfg, taus, positions, k)
            want = flipped[prev + 50: t - 50 + 1]
            assert np.abs(got[:, None] - want[None, :]).min(1).max() < 1e-6
            assert got.min() == pytest.approx(want.min(), abs=1e-6) and got.max() == pytest.approx(want.max(), abs=1e-6)
            assert end[0].item() == pytest.approx(flipped[prev], abs=1e-6)
    assert flipped[0] == pytest.approx(0.003 / 1.002, abs=1e-6)


def test_isg_and_dmd_guidance_laws_are_the_authors():
    """ISG's teacher step draws its own guidance: F728 c = random.uniform(1, 8); S683 random.uniform(2, 4);
    L683 c = 5.0. DMD: F random.uniform(1, 8) (embedding), S uniform(2, 8), L uniform(3, 10) (real CFG)."""
    want = {"flux_dev": ((1, 8), (1, 8), "embedding"), "sd35_medium": ((2, 8), (2, 4), "cfg"),
            "sd35_large": ((3, 10), (5, 5), "cfg")}
    for recipe, (dmd, isg, mode) in want.items():
        d = load_config(recipe).distill
        assert (tuple(d.dmd_guidance), tuple(d.isg_guidance), d.guidance_mode) == (dmd, isg, mode)


def test_recipe_constants_are_the_authors():
    """GD (TTUR), ida_w, ISG weight, gan_weight, anchors' shift, per model (F, S, L)."""
    want = {"flux_dev": (5, 0.97, 1.0, 2.0), "sd35_medium": (10, 0.98, 0.5, 0.1), "sd35_large": (5, 0.97, 1.0, 0.1)}
    for recipe, (ttur, ida, isg, gan) in want.items():
        d = load_config(recipe).distill
        assert (d.ttur, d.ida_lambda, d.isg_weight, d.gan_weight) == (ttur, ida, isg, gan)
        assert d.backward_sim_prob == 0.5 and d.num_steps == 4


# --------------------------------------------------------------------------- the discriminator


def _tiny_dino(image: int):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2,
                                    patch_size=4, image_size=16)).eval()


def authors_dino_taps(dino, x, hooks):
    """DINO._forward + forward_flex + hooks + AddReadout (V): x in [0, 1]; taps '0'.. for the hooked blocks,
    then the pos_drop output; each (tokens[:, 1:] + tokens[:, :1]) as [B, C, H/p, W/p]."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    b, _, h, w = x.shape
    p = dino.config.patch_size
    emb = dino.embeddings
    t = emb.patch_embeddings.projection(x).flatten(2).transpose(1, 2)
    pos = emb.position_embeddings
    tok, grid = pos[:, :1], pos[0, 1:]
    g = int(math.sqrt(len(grid)))
    grid = F.interpolate(grid.reshape(1, g, g, -1).permute(0, 3, 1, 2), size=(h // p, w // p), mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1).reshape(1, (h // p) * (w // p), -1)
    x = torch.cat([emb.cls_token.expand(b, -1, -1), t], dim=1) + torch.cat([tok, grid], dim=1)
    acts = {str(len(hooks)): x}
    for i, blk in enumerate(dino.encoder.layer):
        x = blk(x)
        x = x[0] if isinstance(x, tuple) else x
        if i in hooks:
            acts[str(hooks.index(i))] = x
    return {k: (v[:, 1:] + v[:, :1]).transpose(1, 2).reshape(b, -1, h // p, w // p) for k, v in acts.items()}


def batch_norm_local(x, weight, bias, virtual_bs=8, eps=1e-5):
    shape = x.size()
    x = x.reshape(shape[0], shape[1], -1)
    groups = int(np.ceil(x.size(0) / virtual_bs))
    x = x.view(groups, -1, x.size(-2), x.size(-1))
    mean = x.mean([1, 3], keepdim=True)
    var = x.var([1, 3], keepdim=True, unbiased=False)
    x = (x - mean) / torch.sqrt(var + eps)
    x = x * weight[None, :, None] + bias[None, :, None]
    return x.view(shape)


def authors_head(head, x, c, ref):
    """DiscHeadPlus_2d(downsample=3).forward with the head's (spectral-normalised) weights."""
    def sn_conv(conv, x, stride=1):
        k = conv.weight.shape[-1]
        return F.conv2d(F.pad(x, [k // 2] * 4, mode="circular"), conv.weight, conv.bias, stride=stride)

    def block(seq, x):  # make_block_2d: SpectralConv2d, BatchNormLocal, LeakyReLU(0.2)
        return F.leaky_relu(batch_norm_local(sn_conv(seq[0], x), seq[1].weight, seq[1].bias), 0.2)

    def trunk(seq, x):
        x = block(seq[0], x)
        x = sn_conv(seq[1], x, 2)
        x = (block(seq[2].fn, x) + x) / np.sqrt(2)
        x = sn_conv(seq[3], x, 2)
        x = (block(seq[4].fn, x) + x) / np.sqrt(2)
        return sn_conv(seq[5], x, 2)

    out = sn_conv(head.cls, trunk(head.main, x))
    w = head.cmapper.weight * (1 / np.sqrt(head.cmapper.weight.shape[1]))
    cmap = torch.addmm(head.cmapper.bias[None], c, w.t()).unsqueeze(-1).unsqueeze(-1)
    refmap = sn_conv(head.refmapper[6], trunk(head.refmapper, ref))
    return (out * (cmap + refmap)).sum(1, keepdim=True) * (1 / np.sqrt(64))


def test_discriminator_logits_equal_the_authors_forward():
    """8-style taps (here 3 hooked blocks + the patch embedding), CLS added, full resolution, heads with local
    batch norm and three stride-2 convs; one sample, as the authors train (their batch norm groups 8)."""
    from megatron_senseflow.discriminator import VFMDiscriminator

    hooks = [0, 2, 3]
    dino = _tiny_dino(32)
    torch.manual_seed(1)
    net = VFMDiscriminator(dino, hooks, text_dim=12, image_size=None, patch_features=True, downsample=3).eval()
    net.advance_spectral_norm()
    x, ref = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    c = F.normalize(torch.randn(1, 12), dim=-1)
    with torch.no_grad():
        got = net(x, c, net.reference_maps(ref))
        taps, ref_taps = authors_dino_taps(dino, (x + 1) / 2, hooks), authors_dino_taps(dino, (ref + 1) / 2, hooks)
        heads = [str(i) for i in range(len(hooks) + 1)]  # their ModuleDict: blocks '0'..'2', the patch tap '3'
        want = torch.cat([authors_head(h, taps[k], c, ref_taps[k]).view(1, -1) for h, k in zip(net.heads, heads)], 1)
    assert len(net.heads) == 4 and got.shape == want.shape == (1, 4)  # 8 x 8 maps -> 1 x 1 after three stride-2
    assert torch.allclose(got, want, atol=1e-5), (got, want)


def test_authors_spectral_norm_is_their_legacy_hook_written_out():
    """V's SpectralConv2d: `SpectralNorm.apply(self, 'weight', n_power_iterations=1, dim=0, eps=1e-12)`, i.e.
    torch's legacy hook: u, v ~ N(0, 1) normalised at construction (u drawn first), no warm-up; each
    training-mode forward v <- normalize(W^T u), u <- normalize(W v); weight / (u^T W v)."""
    from megatron_senseflow.discriminator import AuthorsSpectralNorm, _sn_conv

    torch.manual_seed(3)
    ours = _sn_conv(8, 6, 3, stride=2, sn="authors")
    torch.manual_seed(3)
    theirs = torch.nn.utils.spectral_norm(torch.nn.Conv2d(8, 6, 3, stride=2, padding=1, padding_mode="circular"),
                                          n_power_iterations=1, dim=0, eps=1e-12)
    torch.manual_seed(3)  # by hand: the conv's own init, then u (6), then v (8 * 3 * 3)
    w = torch.nn.Conv2d(8, 6, 3).weight.detach()
    u = F.normalize(torch.randn(6), dim=0, eps=1e-12)
    v = F.normalize(torch.randn(72), dim=0, eps=1e-12)
    assert torch.equal(ours.parametrizations.weight.original, theirs.weight_orig)
    assert isinstance(ours.parametrizations.weight[0], AuthorsSpectralNorm)
    sn = ours.parametrizations.weight[0]
    sn.train()
    x = torch.randn(2, 8, 10, 10)
    for _ in range(3):  # three training-mode forwards, as their heads run per iteration
        mat = w.flatten(1)
        v = F.normalize(mat.t() @ u, dim=0, eps=1e-12)
        u = F.normalize(mat @ v, dim=0, eps=1e-12)
        by_hand = w / (u @ mat @ v)
        got, want = ours(x), theirs(x)  # their module is in training mode, as their heads are
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
        sn.eval()  # read the weight without another power iteration
        assert torch.allclose(ours.weight, by_hand, rtol=1e-6, atol=1e-7)
        sn.train()
        assert torch.allclose(sn._u, u, atol=1e-6) and torch.allclose(sn._v, v, atol=1e-6)
    # the gradient treats u and v as constants in both
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    assert torch.allclose(ours.parametrizations.weight.original.grad, theirs.weight_orig.grad, rtol=1e-5, atol=1e-6)
    # torch's parametrization (our default) starts from 15 warm-up iterations: another first estimate
    torch.manual_seed(3)
    default = _sn_conv(8, 6, 3, stride=2)
    assert not torch.allclose(default.weight, ours.weight, rtol=1e-3)


def test_authors_heads_use_their_spectral_norm_everywhere_it_is():
    """DiscHeadPlus_2d: every trunk, reference-mapper and cls convolution spectral-normalised, the text mapper not."""
    from torch.nn.utils import parametrize

    from megatron_senseflow.discriminator import AuthorsSpectralNorm, DiscriminatorHead

    head = DiscriminatorHead(16, 12, 3, sn="authors")
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 * 6 + 2
    assert all(isinstance(m.parametrizations.weight[0], AuthorsSpectralNorm) for m in convs)
    assert not parametrize.is_parametrized(head.cmapper)


def test_grad_scaler_ratio_is_the_authors_two_scalers():
    """S / L train(): `scaler.scale(generator_loss).backward()` leaves scale_G x the GAN gradient on the heads;
    `scaler_d.scale(l_d).backward()` adds scale_D x theirs; `scaler_d.unscale_(optimizer_d)` divides both by
    scale_D. scaler.update() runs on generator iterations, scaler_d.update() every iteration. Here with real
    GradScalers, a one-parameter 'head' whose losses have gradient 1, and growth every 3 finite updates."""
    from megatron_senseflow.methods import authors_grad_scaler_ratio

    for ttur in (5, 10):
        head, gen = torch.nn.Parameter(torch.zeros(())), torch.nn.Parameter(torch.zeros(()))
        optimizer, optimizer_d = torch.optim.SGD([gen], lr=0.0), torch.optim.SGD([head], lr=0.0)
        scaler = torch.amp.GradScaler("cpu", growth_interval=3)
        scaler_d = torch.amp.GradScaler("cpu", growth_interval=3)
        seen = set()
        for current_iter in range(1, 61):  # the ratio stays above fp32's epsilon next to the hinge's 1
            if current_iter % ttur == 0:
                scaler.scale(gen + head).backward()  # generator_loss: reaches the heads
                scaler.unscale_(optimizer)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
            scaler_d.scale(head).backward()  # l_d_real + l_d_fake
            scaler_d.unscale_(optimizer_d)
            if current_iter % ttur == 0:
                ratio = authors_grad_scaler_ratio(current_iter - 1, ttur, growth_interval=3)
                assert float(head.grad) - 1.0 == ratio, (ttur, current_iter)
                seen.add(ratio)
            scaler_d.step(optimizer_d)
            scaler_d.update()
            optimizer_d.zero_grad()
        assert len(seen) >= 4 and min(seen) < 2 ** -10  # the ratio did fall, step by step


def test_recipes_tap_eight_dinov2_maps_at_full_resolution_with_clip_l():
    for recipe in ("flux_dev", "sd35_medium", "sd35_large"):
        dc = load_config(recipe).roles.discriminator
        assert dc.feature_layers == [2, 5, 8, 10, 14, 19, 23] and dc.patch_features  # V350 hooks + hook_patch
        assert dc.image_size is None and dc.head_downsample == 3 and dc.text_condition == "clip_l"


def test_text_condition_is_clip_l_encode_text_from_what_the_batch_carries(tmp_path):
    """The authors condition on CLIP ViT-L/14 encode_text (StyleGAN-T's wrapper: L2-normalised projected text
    features). FLUX's pooled embedding is CLIP-L's pooler output, so projecting it with CLIP's text_projection
    gives encode_text; SD3's pooled embedding starts with CLIP-L's text_embeds."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from megatron_senseflow.discriminator import TextCondition, clip_text_projection

    torch.manual_seed(0)
    clip = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=50, hidden_size=768, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=2, projection_dim=768,
                                                      max_position_embeddings=16, eos_token_id=49)).eval()
    clip.save_pretrained(tmp_path / "clip")
    ids = torch.tensor([[1, 5, 7, 49, 49, 49], [2, 3, 49, 49, 49, 49]])
    with torch.no_grad():
        out = clip(ids)
        pooler = clip.text_model(ids).pooler_output
    encode_text = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    flux = TextCondition("clip_l", "project", 768, clip_text_projection(str(tmp_path / "clip")))
    assert torch.allclose(flux(pooler), encode_text, atol=1e-5)
    sd3 = TextCondition("clip_l", "slice", 2048)
    assert torch.allclose(sd3(torch.cat([out.text_embeds, torch.randn(2, 1280)], dim=1)), encode_text, atol=1e-6)


def test_head_parameter_count_matches_the_module():
    from megatron_senseflow.discriminator import DiscriminatorHead, head_param_count

    for c, d in ((16, 3), (24, 1)):
        head = DiscriminatorHead(c, 10, d)
        assert sum(p.numel() for p in head.parameters()) == head_param_count(c, 10, d)
    assert head_param_count(1024, 768, 3) == pytest.approx(96.6e6, rel=1e-3)


# --------------------------------------------------------------------------- in the trainer


def _draws_body(env):
    from megatron_senseflow.config import load_config
    from megatron_senseflow.trainer import Trainer

    cfg = load_config("tiny", ["train.output_dir=/nonexistent", "distill.dmd_guidance=[1.0,8.0]",
                               "distill.isg_guidance=[1.0,8.0]", "data.micro_batch_size=8"])
    tr = Trainer(cfg, env)
    tr.objective.begin(0)
    st = tr.objective.student_input(next(iter(tr.data)))
    return st.guidance, st.isg_guidance


@pytest.mark.slow
def test_isg_teacher_guidance_is_a_fresh_draw_not_the_dmds():
    from tests.dist_helpers import run_distributed

    dmd, isg = run_distributed(_draws_body, 1)[0]
    assert ((dmd >= 1) & (dmd <= 8)).all() and ((isg >= 1) & (isg <= 8)).all()
    assert not torch.allclose(dmd, isg)


@pytest.mark.slow
def test_learning_rate_warm_up_counts_iterations_for_every_role(tmp_path):
    """F947: lr_scheduler.step() (and the fake score's and D's) runs every iteration, so at 0-based
    iteration k every role's LambdaLR factor is min(1, k / W), also the generator's, which updates only
    every TTUR-th iteration."""
    from tests.trainer_helpers import metrics, train_inprocess

    lr, w = 1e-4, 4
    train_inprocess(1, ["train.max_steps=6", f"train.output_dir={tmp_path}", "checkpoint.every=0",
                        "checkpoint.at_end=false", "logging.log_every=1",
                        "distill.ttur=3", *[f"roles.{r}.optimizer.warmup_steps={w}" for r in
                                            ("generator", "fake_score", "discriminator")]])
    rows = {r["step"]: r for r in metrics(tmp_path)}
    for step, row in rows.items():  # metrics' step = k + 1
        want = lr * min(1.0, (step - 1) / w)
        assert row["fake/lr"] == pytest.approx(want, abs=1e-12) and row["disc/lr"] == pytest.approx(want, abs=1e-12)
        if step % 3 == 0:
            assert row["gen/lr"] == pytest.approx(want, abs=1e-12), step


def test_dry_run_card_through_the_cli():
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "megatron_senseflow.cli", "train", "--dry-run", "sd35_medium", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    card = json.loads(r.stdout)
    flipped = scheduler_sigmas(3.0)[::-1]
    assert card["anchors"] == pytest.approx([1.0, 0.9, 0.75, 0.5])
    assert card["gan_weight_at_anchors"] == pytest.approx([float(scheduler_sigmas(3.0)[t]) ** 2 for t in (999, 749, 499, 249)],
                                                           abs=1e-4)
    steps = [999, 749, 499, 249, 0]
    want = [[flipped[steps[k + 1] + 50], flipped[steps[k] - 50]] for k in range(4)]
    assert np.allclose(card["isg_t_mid_ranges"], want, atol=1e-4)
    assert card["dmd_sigma_quantiles"] == pytest.approx(np.quantile(authors_sd35_dmd(np.random.default_rng(5)), QUANTILES),
                                                         abs=5e-3)
    assert card["fake_sigma_quantiles"] == pytest.approx(
        np.quantile(authors_logit_normal_indexed(3.0, np.random.default_rng(6)), QUANTILES), abs=5e-3)
    assert any("roles.teacher.checkpoint" in m for m in card["missing"])  # listed, not fatal
    text = subprocess.run([sys.executable, "-m", "megatron_senseflow.cli", "train", "flux_dev", "--dry-run"],
                          capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and "student anchors            [1.0, 0.904, 0.759, 0.512]" in text.stdout


def test_readme_recipe_table_is_the_recipe_cards():
    from pathlib import Path

    from megatron_senseflow.recipe_card import readme_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert readme_table() in readme, "README's recipe table is stale: paste recipe_card.readme_table() into it"


def test_docs_recipe_cards_are_the_dry_run_cards():
    """docs/recipes.md shows the `--dry-run` cards of the main recipes (without the paths a real run needs):
    a change of a recipe, a law or the memory plan must show there too."""
    import re
    from pathlib import Path

    from megatron_senseflow.config import load_config
    from megatron_senseflow.recipe_card import recipe_card, render

    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    shown = re.findall(r"```\n(recipe card: .*?)\n```", text.split("## Recipe cards", 1)[1], re.S)
    names = ("flux_dev", "sd35_large", "sd35_medium", "sd3_medium", "qwen_image", "flux2_dev", "flux2_klein")
    want = ["\n".join(ln for ln in render(recipe_card(load_config(n))).splitlines() if not ln.startswith("  missing:"))
            for n in names]
    assert len(shown) == len(names)
    for name, got, card in zip(names, shown, want):
        assert got == card, f"docs/recipes.md's card of {name} is stale: paste `senseflow train {name} --dry-run` into it"
