"""HPSv2.1, ImageReward and the LAION aesthetic predictor (megatron_senseflow/image_rewards.py) on tiny stand-ins in
the real file formats, each against its reference computation written out here in plain torch / numpy from the
checkpoint's own tensors: open_clip's forward for HPS (fused in_proj attention, argmax-EOT pooling, tokens padded
with 0, its pad-to-square transform), BLIP's ViT and its BERT with cross-attention for ImageReward, clip's
resize-and-crop plus the numpy normalisation and the linear head for the aesthetic score."""
from __future__ import annotations

import html
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.reward_standins import HPS_TINY, IR_TINY, aesthetic_standin, hps_standin, imagereward_standin
from tests.tiny_clip import tiny_clip

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
PROMPTS = ["a red cat on the moon", "the photo of a dog &amp; rocket", "Rocket!"]
# square; tall, resized to 32 x 47: a crop margin of 7.5 px that rounds to 8 (a floor would take 7); wide
SIZES = [(40, 40), (37, 55), (61, 34)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    g = np.random.default_rng(0)
    images = []
    (root / "images").mkdir()
    for i, (w, h) in enumerate(SIZES):
        p = root / "images" / f"{i:05d}_00.png"
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        images.append(p)
    tiny_clip(root / "clip")
    hps, hps_clip = hps_standin(root)
    return dict(root=root, images=images, clip=root / "clip", hps=hps, hps_clip=hps_clip,
                imagereward=imagereward_standin(root), aesthetic=aesthetic_standin(root, root / "clip"))


# ---------------------------------------------------------------- the references, written out
def center_crop_pixels(path, n):
    """torchvision Resize(n, InterpolationMode.BICUBIC) + CenterCrop(n) + ToTensor + Normalize on a PIL image."""
    im = Image.open(path)
    w, h = im.size
    if w <= h:
        size = (n, int(n * h / w))
    else:
        size = (int(n * w / h), n)
    if size != (w, h):
        im = im.resize(size, Image.BICUBIC)
    crop_top = int(round((size[1] - n) / 2.0))
    crop_left = int(round((size[0] - n) / 2.0))
    im = im.crop((crop_left, crop_top, crop_left + n, crop_top + n)).convert("RGB")
    return torch.from_numpy(((np.asarray(im, np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1).copy())


def pad_square_pixels(path, n):
    """open_clip ResizeMaxSize(n, bicubic, fill=0) on ToTensor's output (torchvision >= 0.17 antialiases), then
    Normalize."""
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32).transpose(2, 0, 1).copy() / 255.0)
    h, w = x.shape[1:]
    scale = n / max(h, w)
    new = (round(h * scale), round(w * scale))
    x = F.interpolate(x[None], size=new, mode="bicubic", antialias=True)[0]
    pad_h, pad_w = n - new[0], n - new[1]
    x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
    return (x - torch.from_numpy(MEAN)[:, None, None]) / torch.from_numpy(STD)[:, None, None]


def open_clip_resblocks(x, sd, prefix, heads, mask=None):
    """open_clip's Transformer: pre-LN residual blocks of nn.MultiheadAttention (fused in_proj) and a GELU MLP."""
    n = len({k.split(".")[len(prefix.split(".")) - 1] for k in sd if k.startswith(prefix)})
    for i in range(n):
        p = f"{prefix}{i}."
        y = F.layer_norm(x, x.shape[-1:], sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        y = y.transpose(0, 1)  # (L, N, D) as nn.MultiheadAttention without batch_first
        y, _ = F.multi_head_attention_forward(
            y, y, y, x.shape[-1], heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False,
            0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], need_weights=False, attn_mask=mask)
        x = x + y.transpose(0, 1)
        y = F.layer_norm(x, x.shape[-1:], sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(y, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                         sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x


def hps_reference(sd, tokenizer, path, prompt):
    """hpsv2.score: open_clip's encode_image / encode_text, both L2-normalised, their dot product."""
    c = HPS_TINY
    x = pad_square_pixels(path, c["image"])[None]
    x = F.conv2d(x, sd["visual.conv1.weight"], stride=c["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(1, 1, -1), x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = open_clip_resblocks(x, sd, "visual.transformer.resblocks.", c["heads"])
    img = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    # open_clip's tokenizer: basic_clean (ftfy, html.unescape twice), lower case, [sot] bpe [eot], zeros after
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(prompt))).strip().lower()
    ids = tokenizer(text, add_special_tokens=True).input_ids[: c["context"]]
    ids = torch.tensor(ids + [0] * (c["context"] - len(ids)))[None]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    causal = torch.full((c["context"], c["context"]), float("-inf")).triu(1)
    t = open_clip_resblocks(t, sd, "transformer.resblocks.", c["text_heads"], mask=causal)
    t = F.layer_norm(t, t.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
    txt = t[torch.arange(1), ids.argmax(dim=-1)] @ sd["text_projection"]  # the EOT token has the highest id
    return float(F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T)


def bert_layer_norm(x, sd, p, eps=1e-12):
    return F.layer_norm(x, x.shape[-1:], sd[p + "weight"], sd[p + "bias"], eps)


def blip_attention(x, kv, sd, p, heads, mask):
    """BertSelfAttention (query from x, key / value from kv) + BertSelfOutput (dense, residual, LayerNorm)."""
    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    q = split(F.linear(x, sd[p + "self.query.weight"], sd[p + "self.query.bias"]))
    k = split(F.linear(kv, sd[p + "self.key.weight"], sd[p + "self.key.bias"]))
    v = split(F.linear(kv, sd[p + "self.value.weight"], sd[p + "self.value.bias"]))
    scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + mask
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    return bert_layer_norm(F.linear(y, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"]) + x, sd,
                           p + "output.LayerNorm.")


def imagereward_reference(sd, med, tokenizer, path, prompt):
    """ImageReward.score: BLIP's ViT (timm blocks, eps 1e-6), BERT over the prompt with cross-attention to every
    image token, [CLS] through the head, (r - 0.16717362830052426) / 1.0333394966054072."""
    c, v = IR_TINY, "blip.visual_encoder."
    w = c["width"]
    x = F.conv2d(center_crop_pixels(path, c["image"])[None], sd[v + "patch_embed.proj.weight"],
                 sd[v + "patch_embed.proj.bias"], stride=c["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"], x], dim=1) + sd[v + "pos_embed"]
    heads = w // 64
    for i in range(c["depth"]):
        p = f"{v}blocks.{i}."
        y = F.layer_norm(x, (w,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        q, k, val = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).view(1, -1, 3, heads, w // heads) \
            .permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-1, -2)) * (w // heads) ** -0.5).softmax(-1) @ val
        x = x + F.linear(a.transpose(1, 2).reshape(1, -1, w), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(x, (w,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        x = x + F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    image = F.layer_norm(x, (w,), sd[v + "norm.weight"], sd[v + "norm.bias"], 1e-6)
    tok = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    t = "blip.text_encoder."
    ids = tok.input_ids
    h = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:35][None]
    h = bert_layer_norm(h, sd, t + "embeddings.LayerNorm.")
    pad_mask = (1.0 - tok.attention_mask[:, None, None, :].float()) * -10000.0  # BLIP's extended attention mask
    for i in range(med["num_hidden_layers"]):
        p = f"{t}encoder.layer.{i}."
        h = blip_attention(h, h, sd, p + "attention.", med["num_attention_heads"], pad_mask)
        h = blip_attention(h, image, sd, p + "crossattention.", med["num_attention_heads"], 0.0)
        y = F.gelu(F.linear(h, sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]))
        h = bert_layer_norm(F.linear(y, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"]) + h, sd, p + "output.LayerNorm.")
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):  # dropout is off in eval; no activations (commented out in ImageReward.py)
        r = F.linear(r, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
    return float((r - 0.16717362830052426) / 1.0333394966054072)


def aesthetic_reference(head, clip_dir, path):
    """simple_inference.py: clip's encode_image, numpy L2 normalisation, the head."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    x = center_crop_pixels(path, model.config.vision_config.image_size)[None]
    pooled = model.vision_model(pixel_values=x).pooler_output
    emb = (pooled @ model.visual_projection.weight.T).numpy()
    l2 = np.atleast_1d(np.linalg.norm(emb, 2, -1))
    l2[l2 == 0] = 1
    r = torch.from_numpy(emb / np.expand_dims(l2, -1)).float()
    for i in (0, 2, 4, 6, 7):
        r = F.linear(r, head[f"layers.{i}.weight"], head[f"layers.{i}.bias"])
    return float(r)


class References:
    """The three references over one set of stand-in files (`hps`, `hps_clip`, `imagereward`, `aesthetic`, `clip`),
    each checkpoint read once: `refs(metric, png, prompt)`."""

    def __init__(self, files):
        from transformers import BertTokenizer, CLIPTokenizer

        self.files = files
        self.hps_sd = torch.load(files["hps"], weights_only=True)["state_dict"]
        self.hps_tok = CLIPTokenizer.from_pretrained(files["hps_clip"])
        self.ir_sd = torch.load(files["imagereward"] / "ImageReward.pt", weights_only=True)
        self.med = json.loads((files["imagereward"] / "med_config.json").read_text())
        self.ir_tok = BertTokenizer(str(files["imagereward"] / "vocab.txt"))  # blip.init_tokenizer
        self.ir_tok.add_special_tokens({"bos_token": "[DEC]"})
        self.ir_tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.head = torch.load(files["aesthetic"], weights_only=True)

    @torch.no_grad()
    def __call__(self, metric: str, path, prompt: str) -> float:
        if metric == "hpsv2":
            return hps_reference(self.hps_sd, self.hps_tok, path, prompt)
        if metric == "imagereward":
            return imagereward_reference(self.ir_sd, self.med, self.ir_tok, path, prompt)
        return aesthetic_reference(self.head, self.files["clip"], path)


@pytest.fixture(scope="module")
def refs(files):
    return References(files)


# ---------------------------------------------------------------- ours against them
@torch.no_grad()
def test_hpsv2_is_open_clips_cosine_on_the_padded_square(files, refs):
    from megatron_senseflow.image_rewards import HPSv2, resize_longest_pad

    want = [refs("hpsv2", p, q) for p, q in zip(files["images"], PROMPTS)]
    got = HPSv2(files["hps"], files["hps_clip"]).scores(files["images"], PROMPTS)
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    assert len(set(np.round(want, 4))) == 3  # the three differ: nothing constant passes
    # the padding is real: a wide image's top and bottom rows are the normalised zero
    x = resize_longest_pad(Image.open(files["images"][2]), HPS_TINY["image"])
    assert torch.allclose(x[:, 0, 0], torch.from_numpy(-MEAN / STD))


@torch.no_grad()
def test_imagereward_is_blips_cls_through_the_head(files, refs):
    from megatron_senseflow.image_rewards import ImageReward

    assert refs.ir_tok("a red cat").input_ids == [2, 5, 6, 7, 3]  # [CLS] a red cat [SEP]
    want = [refs("imagereward", p, q) for p, q in zip(files["images"], PROMPTS)]
    got = ImageReward(files["imagereward"]).scores(files["images"], PROMPTS)
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    assert len(set(np.round(want, 4))) == 3


@torch.no_grad()
def test_aesthetic_is_the_head_on_the_normalised_clip_embedding(files, refs):
    from megatron_senseflow.image_rewards import AestheticV2

    want = [refs("aesthetic", p, None) for p in files["images"]]
    got = AestheticV2(files["aesthetic"], files["clip"]).scores(files["images"])
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    assert len(set(np.round(want, 4))) == 3


def test_wrong_files_are_one_sentence(files, tmp_path):
    from megatron_senseflow.image_rewards import AestheticV2, HPSv2, ImageReward, ScoreError

    import datetime
    import pickle

    # a pickle whose objects torch.load(weights_only=True) refuses to build
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": {"when": datetime.date(2020, 1, 1)}}))
    for make, why in ((lambda: HPSv2(tmp_path / "evil.pt", files["hps_clip"]), "without unpickling"),
                      (lambda: HPSv2(files["aesthetic"], files["hps_clip"]), "not an HPS checkpoint"),
                      (lambda: AestheticV2(files["hps"], files["clip"]), "not the aesthetic predictor's head"),
                      (lambda: ImageReward(tmp_path), "lacks ImageReward.pt, med_config.json, vocab.txt"),
                      (lambda: AestheticV2(files["aesthetic"], tmp_path), "is not a transformers CLIP ViT-L/14 folder")):
        with pytest.raises(ScoreError, match=why) as e:
            make()
        assert "\n" not in str(e.value)


def test_senseflow_eval_reports_the_three_means(files, refs, capsys):
    """`senseflow eval --metrics hpsv2,imagereward,aesthetic`: the mean of each reference over the images, each image
    against its prompt (the file names' prompt index); a missing file is one sentence."""
    import argparse

    from megatron_senseflow.config import ConfigError
    from megatron_senseflow.eval_cli import add_arguments, run

    root = files["root"]
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    common = ["--images", str(root / "images"), "--prompts", str(root / "prompts.txt")]
    args = parser.parse_args([*common, "--metrics", "hpsv2,imagereward,aesthetic", "--hps", str(files["hps"]),
                              "--hps-clip", str(files["hps_clip"]), "--imagereward", str(files["imagereward"]),
                              "--aesthetic", str(files["aesthetic"]), "--clip", str(files["clip"]),
                              "--out", str(root / "scores.json")])
    assert run(args) == 0
    got = json.loads((root / "scores.json").read_text())
    want = {m: np.mean([refs(m, p, q) for p, q in zip(files["images"], PROMPTS)])
            for m in ("hpsv2", "imagereward", "aesthetic")}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-5), k
    assert f"hpsv2: {got['hpsv2']:.4f}" in capsys.readouterr().out
    args = parser.parse_args([*common, "--metrics", "hpsv2", "--hps", str(files["hps"])])
    with pytest.raises(ConfigError, match="HPSv2 needs --hps .* and --hps-clip") as e:
        run(args)
    assert "\n" not in str(e.value)
