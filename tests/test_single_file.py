"""`senseflow export --single-file` of FLUX.1 read back by diffusers' own `FluxTransformer2DModel.from_single_file`.
diffusers' FLUX converter fixes the width at 3072, so this model is FLUX.1's width (0.53 B parameters): a module of
its own. SD3.x's single files are checked on tiny models in tests/test_convert.py."""
from __future__ import annotations

import pytest
import torch

from tests.convert_helpers import last_line, run_py


@pytest.mark.slow
def test_flux_single_file_at_flux1_width_loads_bitwise_in_diffusers(tmp_path):
    """diffusers' FLUX single-file converter fixes the width at 3072 (inner_dim = 3072 splits a single block's
    linear1), so this model is FLUX.1's width with one block of each kind (0.53 B parameters, bf16, a random bit
    pattern per tensor): `senseflow export --ckpt <diffusers folder> --single-file` writes BFL's layout, and
    `FluxTransformer2DModel.from_single_file` reads it back equal to the folder, tensor for tensor."""
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    with torch.device("meta"):
        model = FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, joint_attention_dim=64,
                                       pooled_projection_dim=32, guidance_embeds=True)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # finite bf16 values in (-1, 1), distinct per position, made fast
        for p in model.parameters():
            bits = torch.randint(0, 0x3F80, p.shape, generator=g, dtype=torch.int16)
            p.copy_(bits.view(torch.bfloat16) * torch.where(torch.rand(p.shape, generator=g) < 0.5, -1, 1).bfloat16())
    model.save_pretrained(tmp_path / "hf")
    want = {k: v.clone() for k, v in model.state_dict().items()}
    del model
    out = tmp_path / "flux1-student.safetensors"
    r = run_py("-m", "megatron_senseflow.cli", "export", "--ckpt", str(tmp_path / "hf"), "--out", str(out),
               "--single-file", "--no-progress")
    assert r.returncode == 0 and "single file" in r.stdout, r.stderr[-2000:]
    with safe_open(str(out), "pt") as f:  # BFL's names, no prefix, fused qkv / linear1
        keys = set(f.keys())
        assert f.get_slice("single_blocks.0.linear1.weight").get_shape() == [7 * 3072, 3072]
    assert {"double_blocks.0.img_attn.qkv.weight", "guidance_in.in_layer.weight", "final_layer.adaLN_modulation.1.bias",
            "double_blocks.0.txt_attn.norm.key_norm.scale"} <= keys
    got = FluxTransformer2DModel.from_single_file(str(out), config=str(tmp_path / "hf"),
                                                  torch_dtype=torch.bfloat16).state_dict()
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    r = run_py("-m", "megatron_senseflow.cli", "export", "--ckpt", str(tmp_path / "hf"), "--out", str(out),
               "--single-file")
    assert r.returncode == 2 and "exists; pass --overwrite" in last_line(r.stderr)
