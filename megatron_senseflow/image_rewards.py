"""The paper's three learned image scores beside CLIP score and PickScore, each computed as its reference code does,
from local files only, on transformers' models (the reference packages pin torch, timm, protobuf and transformers
versions that fight ours, and download weights inside their loaders):

- HPSv2.1 (Wu et al. 2023; tgxs002/HPSv2 `hpsv2.score`): open_clip ViT-H-14 with `HPS_v2.1_compressed.pt`
  (`{"state_dict": ...}`, open_clip names) mapped onto a transformers CLIPModel whose config and tokenizer come
  from a local ViT-H-14 transformers folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, or PickScore_v1's folder,
  which has that architecture); images are resized on their longest side to 224 (bicubic, antialiased: torchvision
  >= 0.17, what `pip install hpsv2` runs today) and zero-padded to a square; prompts are cleaned as open_clip does
  (ftfy, HTML unescape). Score: cos(image, prompt), what `hpsv2.score` returns (its benchmark script prints 100x).
- ImageReward (Xu et al. 2023; THUDM/ImageReward `RM.score`): `ImageReward.pt` (a plain state dict: BLIP's ViT
  `blip.visual_encoder.*`, its BERT with cross-attention `blip.text_encoder.*`, the head `mlp.layers.*`) with
  `med_config.json` and bert-base-uncased's `vocab.txt` in one folder; the prompt (35 tokens) attends to the
  image's tokens and the [CLS] state goes through the head, normalised by the reference's mean and std.
- LAION aesthetic predictor v2 (`sac+logos+ava1-l14-linearMSE.pth`): its linear head on the L2-normalised CLIP
  ViT-L/14 image embedding (the `--clip` folder).

ImageReward and the aesthetic predictor preprocess as torchvision's PIL path (Resize(n, bicubic), CenterCrop(n)),
written out here: transformers' CLIPImageProcessor crops one pixel differently on odd margins. Every checkpoint is
read with `torch.load(weights_only=True)`: no pickle from a file we did not write.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py: the reward's scale


class ScoreError(ValueError):
    """A score's files are missing or of another format (one sentence for the person who passed them)."""


def _load(path: str | Path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ScoreError(f"{path} does not exist.") from None
    except Exception:  # noqa: BLE001 - a pickle with objects, a truncated file: say which file, in one line
        raise ScoreError(f"{path} is not a weights file torch can read without unpickling objects (it holds Python "
                         "objects beyond tensors, or it is damaged); re-download it.") from None


def _from_folder(load, folder: str | Path, what: str):
    """`load(folder)` of a transformers loader, its failure (no weights, no config, no tokenizer) one sentence."""
    try:
        return load(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ScoreError(f"{folder} is not {what} ({first[:160]}).") from None


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def to_pil(image) -> Image.Image:
    """A file path, a PIL image or a uint8 [3, H, W] tensor (what the in-loop evaluation decodes), as RGB PIL."""
    if isinstance(image, torch.Tensor):
        return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    if isinstance(image, Image.Image):
        return image
    with Image.open(image) as im:
        return im.copy()


def resize_center_crop(im: Image.Image, n: int) -> torch.Tensor:
    """torchvision Resize(n, BICUBIC) + CenterCrop(n) + RGB + ToTensor + Normalize(CLIP), on PIL (clip._transform,
    ImageReward's _transform): the shorter side to n, the longer to int(n * long / short), crop offsets rounded."""
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    nw, nh = (n, int(n * long / short)) if w <= h else (int(n * long / short), n)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - n) / 2.0)), int(round((nw - n) / 2.0))
    im = im.crop((left, top, left + n, top + n)).convert("RGB")
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).transpose(2, 0, 1).copy()) / 255.0
    return _normalise(x)


def resize_longest_pad(im: Image.Image, n: int) -> torch.Tensor:
    """HPSv2's evaluation transform (open_clip ResizeMaxSize + MaskAwareNormalize): ToTensor, the longest side to n
    (bicubic on the float tensor), zeros padded around to n x n, then Normalize(CLIP)."""
    x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1).copy()) / 255.0
    h, w = x.shape[1:]
    scale = n / float(max(h, w))
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
    ph, pw = n - x.shape[1], n - x.shape[2]
    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    return _normalise(x)


# ---------------------------------------------------------------- LAION aesthetic predictor v2
def linear_head(sd: dict, prefix: str = "") -> nn.Sequential:
    """The aesthetic predictor's (and ImageReward's) head: Linear-Dropout x3, Linear, Linear, no activations
    (commented out in both references), sized from the state dict (`layers.{0,2,4,6,7}`)."""
    w = [sd[f"{prefix}layers.{i}.weight"] for i in (0, 2, 4, 6, 7)]
    head = nn.Sequential(nn.Linear(w[0].shape[1], w[0].shape[0]), nn.Dropout(0.2), nn.Linear(w[1].shape[1], w[1].shape[0]),
                         nn.Dropout(0.2), nn.Linear(w[2].shape[1], w[2].shape[0]), nn.Dropout(0.1),
                         nn.Linear(w[3].shape[1], w[3].shape[0]), nn.Linear(w[4].shape[1], w[4].shape[0]))
    head.load_state_dict({k[len(prefix) + len("layers."):]: v for k, v in sd.items() if k.startswith(prefix + "layers.")})
    return head.eval()


