"""`senseflow memory-plan RECIPE --nodes N --gpus-per-node G --gpu-mem GB [--tp T --pp P] [overrides]`.

Per-GPU memory of every role for a recipe and a cluster shape, and whether it
fits. Static memory is counted exactly from the architecture
(models.flops.block_params equals diffusers' parameter count) and from how
megatron-core stores it here:
- weights in model.params_dtype (teacher GEMM weights in FP8 with
  roles.teacher.fp8_weights);
- gradients of trainable roles in fp32 (DDP grad_reduce_in_fp32);
- AdamW: fp32 main weights (bf16 models only) + two fp32 moments, divided by
  the data-parallel size with the distributed optimizer, on the host with
  roles.*.optimizer.cpu_offload;
- the frozen DINOv2 and VAE, and the discriminator heads with their AdamW.
The DiT activations use bytes per token per hidden unit per block measured
with saved-tensor hooks (memory_probe, BLOCK_ACT); the discriminator's (VAE
decoder, DINOv2) remain estimates. The phase that holds the most decides the
peak: the generator step keeps the generator's activations and, for the GAN
term, those of the VAE decoder and DINOv2 at the same time. The CPU tests check
the static part against the buffers a real trainer allocates and the per-block
activation figures against the probe.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

GB = 1e9
# Bytes per (token x hidden unit) one block keeps for its backward in 16-bit, measured with
# megatron_senseflow.memory_probe (saved-tensor hooks on a meta-device forward at full width and the
# real 1024 px token counts, fused attention) for FLUX.1-dev, SD3.5 Large and SD3.5 Medium:
# (replicated over TP, split over TP, replicated part under sequence parallel, then also split).
# joint: a FLUX.1 double-stream, SD3 MMDiT or Qwen-Image block (the same module); single: a FLUX.1 single-stream
# block; dual: the extra image self-attention of an SD3.5 Medium (MMDiT-X) block; flux2_double / flux2_single:
# FLUX.2's blocks (SwiGLU MLPs of width 3h, modulation shared by the model; measured for FLUX.2-dev and klein 4B,
# equal to 0.1%). Korthikanti et al.'s rule (34, plus ~8 for adaLN's modulated copies = 42) was a third low for
# these blocks: the QK-norm outputs, the gated residual inputs and the fp32 norm statistics are kept too.
# Residual below 0.4% per block (per-sample modulation vectors, independent of the token count).
BLOCK_ACT = {"joint": (16.0, 40.0, 16.0), "single": (8.0, 46.0, 4.0), "dual": (3.6, 25.0, 3.6),
             "flux2_double": (16.0, 48.0, 16.0), "flux2_single": (8.0, 54.0, 10.0)}
# a block's inputs (image and text streams) kept per block under full recompute (measured: 2.0)
RECOMPUTE_PER_TOKEN_HIDDEN = 2
# The VAE decoder's activations for the GAN term are the family's (models/family.py vae_decoder): the
# FLUX/SD3/FLUX.2 decoder (block_out_channels 128-256-512-512, 3 resnets per level) under diffusers' gradient
# checkpointing (models/vae.py turns it on) keeps the inputs of its blocks plus the largest block (128 channels at
# full resolution) being recomputed, ~2.7e9 elements per 1024 x 1024 image, scaling with pixels (without
# checkpointing ~4.3e9); Qwen-Image's decoder cannot checkpoint.
DINOV2_VITL = {"params": 304.4e6, "hidden": 1024, "layers": 24, "patch": 14}
# full-resolution C-channel maps a discriminator head's trunk keeps for backward: about 4 at the tap's
# resolution (conv, norm, activation), 5 per stride-2 level below, counted by area (4 + 5/4 + 5/16 + ...)
HEAD_TRUNK_MAPS = 5.6
# DINOv2's (pre-norm ViT, no adaLN) recomputed block: Korthikanti's 34 + 8 (not measured here)
DINO_BLOCK_ACT = 42
RUNTIME_GB = 3.0  # CUDA context, NCCL buffers, cuBLAS workspaces
FRAGMENTATION = 0.05  # allocator slack on top of everything else


@dataclass
class RoleMemory:
    name: str
    params: float  # on this GPU
    weights: float  # bytes
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    host: float = 0.0  # offloaded optimizer state, per GPU process
    notes: list[str] = field(default_factory=list)

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer


@dataclass
class Plan:
    header: str
    roles: list[RoleMemory]
    peak_activations: float
    peak_phase: str
    runtime: float
    total: float
    gpu_mem: float

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_mem


@dataclass
class StageShare:
    """What the most loaded pipeline stage holds on one GPU."""

    params: float  # its blocks' TP shard + their TP-replicated parts + the replicated embedders
    split_params: float  # the TP-split part alone (the GEMM weights TE can keep in FP8)
    blocks: int
    kinds: list[list[str]] = field(default_factory=list)  # per block: the BLOCK_ACT parts it is made of


def block_kinds(arch, index: int) -> list[str]:
    from megatron_senseflow.models import family_of

    return family_of(arch).block_kinds(arch, index)


def stage_share(arch, tp: int, pp: int, pp_split, tokens) -> StageShare:
    from megatron_senseflow.models import family_of, stage_layout
    from megatron_senseflow.models.flops import block_params, embedder_params

    counts = block_params(arch)
    # every stage holds the embedders; FLUX.2's shared modulation among them is split over TP
    emb_split = family_of(arch).embedder_split_params(arch)
    embedders = embedder_params(arch) - emb_split + emb_split / tp
    stages = []
    for rank in range(pp):
        lay = stage_layout(arch, pp, rank, pp_split, tokens)
        mine = counts[lay.first : lay.last]
        split = sum(sp / tp for sp, _ in mine)
        kinds = [block_kinds(arch, i) for i in range(lay.first, lay.last)]
        stages.append(StageShare(split + sum(r for _, r in mine) + embedders, split, len(mine), kinds))
    return max(stages, key=lambda st: st.params)


def lora_stage_params(arch, lora, tp: int, pp: int, pp_split, tokens) -> int:
    """Adapter parameters of a LoRA role on the pipeline stage that holds the most of them (one TP rank)."""
    from megatron_senseflow.models import stage_layout
    from megatron_senseflow.models.flops import block_lora_params

    per_stage = []
    for rank in range(pp):
        lay = stage_layout(arch, pp, rank, pp_split, tokens)
        per_stage.append(sum(block_lora_params(arch, i, lora.rank, lora.targets, tp) for i in range(lay.first, lay.last)))
    return max(per_stage)


def block_activation_bytes(arch, tokens: int, batch: int, tp: int, sp: bool, elem: int,
                           kinds: list[str] = ("joint",)) -> float:
    """Saved activations of one block for its backward (measured coefficients, BLOCK_ACT)."""
    coef = 0.0
    for kind in kinds:
        replicated, split, replicated_sp = BLOCK_ACT[kind]
        coef += (replicated_sp + split) / tp if sp else replicated + split / tp
    return coef * tokens * batch * arch.hidden_size * elem / 2


def stage_activation_bytes(arch, tokens: int, batch: int, tp: int, sp: bool, elem: int, recompute: str,
                           kinds: list[list[str]]) -> float:
    per_block = [block_activation_bytes(arch, tokens, batch, tp, sp, elem, k) for k in kinds]
    if recompute == "full":  # every block's input is kept; one block at a time is recomputed in full
        kept = RECOMPUTE_PER_TOKEN_HIDDEN * tokens * batch * arch.hidden_size * elem / 2 / (tp if sp else 1)
        return kept * len(kinds) + max(per_block)
    return sum(per_block)


def plan(cfg, nodes: int, gpus_per_node: int, gpu_mem_gb: float) -> Plan:
    from megatron_senseflow.models import family_of
    from megatron_senseflow.models.flops import image_tokens, param_count

    from . import preflight
    from .discriminator import CLIP_L_DIM, head_param_count

    p = cfg.parallel
    world = nodes * gpus_per_node
    dp = world // (p.tp * p.pp)
    t_arch, s_arch = cfg.model.teacher_arch(), cfg.model.student_arch()
    fp32 = cfg.model.params_dtype == "float32"
    elem = 4 if fp32 else 2
    # latents: the family's VAE for the real models (the recipes leave the VAE path to the user), the
    # exact 2x space-to-depth codec for pixel-space tiny models
    vae = cfg.roles.discriminator.vae
    pixel = vae == "pixel" or (vae is None and cfg.model.preset.startswith("tiny"))
    down = 2 if pixel else family_of(t_arch).vae_factor(vae)
    side = cfg.data.resolution // down
    s_img = image_tokens(t_arch, side, side)
    s_txt = cfg.data.text_max_length
    tokens = (s_img, s_txt)
    mb = cfg.data.micro_batch_size
    # 1F1B keeps up to pp microbatches in flight on the first stage
    in_flight = mb * min(p.num_microbatches, p.pp) if p.pp > 1 else mb

    roles: list[RoleMemory] = []
    # teacher: frozen, forward only
    t_share = stage_share(t_arch, p.tp, p.pp, p.pp_split, tokens)
    n_t = t_share.params
    if cfg.roles.teacher.fp8_weights:  # 1 byte per GEMM weight, the rest stays in params_dtype
        w = t_share.split_params + (n_t - t_share.split_params) * elem
    else:
        w = n_t * elem
    teacher = RoleMemory("teacher", n_t, w)
    # no grad: only the block being run holds activations (x2: the CFG pair of SD3.x)
    teacher.activations = max(block_activation_bytes(t_arch, s_img + s_txt, mb * 2, p.tp, p.sequence_parallel, elem, k)
                              for k in t_share.kinds)
    roles.append(teacher)

    for name, rc in (("generator", cfg.roles.generator), ("fake_score", cfg.roles.fake_score)):
        share = stage_share(s_arch, p.tp, p.pp, p.pp_split, tokens)
        if rc.lora.enabled:  # adapters only: the base is the teacher's weights, counted once above
            n = lora_stage_params(s_arch, rc.lora, p.tp, p.pp, p.pp_split, tokens)
            r = RoleMemory(name, n, n * elem, grads=n * 4,
                           notes=[f"LoRA rank {rc.lora.rank}: adapters over the teacher's weights (shared, not "
                                  f"counted again)"])
        else:
            n = share.params
            r = RoleMemory(name, n, n * elem, grads=n * 4)
        opt = n * (8 if fp32 else 12)
        if p.distributed_optimizer:
            opt /= dp
        if rc.optimizer.cpu_offload != "none":
            r.host = opt
            r.notes.append(f"AdamW on the host ({rc.optimizer.cpu_offload})")
        else:
            r.optimizer = opt
        r.activations = stage_activation_bytes(s_arch, s_img + s_txt, in_flight, p.tp, p.sequence_parallel, elem,
                                               cfg.model.recompute, share.kinds)
        roles.append(r)

    dc = cfg.roles.discriminator
    if preflight.wants_discriminator(cfg) and not cfg.model.preset.startswith("tiny"):
        v = DINOV2_VITL
        num_heads = len(dc.feature_layers) + int(dc.patch_features)
        text_dim = CLIP_L_DIM if dc.text_condition == "clip_l" else t_arch.pooled_dim
        heads = num_heads * head_param_count(v["hidden"], text_dim, dc.head_downsample)
        d_elem = 2 if dc.precision == "bf16" else 4
        # DINOv2 loads in fp32 (autocast for bf16); the VAE is loaded in D's precision
        vae_elems, vae_params = family_of(t_arch).vae_decoder
        d = RoleMemory("discriminator", v["params"] + vae_params + heads,
                       v["params"] * 4 + vae_params * d_elem + heads * 4, grads=heads * 4,
                       optimizer=heads * 8 / dp)  # AdamW sharded over data parallel (ZeroRedundancyOptimizer)
        side = (dc.image_size or cfg.data.resolution) // v["patch"]
        n_tok = side**2 + 1
        # DINOv2's blocks run under activation checkpointing (discriminator.VFMDiscriminator.features): every
        # block's input is kept and one block is recomputed at a time
        dino = (v["layers"] + DINO_BLOCK_ACT / 2) * n_tok * v["hidden"] * d_elem * mb
        # the generator's GAN pass through each head's trunk (fp32 norms under autocast)
        dino += num_heads * HEAD_TRUNK_MAPS * side**2 * v["hidden"] * 4 * mb
        vae = vae_elems * (cfg.data.resolution / 1024) ** 2 * d_elem * mb  # VAE in D's precision
        d.activations = dino + vae
        d.notes = ["activations: the generator's GAN term backpropagates through the VAE decoder and DINOv2"]
        roles.append(d)

    by = {r.name: r for r in roles}
    gen_phase = by["generator"].activations + by["teacher"].activations + by.get("discriminator", RoleMemory("", 0, 0)).activations
    fake_phase = by["fake_score"].activations
    phase, peak = ("generator step (G + GAN through VAE/DINOv2)", gen_phase) if gen_phase >= fake_phase else ("fake-score step", fake_phase)
    static = sum(r.static for r in roles)
    runtime = RUNTIME_GB * GB
    total = (static + peak + runtime) * (1 + FRAGMENTATION)
    fam = t_arch.label
    header = (f"{cfg.model.preset} ({fam}, {param_count(t_arch) / 1e9:.2f} B parameters): {nodes} node(s) x "
              f"{gpus_per_node} GPUs of {gpu_mem_gb:g} GB, tp={p.tp} pp={p.pp} dp={dp}, micro-batch {mb}, "
              f"{cfg.data.resolution} px ({s_img} image + {s_txt} text tokens), {cfg.model.params_dtype} weights, "
              f"recompute={cfg.model.recompute}, distributed optimizer {'on' if p.distributed_optimizer else 'off'}")
    return Plan(header, roles, peak, phase, runtime, total, gpu_mem_gb * GB)


def render(pl: Plan, layouts: str | None = None) -> str:
    """The plan as a table; `layouts` (the layouts of the cluster that fit) goes above the verdict, which stays the
    last line."""
    lines = [pl.header, ""]
    lines.append(f"{'role':<14}{'params/GPU':>12}{'weights':>10}{'grads':>9}{'optimizer':>11}{'activations':>13}{'host':>8}")
    for r in pl.roles:
        lines.append(f"{r.name:<14}{r.params / 1e9:>10.2f} B{r.weights / GB:>7.1f} GB{r.grads / GB:>6.1f} GB"
                     f"{r.optimizer / GB:>8.1f} GB{r.activations / GB:>10.1f} GB{r.host / GB:>5.1f} GB")
    static = sum(r.static for r in pl.roles)
    lines += [
        "",
        f"static (weights + grads + optimizer, all roles)   {static / GB:7.1f} GB   (counted)",
        f"activations at the peak: {pl.peak_phase:<24}{pl.peak_activations / GB:7.1f} GB   (DiT blocks measured, VAE/DINOv2 estimated)",
        f"CUDA context, NCCL, workspaces                    {pl.runtime / GB:7.1f} GB",
        f"with {FRAGMENTATION:.0%} allocator slack, per GPU                 {pl.total / GB:7.1f} GB of {pl.gpu_mem / GB:g} GB",
    ]
    for r in pl.roles:
        for n in r.notes:
            lines.append(f"  {r.name}: {n}")
    if layouts:
        lines.append(layouts)
    if pl.fits:
        lines.append(f"fits: {(pl.gpu_mem - pl.total) / GB:.1f} GB to spare.")
    else:
        lines.append(f"does not fit: {(pl.total - pl.gpu_mem) / GB:.1f} GB over. Try model.recompute=full, a larger tp or pp, "
                     "parallel.distributed_optimizer=true, roles.teacher.precision=fp8 roles.teacher.fp8_weights=true "
                     "(model.spec=te), or roles.<generator|fake_score>.optimizer.cpu_offload=megatron.")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="recipe YAML path or bundled recipe name (flux_dev, sd35_large, sd35_medium, tiny)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.recompute=full")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GB (H100 80, H200 141)")
    p.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: the recipe's)")
    p.add_argument("--pp", type=int, default=None, help="pipeline parallel size (default: the recipe's)")
    p.parse_args = p.parse_intermixed_args  # type: ignore[method-assign]


def fitting_layouts(cfg, nodes: int, gpus_per_node: int, gpu_mem_gb: float) -> list[tuple[int, int, float]]:
    """(tp, pp, GB per GPU) of every layout of this cluster shape that fits, least memory first: TP inside a node
    dividing the heads, PP a power of two up to 8, data parallel filling the rest."""
    import dataclasses

    from megatron_senseflow.models.arch_base import divisors

    arch, world = cfg.model.teacher_arch(), nodes * gpus_per_node
    out = []
    for tp in divisors(arch.num_attention_heads):
        for pp in (1, 2, 4, 8):
            if tp > gpus_per_node or gpus_per_node % tp or pp > arch.num_blocks or world % (tp * pp):
                continue
            par = dataclasses.replace(cfg.parallel, tp=tp, pp=pp, pp_split=None,
                                      sequence_parallel=cfg.parallel.sequence_parallel and tp > 1)
            pl = plan(dataclasses.replace(cfg, parallel=par), nodes, gpus_per_node, gpu_mem_gb)
            if pl.fits:
                out.append((tp, pp, pl.total / GB))
    return sorted(out, key=lambda x: x[2])


def run(args: argparse.Namespace) -> int:
    from . import preflight
    from .config import ConfigError, load_config

    layout = [f"parallel.tp={args.tp}"] if args.tp else []
    layout += [f"parallel.pp={args.pp}"] if args.pp else []
    cfg = load_config(args.config, [*args.overrides, *layout])
    world = args.nodes * args.gpus_per_node
    if world < 1:
        raise ConfigError("--nodes and --gpus-per-node must be at least 1.")
    preflight.check(cfg, world)
    pl = plan(cfg, args.nodes, args.gpus_per_node, args.gpu_mem)
    layouts = None
    if not (args.tp or args.pp):  # the recipe's layout was asked: say which layouts of this cluster fit
        found = fitting_layouts(cfg, args.nodes, args.gpus_per_node, args.gpu_mem)
        if found:
            best = ", ".join(f"tp={tp} pp={pp} ({gb:.1f} GB)" for tp, pp, gb in found[:4])
            layouts = (f"layouts of this cluster that fit, least memory first: {best}; pass --tp / --pp (or "
                       f"parallel.tp / parallel.pp to the run) to use one.")
        else:
            layouts = (f"no tp x pp layout of {args.nodes} node(s) x {args.gpus_per_node} GPUs fits "
                       f"{args.gpu_mem:g} GB; add nodes, or see the suggestions below.")
    print(render(pl, layouts))
    return 0 if pl.fits else 1


def readme_table(recipes=("qwen_image", "flux2_dev"), gpus_per_node: int = 8, gpu_mem_gb: float = 80.0) -> str:
    """The README's table of the largest teachers: full fine-tuning at 1, 2, 4 and 8 nodes and LoRA students
    (rank 64) at one node; per row the recipe's layout, the layout that needs the least memory, and the same search
    with the students' AdamW states on the host (a test keeps the README equal to it)."""
    from .config import load_config

    rows = ["| recipe | students | nodes (8 x 80 GB each) | recipe layout: GB per GPU | least memory: layout, GB per GPU "
            "| ... with AdamW on the host (`cpu_offload=megatron`) |", "|---|---|---|---|---|---|"]
    lora = ["roles.generator.lora.rank=64", "roles.fake_score.lora.rank=64"]
    offload = ["roles.generator.optimizer.cpu_offload=megatron", "roles.fake_score.optimizer.cpu_offload=megatron"]

    def best(cfg, nodes):
        found = fitting_layouts(cfg, nodes, gpus_per_node, gpu_mem_gb)
        return f"tp={found[0][0]} pp={found[0][1]}: {found[0][2]:.1f}" if found else "none fits"

    for name in recipes:
        for students, overrides, node_counts in (("full", [], (1, 2, 4, 8)), ("LoRA rank 64", lora, (1,))):
            cfg, host = load_config(name, overrides), load_config(name, overrides + offload)
            for nodes in node_counts:
                own = plan(cfg, nodes, gpus_per_node, gpu_mem_gb)
                mine = f"tp={cfg.parallel.tp} pp={cfg.parallel.pp}: {own.total / GB:.1f}" + ("" if own.fits else " (over)")
                rows.append(f"| `{name}` | {students} | {nodes} | {mine} | {best(cfg, nodes)} | {best(host, nodes)} |")
    return "\n".join(rows)
