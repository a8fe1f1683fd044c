"""Tiny stand-ins, in the real file formats, for the three learned image scores (megatron_senseflow/image_rewards):
an HPS checkpoint (`{"state_dict": <open_clip names>}`) with its transformers CLIP folder, an ImageReward folder
(ImageReward.pt with BLIP's names, med_config.json, vocab.txt) and the aesthetic predictor's head
(`layers.{0,2,4,6,7}`). Random, seeded, a few hundred kB each."""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

from tests.tiny_clip import tiny_clip

HPS_TINY = dict(width=32, layers=2, heads=2, patch=8, image=32, text_width=32, text_heads=2, text_layers=2, embed=16,
                context=77)


def _rand(g, *shape, scale=0.2):
    return torch.randn(*shape, generator=g) * scale


def _block(g, sd, prefix, width, mlp):
    for n in ("ln_1", "ln_2"):
        sd[f"{prefix}{n}.weight"] = 1 + _rand(g, width, scale=0.1)
        sd[f"{prefix}{n}.bias"] = _rand(g, width, scale=0.1)
    sd[f"{prefix}attn.in_proj_weight"] = _rand(g, 3 * width, width)
    sd[f"{prefix}attn.in_proj_bias"] = _rand(g, 3 * width, scale=0.1)
    sd[f"{prefix}attn.out_proj.weight"] = _rand(g, width, width)
    sd[f"{prefix}attn.out_proj.bias"] = _rand(g, width, scale=0.1)
    sd[f"{prefix}mlp.c_fc.weight"] = _rand(g, mlp, width)
    sd[f"{prefix}mlp.c_fc.bias"] = _rand(g, mlp, scale=0.1)
    sd[f"{prefix}mlp.c_proj.weight"] = _rand(g, width, mlp)
    sd[f"{prefix}mlp.c_proj.bias"] = _rand(g, width, scale=0.1)