class AestheticV2:
    """LAION aesthetic predictor v2 over a local CLIP ViT-L/14 (transformers folder)."""

    def __init__(self, head_path: str | Path, clip_dir: str | Path):
        from transformers import CLIPModel

        sd = _load(head_path)
        if not isinstance(sd, dict) or "layers.0.weight" not in sd:
            raise ScoreError(f"{head_path} is not the aesthetic predictor's head (no layers.0.weight; expected "
                             "sac+logos+ava1-l14-linearMSE.pth).")
        self.head = linear_head(sd)
        self.clip = _from_folder(CLIPModel.from_pretrained, clip_dir, "a transformers CLIP ViT-L/14 folder").eval()
        if self.clip.config.projection_dim != self.head[0].in_features:
            raise ScoreError(f"{head_path} reads {self.head[0].in_features}-d image embeddings but the CLIP at {clip_dir} "
                             f"gives {self.clip.config.projection_dim}-d ones; pass CLIP ViT-L/14 as --clip.")
        self.size = self.clip.config.vision_config.image_size

    @torch.no_grad()
    def scores(self, images, prompts=None) -> torch.Tensor:
        dev = next(self.clip.parameters()).device
        x = torch.stack([resize_center_crop(to_pil(i), self.size) for i in images]).to(dev)
        out = self.clip.get_image_features(pixel_values=x)
        f = (out if isinstance(out, torch.Tensor) else out.pooler_output).float()
        norm = f.norm(dim=-1, keepdim=True)
        f = f / torch.where(norm == 0, torch.ones_like(norm), norm)  # the reference's numpy `normalized`
        return self.head.to(dev)(f).squeeze(-1).cpu()

    def to(self, device):
        self.clip.to(device)
        self.head.to(device)
        return self


# ---------------------------------------------------------------- HPSv2.1
def open_clip_to_transformers(sd: dict) -> dict:
    """open_clip (and OpenAI CLIP) state-dict names -> transformers CLIPModel's (as transformers' own
    convert_clip_original_pytorch_to_hf: fused in_proj split into q/k/v, projections transposed)."""
    out = {}

    def blocks(src: str, dst: str) -> None:
        for i in sorted({int(k[len(src):].split(".")[0]) for k in sd if k.startswith(src)}):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
                for t in ("weight", "bias"):
                    out[f"{d}{b}.{t}"] = sd[f"{s}{a}.{t}"]
            for t in ("weight", "bias"):
                q, k, v = sd[f"{s}attn.in_proj_{t}"].chunk(3, dim=0)
                out[f"{d}self_attn.q_proj.{t}"], out[f"{d}self_attn.k_proj.{t}"], out[f"{d}self_attn.v_proj.{t}"] = q, k, v

    blocks("visual.transformer.resblocks.", "vision_model.encoder.layers.")
    blocks("transformer.resblocks.", "text_model.encoder.layers.")
    out["vision_model.embeddings.class_embedding"] = sd["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                 ("ln_final", "text_model.final_layer_norm")):
        out[f"{b}.weight"], out[f"{b}.bias"] = sd[f"{a}.weight"], sd[f"{a}.bias"]
    out["visual_projection.weight"] = sd["visual.proj"].T.contiguous()
    out["text_projection.weight"] = sd["text_projection"].T.contiguous()
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    out["logit_scale"] = sd["logit_scale"]
    return out


def open_clip_clean(text: str) -> str:
    """open_clip's basic_clean (ftfy, HTML unescaped twice, stripped), so the tokens match its tokenizer."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


class HPSv2:
    """HPSv2.1: the HPS checkpoint (open_clip names) in a transformers CLIPModel of the ViT-H-14 folder's config."""

    def __init__(self, checkpoint: str | Path, clip_dir: str | Path):
        from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

        ck = _load(checkpoint)
        sd = ck.get("state_dict", ck) if isinstance(ck, dict) else None
        if not isinstance(sd, dict) or "visual.conv1.weight" not in sd:
            raise ScoreError(f"{checkpoint} is not an HPS checkpoint (no open_clip state_dict; expected "
                             "HPS_v2.1_compressed.pt).")
        config = _from_folder(CLIPConfig.from_pretrained, clip_dir, "a transformers ViT-H-14 folder")
        self.model = CLIPModel(config).eval()
        try:
            self.model.load_state_dict(open_clip_to_transformers(sd), strict=True)
        except (KeyError, RuntimeError) as e:
            raise ScoreError(f"{checkpoint} does not fit the CLIP architecture of {clip_dir} ({str(e)[:200]}); pass "
                             "a ViT-H-14 transformers folder as --hps-clip.") from None
        self.tokenizer = _from_folder(CLIPTokenizer.from_pretrained, clip_dir, "a ViT-H-14 folder with its tokenizer")
        self.length = config.text_config.max_position_embeddings
        self.size = config.vision_config.image_size

    @torch.no_grad()
    def scores(self, images, prompts) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        x = torch.stack([resize_longest_pad(to_pil(i), self.size) for i in images]).to(dev)
        tok = self.tokenizer([open_clip_clean(p) for p in prompts], padding="max_length", max_length=self.length,
                             truncation=True, return_tensors="pt")
        img = self.model.get_image_features(pixel_values=x)
        txt = self.model.get_text_features(input_ids=tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev))
        img, txt = (o if isinstance(o, torch.Tensor) else o.pooler_output for o in (img, txt))
        return F.cosine_similarity(img.float(), txt.float(), dim=-1).cpu()

    def to(self, device):
        self.model.to(device)
        return self


