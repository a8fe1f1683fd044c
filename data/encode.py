"""Offline encoding: VAE latents and text embeddings computed once, so training never runs the encoders.

Reusable pieces, all loaded from a local diffusers pipeline folder
(vae/, text_encoder/, text_encoder_2/, text_encoder_3/, tokenizer*/):

    LatentEncoder.from_pretrained(path).encode(images_B3HW_in_-1_1) -> latents_BCHW, (z - shift) * scale
    text = TextEncoder.from_pretrained(path, "flux" | "sd3")
    text.encode(prompts) -> (text_BLD float32, pooled_BP float32)

FLUX: T5 sequence embeddings [B, 512, 4096] (`t5.npy`) + CLIP-L pooled [B, 768]
(`clip_pooled.npy`), as `FluxPipeline.encode_prompt`. SD3.x: CLIP-L and
CLIP-G penultimate hidden states concatenated and zero-padded to T5's width,
then T5 appended along the sequence ([B, 77 + 77, 4096], `text.npy`), and
both CLIP projections concatenated ([B, 2048], `pooled.npy`), as
`StableDiffusion3Pipeline.encode_prompt`.

Latents are the posterior mode, not a sample: the encoded set is then a
pure function of the images, and the posterior's spread is far below the
noise the training adds anyway.

`encode_shards` turns a folder of image shards into encoded shards with the
same names, keeping the resized jpg, caption and JSON of every sample (the
discriminator needs the real image). Rank r of W encodes input shards
r, r + W, ...; rank 0 writes the manifest and `empty_prompt.safetensors`
(the embeddings of "" for classifier-free guidance) once all ranks are done.
"""
from __future__ import annotations

import io
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from megatron_senseflow.config import ConfigError, DataConfig

from . import bad
from .bad import Problem
from .decode import IMAGE_SHARD_KEYS, Skip, sample_spec
from .shards import JobDir, ShardReadError, ShardSet, ShardSink, iter_samples

log = logging.getLogger(__name__)

FAMILIES = ("flux", "sd3")
LATENT_KEY = "latent.npy"
EMPTY_PROMPT = "empty_prompt.safetensors"
# The distillation trainers' prompt lengths: FLUX T5 512 (SenseFlow's FLUX encode_prompt); SD3.x 77 CLIP + 77 T5
# tokens (SenseFlow's SD3.5 and SiD-DiT's SD3 encode T5 with max_length 77; diffusers' own default is 256)
DEFAULT_TEXT_LENGTH = {"flux": 512, "sd3": 77 + 77}
PIPELINE_FAMILY = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}


def _need(folder: Path, sub: str) -> Path:
    path = folder / sub
    if not path.is_dir():
        raise ConfigError(
            f"{folder} has no {sub}/ folder; --model-path must be a local diffusers pipeline folder "
            f"(vae/, text_encoder*/, tokenizer*/) such as a FLUX.1 or SD3.x download."
        )
    return path


def infer_family(pipeline_dir: str | Path) -> str:
    """'flux' or 'sd3' from the pipeline's model_index.json."""
    index = Path(pipeline_dir) / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError):
        name = ""
    for prefix, family in PIPELINE_FAMILY.items():
        if name.startswith(prefix):
            return family
    raise ConfigError(f"cannot tell the model family from {index} (class {name!r}); pass --family flux or --family sd3.")


# --------------------------------------------------------------------------- latents


