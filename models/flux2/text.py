"""FLUX.2's text stacks, as diffusers' pipelines encode prompts: three hidden layers of the text model stacked per
token, the prompt padded to the run's length (attended unmasked by the DiT, as the pipelines do), plus CLIP
ViT-L/14's text embedding as the pooled vector.

- dev (`Flux2Pipeline`): Mistral-Small 3.1 (Mistral3ForConditionalGeneration) on the chat-formatted prompt with
  the pipeline's system message; layers 10, 20, 30;
- klein (`Flux2KleinPipeline`): Qwen3 (Qwen3ForCausalLM) on the chat template with a generation prompt and
  thinking off; layers 9, 18, 27.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_senseflow.errors import ConfigError

from ..text_encoders import ClipLCondition, TextEncoder, load_text_model, need
from .arch import CLIP_L_DIM

DEV_LAYERS = (10, 20, 30)
KLEIN_LAYERS = (9, 18, 27)


def system_message() -> str:
    """The dev pipeline's system message (the prompt format the teacher was trained with)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    return SYSTEM_MESSAGE


class Flux2TextEncoder(TextEncoder):
    """Stacked hidden states [B, L, 3 x D] (`flux2_text.npy`) + CLIP-L [B, 768] (`clip_l.npy`; zeros without a CLIP
    folder: only the discriminator reads it)."""

    family, text_key, pooled_key = "flux2", "flux2_text.npy", "clip_l.npy"

    def __init__(self, tokenizer, model, variant: str, max_length: int = 512, clip: ClipLCondition | None = None):
        self.tokenizer, self.model, self.variant, self.clip = tokenizer, model, variant, clip
        self.layers = KLEIN_LAYERS if variant == "klein" else DEV_LAYERS
        self.max_length = max_length
        depth = self.model.config.get_text_config().num_hidden_layers
        if max(self.layers) > depth:
            raise ConfigError(f"the FLUX.2 {variant} text encoder has {depth} layers, but the pipeline reads hidden "
                              f"states {self.layers}; --model-path must hold the released text encoder.")

    @classmethod
    def from_pretrained(cls, d, max_length: int, device, dtype, clip: str | None = None) -> "Flux2TextEncoder":
        from transformers import AutoProcessor, AutoTokenizer

        d = Path(d)
        try:
            pipeline = json.loads((d / "model_index.json").read_text()).get("_class_name", "")
        except (OSError, ValueError):
            pipeline = ""
        variant = "klein" if pipeline.startswith("Flux2Klein") else "dev"
        if variant == "klein":
            tok, model = AutoTokenizer.from_pretrained(need(d, "tokenizer")), "Qwen3ForCausalLM"
        else:
            tok, model = AutoProcessor.from_pretrained(need(d, "tokenizer")), "Mistral3ForConditionalGeneration"
        return cls(tok, load_text_model(model, need(d, "text_encoder"), device, dtype), variant, max_length,
                   ClipLCondition(clip, device, dtype) if clip else None)

    @property
    def text_dim(self) -> int:
        return len(self.layers) * self.model.config.get_text_config().hidden_size

    @property
    def pooled_dim(self) -> int:
        return CLIP_L_DIM

    def _tokens(self, prompts: list[str]):
        kw = dict(padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        if self.variant == "klein":
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                        add_generation_prompt=True, enable_thinking=False)
                     for p in prompts]
            return self.tokenizer(texts, **kw)
        messages = [[{"role": "system", "content": [{"type": "text", "text": system_message()}]},
                     {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}] for p in prompts]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True,
                                                  return_dict=True, **kw)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        toks = self._tokens(prompts)
        out = self.model(input_ids=toks["input_ids"].to(self.model.device),
                         attention_mask=toks["attention_mask"].to(self.model.device), output_hidden_states=True,
                         use_cache=False)
        stacked = torch.stack([out.hidden_states[k] for k in self.layers], dim=1)  # [B, layers, L, D]
        b, n, length, d = stacked.shape
        text = stacked.permute(0, 2, 1, 3).reshape(b, length, n * d).float().cpu()
        pooled = self.clip.encode(prompts) if self.clip is not None else torch.zeros(len(prompts), CLIP_L_DIM)
        return text, pooled