# ---------------------------------------------------------------- ImageReward
def _blip_vision_key(k: str) -> str:
    """blip.visual_encoder.* (timm-style ViT) -> transformers BlipVisionModel (transformers' convert_blip rename)."""
    k = k[len("blip.visual_encoder."):]
    if k.startswith("norm."):
        return "post_layernorm." + k[len("norm."):]
    for a, b in (("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
                 ("patch_embed.proj.", "embeddings.patch_embedding."), ("blocks.", "encoder.layers."),
                 ("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
                 ("attn.proj.", "self_attn.projection.")):
        k = k.replace(a, b)
    return k


class ImageReward:
    """ImageReward v1.0 from one folder: ImageReward.pt, med_config.json and bert-base-uncased's vocab.txt."""

    def __init__(self, folder: str | Path):
        from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        folder = Path(folder)
        missing = [n for n in ("ImageReward.pt", "med_config.json", "vocab.txt") if not (folder / n).is_file()]
        if missing:
            raise ScoreError(f"{folder} lacks {', '.join(missing)}: put ImageReward.pt, med_config.json and "
                             "bert-base-uncased's vocab.txt in one folder.")
        sd = _load(folder / "ImageReward.pt")
        if not isinstance(sd, dict) or "blip.visual_encoder.pos_embed" not in sd:
            raise ScoreError(f"{folder / 'ImageReward.pt'} is not ImageReward's state dict (no blip.visual_encoder).")
        med = json.loads((folder / "med_config.json").read_text())
        pos, patch = sd["blip.visual_encoder.pos_embed"], sd["blip.visual_encoder.patch_embed.proj.weight"]
        width, p = pos.shape[-1], patch.shape[-1]
        depth = len({k.split(".")[3] for k in sd if k.startswith("blip.visual_encoder.blocks.")})
        # BLIP's ViT-B and ViT-L have 64-wide heads; the image side follows from the position table
        vision = BlipVisionConfig(hidden_size=width, intermediate_size=sd["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                                  num_hidden_layers=depth, num_attention_heads=max(width // 64, 1),
                                  image_size=int(round((pos.shape[1] - 1) ** 0.5)) * p, patch_size=p,
                                  layer_norm_eps=1e-6, hidden_act="gelu")
        self.vision = BlipVisionModel(vision).eval()
        self.vision.load_state_dict({_blip_vision_key(k): v for k, v in sd.items()
                                     if k.startswith("blip.visual_encoder.")}, strict=True)
        text = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=width,
                              intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
                              num_attention_heads=med["num_attention_heads"],
                              max_position_embeddings=med["max_position_embeddings"],
                              layer_norm_eps=med["layer_norm_eps"], hidden_act=med["hidden_act"],
                              pad_token_id=med.get("pad_token_id", 0),
                              is_decoder=True)  # builds the cross-attention; called as an encoder below
        self.text = BlipTextModel(text, add_pooling_layer=False).eval()
        self.text.load_state_dict({k[len("blip.text_encoder."):]: v for k, v in sd.items()
                                   if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")}, strict=True)
        self.head = linear_head(sd, "mlp.")
        self.tokenizer = BertTokenizer(str(folder / "vocab.txt"))
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # blip.init_tokenizer
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.size = vision.image_size

    @torch.no_grad()
    def scores(self, images, prompts) -> torch.Tensor:
        dev = next(self.vision.parameters()).device
        out = []
        for image, prompt in zip(images, prompts):
            tok = self.tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            img = self.vision(pixel_values=resize_center_crop(to_pil(image), self.size)[None].to(dev)).last_hidden_state
            state = self.text(input_ids=tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev),
                              encoder_hidden_states=img,
                              encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long, device=dev))
            reward = self.head(state.last_hidden_state[:, 0, :].float())
            out.append(float((reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD))
        return torch.tensor(out)

    def to(self, device):
        for m in (self.vision, self.text, self.head):
            m.to(device)
        return self