def hps_standin(root: Path) -> tuple[Path, Path]:
    """(HPS checkpoint, its transformers CLIP folder): open_clip's ViT-H-14 layout at a tiny width; the folder
    holds the config (GELU, as ViT-H-14; 77 text positions) and a letters-only CLIP tokenizer."""
    from transformers import CLIPConfig

    c = HPS_TINY
    clip_dir = root / "hps-clip"
    tiny_clip(clip_dir)
    vocab = json.loads((clip_dir / "vocab.json").read_text())
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=c["text_width"], intermediate_size=4 * c["text_width"],
                         num_hidden_layers=c["text_layers"], num_attention_heads=c["text_heads"],
                         max_position_embeddings=c["context"], hidden_act="gelu", bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=c["width"], intermediate_size=4 * c["width"], num_hidden_layers=c["layers"],
                           num_attention_heads=c["heads"], image_size=c["image"], patch_size=c["patch"], hidden_act="gelu"),
        projection_dim=c["embed"])
    cfg.save_pretrained(clip_dir)  # replaces tiny_clip's config: the weights come from the HPS checkpoint
    for f in clip_dir.glob("*.safetensors"):
        f.unlink()
    g = torch.Generator().manual_seed(1)
    sd: dict[str, torch.Tensor] = OrderedDict()
    w, tw = c["width"], c["text_width"]
    sd["visual.class_embedding"] = _rand(g, w)
    sd["visual.positional_embedding"] = _rand(g, (c["image"] // c["patch"]) ** 2 + 1, w)
    sd["visual.proj"] = _rand(g, w, c["embed"])
    sd["visual.conv1.weight"] = _rand(g, w, 3, c["patch"], c["patch"])
    for n in ("ln_pre", "ln_post"):
        sd[f"visual.{n}.weight"], sd[f"visual.{n}.bias"] = 1 + _rand(g, w, scale=0.1), _rand(g, w, scale=0.1)
    for i in range(c["layers"]):
        _block(g, sd, f"visual.transformer.resblocks.{i}.", w, 4 * w)
    sd["positional_embedding"] = _rand(g, c["context"], tw)
    sd["text_projection"] = _rand(g, tw, c["embed"])
    sd["logit_scale"] = torch.tensor(4.6)
    sd["token_embedding.weight"] = _rand(g, len(vocab), tw)
    sd["ln_final.weight"], sd["ln_final.bias"] = 1 + _rand(g, tw, scale=0.1), _rand(g, tw, scale=0.1)
    for i in range(c["text_layers"]):
        _block(g, sd, f"transformer.resblocks.{i}.", tw, 4 * tw)
    path = root / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": sd}, path)
    return path, clip_dir


IR_WORDS = ["a", "red", "cat", "on", "the", "moon", "photo", "of", "dog", "rocket"]
IR_TINY = dict(width=64, depth=2, patch=16, image=32, hidden=32, layers=2, heads=2, inter=64)


def imagereward_standin(root: Path) -> Path:
    """An ImageReward folder: ImageReward.pt (BLIP ViT with 64-wide heads, BERT with cross-attention, the head, and
    the unused projections and position ids the real file holds), med_config.json, vocab.txt."""
    c = IR_TINY
    folder = root / "ImageReward"
    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *IR_WORDS, ",", "!"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    n_vocab = len(vocab) + 2  # blip.init_tokenizer adds [DEC] and [ENC]
    med = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
               hidden_dropout_prob=0.1, hidden_size=c["hidden"], initializer_range=0.02,
               intermediate_size=c["inter"], layer_norm_eps=1e-12, max_position_embeddings=40, model_type="bert",
               num_attention_heads=c["heads"], num_hidden_layers=c["layers"], pad_token_id=0, type_vocab_size=2,
               vocab_size=n_vocab, encoder_width=c["width"], add_cross_attention=True)
    (folder / "med_config.json").write_text(json.dumps(med, indent=2))
    g = torch.Generator().manual_seed(2)
    sd: dict[str, torch.Tensor] = OrderedDict()
    w, h, n_pos = c["width"], c["hidden"], (c["image"] // c["patch"]) ** 2 + 1
    v = "blip.visual_encoder."
    sd[v + "cls_token"] = _rand(g, 1, 1, w)
    sd[v + "pos_embed"] = _rand(g, 1, n_pos, w)
    sd[v + "patch_embed.proj.weight"] = _rand(g, w, 3, c["patch"], c["patch"], scale=0.05)
    sd[v + "patch_embed.proj.bias"] = _rand(g, w, scale=0.1)
    for i in range(c["depth"]):
        b = f"{v}blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[f"{b}{n}.weight"], sd[f"{b}{n}.bias"] = 1 + _rand(g, w, scale=0.1), _rand(g, w, scale=0.1)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = _rand(g, 3 * w, w), _rand(g, 3 * w, scale=0.1)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = _rand(g, w, w), _rand(g, w, scale=0.1)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = _rand(g, 4 * w, w), _rand(g, 4 * w, scale=0.1)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = _rand(g, w, 4 * w), _rand(g, w, scale=0.1)
    sd[v + "norm.weight"], sd[v + "norm.bias"] = 1 + _rand(g, w, scale=0.1), _rand(g, w, scale=0.1)
    t = "blip.text_encoder."
    sd[t + "embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    sd[t + "embeddings.word_embeddings.weight"] = _rand(g, n_vocab, h)
    sd[t + "embeddings.position_embeddings.weight"] = _rand(g, med["max_position_embeddings"], h)
    sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"] = 1 + _rand(g, h, scale=0.1), _rand(g, h, scale=0.1)
    for i in range(c["layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", h), ("crossattention", w)):
            sd[f"{b}{att}.self.query.weight"], sd[f"{b}{att}.self.query.bias"] = _rand(g, h, h), _rand(g, h, scale=0.1)
            for n in ("key", "value"):
                sd[f"{b}{att}.self.{n}.weight"], sd[f"{b}{att}.self.{n}.bias"] = _rand(g, h, kv), _rand(g, h, scale=0.1)
            sd[f"{b}{att}.output.dense.weight"], sd[f"{b}{att}.output.dense.bias"] = _rand(g, h, h), _rand(g, h, scale=0.1)
            sd[f"{b}{att}.output.LayerNorm.weight"] = 1 + _rand(g, h, scale=0.1)
            sd[f"{b}{att}.output.LayerNorm.bias"] = _rand(g, h, scale=0.1)
        sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"] = _rand(g, c["inter"], h), _rand(g, c["inter"], scale=0.1)
        sd[b + "output.dense.weight"], sd[b + "output.dense.bias"] = _rand(g, h, c["inter"]), _rand(g, h, scale=0.1)
        sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"] = 1 + _rand(g, h, scale=0.1), _rand(g, h, scale=0.1)
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = _rand(g, 16, w), _rand(g, 16)  # unused by the score
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = _rand(g, 16, h), _rand(g, 16)
    sd.update(head_state(g, h, "mlp."))
    torch.save(sd, folder / "ImageReward.pt")
    return folder


def head_state(g, dim: int, prefix: str = "") -> dict:
    """The aesthetic predictor's / ImageReward's head: dim -> 1024 -> 128 -> 64 -> 16 -> 1 (`layers.{0,2,4,6,7}`)."""
    sizes = [(1024, dim), (128, 1024), (64, 128), (16, 64), (1, 16)]
    out = OrderedDict()
    for i, (o, n) in zip((0, 2, 4, 6, 7), sizes):
        out[f"{prefix}layers.{i}.weight"] = _rand(g, o, n, scale=n ** -0.5)
        out[f"{prefix}layers.{i}.bias"] = _rand(g, o, scale=0.1)
    return out


def aesthetic_standin(root: Path, clip_dir: Path) -> Path:
    """The aesthetic head for the tiny CLIP's 16-d image embeddings (the real one reads ViT-L/14's 768)."""
    from transformers import CLIPConfig

    dim = CLIPConfig.from_pretrained(clip_dir).projection_dim
    path = root / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head_state(torch.Generator().manual_seed(3), dim), path)
    return path
