"""`senseflow verify` (tools/verify_conversion.py): passes for a faithful conversion at TP=1, 2 and PP=2, fails loudly otherwise.

Real launches (`python` and `torchrun`), as users run it; each costs a few
seconds of imports per process, so there are four.
"""
from __future__ import annotations

import argparse

import pytest
import torch

from tests.convert_helpers import last_line, run_py, save_tiny
from tests.dist_helpers import run_distributed


def _import(env, src, ckpt):
    from megatron_senseflow.tools.convert_checkpoint import import_checkpoint

    import_checkpoint(src, ckpt, progress=False)
    return True


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Two tiny FLUX.1-dev models (seeds 0 and 1) and the checkpoint converted from seed 0, in bf16."""
    root = tmp_path_factory.mktemp("verify")
    src = save_tiny("flux-dev", root / "hf", torch.bfloat16)
    other = save_tiny("flux-dev", root / "hf_other", torch.bfloat16, seed=1)
    run_distributed(_import, 1, str(src), str(root / "ckpt"))
    return src, other, root / "ckpt"


def _value(line: str) -> float:
    assert line.startswith("max_rel_err="), line
    return float(line.split("=", 1)[1])


def _torchrun(n, *args):
    return run_py("-m", "torch.distributed.run", "--nproc-per-node", str(n), "-m", "megatron_senseflow.tools.verify_conversion",
                  *args)


def _verify(*args):
    return run_py("-m", "megatron_senseflow.cli", "verify", *args)


@pytest.mark.slow
def test_passes_single_process(converted):
    src, _, ckpt = converted
    r = _verify("--hf", str(src), "--ckpt", str(ckpt))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _value(last_line(r.stdout)) < 1e-5
    assert len(r.stdout.splitlines()) <= 5 and "Warning" not in r.stderr  # the result, not library noise


@pytest.mark.slow
def test_the_verb_starts_its_own_processes_for_tp2(converted):
    src, _, ckpt = converted
    r = _verify("--hf", str(src), "--ckpt", str(ckpt), "--tp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tp=2 pp=1" in r.stdout and _value(last_line(r.stdout)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_passes_under_torchrun(converted, tp, pp):
    src, _, ckpt = converted
    r = _torchrun(tp * pp, "--hf", str(src), "--ckpt", str(ckpt), "--tp", str(tp), "--pp", str(pp))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _value(last_line(r.stdout)) < 1e-5


@pytest.mark.slow
def test_fails_loudly_for_another_models_checkpoint(converted):
    _, other, ckpt = converted
    r = _verify("--hf", str(other), "--ckpt", str(ckpt))
    assert r.returncode == 1
    assert _value(last_line(r.stdout)) > 0.1
    assert "FAIL: max_rel_err" in r.stdout and "above the fp32 tolerance" in r.stdout


def _args(src, ckpt, **kw):
    return argparse.Namespace(hf=str(src), ckpt=str(ckpt), role="generator", tp=kw.get("tp", 1), pp=kw.get("pp", 1),
                              latent_size=16)


def test_layouts_that_do_not_fit_are_refused_before_launch(tmp_path, monkeypatch):
    """TP/PP/world checks run before any process group: plain function calls here."""
    import json

    from megatron_senseflow.models.checkpoint_io import write_meta
    from megatron_senseflow.models.configs import arch_from_diffusers_config
    from megatron_senseflow.tools.verify_conversion import VerifyError, resolve

    src = save_tiny("flux-dev", tmp_path / "hf", shard="10MB")
    arch = arch_from_diffusers_config(json.loads((src / "config.json").read_text()))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_meta(ckpt, arch, torch.float32)  # resolve() reads only the sidecar
    with pytest.raises(VerifyError, match=r"--tp 3 does not divide FLUX's 4 attention heads; use one of 1, 2, 4"):
        resolve(_args(src, ckpt, tp=3))
    with pytest.raises(VerifyError, match=r"--pp 9 exceeds the model's 5 blocks"):
        resolve(_args(src, ckpt, pp=9))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(VerifyError, match=r"needs 4 processes, but 2 were launched; run `torchrun --nproc-per-node 4"):
        resolve(_args(src, ckpt, tp=2, pp=2))
    monkeypatch.delenv("WORLD_SIZE")
    student = tmp_path / "student"
    student.mkdir()
    import dataclasses

    write_meta(student, dataclasses.replace(arch, guidance_embeds=False), torch.float32)
    with pytest.raises(VerifyError, match=r"guidance_embeds=False .* guidance_embeds=True; they are different"):
        resolve(_args(src, student))


@pytest.mark.slow
def test_bf16_compute_on_sd35(tmp_path):
    """bf16 compute states its own tolerance; diffusers' SD3 keeps pos_embed.proj in fp32 unless told otherwise."""
    src = save_tiny("sd35-medium", tmp_path / "hf", torch.bfloat16)
    run_distributed(_import, 1, str(src), str(tmp_path / "ckpt"))
    r = _verify("--hf", str(src), "--ckpt", str(tmp_path / "ckpt"), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bf16 tolerance 5e-02" in r.stdout and _value(last_line(r.stdout)) < 5e-2


@pytest.mark.slow
@pytest.mark.parametrize("variant,layout", [("qwen-image", ("--tp", "2")), ("flux2-dev", ("--pp", "2"))])
def test_the_new_families_verify(tmp_path, variant, layout):
    """Qwen-Image (its masked text) and FLUX.2 (its packed projections) through the verb, at a split layout."""
    src = save_tiny(variant, tmp_path / "hf")
    run_distributed(_import, 1, str(src), str(tmp_path / "ckpt"))
    r = _verify("--hf", str(src), "--ckpt", str(tmp_path / "ckpt"), *layout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _value(last_line(r.stdout)) < 1e-5
