"""A model family as one object: what differs between FLUX.1, SD3.x, Qwen-Image and FLUX.2, asked in one place.

Each family lives in its own folder under models/ (`models/flux`, `models/sd3`, `models/qwen_image`,
`models/flux2`) and exposes one `Family` instance; `models/registry.py` lists them, one line each. Code outside
models/ never tests which family it holds: it asks `family_of(arch)` (or the architecture's own fields) for

- the architecture: its config dataclass and presets (read from a diffusers config.json), the stage of the DiT
  built from megatron-core layer specs (`build`), and the diffusers <-> canonical weight mapping (`groups`);
- the DiT's interface, latents in and velocity out: `model_inputs` turns (latent [B, C, H, W], sigma [B], text,
  pooled, guidance) into the model's forward arguments (patchify / packing, position ids, time scale, guidance
  input, text mask) and `velocity` turns its output back into [B, C, H, W]; `reference_inputs` gives diffusers'
  own calling convention for the same inputs (parity tests, `senseflow verify`);
- the schedule facts: `default_shift` (fixed, or resolution- and step-dependent);
- the costs the planner needs: FLOPs, parameter counts, LoRA-able linears and activation kinds per block;
- the encoders: `text_encoder` (prompts -> the embeddings the DiT and the discriminator read) and `vae` (images
  <-> latents), used by offline encoding, sampling and the discriminator;
- export: what a stock diffusers pipeline of the student needs (`pipeline_overrides`) and how to call it, and the
  original release's single-file layout (`single_file_recipe`).

Tensor legend: x latents [B, C, H, W] in the family's latent space, sigma [B], text [B, L, D], pooled [B, P].
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch


class Family:
    """The interface every family implements (see the module docstring). Subclasses set the class attributes and
    override the methods that raise NotImplementedError."""

    name: ClassVar[str]
    """Short name stored in checkpoints (`senseflow_model.json`) and used on command lines."""
    label: ClassVar[str]
    """Name for people: 'FLUX', 'SD3', 'Qwen-Image', 'FLUX.2' (its architecture's `label`)."""
    arch_cls: ClassVar[type]
    """Its architecture dataclass (models/configs.py ArchBase); field names follow diffusers' config.json."""
    presets: ClassVar[dict[str, Any]]
    """Released (and tiny test) architectures by preset name."""
    pipelines: ClassVar[tuple[str, ...]]
    """diffusers pipeline classes whose model_index.json holds this transformer (prefix match)."""
    default_text_length: ClassVar[int]
    """Text tokens per prompt the teacher's pipeline produces (and the bundled recipes train with)."""
    clip_at_encode: ClassVar[bool] = False
    """The teacher's text stack has no CLIP ViT-L/14: `prepare-data --encode --clip DIR` computes the
    discriminator's condition into the pooled vector (samplers, which do not need it, get zeros)."""
    clip_condition: ClassVar[str] = "slice"
    """How the discriminator heads' CLIP ViT-L/14 text condition is read off the pooled vector every batch carries:
    'slice' its first 768 channels are CLIP-L's projected text embedding; 'project' it is CLIP-L's pooler output,
    still to be projected by CLIP's text_projection (roles.discriminator.clip)."""

    # ------------------------------------------------------------------ architecture
    def build(self, arch, config, backend, layout):
        """This pipeline stage of the DiT (a models.base.DiTBase) from megatron-core layer specs of `backend`."""
        raise NotImplementedError

    def groups(self, arch) -> list:
        """diffusers <-> canonical tensor groups (models/hf_mapping.py Group), in the model's order."""
        raise NotImplementedError

    # ------------------------------------------------------------------ interface: latents in, velocity out
    def model_inputs(self, arch, x, sigma, text, pooled, guidance=None) -> dict:
        """The model's forward arguments for latents x at noise levels sigma (every pipeline stage gets them)."""
        raise NotImplementedError

    def velocity(self, arch, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's output (last stage) as a velocity shaped like x."""
        raise NotImplementedError

    def image_tokens(self, arch, latent_h: int, latent_w: int) -> int:
        """Image tokens of a latent of this height and width."""
        raise NotImplementedError

    def reference_inputs(self, arch, batch: int, latent_hw: tuple[int, int], num_txt: int, g: torch.Generator,
                         guidance: float | None) -> dict:
        """Random inputs in the diffusers model's own calling convention (fp32, CPU), the same for every rank
        that uses the same generator; `guidance` None draws a scale per sample (parity tests)."""
        raise NotImplementedError

    def our_inputs(self, arch, reference: dict, num_txt: int) -> dict:
        """`reference_inputs` as our model's forward arguments (they follow diffusers' names; some families need
        a little more on later pipeline stages)."""
        return dict(reference)

    def per_sample_keys(self) -> tuple[str, ...]:
        """Keys of `reference_inputs` that are not split into microbatches (position ids shared by the batch)."""
        return ()

    # ------------------------------------------------------------------ schedule
    def default_shift(self, arch, num_image_tokens: int, num_steps: int) -> float:
        """The teacher's own timestep shift m (shift(s) = m s / (1 + (m - 1) s)) at this many image tokens and
        sampling steps, as its diffusers pipeline computes it."""
        raise NotImplementedError

    # ------------------------------------------------------------------ costs (models/flops.py, memory_plan)
    def block_costs(self, arch, batch: int, s_img: int, s_txt: int) -> list[int]:
        """Forward FLOPs of each block in global order."""
        raise NotImplementedError

    def embed_flops(self, arch, batch: int, s_img: int, s_txt: int) -> tuple[int, int]:
        """(first-stage embedders and conditioning, last-stage output layer) forward FLOPs."""
        raise NotImplementedError

    def block_params(self, arch) -> list[tuple[int, int]]:
        """(TP-split, TP-replicated) parameter counts of each block in global order (equal to diffusers')."""
        raise NotImplementedError

    def embedder_params(self, arch) -> int:
        """Parameters outside the blocks; every pipeline stage holds them."""
        raise NotImplementedError

    def embedder_split_params(self, arch) -> int:
        """The part of `embedder_params` that is split over TP (FLUX.2's shared modulation linears); the rest is
        replicated on every TP rank."""
        return 0

    def block_lora_linears(self, arch, index: int) -> list[tuple[str, str, int, int, int]]:
        """(target, 'column' | 'row', in, out, parts) of every linear models/lora.py adapts in block `index`."""
        raise NotImplementedError

    def block_kinds(self, arch, index: int) -> list[str]:
        """The measured activation kinds (memory_plan.BLOCK_ACT) block `index` is made of."""
        raise NotImplementedError

    def with_depth(self, arch, double: int, single: int = 0, dual: int = 0):
        """The same architecture with `double` double-stream (joint) blocks, `single` single-stream blocks and
        `dual` MMDiT-X blocks where the family has them (memory probes measure per-block costs this way)."""
        raise NotImplementedError

    def block_counts(self, arch) -> tuple[int, int, int]:
        """(double, single, dual) blocks of `arch`, the inverse of `with_depth`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ encoders
    def text_encoder(self, pipeline_dir, max_length: int | None = None, device="cpu", dtype=torch.float32,
                     clip: str | None = None):
        """The teacher's text stack from a local diffusers pipeline folder (models/text_encoders.py TextEncoder).
        `clip`: a CLIP ViT-L/14 directory for families whose own encoder is not CLIP (the discriminator's
        condition is computed at encode time)."""
        raise NotImplementedError

    def vae(self, vae_dir, dtype=torch.float32, device="cpu"):
        """The teacher's VAE from a local `vae/` folder as a models.vae.LatentCodec (images <-> latents)."""
        raise NotImplementedError

    vae_decoder: ClassVar[tuple[float, float]] = (2.7e9, 49.5e6)
    """(elements the VAE decoder keeps for the GAN term's backward per 1024 px image, decoder parameters): the
    FLUX.1 / SD3.x AutoencoderKL decoder under diffusers' gradient checkpointing (memory_plan)."""

    def vae_factor(self, vae_dir=None) -> int:
        """Pixels per latent side of the codec `vae` would build, from its config.json alone (the released
        model's when no folder is given or it is not there yet: 8 for FLUX.1, SD3.x and Qwen-Image)."""
        from .vae import KLCodec, read_config

        return KLCodec.factor_of(read_config(vae_dir) if vae_dir else {})

    # ------------------------------------------------------------------ export
    def pipeline_overrides(self, arch, model_index: dict) -> dict[str, dict]:
        """Config entries an exported student's pipeline folder gets on top of the base pipeline's (whose
        model_index.json is `model_index`), by file relative to the folder ({"scheduler/scheduler_config.json":
        {...}, "model_index.json": {...}}), so that the stock pipeline's default call samples the student as it
        trained."""
        return {}

    single_file: ClassVar[str | None] = None
    """The original release's single-file layout that `senseflow export --single-file` writes (for people), None
    where the family has none here."""

    def single_file_recipe(self, keys) -> list:
        """diffusers tensor names -> the steps that make the original single file (models/single_file.py)."""
        raise NotImplementedError

    def sampling_call(self, arch, anchors_unshifted: list[float]) -> str | None:
        """The stock pipeline call that samples an exported student at its anchors, when its default call
        cannot (None: the default call does)."""
        return None
