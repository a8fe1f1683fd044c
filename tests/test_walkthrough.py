"""README's "From a diffusers checkpoint to a student", run as written: every command of its code block, in
a fresh working directory that holds its own `models/` and `data/` folders, on a tiny random FLUX pipeline
(diffusers components) and 40 captioned images; only the substitutions the README names for a CPU.
The exported student is then loaded with diffusers' FluxPipeline and draws an image."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

# what the README says a CPU needs: paths into the working directory, small sizes, two processes, five steps
SUBSTITUTIONS = [("/models/", "models/"), ("/data/", "data/"), ("--resolution 1024", "--resolution 64"),
                 ("--workers 16", "--workers 2"), ("--nproc-per-node 8", "--nproc-per-node 2"),
                 ("parallel.tp=8", "parallel.tp=2 train.max_steps=5 data.resolution=64")]
FLUX_SECTION = "## From a diffusers checkpoint to a student"
QWEN_SECTION = "### Qwen-Image and FLUX.2: the 2025 teachers on one node"


def readme_commands(section_title: str = FLUX_SECTION) -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split(section_title, 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", "", block)
    commands = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    for old, new in SUBSTITUTIONS:
        assert any(old in c for c in commands), f"README no longer contains {old!r}; update the test with it"
        commands = [c.replace(old, new) for c in commands]
    return commands


def _tokenizers(root: Path):
    from tests.test_convert_pipeline import _clip_tokenizer, _t5_tokenizer

    return _clip_tokenizer(root / "tok_clip"), _t5_tokenizer(root / "tok_t5")


def build_models(models: Path, tmp: Path) -> None:
    """models/FLUX.1-dev (a tiny FLUX.1-dev pipeline whose CLIP-L is 768 wide, as the real one),
    models/dinov2-large (24 blocks, as ViT-L/14), models/clip-vit-large-patch14 (768-wide text tower)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip_tok, t5_tok = _tokenizers(tmp)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.05)
    text = dict(vocab_size=len(clip_tok), intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=len(clip_tok) - 2, eos_token_id=len(clip_tok) - 1,
                pad_token_id=len(clip_tok) - 1)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, **text))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                 pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                 tokenizer_2=t5_tok, transformer=transformer).save_pretrained(models / "FLUX.1-dev")
    build_discriminator_models(models, tmp)


