"""Text stacks of the families: prompts -> (sequence embeddings the DiT reads, pooled vector every batch carries).

Each family builds its own from a local diffusers pipeline folder (`Family.text_encoder`, in its folder's
text.py); what they share is here: the interface, loading, and the CLIP ViT-L/14 text embedding that families
whose own encoder is not CLIP compute at encode time for the discriminator's condition.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from megatron_senseflow.errors import ConfigError


def need(folder: Path, sub: str) -> Path:
    path = Path(folder) / sub
    if not path.is_dir():
        raise ConfigError(
            f"{folder} has no {sub}/ folder; --model-path must be a local diffusers pipeline folder "
            f"(vae/, text_encoder*/, tokenizer*/) such as a FLUX.1, SD3.x, Qwen-Image or FLUX.2 download."
        )
    return path


def tokens(tokenizer, prompts: list[str], length: int) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def load_text_model(cls_name: str, path: Path, device, dtype):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class TextEncoder(ABC):
    """The text stack of one model family: prompts -> (sequence embeddings, pooled embedding)."""

    family: str
    text_key: str
    """Shard key of the sequence embeddings (`<name>.npy`)."""
    pooled_key: str
    """Shard key of the pooled vector."""
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


class ClipLCondition:
    """CLIP ViT-L/14's projected text embedding ([B, 768], CLIPTextModelWithProjection.text_embeds of a prompt
    padded to 77 tokens): the discriminator heads' condition, for families whose own text encoder is not CLIP.
    `directory` is a transformers CLIP directory (openai/clip-vit-large-patch14: its tokenizer and text tower)."""

    def __init__(self, directory: str | Path, device="cpu", dtype=torch.float32):
        from transformers import AutoConfig, CLIPTextModelWithProjection
        from transformers.utils import logging as hf_logging

        d = Path(directory)
        if not (d / "config.json").is_file():
            raise ConfigError(f"--clip {d} is not a transformers model directory; give a local CLIP ViT-L/14 folder "
                              "(openai/clip-vit-large-patch14).")
        self.tokenizer = load_tokenizer(d)
        cfg = AutoConfig.from_pretrained(d)
        if cfg.model_type == "clip":  # a whole CLIP, as released: its text tower and text projection are read
            text_cfg = cfg.text_config
            text_cfg.projection_dim = cfg.projection_dim
        else:
            text_cfg = cfg
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the vision tower's weights are not read, and need no report
        try:
            model = CLIPTextModelWithProjection.from_pretrained(d, config=text_cfg, dtype=dtype)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.model = model.to(device).eval().requires_grad_(False)
        self.dim = int(self.model.config.projection_dim)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = tokens(self.tokenizer, prompts, self.tokenizer.model_max_length)
        return self.model(ids.to(self.model.device)).text_embeds.float().cpu()
