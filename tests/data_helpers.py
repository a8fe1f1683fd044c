"""Real photographs with real captions, source layouts, and tiny diffusers pipelines for the data tests.

The photographs ship with scikit-image (no download); variants come from
crops and mirror images so the corpus has more than a handful of samples.
The tiny pipelines are built from configs with tokenizers written here, and
saved with save_pretrained, so they load exactly like a downloaded model.
"""
from __future__ import annotations

import io
import json
import string
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = {
    "astronaut": "astronaut Eileen Collins in an orange flight suit in front of the American flag",
    "chelsea": "a tabby cat looking to the side",
    "coffee": "a cup of coffee on a saucer with a spoon",
    "hubble_deep_field": "distant galaxies in the Hubble deep field",
    "immunohistochemistry": "a microscope slide of tissue stained brown and blue",
    "motorcycle_left": "a red motorcycle parked in a room",
    "motorcycle_right": "a red motorcycle seen from a second camera",
    "retina": "a photograph of a human retina with its blood vessels",
    "rocket": "a rocket standing on its launch pad under a blue sky",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "coins": "old coins laid out in rows",
    "moon": "the cratered surface of the moon",
}
VARIANTS = ("full", "mirror", "crop_top_left", "crop_bottom_right")
SAFE_WDS_KEYS = ("jpg", "txt", "json")  # what webdataset's own decoder may touch in these tests


def photo(name: str) -> np.ndarray:
    import skimage.data

    arr = skimage.data.stereo_motorcycle()[0 if name == "motorcycle_left" else 1] if name.startswith("motorcycle") else getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def variant(arr: np.ndarray, how: str) -> np.ndarray:
    h, w = arr.shape[:2]
    return {
        "full": arr,
        "mirror": arr[:, ::-1],
        "crop_top_left": arr[: h * 3 // 4, : w * 3 // 4],
        "crop_bottom_right": arr[h // 4 :, w // 4 :],
    }[how]


def real_images(names=tuple(PHOTOS), variants=VARIANTS) -> list[tuple[str, Image.Image, str]]:
    """(key, image, caption) for every photo x variant."""
    out = []
    for name in names:
        arr = photo(name)
        for how in variants:
            caption = PHOTOS[name] + ("" if how == "full" else f", {how.replace('_', ' ')}")
            out.append((f"{name}-{how}", Image.fromarray(np.ascontiguousarray(variant(arr, how))), caption))
    return out


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def absurd_png(w: int, h: int) -> bytes:
    """A PNG whose header promises w x h pixels (a decompression bomb); PIL reads the size without decoding."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def save_folder(root: Path, items, meta: dict[str, dict] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for key, img, caption in items:
        img.save(root / f"{key}.jpg", quality=90)
        if caption is not None:
            (root / f"{key}.txt").write_text(caption)
        if meta and key in meta:
            (root / f"{key}.json").write_text(json.dumps(meta[key]))
    return root


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def save_img2dataset(root: Path, items, per_tar: int, scores: dict[str, float | None]) -> Path:
    """img2dataset's layout: 00000.tar with KEY.jpg/.txt/.json (+ aesthetic when scored), 00000_stats.json."""
    root.mkdir(parents=True, exist_ok=True)
    for t in range(0, len(items), per_tar):
        chunk = items[t : t + per_tar]
        with tarfile.open(root / f"{t // per_tar:05d}.tar", "w") as tf:
            for i, (key, img, caption) in enumerate(chunk):
                k = f"{t // per_tar:05d}{i:04d}"
                meta = {"key": k, "url": f"http://example.com/{key}.jpg", "width": img.width, "height": img.height,
                        "original_width": img.width, "original_height": img.height, "status": "success"}
                if scores.get(key) is not None:
                    meta["aesthetic"] = scores[key]
                add_member(tf, f"{k}.jpg", jpeg(img))
                if caption is not None:
                    add_member(tf, f"{k}.txt", caption.encode())
                add_member(tf, f"{k}.json", json.dumps(meta).encode())
        (root / f"{t // per_tar:05d}_stats.json").write_text(json.dumps({"successes": len(chunk)}))
    return root


# --------------------------------------------------------------------------- tiny diffusers pipelines

CLIP_LEN = 16


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,'-!?":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>"), ("o", "f</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_LEN)


def t5_tokenizer():
    from transformers import T5Tokenizer

    words = "the a of in on with and photo cat moon rocket coffee red old".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -2.0) for w in words] + [(c, -5.0) for c in string.ascii_lowercase + string.digits + ".,'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=32, shift_factor=0.1159, scaling_factor=0.3611,
    )


def _clip_config(tok, hidden: int, proj: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_LEN, projection_dim=proj,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def _t5(tok, d_model: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def tiny_components(family: str, seed: int = 0) -> dict:
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok, t5tok = clip_tokenizer(), t5_tokenizer()
    if family == "flux":
        return {
            "vae": tiny_vae().eval(),
            "tokenizer": tok, "text_encoder": CLIPTextModel(_clip_config(tok, 16, 16)).eval(),
            "tokenizer_2": t5tok, "text_encoder_2": _t5(t5tok, 32),
        }
    return {
        "vae": tiny_vae().eval(),
        "tokenizer": tok, "text_encoder": CLIPTextModelWithProjection(_clip_config(tok, 16, 8)).eval(),
        "tokenizer_2": clip_tokenizer(), "text_encoder_2": CLIPTextModelWithProjection(_clip_config(tok, 20, 12)).eval(),
        "tokenizer_3": t5tok, "text_encoder_3": _t5(t5tok, 40),
    }


PIPELINE_CLASS = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}


def save_pipeline(root: Path, family: str, components: dict) -> Path:
    """A pipeline folder as diffusers writes it (model_index.json + one folder per component)."""
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": PIPELINE_CLASS[family], "_diffusers_version": "0.42.1"}
    for name, module in components.items():
        module.save_pretrained(root / name)
        index[name] = ["diffusers" if name == "vae" else "transformers", type(module).__name__]
    (root / "model_index.json").write_text(json.dumps(index, indent=1))
    return root


def diffusers_pipeline(family: str, components: dict):
    """The reference diffusers pipeline over the same components (no transformer or scheduler needed to encode)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    return cls(transformer=None, scheduler=None, **components)
