"""Qwen-Image's text stack, as diffusers' QwenImagePipeline.encode_prompt: Qwen2.5-VL's last hidden state of the
prompt in the pipeline's template, without the template's first 34 tokens, zero-padded (and so masked, see
model.text_mask) to the run's length; plus CLIP ViT-L/14's text embedding as the pooled vector."""
from __future__ import annotations

from pathlib import Path

import torch

from ..text_encoders import ClipLCondition, TextEncoder, load_text_model, load_tokenizer, need
from .arch import CLIP_L_DIM

TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
TEMPLATE_START = 34  # tokens of the template's system part, dropped (the pipeline's prompt_template_encode_start_idx)
TOKENIZER_MAX_LENGTH = 1024  # the pipeline's tokenizer_max_length


class QwenImageTextEncoder(TextEncoder):
    """Qwen2.5-VL embeddings [B, L, 3584] (`qwen.npy`, zero rows after each prompt's end) + CLIP-L [B, 768]
    (`clip_l.npy`; zeros without a CLIP folder: only the discriminator reads it)."""

    family, text_key, pooled_key = "qwen_image", "qwen.npy", "clip_l.npy"

    def __init__(self, tokenizer, model, max_length: int = 512, clip: ClipLCondition | None = None):
        self.tokenizer, self.model, self.clip = tokenizer, model, clip
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, d, max_length: int, device, dtype, clip: str | None = None) -> "QwenImageTextEncoder":
        d = Path(d)
        return cls(load_tokenizer(need(d, "tokenizer")),
                   load_text_model("Qwen2_5_VLForConditionalGeneration", need(d, "text_encoder"), device, dtype),
                   max_length, ClipLCondition(clip, device, dtype) if clip else None)

    @property
    def text_dim(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def pooled_dim(self) -> int:
        return CLIP_L_DIM

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        toks = self.tokenizer([TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + TEMPLATE_START,
                              padding=True, truncation=True, return_tensors="pt")
        ids, attn = toks.input_ids.to(self.model.device), toks.attention_mask.to(self.model.device)
        hidden = self.model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[-1]
        text = torch.zeros(len(prompts), self.max_length, hidden.shape[-1])
        for i in range(len(prompts)):
            real = hidden[i][attn[i].bool()][TEMPLATE_START:][: self.max_length]
            text[i, : real.shape[0]] = real.float().cpu()
        pooled = self.clip.encode(prompts) if self.clip is not None else torch.zeros(len(prompts), CLIP_L_DIM)
        return text, pooled
