"""Offline encoding: parity with diffusers' encode_prompt, VAE shift/scale, encoded shards, multi-rank, resume."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_senseflow.data.encode import EMPTY_PROMPT, infer_family, latent_codec, load_empty_prompt, text_encoder
from megatron_senseflow.data.loader import ShardLoader
from megatron_senseflow.data.shards import read_manifest
from megatron_senseflow.data.write import WriteSettings, write_shards
from megatron_senseflow.cli import main as cli_main
from megatron_senseflow.config import ConfigError, DataConfig
from tests.data_helpers import (CLIP_LEN, clip_tokenizer, diffusers_pipeline, real_images, save_folder, save_pipeline,
                                tiny_components)
from tests.dist_helpers import run_distributed

PROMPTS = [
    "a photo of a cat on the moon",
    "an old red rocket with coffee in the photo, in the rain, with a very long prompt that the tokenizers cut",
    "",
]
T5_LEN = 12  # tiny T5 tokens per prompt


@pytest.fixture(scope="module", params=["flux", "sd3"])
def pipeline(request, tmp_path_factory):
    family = request.param
    components = tiny_components(family)
    return family, components, save_pipeline(tmp_path_factory.mktemp(f"{family}-pipe"), family, components)


def text_length(family: str) -> int:
    return T5_LEN if family == "flux" else CLIP_LEN + T5_LEN


def test_text_encoders_match_diffusers_encode_prompt(pipeline):
    family, components, path = pipeline
    ours = text_encoder(path, family, text_length(family))
    text, pooled = ours.encode(PROMPTS)
    ref = diffusers_pipeline(family, components)
    if family == "flux":
        want_text, want_pooled, _ = ref.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=T5_LEN)
    else:
        want_text, _, want_pooled, _ = ref.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_LEN
        )
    assert text.dtype == pooled.dtype == torch.float32
    assert text.shape == (3, text_length(family), ours.text_dim) and pooled.shape == (3, ours.pooled_dim)
    torch.testing.assert_close(text, want_text.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, want_pooled.float(), rtol=0, atol=1e-6)
    assert not torch.equal(text[0], text[1]), "different prompts, different embeddings"
    assert infer_family(path) == family


def test_latent_encoder_applies_the_vae_shift_and_scale(pipeline):
    _, components, path = pipeline
    enc = latent_codec(path, "flux")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    vae = components["vae"]
    want = (vae.encode(x).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(x), want, rtol=0, atol=1e-6)
    assert (enc.shift, enc.scale, enc.factor, enc.latent_channels) == (0.1159, 0.3611, 2, 4)


def test_missing_component_is_one_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ConfigError, match=r"has no tokenizer/ folder; --model-path must be a local diffusers pipeline"):
        text_encoder(tmp_path, "flux")


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode-src")
    items = real_images(names=("astronaut", "coffee", "rocket"), variants=("full", "mirror", "crop_top_left"))
    save_folder(root / "src", items)
    write_shards(
        WriteSettings(format="folder", input=str(root / "src"), resolution=32, min_side=256, max_samples_per_shard=3),
        root / "shards",
    )
    return root / "shards", {k: c for k, _, c in items}


def _encode_argv(src, out, path, family, *extra):
    return ["prepare-data", "--encode", "--input", str(src), "--out", str(out), "--model-path", str(path),
            "--text-max-length", str(text_length(family)), "--batch-size", "2", "--device", "cpu", *extra]


def _members(tar_path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_encoded_shards_round_trip_into_the_loader(pipeline, image_shards, tmp_path):
    family, _, path = pipeline
    src, captions = image_shards
    out = tmp_path / "encoded"
    assert cli_main(_encode_argv(src, out, path, family, "--text-dtype", "float32")) == 0
    man = read_manifest(out)
    enc = man["encoder"]
    assert man["kind"] == "encoded" and man["num_samples"] == len(captions) == 9 and man["stats"]["skipped"] == {}
    assert [s["name"] for s in man["shards"]] == [s["name"] for s in read_manifest(src)["shards"]]
    assert enc["text_shape"] == [text_length(family), 32 if family == "flux" else 40] and enc["vae_scale_factor"] == 2

    text_enc = text_encoder(path, family, text_length(family))
    latent_enc = latent_codec(path, family)
    sample_key, members = next(iter(_members(out / man["shards"][0]["name"]).items()))
    src_members = _members(src / man["shards"][0]["name"])[sample_key]
    assert members["jpg"] == src_members["jpg"] and members["txt"] == src_members["txt"]
    arrays = {k: np.load(io.BytesIO(members[k]), allow_pickle=False) for k in (enc["latent_key"], enc["text_key"], enc["pooled_key"])}
    image = torch.from_numpy(np.array(Image.open(io.BytesIO(members["jpg"])).convert("RGB")))
    latent = latent_enc.encode(image.permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
    text, pooled = text_enc.encode([members["txt"].decode()])
    np.testing.assert_allclose(arrays[enc["latent_key"]], latent.numpy(), atol=1e-5)
    np.testing.assert_allclose(arrays[enc["text_key"]], text[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(arrays[enc["pooled_key"]], pooled[0].numpy(), atol=1e-5)

    empty = load_empty_prompt(out)
    want_text, want_pooled = text_enc.encode([""])
    torch.testing.assert_close(empty["text"], want_text[0])
    torch.testing.assert_close(empty["pooled"], want_pooled[0])
    assert man["empty_prompt"] == EMPTY_PROMPT

    cfg = DataConfig(path=str(out), encoded=True, resolution=32, micro_batch_size=3, shuffle_buffer=4,
                     num_workers=1, text_max_length=text_length(family))
    batch = next(ShardLoader(cfg, 0, 1))
    assert batch["latent"].shape == (3, 4, 16, 16) and batch["latent"].dtype == torch.float32
    assert batch["text"].shape == (3, *enc["text_shape"]) and batch["pooled"].shape == (3, enc["pooled_dim"])
    assert batch["image"].shape == (3, 3, 32, 32) and batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["prompt"] == [captions[k] for k in batch["key"]]
    no_image = next(ShardLoader(DataConfig(**{**cfg.__dict__, "real_images": False}), 0, 1))
    assert set(no_image) == {"latent", "text", "pooled", "prompt", "key", "epoch"}
    with pytest.raises(ConfigError, match=r"hold \d+ text tokens per prompt but data.text_max_length=512"):
        ShardLoader(DataConfig(**{**cfg.__dict__, "text_max_length": 512}), 0, 1)
    with pytest.raises(ConfigError, match="were encoded at 32 px but data.resolution=64"):
        ShardLoader(DataConfig(**{**cfg.__dict__, "resolution": 64}), 0, 1)


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("flux-pipe"), "flux", tiny_components("flux"))


def test_encoding_resumes_only_the_missing_shards(image_shards, flux_pipe, tmp_path):
    family, path = "flux", flux_pipe
    src, _ = image_shards
    out = tmp_path / "encoded"
    argv = _encode_argv(src, out, path, family)
    assert cli_main(argv) == 0
    first = read_manifest(out)
    assert first["encoder"]["text_dtype"] == "float16"
    victim = first["shards"][1]["name"]
    kept = {s["name"]: (out / s["name"]).stat().st_mtime_ns for s in first["shards"] if s["name"] != victim}
    (out / victim).unlink()
    (out / "_progress" / "job-000001.json").unlink()
    (out / "manifest.json").unlink()
    assert cli_main(argv) == 0
    again = read_manifest(out)
    assert again["shards"] == first["shards"]
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept, "finished shards are not written again"
    assert cli_main(argv + ["--batch-size", "1"]) == 0, "the batch size may change (say after running out of memory)"
    assert cli_main(argv + ["--text-dtype", "float32"]) == 2, "a setting that changes the shards may not"


def _encode_on_rank(env, src, out, path, family):
    assert cli_main(_encode_argv(src, out, path, family)) == 0
    records = sorted((out / "_progress").glob("job-*.json"))
    return {"rank": env.rank, "records": len(records)}


@pytest.mark.slow
def test_two_ranks_encode_their_own_shards(image_shards, flux_pipe, tmp_path):
    family, path = "flux", flux_pipe
    src, captions = image_shards
    out = tmp_path / "encoded"
    res = run_distributed(_encode_on_rank, 2, src, out, path, family)
    assert [r["records"] for r in res] == [3, 3]
    man = read_manifest(out)
    assert man["num_samples"] == len(captions) and len(man["shards"]) == 3
    for j, shard in enumerate(man["shards"]):
        record = json.loads((out / "_progress" / f"job-{j:06d}.json").read_text())
        assert record["rank"] == j % 2, "rank r encodes shards r, r + 2, ..."
    keys = [k for s in man["shards"] for k in _members(out / s["name"])]
    assert sorted(keys) == sorted(captions)


class _NaNFirst:
    """A VAE that returns NaN for the first image it ever sees."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def encode(self, images):
        z = self.inner.encode(images).clone()
        if self.calls == 0:
            z[0, 0, 0, 0] = float("nan")
        self.calls += 1
        return z

    def describe(self):
        return self.inner.describe()


