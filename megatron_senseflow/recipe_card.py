"""`senseflow train RECIPE --dry-run [--json]`: what a recipe will do, before a GPU is queued.

Builds and checks everything that needs no weights (the config, the layout (one node of 8 GPUs
unless `--nproc N` says otherwise),
the objective's anchors, laws and weights with the same code the trainer runs,
the memory plan), then prints a card: student anchors; quantiles of the DMD,
fake-score and ISG noise levels; the GAN weight at each anchor; the guidance
laws; TTUR, IDA, loss weights and warm-up; the layout and the memory plan's
per-GPU total. Paths a real run still needs are listed, not fatal.
"""
from __future__ import annotations

import json

import torch

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
DRAWS = 200_000  # enough for every quantile to sit on its 1/1000 grid step


class _Draws:
    """What methods.draw_sigma asks of a random source, for many draws at once."""

    def __init__(self, n: int, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.n = n

    def rand(self):
        return torch.rand(self.n, generator=self.g, dtype=torch.float64)

    def randn(self):
        return torch.randn(self.n, generator=self.g, dtype=torch.float64)


def law_quantiles(law) -> list[float]:
    from .methods import draw_sigma

    sigma = draw_sigma(law, _Draws(DRAWS)).float()
    return [round(float(q), 4) for q in torch.quantile(sigma, torch.tensor(QUANTILES))]


def recipe_card(cfg, world: int | None = None) -> dict:
    """The card as a dict (JSON-ready). Raises ConfigError for what cannot run."""
    from . import flow
    from .codec import codec_factor
    from .memory_plan import plan
    from . import preflight
    from .methods import OBJECTIVES, gan_weights, isg_grid, isg_sigma
    from .models import family_of
    from .models.flops import image_tokens

    p, d = cfg.parallel, cfg.distill
    mp = p.tp * p.pp
    world = world or mp * max(1, 8 // mp)  # default: one node of 8 GPUs (at least one replica)
    preflight.check(cfg, world)
    arch = cfg.model.teacher_arch()
    vae = cfg.roles.discriminator.vae
    # a real run decodes with its pipeline's VAE (8x for FLUX and SD3.x) even when the path is still missing
    factor = codec_factor(vae, arch) if vae or cfg.model.preset.startswith("tiny") else family_of(arch).vae_factor(None)
    side = cfg.data.resolution // factor
    tokens = image_tokens(arch, side, side)
    shift = d.shift or flow.default_shift(arch, tokens, d.num_steps)
    taus = flow.student_anchors(d.num_steps, d.shift, arch, tokens, d.anchor_rounding)
    positions = [1 - i / d.num_steps for i in range(d.num_steps)]
    method = OBJECTIVES[cfg.method]
    card: dict = {
        "recipe": cfg.model.preset,
        "method": cfg.method,
        "anchors": [round(t, 4) for t in taus],
        "anchor_shift": round(float(shift), 4),
        "backward_sim_prob": d.backward_sim_prob,
        "anchor_draw": d.anchor_draw,
        "dmd_sigma_law": _law(d.dmd_timesteps),
        "dmd_sigma_quantiles": law_quantiles(d.dmd_timesteps),
        "fake_sigma_law": _law(d.fake_timesteps),
        "fake_sigma_quantiles": law_quantiles(d.fake_timesteps),
        "guidance_mode": d.guidance_mode,
        "dmd_guidance": list(d.dmd_guidance),
        "fake_guidance": d.fake_guidance,
        "ttur": d.ttur,
        "loss_weights": {"dmd" if cfg.method != "sid" else "sid": d.dmd_weight},
    }
    if method.use_isg:
        grid = isg_grid(cfg, taus, positions)
        card["isg_t_mid_ranges"] = [[round(float(isg_sigma(cfg, torch.tensor(float(lo)))), 4),
                                     round(float(isg_sigma(cfg, torch.tensor(float(hi)))), 4)] for lo, hi, _ in grid]
        card["isg_segment_ends"] = [round(end, 4) for _, _, end in grid]
        card["isg_guidance"] = list(d.isg_guidance)
        card["loss_weights"]["isg"] = d.isg_weight
    if method.use_ida:
        card["ida_lambda"] = d.ida_lambda
    if preflight.wants_discriminator(cfg):
        card["gan_weight_at_anchors"] = [round(w, 4) for w in gan_weights(cfg, taus, positions)]
        card["loss_weights"]["gan"] = d.gan_weight
        dc = cfg.roles.discriminator
        card["discriminator"] = {"maps": len(dc.feature_layers) + int(dc.patch_features),
                                 "image_size": dc.image_size or cfg.data.resolution,
                                 "text_condition": dc.text_condition}
        # the two authors' behaviours behind switches (docs/recipes.md, "Differences we keep")
        card["discriminator_update"] = {"generator_grad": dc.generator_grad, "spectral_norm": dc.spectral_norm}
    for name in ("generator", "fake_score"):
        lc = getattr(cfg.roles, name).lora
        if lc.enabled:  # not the paper's recipe: the authors fine-tune every weight
            card.setdefault("lora", {})[name] = {"rank": lc.rank, "alpha": lc.alpha or lc.rank,
                                                 "targets": list(lc.targets)}
    if cfg.method == "sid":
        card["sid"] = {"alpha": d.sid_alpha, "weighting": d.sid_weighting, "loss_scale": d.sid_loss_scale}
    roles = {"generator": cfg.roles.generator.optimizer, "fake_score": cfg.roles.fake_score.optimizer}
    if preflight.wants_discriminator(cfg):
        roles["discriminator"] = cfg.roles.discriminator.optimizer
    card["optimizers"] = {k: {"lr": o.lr, "betas": list(o.betas), "warmup_iterations": o.warmup_steps,
                              "clip_grad": o.clip_grad} for k, o in roles.items()}
    card["layout"] = {"world": world, "tp": p.tp, "pp": p.pp, "dp": world // (p.tp * p.pp),
                      "micro_batch_size": cfg.data.micro_batch_size, "resolution": cfg.data.resolution}
    pl = plan(cfg, 1, world, 80.0)  # one node of `world` GPUs, 80 GB each
    card["memory_plan_gb_per_gpu"] = round(pl.total / 1e9, 1)
    card["derived"] = list(cfg.derived)
    card["missing"] = preflight.missing_assets(cfg)
    card["notes"] = preflight.notes(cfg)
    return card


def _law(law) -> str:
    if law.kind == "uniform_index":
        s = f"t ~ U{{{law.index_min}..{law.index_max}}}, sigma = (t + 1) / 1000"
    elif law.kind == "logit_normal_table":
        s = f"u = sigmoid(N({law.mean:g}, {law.std:g}^2)), sigma = 1 - floor(1000 u) / 1000"
    else:
        s = f"sigma = sigmoid(N({law.mean:g}, {law.std:g}^2))"
    return s + (f", shifted by {law.shift:g}" if law.shift != 1 else "")


def render(card: dict) -> str:
    """The card as aligned text lines."""
    lines = [f"recipe card: {card['method']} on {card['recipe']}"]

    def row(name, value):
        lines.append(f"  {name:<26} {value}")

    row("student anchors", f"{card['anchors']} (shift {card['anchor_shift']})")
    row("student input", f"backward simulation p={card['backward_sim_prob']}, anchor per {card['anchor_draw'][4:]}")
    q = "/".join(f"{int(x * 100)}" for x in QUANTILES)
    row("DMD sigma" if card["method"] != "sid" else "SiD sigma", card["dmd_sigma_law"])
    row(f"  quantiles {q}%", card["dmd_sigma_quantiles"])
    row("fake-score sigma", card["fake_sigma_law"])
    row(f"  quantiles {q}%", card["fake_sigma_quantiles"])
    if "isg_t_mid_ranges" in card:
        row("ISG t_mid [min, max]", card["isg_t_mid_ranges"])
        row("ISG segment ends", card["isg_segment_ends"])
        row("ISG guidance", f"U{tuple(card['isg_guidance'])}")
    if "gan_weight_at_anchors" in card:
        row("GAN weight at anchors", card["gan_weight_at_anchors"])
        row("discriminator", card["discriminator"])
        du = card["discriminator_update"]
        carried = {"dropped": "dropped (heads frozen for it)", "carried": "carried into the heads' update (F)",
                   "carried_grad_scalers": "carried, weighted scale_G / scale_D (S, L)"}[du["generator_grad"]]
        row("  generator's GAN grad", carried)
        row("  spectral norm", {"torch": "torch parametrization (15-step warm-up, u then v)",
                                "authors": "the authors' (legacy hook: no warm-up, v then u)"}[du["spectral_norm"]])
    row("guidance", f"{card['guidance_mode']}, DMD U{tuple(card['dmd_guidance'])}, fake score {card['fake_guidance']}")
    row("TTUR", card["ttur"])
    if "ida_lambda" in card:
        row("IDA lambda", card["ida_lambda"])
    if "sid" in card:
        row("SiD", card["sid"])
    for name, lc in card.get("lora", {}).items():
        row(f"{name} LoRA", f"rank {lc['rank']}, alpha {lc['alpha']:g}, {'/'.join(lc['targets'])} over the teacher's "
                            "frozen weights (the paper fine-tunes all weights)")
    row("loss weights", card["loss_weights"])
    for k, o in card["optimizers"].items():
        row(f"{k} optimizer", f"lr {o['lr']:g}, betas {tuple(o['betas'])}, warm-up {o['warmup_iterations']} iterations, "
                              f"clip {o['clip_grad']:g}")
    lay = card["layout"]
    row("layout", f"{lay['world']} GPUs: tp={lay['tp']} pp={lay['pp']} dp={lay['dp']}, micro-batch "
                  f"{lay['micro_batch_size']}, {lay['resolution']} px")
    row("memory plan", f"{card['memory_plan_gb_per_gpu']} GB per GPU at this layout (senseflow memory-plan for "
                       "details and other shapes)")
    for m in card.get("derived", []):
        lines.append(f"  ours: {m}")
    for m in card["missing"]:
        lines.append(f"  missing: {m}")
    for m in card.get("notes", []):
        lines.append(f"  note: {m}")
    return "\n".join(lines)


def print_card(cfg, world: int | None, as_json: bool) -> int:
    card = recipe_card(cfg, world)
    print(json.dumps(card) if as_json else render(card))
    return 0


README_RECIPES = ("flux_dev", "sd35_large", "sd35_medium", "sd3_medium", "qwen_image", "flux2_dev", "flux2_klein",
                  "flux_dev_sid", "sd35_large_sid", "sd35_medium_sid", "qwen_image_sid", "flux2_dev_sid",
                  "flux2_klein_sid", "tiny")


def readme_table(names=README_RECIPES) -> str:
    """The README's recipe table, rendered from the recipe cards (a test keeps the README equal to it)."""
    from .config import load_config

    head = ("| recipe | method | lr | TTUR | teacher guidance (DMD; ISG) | DMD sigma (median) | fake-score sigma "
            "(median) | ISG weight | IDA | GAN weight at anchors | layout |")
    rows = [head, "|" + "---|" * 11]
    for name in names:
        cfg = load_config(name)
        c = recipe_card(cfg)
        d = cfg.distill

        def law(prefix):
            law_ = getattr(d, f"{prefix}_timesteps")
            kind = {"logit_normal": "logit-normal", "logit_normal_table": "logit-normal, 1000-step table",
                    "uniform_index": f"uniform index {law_.index_min}-{law_.index_max}"}[law_.kind]
            if law_.kind != "uniform_index" and (law_.mean, law_.std) != (0.0, 1.0):
                kind += f" ({law_.mean:.3g}, {law_.std:g})"
            shift = f", shift {law_.shift:g}" if law_.shift != 1 else ""
            return f"{kind}{shift} ({c[f'{prefix}_sigma_quantiles'][2]:.3f})"

        guide = f"{d.guidance_mode} U{tuple(d.dmd_guidance)}"
        if "isg_guidance" in c:
            guide += f"; U{tuple(d.isg_guidance)}"
        gan = (f"{d.gan_weight:g} x {c['gan_weight_at_anchors']}" if "gan_weight_at_anchors" in c else "none")
        lay = c["layout"]
        rows.append(f"| `{name}` | {cfg.method} | {cfg.roles.generator.optimizer.lr:g} | {d.ttur} | {guide} | "
                    f"{law('dmd')} | {law('fake')} | {c['loss_weights'].get('isg', '-')} | {c.get('ida_lambda', '-')} | "
                    f"{gan} | TP={lay['tp']} PP={lay['pp']} |")
    return "\n".join(rows)