class LatentEncoder:
    """A diffusers AutoencoderKL that maps images in [-1, 1] to the latents the DiT is trained on."""

    def __init__(self, vae, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        cfg = vae.config
        self.device, self.dtype = torch.device(device), dtype
        self.shift = float(cfg.shift_factor or 0.0)  # SD-style VAEs have none
        self.scale = float(cfg.scaling_factor)
        self.scale_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.channels = int(cfg.latent_channels)

    @classmethod
    def from_pretrained(cls, pipeline_dir: str | Path, device="cpu", dtype=torch.float32) -> "LatentEncoder":
        from diffusers import AutoencoderKL

        return cls(AutoencoderKL.from_pretrained(_need(Path(pipeline_dir), "vae"), torch_dtype=dtype), device, dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [-1, 1] -> float32 latents [B,C,H/f,W/f] on the CPU."""
        z = self.vae.encode(images.to(self.device, self.dtype)).latent_dist.mode()
        return ((z.float() - self.shift) * self.scale).cpu()


# --------------------------------------------------------------------------- text


def _tokens(tokenizer, prompts: list[str], length: int) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


class TextEncoder(ABC):
    """The text stack of one model family: prompts -> (sequence embeddings, pooled embedding)."""

    family: str
    text_key: str
    pooled_key: str
    max_length: int
    """Text tokens per prompt in the output sequence."""

    @abstractmethod
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> text [B, L, D] float32, pooled [B, P] float32, on the CPU."""

    @property
    @abstractmethod
    def text_dim(self) -> int: ...

    @property
    @abstractmethod
    def pooled_dim(self) -> int: ...

    @staticmethod
    def from_pretrained(
        pipeline_dir: str | Path, family: str, max_length: int | None = None, device="cpu", dtype=torch.float32
    ) -> "TextEncoder":
        if family not in FAMILIES:
            raise ConfigError(f"--family {family!r} is unknown; use flux or sd3.")
        cls = FluxTextEncoder if family == "flux" else SD3TextEncoder
        return cls.from_pretrained(Path(pipeline_dir), max_length or DEFAULT_TEXT_LENGTH[family], device, dtype)


def _load_text_model(cls_name: str, path: Path, device, dtype):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class FluxTextEncoder(TextEncoder):
    """CLIP-L pooled output + T5 last hidden state, as diffusers' FluxPipeline.encode_prompt."""

    family, text_key, pooled_key = "flux", "t5.npy", "clip_pooled.npy"

    def __init__(self, clip_tokenizer, clip, t5_tokenizer, t5, max_length: int = 512):
        self.clip_tokenizer, self.clip = clip_tokenizer, clip
        self.t5_tokenizer, self.t5 = t5_tokenizer, t5
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, d: Path, max_length: int, device, dtype) -> "FluxTextEncoder":
        return cls(
            _load_tokenizer(_need(d, "tokenizer")),
            _load_text_model("CLIPTextModel", _need(d, "text_encoder"), device, dtype),
            _load_tokenizer(_need(d, "tokenizer_2")),
            _load_text_model("T5EncoderModel", _need(d, "text_encoder_2"), device, dtype),
            max_length,
        )

    @property
    def text_dim(self) -> int:
        return self.t5.config.d_model

    @property
    def pooled_dim(self) -> int:
        return self.clip.config.hidden_size

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        clip_ids = _tokens(self.clip_tokenizer, prompts, self.clip_tokenizer.model_max_length)
        pooled = self.clip(clip_ids.to(self.clip.device), output_hidden_states=False).pooler_output
        t5_ids = _tokens(self.t5_tokenizer, prompts, self.max_length)
        text = self.t5(t5_ids.to(self.t5.device), output_hidden_states=False)[0]
        return text.float().cpu(), pooled.float().cpu()


class SD3TextEncoder(TextEncoder):
    """CLIP-L + CLIP-G (penultimate layer, projections pooled) joined with T5, as StableDiffusion3Pipeline."""

    family, text_key, pooled_key = "sd3", "text.npy", "pooled.npy"

    def __init__(self, clip_l_tokenizer, clip_l, clip_g_tokenizer, clip_g, t5_tokenizer, t5, max_length: int = 154):
        self.clips = ((clip_l_tokenizer, clip_l), (clip_g_tokenizer, clip_g))
        self.t5_tokenizer, self.t5 = t5_tokenizer, t5
        # diffusers pads both CLIP prompts to the first tokenizer's length
        self.clip_length = clip_l_tokenizer.model_max_length
        if max_length <= self.clip_length:
            raise ConfigError(
                f"SD3 text length {max_length} leaves no room for T5 after {self.clip_length} CLIP tokens; "
                f"use at least {self.clip_length + 1} (SD3.x default {DEFAULT_TEXT_LENGTH['sd3']})."
            )
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, d: Path, max_length: int, device, dtype) -> "SD3TextEncoder":
        return cls(
            _load_tokenizer(_need(d, "tokenizer")),
            _load_text_model("CLIPTextModelWithProjection", _need(d, "text_encoder"), device, dtype),
            _load_tokenizer(_need(d, "tokenizer_2")),
            _load_text_model("CLIPTextModelWithProjection", _need(d, "text_encoder_2"), device, dtype),
            _load_tokenizer(_need(d, "tokenizer_3")),
            _load_text_model("T5EncoderModel", _need(d, "text_encoder_3"), device, dtype),
            max_length,
        )

    @property
    def text_dim(self) -> int:
        return self.t5.config.d_model

    @property
    def pooled_dim(self) -> int:
        return sum(enc.config.projection_dim for _, enc in self.clips)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs, pooled = [], []
        for tokenizer, encoder in self.clips:
            out = encoder(_tokens(tokenizer, prompts, self.clip_length).to(encoder.device), output_hidden_states=True)
            pooled.append(out.text_embeds)
            seqs.append(out.hidden_states[-2])
        t5_ids = _tokens(self.t5_tokenizer, prompts, self.max_length - self.clip_length)
        t5 = self.t5(t5_ids.to(self.t5.device))[0]
        clip = torch.cat(seqs, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        text = torch.cat([clip.to(t5.dtype), t5], dim=-2)
        return text.float().cpu(), torch.cat(pooled, dim=-1).float().cpu()


# --------------------------------------------------------------------------- encoding shards


@dataclass(frozen=True, kw_only=True)
class EncodeSettings:
    """Everything that decides the content of the encoded shards (a rerun must pass the same)."""

    input: str
    model_path: str
    family: str
    text_max_length: int
    text_dtype: str = "float16"


TEXT_DTYPES = {"float16": np.float16, "float32": np.float32}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class _ShardEncoder:
    """Encodes one input shard into one output shard of the same name."""

    def __init__(self, s: EncodeSettings, text: TextEncoder, latent: LatentEncoder, spec, out: Path, batch_size: int):
        self.s, self.text, self.latent, self.spec, self.out = s, text, latent, spec, out
        self.batch_size = batch_size

    def __call__(self, url: str, name: str) -> dict[str, Any]:
        problems: list[Problem] = []
        sink = ShardSink(self.out, lambda part: name)
        pending: dict[tuple, list] = {}
        try:
            for sample, decoded in self._decoded(url, problems):
                group = pending.setdefault(tuple(decoded["image"].shape), [])
                group.append((sample, decoded))
                if len(group) == self.batch_size:
                    self._flush(pending.pop(tuple(decoded["image"].shape)), sink, problems, name)
            for group in pending.values():
                self._flush(group, sink, problems, name)
            parts = sink.close()
        except BaseException:
            sink.abort()
            raise
        # an input whose samples were all bad still gets a record, but lists no shard
        return {"job": name, "shards": [p for p in parts if p["count"]], "problems": [asdict(p) for p in problems]}

    def _decoded(self, url: str, problems: list[Problem]):
        try:
            for sample in iter_samples(url):
                try:
                    yield sample, self.spec.decode(sample)
                except Skip as e:
                    problems.append(Problem(e.reason, f"{url}:{sample.key}", e.detail))
        except ShardReadError as e:
            problems.append(Problem(e.reason, url, f"after {e.index} samples: {e}"))

    def _flush(self, group: list, sink: ShardSink, problems: list[Problem], name: str) -> None:
        images = torch.from_numpy(np.stack([d["image"] for _, d in group]).astype(np.float32) / 127.5 - 1.0)
        latents = self.latent.encode(images).numpy()
        text, pooled = (t.numpy() for t in self.text.encode([d["prompt"] for _, d in group]))
        dtype = TEXT_DTYPES[self.s.text_dtype]
        for i, (sample, _) in enumerate(group):
            arrays = {LATENT_KEY: latents[i], self.text.text_key: text[i].astype(dtype), self.text.pooled_key: pooled[i].astype(dtype)}
            broken = [k for k, a in arrays.items() if not np.isfinite(a).all()]
            if broken:
                problems.append(Problem(bad.NON_FINITE, f"{name}:{sample.key}", f"{broken[0]} has NaN/inf"))
                continue
            kept = {k: v for k, v in sample.members.items() if k in IMAGE_SHARD_KEYS}
            sink.write({"__key__": sample.key, **kept, **{k: _npy(a) for k, a in arrays.items()}})


def encode_shards(
    s: EncodeSettings,
    out: str | Path,
    text: TextEncoder,
    latent: LatentEncoder,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    batch_size: int = 8,
) -> dict[str, Any] | None:
    """Encode this rank's share of the input shards; rank 0 returns the manifest, other ranks None."""
    out = Path(out)
    source = ShardSet.open(s.input)
    if source.manifest.get("kind") != "images":
        raise ConfigError(f"--input {s.input} must be a folder of image shards written by `senseflow prepare-data`.")
    # decode exactly as the raw loader would, at the shards' own resolution
    spec = sample_spec(
        DataConfig(path=s.input, encoded=False, resolution=source.manifest["resolution"]), source
    )
    names = source.names
    jobdir = JobDir(out, {"settings": asdict(s), "jobs": len(names), "fingerprint": source.fingerprint})
    jobdir.check(missing_ok=True)  # every rank refuses a mismatched folder before anyone waits at the barrier
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        jobdir.begin()
    barrier()
    jobdir.check()
    encode_one = _ShardEncoder(s, text, latent, spec, out, batch_size)
    report = bad.BadDataLog(log)
    for j in range(rank, len(names), world):
        if not jobdir.done(j):
            record = {**encode_one(source.urls[j], names[j]), "rank": rank}
            jobdir.record(j, record)
            for p in record["problems"]:
                report.report(Problem(**p))
            log.info("rank %d encoded %s (%d samples)", rank, names[j], sum(p["count"] for p in record["shards"]))
    barrier()
    if rank != 0:
        return None
    return _finish(jobdir, s, source, text, latent, out)


def _finish(jobdir: JobDir, s: EncodeSettings, source: ShardSet, text: TextEncoder, latent: LatentEncoder, out: Path):
    from safetensors.torch import save_file

    records = jobdir.records(len(source.names))
    skipped = bad.add_counts(*({p["reason"]: p["count"]} for r in records for p in r["problems"]))
    shards = [part for r in records for part in r["shards"]]
    empty_text, empty_pooled = text.encode([""])
    save_file({"text": empty_text[0].contiguous(), "pooled": empty_pooled[0].contiguous()}, str(out / EMPTY_PROMPT))
    written = sum(p["count"] for p in shards)
    manifest = {
        "kind": "encoded",
        "resolution": source.manifest["resolution"],
        "ratios": source.manifest.get("ratios", [1.0]),
        "sizes": source.manifest.get("sizes"),
        "encoder": {
            "family": text.family,
            "model_path": str(Path(s.model_path).resolve()),
            "latent_key": LATENT_KEY,
            "text_key": text.text_key,
            "pooled_key": text.pooled_key,
            "latent_channels": latent.channels,
            "vae_scale_factor": latent.scale_factor,
            "shift_factor": latent.shift,
            "scaling_factor": latent.scale,
            "latent": "posterior mode, (z - shift_factor) * scaling_factor",
            "text_shape": [text.max_length, text.text_dim],
            "pooled_dim": text.pooled_dim,
            "text_dtype": s.text_dtype,
        },
        "empty_prompt": EMPTY_PROMPT,
        "source": {"path": str(Path(s.input).resolve()), "fingerprint": source.fingerprint, "stats": source.manifest.get("stats")},
        "settings": asdict(s),
        "num_samples": written,
        "shards": shards,
        "stats": {"inputs": source.num_samples, "written": written, "skipped": skipped},
    }
    jobdir.write_manifest(manifest)
    log.info("encoded %d of %d samples into %d shards in %s; skipped %s",
             written, source.num_samples, len(shards), out, skipped)
    return manifest


def load_empty_prompt(folder: str | Path) -> dict[str, torch.Tensor]:
    """The embeddings of the empty prompt written next to encoded shards: {"text": [L, D], "pooled": [P]}."""
    from safetensors.torch import load_file

    path = Path(folder) / EMPTY_PROMPT
    if not path.exists():
        raise ConfigError(f"no {EMPTY_PROMPT} in {folder}; it is written by `senseflow prepare-data --encode`.")
    return load_file(str(path))
