"""A tiny CLIP in the real transformers format (letters-only BPE vocabulary, 32 px images) for the metric tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_clip(directory: Path) -> None:
    """A random CLIP with a character-level BPE vocabulary, saved like a real one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {tok: i for i, tok in enumerate(letters + [l + "</w>" for l in letters] + ["<|startoftext|>", "<|endoftext|>"])}
    directory.mkdir()
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=32)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                         tokenizer=tok)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(directory)
    proc.save_pretrained(directory)


def tiny_pickscore(clip_dir: Path, directory: Path, scale: float = 87.0) -> None:
    """The tiny CLIP at `clip_dir` with a learned-looking logit scale (not CLIP's initial 1/0.07), saved with its
    processor files as a PickScore_v1 directory."""
    import math

    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(scale))
    model.save_pretrained(directory)
    CLIPProcessor.from_pretrained(clip_dir).save_pretrained(directory)
