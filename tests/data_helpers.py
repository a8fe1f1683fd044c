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

    if family in ("qwen_image", "flux2", "flux2_klein"):
        return tiny_components_new(family, seed)
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


def byte_vocab(specials: list[str]) -> dict[str, int]:
    """A byte-level BPE vocabulary without merges: the specials, then one token per byte."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {s: i for i, s in enumerate(specials)}
    for c in sorted(ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
    return vocab


QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
                      "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def qwen_tokenizer():
    """A Qwen2 tokenizer (byte-level, Qwen's chat tokens) with a Qwen3-style chat template (thinking switch)."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = Qwen2Tokenizer(vocab=byte_vocab(specials), merges=[], additional_special_tokens=specials[1:])
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def mistral_tokenizer():
    """A byte-level tokenizer with Mistral's control tokens and a chat template of list-of-parts messages, as the
    FLUX.2-dev pipeline calls it (the released tokenizer is a PixtralProcessor, which needs torchvision)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    tk = Tokenizer(models.BPE(vocab=byte_vocab(specials), merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=specials[4:])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
                         "{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]{% else %}[INST]{{ m['content'][0]['text'] }}"
                         "[/INST]{% endif %}{% endfor %}")
    return tok


def tiny_qwen_vl(tok, hidden: int = 16):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config={"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tok),
                     # M-RoPE sections split half a head (2 heads)
                     "rope_scaling": {"mrope_section": [hidden // 16, hidden // 16, hidden // 8], "rope_type": "default",
                                      "type": "default"},
                     "rope_theta": 1000000.0},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": hidden},
        hidden_size=hidden, vocab_size=len(tok), bos_token_id=0, eos_token_id=2, pad_token_id=0,
        vision_start_token_id=len(tok), vision_end_token_id=len(tok) + 1,
        vision_token_id=len(tok) + 2, image_token_id=len(tok) + 3, video_token_id=len(tok) + 4,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def tiny_mistral3(tok, hidden: int = 8, layers: int = 31):
    """Mistral3 deep enough for the dev pipeline's hidden states 10, 20, 30."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    cfg = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tok), "hidden_size": hidden,
                     "intermediate_size": 2 * hidden, "max_position_embeddings": 512, "num_attention_heads": 2,
                     "num_hidden_layers": layers, "num_key_value_heads": 1, "head_dim": hidden // 2,
                     "rope_theta": 1e9, "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
        vision_config={"model_type": "pixtral", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 8, "image_size": 12, "patch_size": 6, "num_channels": 3},
        image_token_index=0, vision_feature_layer=-1,
    )
    return Mistral3ForConditionalGeneration(cfg).eval()


def tiny_qwen3(tok, hidden: int = 8, layers: int = 28):
    """Qwen3 deep enough for klein's hidden states 9, 18, 27."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    return Qwen3ForCausalLM(cfg).eval()


def tiny_qwen_vae(z_dim: int = 4):
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0][:z_dim],
                                  latents_std=[1.5, 0.8, 1.2, 2.0][:z_dim]).eval()


def tiny_flux2_vae(latent_channels: int = 4):
    """AutoencoderKLFlux2 with 2x downsampling (x2 patchify = 4 pixels per latent side) and non-trivial batch-norm
    statistics (the released VAE's normalisation of the patchified latent)."""
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                             latent_channels=latent_channels, norm_num_groups=4, sample_size=32).eval()
    g = torch.Generator().manual_seed(7)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.3)
    vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) + 0.5)
    return vae


def clip_l_dir(root: Path) -> Path:
    """A transformers CLIP folder whose text tower projects to 768 (the discriminator's CLIP ViT-L/14 condition)."""
    from transformers import CLIPTextModelWithProjection

    tok = clip_tokenizer()
    CLIPTextModelWithProjection(_clip_config(tok, 16, 768)).eval().save_pretrained(root)
    tok.save_pretrained(root)
    return root


def tiny_components_new(family: str, seed: int = 0) -> dict:
    import torch

    torch.manual_seed(seed)
    if family == "qwen_image":
        tok = qwen_tokenizer()
        return {"vae": tiny_qwen_vae(), "tokenizer": tok, "text_encoder": tiny_qwen_vl(tok, 32)}  # tiny-qwen-image's 32
    if family == "flux2":
        tok = mistral_tokenizer()
        return {"vae": tiny_flux2_vae(), "tokenizer": tok, "text_encoder": tiny_mistral3(tok, 16)}  # 3 x 16 = 48
    tok = qwen_tokenizer()  # flux2_klein
    return {"vae": tiny_flux2_vae(), "tokenizer": tok, "text_encoder": tiny_qwen3(tok, 16)}


PIPELINE_CLASS = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "qwen_image": "QwenImagePipeline",
                  "flux2": "Flux2Pipeline", "flux2_klein": "Flux2KleinPipeline"}


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
    import diffusers

    return getattr(diffusers, PIPELINE_CLASS[family])(transformer=None, scheduler=None, **components)


# the released schedulers' settings (QwenImagePipeline's scheduler_config.json; FLUX.2's, whose pipeline overrides the
# shift with its own empirical mu)
SCHEDULERS = {
    "qwen_image": dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                       max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential"),
    "flux2": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096, time_shift_type="exponential"),
}
TRANSFORMER_PRESET = {"qwen_image": "tiny-qwen-image", "flux2": "tiny-flux2", "flux2_klein": "tiny-flux2-klein"}


def tiny_transformer(preset: str, seed: int = 0, scale: float = 0.05, **overrides):
    """A diffusers transformer of one of our tiny presets with random non-zero weights everywhere."""
    import diffusers
    import torch

    from megatron_senseflow.models.configs import arch_to_diffusers_config, make_arch

    arch = make_arch(preset, overrides)
    cls = getattr(diffusers, arch.diffusers_class)
    torch.manual_seed(seed)
    model = cls(**{k: v for k, v in arch_to_diffusers_config(arch).items() if k != "_class_name"})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def save_full_pipeline(root: Path, family: str, seed: int = 0, **transformer) -> Path:
    """A complete tiny pipeline of a new family (transformer, scheduler, VAE, text stack) saved as diffusers does;
    `transformer`: fields of the tiny transformer to change."""
    import diffusers

    components = tiny_components(family, seed)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULERS["qwen_image" if family == "qwen_image" else "flux2"])
    extra = {"is_distilled": False} if family == "flux2_klein" else {}
    pipe = getattr(diffusers, PIPELINE_CLASS[family])(transformer=tiny_transformer(TRANSFORMER_PRESET[family], seed,
                                                                                   **transformer),
                                                      scheduler=sched, **components, **extra)
    pipe.save_pretrained(root)
    return Path(root)