def build_discriminator_models(models: Path, tmp: Path) -> None:
    """models/dinov2-large (24 blocks, as ViT-L/14) and models/clip-vit-large-patch14 (768-wide text tower)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, Dinov2Config, Dinov2Model

    from tests.test_convert_pipeline import _clip_tokenizer

    clip_tok = _clip_tokenizer(tmp / "tok_clip_d")
    text = dict(vocab_size=len(clip_tok), intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=len(clip_tok) - 2, eos_token_id=len(clip_tok) - 1,
                pad_token_id=len(clip_tok) - 1)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=24, num_attention_heads=2, mlp_ratio=2, patch_size=4,
                             image_size=64)).save_pretrained(models / "dinov2-large")
    cfg = CLIPConfig(text_config=dict(hidden_size=768, **text), projection_dim=768,
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=8))
    CLIPModel(cfg).save_pretrained(models / "clip-vit-large-patch14")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=clip_tok).save_pretrained(models / "clip-vit-large-patch14")


def build_data(work: Path) -> None:
    """data/laion-aesthetic (img2dataset's layout, 40 scored, captioned images), coco5k/, prompts.txt, and
    inception-2015-12-05.pt (a TorchScript stand-in with Inception's calling convention)."""
    from PIL import Image

    from tests.data_helpers import save_img2dataset
    from tests.test_demo import _StandInInception

    g = np.random.default_rng(0)
    words = ["cat", "moon", "rocket", "coffee", "red", "old"]
    items, scores = [], {}
    for i in range(40):
        base = g.integers(0, 255, size=(1, 1, 3))
        arr = np.clip(base + g.normal(0, 40, size=(80, 96, 3)), 0, 255).astype(np.uint8)
        key = f"img{i:03d}"
        items.append((key, Image.fromarray(arr), f"a photo of the {words[i % 6]} {words[(i // 6) % 6]}"))
        scores[key] = 5.5 + (i % 3) * 0.5
    save_img2dataset(work / "data" / "laion-aesthetic", items, per_tar=16, scores=scores)
    (work / "coco5k").mkdir()
    for i in range(8):
        Image.fromarray(np.clip(g.normal(128, 50, size=(64, 64, 3)), 0, 255).astype(np.uint8)).save(
            work / "coco5k" / f"{i:03d}.png")
    (work / "prompts.txt").write_text("a photo of the cat\nthe red rocket\n")
    torch.jit.script(_StandInInception()).save(str(work / "inception-2015-12-05.pt"))


def run_block(work: Path, section: str, run_name: str) -> list[tuple[str, float]]:
    """Every command of a README code block, with the CPU substitutions, in `work`; the checks each step owes."""
    # the working directory's models/ and data/ are the user's folders: they must not shadow our packages
    for name in ("models", "data"):
        (work / name / "__init__.py").write_text(f"raise ImportError('the working directory\\'s {name}/ was imported')\n")
    timings = []
    for command in readme_commands(section):
        t0 = time.time()
        r = subprocess.run(shlex.split(command), cwd=work, env=ENV, capture_output=True, text=True, timeout=900)
        timings.append((command.split()[1] if command.startswith("senseflow") else "torchrun (train)", time.time() - t0))
        assert r.returncode == 0, f"{command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        out = r.stdout + r.stderr
        if " verify " in f" {command} ":
            assert float(r.stdout.strip().splitlines()[-1].split("=")[1]) < 1e-4
        if "--dry-run" in command:
            assert "student anchors" in r.stdout
        if "prepare-data" in command and "--encode" not in command:
            assert "wrote 40 samples" in r.stdout and "only" not in r.stdout, out[-2000:]
        if "memory-plan" in command:
            assert "fits" in r.stdout
        if command.startswith("torchrun"):
            assert "stand-in" not in out and (work / "runs" / run_name / "DONE").is_file(), out[-3000:]
        if " sample " in f" {command} ":
            assert "sampling the generator of step_00000005" in r.stdout and "of 64 px" in r.stdout
        if " export " in f" {command} ":
            assert "exporting the generator of step_00000005" in r.stdout
        if " eval " in f" {command} ":
            assert "fid:" in r.stdout and "clip_score:" in r.stdout
            assert "warning: FID from 2 images is dominated by sampling noise" in out, out[-2000:]
            # 64 px samples: patch FID cannot crop 299 px patches, and says that it equals FID here
            assert "patch_fid:" in r.stdout and "below the 299 px patch" in out, out[-2000:]
    return timings


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def euler_sample(work: Path, run: str, text_encoder: str) -> np.ndarray:
    """`senseflow sample --sampler euler` of the run's generator for the first prompt (seed 0, as the default)."""
    from PIL import Image

    r = subprocess.run(["senseflow", "sample", "--ckpt", f"runs/{run}", "--text-encoder", text_encoder, "--prompts",
                        "prompts.txt", "--out", f"euler-{run}/", "--sampler", "euler"], cwd=work, env=ENV,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return np.asarray(Image.open(work / f"euler-{run}" / "00000_00.png"), dtype=np.int16)


def first_noise(channels: int, side: int) -> torch.Tensor:
    """The noise `senseflow sample` draws for the first prompt: one batch of both prompts from seed 0."""
    return torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0))[:1]


def differs_from_teacher(student: Path, teacher: Path) -> bool:
    from tests.convert_helpers import load_all

    a, b = load_all(student), load_all(teacher)
    common = a.keys() & b.keys()
    assert len(common) > 10
    return any(not torch.equal(a[k].float(), b[k].float()) for k in common)


def test_readme_walkthrough(tmp_path):
    from diffusers import FluxPipeline

    from megatron_senseflow.models.flux.model import pack_latents

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    build_models(work / "models", tmp_path)
    build_data(work)
    timings = run_block(work, FLUX_SECTION, "flux")
    assert len(list((work / "samples").glob("*.png"))) == 2
    # the run trained: the exported student is not the teacher
    assert differs_from_teacher(work / "student" / "transformer", work / "models" / "FLUX.1-dev" / "transformer")

    ours = euler_sample(work, "flux", "models/FLUX.1-dev")
    pipe = FluxPipeline.from_pretrained(work / "student")
    assert pipe.transformer.config.guidance_embeds is False
    image = pipe("a photo of the cat", height=64, width=64, num_inference_steps=4, guidance_scale=1.0,
                 max_sequence_length=512, latents=pack_latents(first_noise(4, 32)), output_type="np").images[0]
    stock = np.round(image * 255).astype(np.int16)
    assert np.abs(stock - ours).max() <= 1, np.abs(stock - ours).max()
    (tmp_path / "timings.json").write_text(json.dumps(timings))
    print("\n".join(f"{name:24s} {sec:6.1f} s" for name, sec in timings))
