"""The exported FLUX student is a working diffusers pipeline: FluxPipeline.from_pretrained runs 4 steps.

The base pipeline is built offline from configs: a tiny AutoencoderKL, a CLIP
text encoder with a byte-level BPE tokenizer written here, a T5 encoder with a
unigram tokenizer made by the `tokenizers` library, and the tiny FLUX.1-dev
teacher. The student is imported from it with --student and exported with
--base-pipeline; its weights must equal, and its image match, those of
diffusers' own FLUX transformer holding the teacher's weights minus the
guidance embedder.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist_helpers import run_distributed

pytestmark = pytest.mark.slow


def _clip_tokenizer(directory: Path):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True)
    chars = ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(sorted(chars))})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


def _t5_tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    return T5TokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), eos_token="</s>", pad_token="<pad>",
                           unk_token="<unk>", extra_ids=0)


def build_base_pipeline(root: Path) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from tests.test_model_parity import reference

    arch, teacher = reference("flux-dev")  # in_channels 16 = 4 latent channels x 2 x 2
    torch.manual_seed(0)
    clip_tok = _clip_tokenizer(root / "tok_clip")
    t5_tok = _t5_tokenizer(root / "tok_t5")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=arch.pooled_projection_dim,
                                        intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=77, bos_token_id=len(clip_tok) - 2,
                                        eos_token_id=len(clip_tok) - 1, pad_token_id=len(clip_tok) - 1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=arch.joint_attention_dim, d_kv=8, d_ff=64,
                                 num_layers=1, num_heads=4, pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=arch.in_channels // 4, norm_num_groups=4, sample_size=32,
                        scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=teacher)
    pipe.save_pretrained(root / "base", max_shard_size="200KB")
    return root / "base"


def _import_export(env, base, ckpt, out):
    from megatron_senseflow.tools.convert_checkpoint import export_checkpoint, import_checkpoint

    import_checkpoint(base, ckpt, student=True, progress=False)
    export_checkpoint(ckpt, out, base_pipeline=base, max_shard_size="100KB", progress=False)
    return True


def _draw(pipe, guidance_scale: float = 3.5):
    return pipe("a cat", height=32, width=32, num_inference_steps=4, guidance_scale=guidance_scale, max_sequence_length=16,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_exported_student_pipeline_draws_in_four_steps(tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    base = build_base_pipeline(tmp_path)
    run_distributed(_import_export, 1, str(base), str(tmp_path / "ckpt"), str(tmp_path / "out"))
    out = tmp_path / "out"
    assert (out / "model_index.json").is_file() and (out / "transformer" / "config.json").is_file()
    assert len(list((out / "transformer").glob("*.safetensors"))) > 1

    pipe = FluxPipeline.from_pretrained(out)
    assert pipe.transformer.config.guidance_embeds is False
    image = _draw(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()

    # the same pipeline with diffusers' own student transformer (teacher weights minus guidance) draws the same image
    teacher = FluxTransformer2DModel.from_pretrained(base / "transformer")
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    student = FluxTransformer2DModel(**{**config, "guidance_embeds": False})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("time_text_embed.guidance_embedder.") for k in unexpected)
    exported = pipe.transformer.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in student.state_dict().items())
    pipe.transformer = student
    # same weights; CPU kernels may round differently from run to run (seen: 4e-7)
    np.testing.assert_allclose(_draw(pipe), image, rtol=0, atol=1e-5)
