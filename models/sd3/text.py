"""SD3.x's text stack: CLIP-L + CLIP-G (penultimate layer, projections pooled) joined with T5, as
diffusers' StableDiffusion3Pipeline.encode_prompt."""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_senseflow.errors import ConfigError

from ..text_encoders import TextEncoder, load_text_model, load_tokenizer, need, tokens


class SD3TextEncoder(TextEncoder):
    """CLIP-L and CLIP-G penultimate hidden states concatenated and zero-padded to T5's width, then T5 appended
    along the sequence ([B, 77 + 77, 4096], `text.npy`), and both CLIP projections concatenated ([B, 2048],
    `pooled.npy`)."""

    family, text_key, pooled_key = "sd3", "text.npy", "pooled.npy"

    def __init__(self, clip_l_tokenizer, clip_l, clip_g_tokenizer, clip_g, t5_tokenizer, t5, max_length: int = 154):
        self.clips = ((clip_l_tokenizer, clip_l), (clip_g_tokenizer, clip_g))
        self.t5_tokenizer, self.t5 = t5_tokenizer, t5
        # diffusers pads both CLIP prompts to the first tokenizer's length
        self.clip_length = clip_l_tokenizer.model_max_length
        if max_length <= self.clip_length:
            raise ConfigError(
                f"SD3 text length {max_length} leaves no room for T5 after {self.clip_length} CLIP tokens; "
                f"use at least {self.clip_length + 1} (SD3.x default {77 + 77})."
            )
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, d, max_length: int, device, dtype) -> "SD3TextEncoder":
        d = Path(d)
        return cls(
            load_tokenizer(need(d, "tokenizer")),
            load_text_model("CLIPTextModelWithProjection", need(d, "text_encoder"), device, dtype),
            load_tokenizer(need(d, "tokenizer_2")),
            load_text_model("CLIPTextModelWithProjection", need(d, "text_encoder_2"), device, dtype),
            load_tokenizer(need(d, "tokenizer_3")),
            load_text_model("T5EncoderModel", need(d, "text_encoder_3"), device, dtype),
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
            out = encoder(tokens(tokenizer, prompts, self.clip_length).to(encoder.device), output_hidden_states=True)
            pooled.append(out.text_embeds)
            seqs.append(out.hidden_states[-2])
        t5_ids = tokens(self.t5_tokenizer, prompts, self.max_length - self.clip_length)
        t5 = self.t5(t5_ids.to(self.t5.device))[0]
        clip = torch.cat(seqs, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        text = torch.cat([clip.to(t5.dtype), t5], dim=-2)
        return text.float().cpu(), torch.cat(pooled, dim=-1).float().cpu()
