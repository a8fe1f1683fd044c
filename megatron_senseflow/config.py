"""The run's settings: one dataclass per component, each field with its meaning, and the checks that span fields.

A recipe is a YAML file whose keys map one to one onto these dataclasses (typed_yaml.py reads it: an unknown
key is an error that names the key and the file). Command-line overrides use dotted paths (`parallel.tp=2`,
`roles.generator.optimizer.lr=1e-5`). What a run needs beyond its settings (the assets of a training run, the
discriminator's inputs, which the objective decides to train) preflight.py checks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from megatron_senseflow import typed_yaml
from megatron_senseflow.errors import ConfigError
from megatron_senseflow.typed_yaml import Range
from megatron_senseflow.models.configs import Arch, ArchError, make_arch

RECIPE_DIR = Path(__file__).parent / "recipes"


Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
Beta = Annotated[float, Range(ge=0, lt=1)]
Count = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]


# --------------------------------------------------------------------------- components


@dataclass(kw_only=True)
class ModelConfig:
    preset: str = "flux-dev"
    """Model family and its default architecture (models/<family>/arch.py): flux-dev, flux-schnell, sd3-medium,
    sd35-medium, sd35-large, qwen-image, flux2-dev, flux2-klein-4b, flux2-klein-9b, and tiny-* test models. With
    roles.teacher.checkpoint set, the architecture is the checkpoint's own."""
    arch: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's architecture fields, named as in diffusers' config.json; with a teacher
    checkpoint they must agree with it (the loader fills in the rest from the checkpoint)."""
    student_guidance_embeds: bool | None = None
    """Teachers that embed a guidance scale (FLUX.1-dev, FLUX.2-dev): keep that embedding in generator and fake
    score, fed the fixed distill.student_guidance. None: kept when the students are LoRA (they share the
    teacher's weights, and the stock pipeline their adapters load into holds the embedder: its call passes
    guidance_scale = distill.student_guidance, which `senseflow export` prints), dropped for full fine-tuning
    (SenseFlow's FLUX students take no guidance scale)."""
    spec: Literal["local", "te"] = "local"
    """Layer backend: 'local' (plain torch + megatron-core TP layers, runs on CPU) or 'te' (TransformerEngine)."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation recompute for trainable roles: 'none', 'full' (every block) or 'selective' (attention core only)."""
    params_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Dtype of the DiT weights of every role: 'bfloat16' or 'float32' (CPU runs and parity tests use float32)."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """FP8 scaling of roles with precision 'fp8' (TE): 'delayed', 'tensorwise' (current scaling),
    'blockwise', or 'mxfp8' (Blackwell GPUs only)."""

    def teacher_arch(self) -> Arch:
        return make_arch(self.preset, self.arch)

    def take_arch_from(self, checkpoint: str) -> None:
        """The teacher's architecture is the one its checkpoint records (senseflow_model.json): the preset
        names the family and its defaults, and a field the recipe sets in model.arch must agree."""
        from .models.checkpoint_io import CheckpointError, checkpoint_arch
        from .models.configs import arch_to_dict

        try:
            saved = checkpoint_arch(checkpoint)
        except CheckpointError as e:
            raise ConfigError(f"roles.teacher.checkpoint={checkpoint}: {e}") from None
        family = make_arch(self.preset).family
        if saved.family != family:
            raise ConfigError(f"roles.teacher.checkpoint={checkpoint} holds a {saved.label} model, but "
                              f"model.preset={self.preset} is {make_arch(self.preset).label}; use a "
                              f"{saved.label} recipe or preset.")
        have = arch_to_dict(saved)
        want = arch_to_dict(make_arch(self.preset, self.arch))
        for key in self.arch:
            if want.get(key) != have.get(key):
                raise ConfigError(f"model.arch.{key}={want.get(key)!r} disagrees with the teacher checkpoint "
                                  f"{checkpoint}, which has {key}={have.get(key)!r}; drop the override (the "
                                  f"architecture comes from the checkpoint).")
        self.arch = {k: v for k, v in have.items() if k != "family"}

    def student_arch(self) -> Arch:
        """The generator's and fake score's architecture: the teacher's, without a guidance embedding unless
        model.student_guidance_embeds keeps it (SenseFlow's FLUX students take no guidance scale)."""
        arch = self.teacher_arch()
        if arch.guidance_embeds and not self.student_guidance_embeds:
            arch = dataclasses.replace(arch, guidance_embeds=False)
        return arch


@dataclass(kw_only=True)
class ParallelConfig:
    tp: Count = 1
    """Tensor-parallel size; must divide the number of attention heads."""
    pp: Count = 1
    """Pipeline-parallel size; stages are split by layer cost."""
    cp: Count = 1
    """Context-parallel size (reserved; the DiTs accept 1 only for now)."""
    sequence_parallel: bool = False
    """Shard activations along the sequence between TP regions (needs tp > 1)."""
    pp_split: list[int] | None = None
    """Explicit blocks per pipeline stage, counted over double then single blocks (None = balanced by cost)."""
    distributed_optimizer: bool = True
    """Shard optimizer states and fp32 main weights over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce with the backward pass."""
    num_microbatches: Count = 1
    """Microbatches per step and DP rank; the pipeline schedule interleaves them."""


@dataclass(kw_only=True)
class DataConfig:
    path: str | None = None
    """Directory of webdataset shards (with manifest.json), a glob, or a brace pattern; None = synthetic data."""
    encoded: bool = True
    """Shards hold precomputed latents and text embeddings (`senseflow prepare-data --encode`)."""
    resolution: Count = 1024
    """Training resolution in pixels."""
    micro_batch_size: Count = 1
    """Samples per microbatch per data-parallel rank."""
    shuffle_buffer: NonNegativeInt = 1000
    """Samples each loader worker holds for shuffling (raw bytes, before decoding); 0 disables shuffling."""
    num_workers: NonNegativeInt = 2
    """Loader worker processes per rank."""
    seed: NonNegativeInt = 1234
    """Seed (>= 0) of the shard order and the shuffle; every epoch reshuffles with (seed, epoch)."""
    real_images: bool = True
    """Also yield the decoded real image for the discriminator."""
    text_max_length: Count = 512
    """Text tokens per prompt (T5 for FLUX, CLIP+T5 joint for SD3.x)."""


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: Positive = 1e-5
    """Peak learning rate."""
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    """AdamW betas."""
    eps: Positive = 1e-8
    """AdamW epsilon."""
    weight_decay: NonNegative = 0.0
    """Decoupled weight decay."""
    clip_grad: NonNegative = 1.0
    """Global gradient-norm clip (0 disables)."""
    warmup_steps: NonNegativeInt = 0
    """Linear warm-up steps of this role's optimizer, counted in its own updates."""
    cpu_offload: Literal["none", "megatron", "deepspeed"] = "none"
    """Optimizer CPU offload: 'none', 'megatron' (megatron-core's hybrid offload) or 'deepspeed' (DeepSpeedCPUAdam)."""


@dataclass(kw_only=True)
class LoRAConfig:
    rank: NonNegativeInt = 0
    """Adapter rank r; 0 = full fine-tuning (no adapters)."""
    alpha: Positive | None = None
    """Adapter scale numerator: the delta is (alpha / r) B A; None = r (scale 1)."""
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Dropout on the adapter input (PEFT's lora_dropout); only 0 is supported for now."""
    targets: list[Literal["qkv", "proj", "mlp"]] = field(default_factory=lambda: ["qkv", "proj", "mlp"])
    """Linears that get adapters in every block: 'qkv' the (fused) attention projections of both streams, 'proj'
    the attention output projections (and FLUX's single-block proj_out), 'mlp' both MLP linears."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass(kw_only=True)
class GeneratorConfig:
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW settings of the generator."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Train low-rank adapters over the teacher's frozen weights instead of all weights (rank 0: off)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Compute precision: 'bf16' or 'fp32' (the generator never runs FP8)."""
    ema_decay: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Keep an EMA of the generator weights with this decay (0 disables)."""


@dataclass(kw_only=True)
class FakeScoreConfig:
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW settings of the fake score."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Low-rank adapters over the teacher's frozen weights (rank 0: full fine-tuning)."""
    precision: Literal["bf16", "fp8", "fp32"] = "bf16"
    """Compute precision: 'bf16', 'fp8' (TransformerEngine) or 'fp32'."""


@dataclass(kw_only=True)
class TeacherConfig:
    checkpoint: str | None = None
    """Megatron checkpoint of the teacher (`senseflow convert import`); None = random init (tests only)."""
    precision: Literal["bf16", "fp8", "fp32"] = "bf16"
    """Compute precision: 'bf16', 'fp8' (TransformerEngine) or 'fp32'."""
    fp8_weights: bool = False
    """Keep the frozen teacher's GEMM weights in FP8 to save memory (needs precision 'fp8')."""


@dataclass(kw_only=True)
class DiscriminatorConfig:
    enabled: bool = True
    """Train the vision-foundation-model discriminator and use the GAN term."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW settings of the trainable heads."""
    dinov2: str | None = "tiny"
    """Local path of a DINOv2 ViT-L/14 (transformers format), or 'tiny' for a small one built from a config
    (None in the big recipes: the user must set it)."""
    vae: str | None = None
    """Local path of the diffusers VAE (AutoencoderKL) that decodes latents; None or 'pixel' = exact
    space-to-depth codec for pixel-space models (demo, tests)."""
    feature_layers: list[int] = field(default_factory=lambda: [2, 5, 8, 10, 14, 19, 23])
    """DINOv2 blocks whose outputs feed a head each (0-based; the authors' hooks, V350)."""
    patch_features: bool = True
    """Also feed a head the patch embedding with position (the authors' hook_patch: 8 maps with the blocks)."""
    image_size: Count | None = None
    """Resolution DINOv2 sees; None = the decoded image's own (the authors: crop_plan 'none', fix_res_dino False:
    73 x 73 patches at 1024 px, DINOv2's position grid resized bilinearly)."""
    head_downsample: Annotated[int, Range(ge=0, le=3)] = 3
    """Stride-2 convolutions in each head's trunk and reference mapper (the authors: 3)."""
    text_condition: Literal["clip_l", "pooled"] = "clip_l"
    """Head condition: 'clip_l' the L2-normalised CLIP ViT-L/14 text embedding (the authors' CLIP().encode_text),
    taken from what every batch carries: SD3.x's pooled embedding begins with it; FLUX's pooled CLIP-L output is
    projected by CLIP's text_projection (`clip`); 'pooled' the DiT's pooled embedding as is (tests, demo)."""
    clip: str | None = None
    """FLUX with text_condition 'clip_l': a local CLIP ViT-L/14 directory (transformers format); only its
    768 x 768 text_projection is read, to project FLUX's pooled CLIP-L embedding."""
    diffaug: str = "color,translation,cutout"
    """DiffAugment policies applied to real and fake images."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Compute precision: 'bf16' or 'fp32'."""
    generator_grad: Literal["dropped", "carried", "carried_grad_scalers"] = "dropped"
    """What the generator's GAN term leaves on the heads. 'dropped': the heads are frozen for that term, and
    their update is the hinge's alone. 'carried' (the authors' FLUX trainer, F train()): the term runs the
    heads with gradients and nothing clears them before the discriminator's own backward, so on generator
    iterations the heads' update is the generator's GAN gradient plus the hinge's, clipped together.
    'carried_grad_scalers' (their SD3.5 trainers): the same, with the carried part weighted by
    scale_G / scale_D of their two default GradScalers (`authors_grad_scaler_ratio`)."""
    spectral_norm: Literal["torch", "authors"] = "torch"
    """The heads' spectral norm: 'torch' = torch.nn.utils.parametrizations.spectral_norm (15 power iterations at
    construction, then u before v); 'authors' = their SpectralConv2d, torch's legacy hook (random u and v with no
    warm-up, v before u), `discriminator.AuthorsSpectralNorm`."""


@dataclass(kw_only=True)
class RolesConfig:
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    """The few-step student G."""
    fake_score: FakeScoreConfig = field(default_factory=FakeScoreConfig)
    """The fake-score model F that tracks the student's distribution."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The frozen teacher T."""
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    """The DINOv2/CLIP discriminator D."""


@dataclass(kw_only=True)
class TimestepLaw:
    """A law of the noise level sigma, as the authors' trainers draw it (flow.py, "the authors' timestep laws")."""

    kind: Literal["logit_normal", "logit_normal_table", "uniform_index"] = "logit_normal_table"
    """'logit_normal': sigmoid(mean + std z), continuous (SiD-DiT); 'logit_normal_table': the same u read off
    diffusers' 1000-step table, sigma = 1 - floor(1000 u) / 1000 (SenseFlow's FLUX DMD and fake score, SD3.5 fake
    score); 'uniform_index': an integer t uniform in [index_min, index_max] on the flipped table,
    sigma = (t + 1) / 1000 (SenseFlow's SD3.5 DMD). The shift below applies after either."""
    mean: float = 0.0
    """Logit-normal mean."""
    std: Positive = 1.0
    """Logit-normal standard deviation."""
    index_min: Annotated[int, Range(ge=0, le=999)] = 20
    """'uniform_index': the lowest table index (the authors' min_step_percent 0.02 x 1000)."""
    index_max: Annotated[int, Range(ge=0, le=999)] = 980
    """'uniform_index': the highest table index, included (max_step_percent 0.98 x 1000)."""
    shift: Positive = 1.0
    """Timestep shift m applied to the drawn position: m s / (1 + (m - 1) s); 1 = none."""


@dataclass(kw_only=True)
class DistillConfig:
    num_steps: Count = 4
    """Student sampling steps (anchors)."""
    shift: Positive | None = None
    """Shift m of the student anchors shift({1, (K-1)/K, ..., 1/K}); None = the family default (SD3.x 3.0,
    FLUX resolution-dependent: {1, .904, .759, .512} at 1024 px)."""
    anchor_rounding: Literal["none", "floor_1000"] = "none"
    """'floor_1000' truncates the anchors to multiples of 1/1000, as the FLUX trainer's hard-coded timesteps
    (1000, 904, 759, 512); 'none' keeps the exact shift values."""
    ttur: Count = 5
    """Generator updates once every `ttur` iterations; fake score and discriminator every iteration."""
    backward_sim_prob: Fraction = 0.5
    """Probability of building the student input by running G from noise instead of noising a real latent
    (1.0: data-free, as SiD)."""
    anchor_draw: Literal["per_sample", "per_iteration"] = "per_sample"
    """Which anchor a sample trains at: drawn per sample, or one draw shared by the whole iteration (SiD-DiT's
    number of generator steps k ~ U{1..K}, broadcast to every rank)."""
    dmd_weight: NonNegative = 1.0
    """Weight of the DMD loss (of the SiD loss for method=sid)."""
    dmd_timesteps: TimestepLaw = field(default_factory=TimestepLaw)
    """Noise levels at which teacher and fake score judge G's output (DMD; the SiD loss for method=sid)."""
    fake_timesteps: TimestepLaw = field(default_factory=TimestepLaw)
    """Noise levels of the fake score's flow-matching loss."""
    guidance_mode: Literal["embedding", "cfg", "cfg_and_embedding"] = "embedding"
    """How the teacher is guided: 'embedding' (FLUX.1-dev's guidance input), 'cfg' (real classifier-free guidance
    against the empty prompt, SD3.x) or 'cfg_and_embedding' (both, the scale fed as the FLUX guidance too: SiD-DiT)."""
    dmd_guidance: tuple[NonNegative, NonNegative] = (1.0, 8.0)
    """Teacher guidance scale of the DMD (SiD) target, uniform in [a, b] per sample; a == b for a fixed scale."""
    isg_guidance: tuple[NonNegative, NonNegative] = (1.0, 8.0)
    """Teacher guidance scale of ISG's teacher step, drawn afresh: FLUX U(1, 8), SD3.5 Medium U(2, 4), Large 5.0."""
    fake_guidance: NonNegative = 1.0
    """CFG scale of the fake score, in its own loss and in the target (SiD-DiT's cfg_train_fake = cfg_eval_fake);
    1.0 = the conditional branch only (SenseFlow)."""
    student_guidance: NonNegative = 1.0
    """Guidance embedding fed to a student that keeps FLUX's guidance embedder (model.student_guidance_embeds)."""
    ida_lambda: Fraction = 0.97
    """IDA blend: phi <- lam * phi + (1 - lam) * theta after each generator step."""
    isg_weight: NonNegative = 1.0
    """Weight of intra-segment guidance."""
    isg_grid: Literal["sigma", "scheduler_index"] = "sigma"
    """Where ISG draws t_mid: 'sigma' (FLUX, F724): an integer 1000 sigma strictly inside the segment by
    `isg_margin`; 'scheduler_index' (SD3.5, S677-679): an integer index of the shifted 1000-step table
    inside the segment by `isg_margin`, whose last segment ends at the table's smallest sigma (0.003), not 0."""
    isg_margin: NonNegativeInt = 20
    """Distance of t_mid from both ends of its segment, in the grid's integer steps (FLUX 20, SD3.5 50)."""
    pseudo_huber_c: Positive = 1e-3
    """Constant c of the ISG pseudo-Huber loss."""
    gan_weight: NonNegative = 2.0
    """Weight of the generator's GAN term."""
    gan_time_weight: Literal["one_minus_sigma_sq", "scheduler_table_sq"] = "one_minus_sigma_sq"
    """Per-anchor weight w of the GAN terms (generator and discriminator): 'one_minus_sigma_sq' (1 - tau)^2, the
    paper's and the FLUX trainer's; 'scheduler_table_sq' the SD3.5 trainers' (S812-818): their unflipped scheduler
    table read at the anchor's step index, squared: 0.000009, 0.2513, 0.5636, 0.8109 at {1, .9, .75, .5}."""
    fake_loss_reduction: Literal["mean", "sum"] = "mean"
    """Fake-score flow-matching loss over a sample's elements: 'mean' (SenseFlow) or 'sum' (SiD-DiT)."""
    sid_alpha: float = 1.0
    """SiD alpha in (y_r - y_f) . ((y_r - x_g) - alpha (y_r - y_f))."""
    sid_weighting: Literal["one_minus_sigma", "one_minus_sigma_sq", "inv_sigma", "inv_sigma_sq", "snr",
                           "snr_sqrt", "legacy"] = "one_minus_sigma"
    """SiD per-sample weight (SiD-DiT's weighting_scheme): 1 - sigma (their default), (1 - sigma)^2, 1 / sigma,
    1 / sigma^2, ((1 - sigma) / sigma)^2, (1 - sigma) / sigma, or 'legacy' 1 / mean|x_g - y_r| (the original SiD)."""
    sid_loss_scale: Positive = 100.0
    """SiD-DiT's loss_scaling_G: the SiD loss is summed over a sample's elements and multiplied by this."""


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: NonNegativeInt = 1000
    """Training iterations (each runs a fake-score and discriminator update, a generator update every ttur)."""
    output_dir: str = "runs/senseflow"
    """Where checkpoints, TensorBoard logs and samples go; rerunning with the same directory resumes."""
    seed: int = 1234
    """Base seed; noise streams differ across data-parallel ranks and agree inside a model-parallel group."""
    nan_max_consecutive: Count = 5
    """Abort after this many consecutive steps with a non-finite loss (each one is skipped and logged)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (CUDA if present), 'cuda' or 'cpu'."""


@dataclass(kw_only=True)
class CheckpointConfig:
    every: NonNegativeInt = 500
    """Save every N iterations (0 = only at the end and on signals)."""
    at_end: bool = True
    """Save when the run reaches train.max_steps. false for smoke tests and throughput measurements, whose end
    state nobody resumes: a rerun then starts from the last periodic checkpoint (a FLUX run's final save writes
    about 340 GB)."""
    keep_last: Count = 3
    """Keep this many step directories; older ones are removed after a successful save."""
    resume: bool = True
    """Resume from the latest checkpoint in output_dir when one exists."""
    save_on_signal: bool = True
    """SIGTERM/SIGUSR1 save at the next step boundary and exit 0 (Slurm preemption)."""
    verify: Literal["checksum", "size"] = "checksum"
    """Integrity check of the checkpoint a run resumes from: file sizes and CRC32s, or sizes only (for very
    large runs, where reading every byte again at start takes minutes)."""
    async_save: bool = False
    """Write the distributed-checkpoint parts in the background (megatron-core's async machinery) while
    training goes on; a save counts once every rank's writer finished."""


@dataclass(kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files under output_dir/tensorboard."""
    log_every: NonNegativeInt = 10
    """Scalars every N iterations."""
    image_every: NonNegativeInt = 500
    """4-step sample grids for the fixed prompts every N iterations (0 disables)."""
    peak_tflops: float | None = None
    """Per-GPU peak TFLOP/s for MFU; None = look up the GPU model (H100/H200/A100...), no MFU on CPU."""


@dataclass(kw_only=True)
class EvalConfig:
    every: NonNegativeInt = 0
    """Evaluate the generator (and its EMA) every N iterations; 0 disables it."""
    num_samples: Count = 64
    """The first N samples of the data stream (the same whatever the data-parallel layout) are the evaluation
    set: their conditioning is sampled, their real latents, decoded, are the reference."""
    batch: Count = 8
    """Samples per forward. Sample i is always in batch i // batch, at any data-parallel size (replicas take
    whole batches in turn), so the numbers do not depend on the layout."""
    features: str | None = None
    """TorchScript feature network for the Frechet distance: uint8 images [N, 3, H, W] in, features [N, D] out
    (clean-fid's inception-2015-12-05.pt, or the demo's digit network)."""
    clip: str | None = None
    """Local transformers CLIP directory (e.g. openai/clip-vit-large-patch14): adds the CLIP score of each sample
    against its own caption (eval/clip_*). The model sits on the trainer's device while training (ViT-L: 1.7 GB)."""
    pickscore: str | None = None
    """Local PickScore_v1 directory (transformers CLIP format with its processor files): adds PickScore
    (eval/pickscore_*), computed as `senseflow eval` does."""
    hpsv2: str | None = None
    """Local HPS_v2.1_compressed.pt: adds HPSv2.1 (eval/hpsv2_*), with `hpsv2_clip` (image_rewards.py)."""
    hpsv2_clip: str | None = None
    """Local ViT-H-14 transformers folder whose config and tokenizer HPSv2 uses (the PickScore_v1 folder works)."""
    imagereward: str | None = None
    """Local folder with ImageReward.pt, med_config.json and vocab.txt: adds ImageReward (eval/imagereward_*)."""
    aesthetic: str | None = None
    """Local sac+logos+ava1-l14-linearMSE.pth: adds the LAION aesthetic score (eval/aesthetic_*) on `clip`."""


@dataclass(kw_only=True)
class Config:
    purpose: Literal["training", "test", "demo"] = "training"
    """'training' refuses every stand-in (a random teacher or DINOv2, synthetic data, the pixel codec, the
    pooled text condition); a recipe that declares 'test' or 'demo' may use them, and the banner names each."""
    method: Literal["senseflow", "dmd2", "sid"] = "senseflow"
    """Objective: 'senseflow' (DMD + ISG + IDA + GAN), 'dmd2' (IDA and ISG off) or 'sid'."""
    derived: list[str] = field(default_factory=list)
    """Where a recipe's values come from when the authors published none for its teacher, one sentence each
    (`--dry-run` prints them); empty for the authors' own recipes."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture shared by the roles."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline / data parallel layout, shared by every role."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    roles: RolesConfig = field(default_factory=RolesConfig)
    """Per-role optimizer and precision."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """SenseFlow / DMD2 / SiD hyper-parameters."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop length, output and seeds."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """TensorBoard and sample grids."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """In-loop evaluation: Frechet distance of 4-step samples (stochastic and Euler) against the real data."""

    def validate(self, world_size: int | None = None) -> None:
        """Raise ConfigError with one sentence for the first thing that cannot run.

        Single-field rules (choices, ranges, finiteness) are types the loader checks;
        what is left here spans fields."""
        try:
            arch = self.model.teacher_arch()
        except ArchError as e:
            raise ConfigError(str(e)) from None
        self._check_lora()
        if self.eval.every and not self.eval.features:
            raise ConfigError("eval.every is set but eval.features is not: give a TorchScript feature network "
                              "(for example clean-fid's inception-2015-12-05.pt) as eval.features=PATH.")
        if self.eval.every and self.parallel.pp > 1 and self.eval.batch % self.parallel.num_microbatches:
            raise ConfigError(f"eval.batch={self.eval.batch} must be a multiple of parallel.num_microbatches="
                              f"{self.parallel.num_microbatches}: the pipeline splits each evaluation batch into them.")
        if self.eval.every and self.eval.num_samples < 2:
            raise ConfigError("eval.num_samples must be at least 2 for a Frechet distance.")
        for key in ("clip", "pickscore", "hpsv2_clip", "imagereward"):
            where = getattr(self.eval, key)
            if self.eval.every and where is not None and not Path(where).is_dir():
                raise ConfigError(f"eval.{key}={where} is not a directory; give a local folder (no model hub is "
                                  "contacted).")
        for key in ("hpsv2", "aesthetic"):
            where = getattr(self.eval, key)
            if self.eval.every and where is not None and not Path(where).is_file():
                raise ConfigError(f"eval.{key}={where} is not a file; give the local weights file.")
        if self.eval.every and (self.eval.hpsv2 is None) != (self.eval.hpsv2_clip is None):
            raise ConfigError("eval.hpsv2 and eval.hpsv2_clip go together (the HPS weights and the ViT-H-14 folder "
                              "for its config and tokenizer).")
        if self.eval.every and self.eval.aesthetic is not None and self.eval.clip is None:
            raise ConfigError("eval.aesthetic scores CLIP ViT-L/14 image embeddings: set eval.clip too.")
        p = self.parallel
        try:
            arch.check_layout(p.tp, p.pp, p.cp, world_size)
        except ArchError as e:
            raise ConfigError(str(e)[:-1] + "; change the number of processes or the parallel sizes."
                              if e.kind == "world" else str(e)) from None
        if p.cp != 1:
            raise ConfigError("context parallel (parallel.cp) is not supported by the DiTs yet; set parallel.cp=1.")
        if p.sequence_parallel and p.tp == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1.")
        if p.pp_split is not None:
            if len(p.pp_split) != p.pp or sum(p.pp_split) != arch.num_blocks or min(p.pp_split) < 1:
                raise ConfigError(
                    f"parallel.pp_split={p.pp_split} must list {p.pp} positive block counts summing to {arch.num_blocks}."
                )
        for role, prec in (
            ("generator", self.roles.generator.precision),
            ("fake_score", self.roles.fake_score.precision),
            ("teacher", self.roles.teacher.precision),
        ):
            if prec == "fp8" and self.model.spec != "te":
                raise ConfigError(f"roles.{role}.precision=fp8 needs model.spec=te (TransformerEngine).")
            # the DiT roles share one weight dtype (IDA blends generator into fake score elementwise);
            # their precision says how they compute on it
            want = "float32" if prec == "fp32" else "bfloat16"
            if self.model.params_dtype != want:
                raise ConfigError(
                    f"roles.{role}.precision={prec} computes on {want} weights but model.params_dtype is "
                    f"{self.model.params_dtype}; set model.params_dtype={want} or change the role's precision."
                )
        for role in ("generator", "fake_score"):
            off = getattr(self.roles, role).optimizer.cpu_offload
            if off != "none" and not self.parallel.distributed_optimizer:
                raise ConfigError(f"roles.{role}.optimizer.cpu_offload={off} needs parallel.distributed_optimizer=true "
                                  "(megatron-core offloads the distributed optimizer's shard).")
        if self.roles.teacher.fp8_weights and self.roles.teacher.precision != "fp8":
            raise ConfigError("roles.teacher.fp8_weights=true needs roles.teacher.precision=fp8.")
        d = self.distill
        for name in ("dmd_guidance", "isg_guidance"):
            lo, hi = getattr(d, name)
            if lo > hi:
                raise ConfigError(f"distill.{name}={[lo, hi]}: the lower end exceeds the upper.")
        if d.guidance_mode != "cfg" and not arch.guidance_embeds:
            raise ConfigError(
                f"distill.guidance_mode={d.guidance_mode!r} needs a teacher with a guidance embedding "
                f"({self.model.preset} has none); use guidance_mode='cfg'."
            )
        for name in ("dmd_timesteps", "fake_timesteps"):
            law = getattr(d, name)
            if law.kind == "uniform_index" and law.index_min > law.index_max:
                raise ConfigError(f"distill.{name}.index_min={law.index_min} exceeds index_max={law.index_max}.")

    def _check_lora(self) -> None:
        g, f = self.roles.generator.lora, self.roles.fake_score.lora
        for name, lc in (("generator", g), ("fake_score", f)):
            if lc.enabled and lc.dropout:
                raise ConfigError(f"roles.{name}.lora.dropout={lc.dropout}: adapter dropout is not supported yet "
                                  f"(it would need one dropout mask per TP group); use 0.")
            if lc.enabled and not lc.targets:
                raise ConfigError(f"roles.{name}.lora.targets is empty; name at least one of qkv, proj, mlp.")
        if not (g.enabled or f.enabled):
            return
        if self.parallel.sequence_parallel:
            raise ConfigError("LoRA adapters do not support parallel.sequence_parallel yet; set it to false.")
        if self.roles.teacher.fp8_weights:
            raise ConfigError("roles.teacher.fp8_weights stores the teacher's weights in FP8, but LoRA roles share "
                              "those weights as their frozen base; set roles.teacher.fp8_weights=false (the teacher "
                              "still computes in FP8 with precision=fp8).")
        ida = self.method == "senseflow" and self.distill.ida_lambda < 1
        same = (g.rank, g.alpha, sorted(g.targets)) == (f.rank, f.alpha, sorted(f.targets))
        if ida and not same:
            raise ConfigError("IDA blends the fake score toward the generator weight by weight, so both need the "
                              "same adaptation: give roles.generator.lora and roles.fake_score.lora the same rank, "
                              "alpha and targets (or rank 0 for both), or disable IDA with distill.ida_lambda=1.")


# --------------------------------------------------------------------------- loading (typed_yaml.py reads)


def resolve_recipe(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a bundled recipe (`tiny`, `flux_dev`, ...)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    bundled = RECIPE_DIR / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if bundled.is_file():
        return bundled
    names = ", ".join(sorted(x.stem for x in RECIPE_DIR.glob("*.yaml")))
    raise ConfigError(f"no recipe file {name_or_path!r}; give a YAML path or one of the bundled recipes: {names}.")


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    cfg = typed_yaml.build(Config, data, source)
    m, r = cfg.model, cfg.roles
    if m.student_guidance_embeds is None:  # resolved here, so a run's saved config.yaml says what it did
        m.student_guidance_embeds = r.generator.lora.enabled or r.fake_score.lora.enabled
    return cfg


def load_config(recipe: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe, apply dotted overrides, type-check every key, take the teacher's architecture from its
    checkpoint and validate the settings (what a run also needs of its objective, preflight.py checks)."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if recipe is not None:
        path = resolve_recipe(recipe)
        source = str(path)
        data = typed_yaml.read_mapping(path)
    for text in overrides:
        typed_yaml.set_dotted(data, *typed_yaml.parse_override(text))
    cfg = config_from_dict(data, source + (" (with overrides)" if overrides else ""))
    if cfg.roles.teacher.checkpoint:
        cfg.model.take_arch_from(cfg.roles.teacher.checkpoint)
    cfg.validate()
    return cfg


config_to_dict = typed_yaml.to_dict
dump_config = typed_yaml.dump