def test_encoder_skips_broken_inputs_and_non_finite_outputs(image_shards, flux_pipe, tmp_path):
    import shutil

    from megatron_senseflow.data.encode import EncodeSettings, encode_shards
    from megatron_senseflow.data.shards import write_json_atomic

    src, captions = image_shards
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    man = read_manifest(copy)
    first = man["shards"][0]
    with tarfile.open(copy / first["name"], "a") as tf:  # one more sample whose image does not decode
        for name, data in (("broken.jpg", b"not a jpeg"), ("broken.txt", b"a broken picture")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    first["count"] += 1
    write_json_atomic(copy / "manifest.json", man)

    s = EncodeSettings(input=str(copy), model_path=str(flux_pipe), family="flux", text_max_length=T5_LEN)
    text = text_encoder(flux_pipe, "flux", T5_LEN)
    out = encode_shards(s, tmp_path / "enc", text, _NaNFirst(latent_codec(flux_pipe, "flux")), batch_size=2)
    assert out["stats"]["skipped"] == {"undecodable": 1, "non_finite": 1}
    assert out["num_samples"] == len(captions) - 1 == out["stats"]["written"]


@pytest.mark.parametrize("family", ["qwen_image", "flux2", "flux2_klein"])
def test_new_family_encoders_match_their_pipelines(family, tmp_path):
    """Text: the pipeline's own encode_prompt (Qwen-Image: its batch padding and mask, ours zero-padded to the run's
    length, the mask read back from the zeros); latents: the pipelines' normalisations written out by hand."""
    from megatron_senseflow.models import family_of
    from tests.data_helpers import clip_l_dir

    from megatron_senseflow.models.configs import presets

    components = tiny_components(family)
    path = save_pipeline(tmp_path / "pipe", family, components)
    name = infer_family(path)
    assert name == ("flux2" if family.startswith("flux2") else family)
    length = 200 if family == "qwen_image" else 48
    ours = text_encoder(path, name, length, clip=str(clip_l_dir(tmp_path / "clip")))
    text, pooled = ours.encode(PROMPTS)
    ref = diffusers_pipeline(family, components)
    assert text.shape == (3, length, ours.text_dim) and pooled.shape == (3, 768)
    if family == "qwen_image":
        want, mask = ref.encode_prompt(PROMPTS, max_sequence_length=length)
        n = want.shape[1]
        torch.testing.assert_close(text[:, :n], want.float(), rtol=0, atol=0)
        assert not text[:, n:].any()
        arch = presets()["tiny-qwen-image"]
        derived = family_of(arch).model_inputs(arch, torch.zeros(3, 4, 4, 4), torch.rand(3), text, pooled)
        assert torch.equal(derived["encoder_hidden_states_mask"][:, :n], mask.bool())
        assert not derived["encoder_hidden_states_mask"][:, n:].any()
    else:
        want, _ = ref.encode_prompt(PROMPTS, max_sequence_length=length)
        torch.testing.assert_close(text, want.float(), rtol=0, atol=0)
    from transformers import CLIPTextModelWithProjection

    clip = CLIPTextModelWithProjection.from_pretrained(tmp_path / "clip")
    ids = clip_tokenizer()(PROMPTS, padding="max_length", max_length=CLIP_LEN, truncation=True, return_tensors="pt")
    torch.testing.assert_close(pooled, clip(ids.input_ids).text_embeds, rtol=0, atol=1e-6)
    assert not text_encoder(path, name, length).encode(PROMPTS[:1])[1].any()  # no CLIP folder: zeros

    vae, codec = components["vae"], latent_codec(path, name)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = codec.encode(x)
        if family == "qwen_image":  # QwenImage img2img: (z - mean) * (1 / std) of one frame
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
            want_z = (vae.encode(x[:, :, None]).latent_dist.mode()[:, :, 0] - mean) * (1.0 / std)
            want_img = vae.decode((z / (1.0 / std) + mean)[:, :, None]).sample[:, :, 0]
        else:  # Flux2Pipeline: patchify, then the batch-norm statistics
            from diffusers import Flux2Pipeline

            mean = vae.bn.running_mean.view(1, -1, 1, 1)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
            want_z = (Flux2Pipeline._patchify_latents(vae.encode(x).latent_dist.mode()) - mean) / std
            want_img = vae.decode(Flux2Pipeline._unpatchify_latents(z * std + mean)).sample
        torch.testing.assert_close(z, want_z, rtol=0, atol=1e-6)
        torch.testing.assert_close(codec.decode(z), want_img, rtol=0, atol=1e-6)
    assert z.shape[1] == codec.latent_channels and 32 // z.shape[-1] == codec.factor == family_of(name).vae_factor(path / "vae")
