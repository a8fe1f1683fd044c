"""GPU checks run by tests/test_gpu.py, each in its own process (one NCCL rank):

    python tests/gpu_checks.py te_parity | fp8_close | train_step

Prints one JSON line last. Needs CUDA and TransformerEngine.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARCHS = {
    "flux": ("tiny-flux", dict(attention_head_dim=64, num_attention_heads=4, num_layers=2, num_single_layers=2,
                               joint_attention_dim=64, in_channels=16, guidance_embeds=True, axes_dims_rope=(8, 28, 28))),
    "sd3": ("tiny-sd3", dict(attention_head_dim=64, num_attention_heads=4, caption_projection_dim=256,
                             joint_attention_dim=64, num_layers=3, dual_attention_layers=(0,))),
}


def _inputs(arch, device, seed=0):
    from megatron_senseflow.roles import Denoiser

    g = torch.Generator(device="cpu").manual_seed(seed)
    c = arch.latent_channels
    x = torch.randn(2, c, 32, 32, generator=g).to(device)
    text = torch.randn(2, 16, arch.joint_attention_dim, generator=g).to(device)
    pooled = torch.randn(2, arch.pooled_projection_dim, generator=g).to(device)
    sigma = torch.rand(2, generator=g).to(device)
    den = Denoiser(arch, torch.bfloat16)
    guidance = torch.full((2,), 3.5, device=device) if getattr(arch, "guidance_embeds", False) else None
    return den, den.kwargs(x, sigma, text, pooled, guidance), x


def _models(family, fp8=None, recipe="tensorwise"):
    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.configs import make_arch

    preset, over = ARCHS[family]
    arch = make_arch(preset, over)
    torch.manual_seed(0)
    local = build_model(arch, transformer_config(arch, params_dtype=torch.bfloat16), spec="local").cuda().eval()
    te = build_model(arch, transformer_config(arch, params_dtype=torch.bfloat16, fp8=fp8, fp8_recipe=recipe),
                     spec="te").cuda().eval()
    canonical = {local.global_name(n): t.detach() for n, t in local.tensors()}
    te.local_from_canonical(canonical, strict=True)
    return arch, local, te


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def te_parity():
    out = {}
    for family in ("flux", "sd3"):
        arch, local, te = _models(family)
        den, kw, x = _inputs(arch, "cuda")
        with torch.no_grad():
            out[family] = _rel(den.velocity(te(**kw), x), den.velocity(local(**kw), x))
    return out


def fp8_close():
    out = {}
    for family in ("flux", "sd3"):
        arch, _, bf16 = _models(family)
        _, _, fp8 = _models(family, fp8="hybrid")
        den, kw, x = _inputs(arch, "cuda")
        with torch.no_grad():
            out[family] = _rel(den.velocity(fp8(**kw), x), den.velocity(bf16(**kw), x))
    return out


def train_step():
    from megatron_senseflow.config import load_config
    from megatron_senseflow.distributed import current_env
    from megatron_senseflow.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("tiny", [
            "model.spec=te", "model.params_dtype=bfloat16", "roles.generator.precision=bf16",
            "roles.fake_score.precision=fp8", "roles.teacher.precision=fp8", "model.fp8_recipe=tensorwise",
            "roles.discriminator.precision=bf16", "train.device=cuda", f"train.output_dir={tmp}", "train.max_steps=2",
            "logging.log_every=1", "logging.tensorboard=false", "checkpoint.every=0", "distill.ttur=1",
        ])
        cfg.model.arch = dict(ARCHS["flux"][1])
        tr = Trainer(cfg, current_env(torch.device("cuda")))
        it = iter(tr.data)
        logs = [tr.train_step(next(it)) for _ in range(2)]
        peak = torch.cuda.max_memory_allocated() / 1e9
    return {"logs": [{k: float(v) for k, v in l.items()} for l in logs], "peak_gb": peak}


def local_train_step():
    """Two trainer iterations with the `local` spec on CUDA, bf16 (what runs where TransformerEngine is
    missing), FLUX and SD3; and proof that the CPU support code was never loaded."""
    from megatron_senseflow.config import load_config
    from megatron_senseflow.distributed import current_env
    from megatron_senseflow.trainer import Trainer

    out = {}
    for family in ("flux", "sd3"):
        with tempfile.TemporaryDirectory() as tmp:
            extra = [f"model.preset={ARCHS[family][0]}"] + (["distill.guidance_mode=cfg"] if family == "sd3" else [])
            cfg = load_config("tiny", extra + [
                "model.spec=local", "model.params_dtype=bfloat16", "roles.generator.precision=bf16", "roles.fake_score.precision=bf16",
                "roles.teacher.precision=bf16", "roles.discriminator.precision=bf16",
                "train.device=cuda", f"train.output_dir={tmp}", "train.max_steps=2", "logging.log_every=1",
                "logging.tensorboard=false", "checkpoint.every=0", "distill.ttur=1",
            ])
            cfg.model.arch = dict(ARCHS[family][1])
            tr = Trainer(cfg, current_env(torch.device("cuda")))
            it = iter(tr.data)
            out[family] = [{k: float(v) for k, v in tr.train_step(next(it)).items()} for _ in range(2)]
    out["cpu_support_loaded"] = "megatron_senseflow.cpu_megatron" in sys.modules
    return out


if __name__ == "__main__":
    from megatron_senseflow.config import ParallelConfig
    from megatron_senseflow.distributed import init_distributed

    init_distributed(ParallelConfig(), device="cuda")
    checks = {"te_parity": te_parity, "fp8_close": fp8_close, "train_step": train_step, "local_train_step": local_train_step}
    print(json.dumps(checks[sys.argv[1]]()))
