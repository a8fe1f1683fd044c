"""FLUX.1's text stack: CLIP-L's pooled output + T5's last hidden state, as diffusers' FluxPipeline.encode_prompt."""
from __future__ import annotations

from pathlib import Path

import torch

from ..text_encoders import TextEncoder, load_text_model, load_tokenizer, need, tokens


class FluxTextEncoder(TextEncoder):
    """T5 sequence embeddings [B, 512, 4096] (`t5.npy`) + CLIP-L pooled [B, 768] (`clip_pooled.npy`)."""

    family, text_key, pooled_key = "flux", "t5.npy", "clip_pooled.npy"

    def __init__(self, clip_tokenizer, clip, t5_tokenizer, t5, max_length: int = 512):
        self.clip_tokenizer, self.clip = clip_tokenizer, clip
        self.t5_tokenizer, self.t5 = t5_tokenizer, t5
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, d, max_length: int, device, dtype) -> "FluxTextEncoder":
        d = Path(d)
        return cls(
            load_tokenizer(need(d, "tokenizer")),
            load_text_model("CLIPTextModel", need(d, "text_encoder"), device, dtype),
            load_tokenizer(need(d, "tokenizer_2")),
            load_text_model("T5EncoderModel", need(d, "text_encoder_2"), device, dtype),
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
        clip_ids = tokens(self.clip_tokenizer, prompts, self.clip_tokenizer.model_max_length)
        pooled = self.clip(clip_ids.to(self.clip.device), output_hidden_states=False).pooler_output
        t5_ids = tokens(self.t5_tokenizer, prompts, self.max_length)
        text = self.t5(t5_ids.to(self.t5.device), output_hidden_states=False)[0]
        return text.float().cpu(), pooled.float().cpu()
