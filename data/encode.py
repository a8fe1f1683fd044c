"""Offline encoding: VAE latents and text embeddings computed once, so training never runs the encoders.

Every family brings its own encoders (models/family.py: `text_encoder`, `vae`), loaded from a local diffusers
pipeline folder; this module runs them over image shards:

    text = text_encoder(path, family)          # prompts -> (text [B, L, D] float32, pooled [B, P] float32)
    latent = latent_codec(path, family)        # images [B, 3, H, W] in [-1, 1] -> latents (posterior mode)

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from megatron_senseflow.config import ConfigError, DataConfig
from megatron_senseflow.models import FAMILIES, family_of
from megatron_senseflow.models.registry import family_of_pipeline
from megatron_senseflow.models.text_encoders import TextEncoder, need

from . import bad
from .bad import Problem
from .decode import IMAGE_SHARD_KEYS, Skip, sample_spec
from .shards import JobDir, ShardReadError, ShardSet, ShardSink, iter_samples

log = logging.getLogger(__name__)

LATENT_KEY = "latent.npy"
EMPTY_PROMPT = "empty_prompt.safetensors"


def infer_family(pipeline_dir: str | Path) -> str:
    """The family of a pipeline folder, from its model_index.json's pipeline class."""
    index = Path(pipeline_dir) / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError):
        name = ""
    fam = family_of_pipeline(name)
    if fam is None:
        raise ConfigError(f"cannot tell the model family from {index} (class {name!r}); pass --family "
                          f"{' or --family '.join(sorted(FAMILIES))}.")
    return fam.name


def _family(family: str):
    if family not in FAMILIES:
        raise ConfigError(f"--family {family!r} is unknown; use one of {', '.join(sorted(FAMILIES))}.")
    return family_of(family)


def text_encoder(pipeline_dir: str | Path, family: str, max_length: int | None = None, device="cpu",
                 dtype=torch.float32, clip: str | None = None) -> TextEncoder:
    """The family's text stack from a local pipeline folder (`clip`: CLIP ViT-L/14 for families without it)."""
    return _family(family).text_encoder(Path(pipeline_dir), max_length, device, dtype, clip)


def latent_codec(pipeline_dir: str | Path, family: str, device="cpu", dtype=torch.float32):
    """The family's VAE from the pipeline folder's vae/ (models/vae.py LatentCodec)."""
    return _family(family).vae(need(Path(pipeline_dir), "vae"), dtype, device)


def default_text_length(family: str) -> int:
    return _family(family).default_text_length


# --------------------------------------------------------------------------- encoding shards


@dataclass(frozen=True, kw_only=True)
class EncodeSettings:
    """Everything that decides the content of the encoded shards (a rerun must pass the same)."""

    input: str
    model_path: str
    family: str
    text_max_length: int
    text_dtype: str = "float16"
    clip: str | None = None
    """CLIP ViT-L/14 folder of families whose text encoder is not CLIP (the discriminator's condition)."""


TEXT_DTYPES = {"float16": np.float16, "float32": np.float32}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class _ShardEncoder:
    """Encodes one input shard into one output shard of the same name."""

    def __init__(self, s: EncodeSettings, text: TextEncoder, latent, spec, out: Path, batch_size: int):
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
        with torch.no_grad():
            latents = self.latent.encode(images).cpu().numpy()
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
    latent,
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
    from ..progress import bar

    mine = range(rank, len(names), world)
    for j in bar(iterable=mine, total=len(mine), desc="encode", unit="shard", main=rank == 0):
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


def _finish(jobdir: JobDir, s: EncodeSettings, source: ShardSet, text: TextEncoder, latent, out: Path):
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
            **latent.describe(),
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
