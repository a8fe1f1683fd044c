"""Role checkpoints written at one TP/PP layout load at any other, and refuse another architecture."""
from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.test_model_parity import reference

pytestmark = pytest.mark.slow


def _canonical(variant):
    from megatron_senseflow.models import hf_mapping

    arch, ref = reference(variant)
    sd = ref.state_dict()
    return arch, dict(hf_mapping.hf_to_ours(arch, sd.__getitem__))


def _save(env, variant, directory):
    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.checkpoint_io import save_model

    arch, canonical = _canonical(variant)
    model = build_model(arch, transformer_config(arch, tp=env.tp, pp=env.pp))
    model.local_from_canonical(canonical)
    save_model(model, arch, directory)
    return True


def _load_and_compare(env, variant, directory, student=False):
    import dataclasses

    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.base import local_slice
    from megatron_senseflow.models.checkpoint_io import load_model

    arch, canonical = _canonical(variant)
    if student:
        arch = dataclasses.replace(arch, guidance_embeds=False)
    model = build_model(arch, transformer_config(arch, tp=env.tp, pp=env.pp))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_model(model, arch, directory, allow_guidance_drop=student)
    worst = 0.0
    for name, t in model.tensors():
        want = local_slice(t, canonical[model.global_name(name)], env.tp_rank, env.tp)
        worst = max(worst, (t.detach() - want).abs().max().item())
    return worst


@pytest.mark.parametrize("variant", ["flux-dev", "sd35-medium"])
def test_save_tp2_load_pp2_and_tp1(tmp_path, variant):
    run_distributed(_save, 2, variant, str(tmp_path), tp=2)
    assert max(run_distributed(_load_and_compare, 2, variant, str(tmp_path), pp=2)) == 0.0
    assert max(run_distributed(_load_and_compare, 1, variant, str(tmp_path))) == 0.0


def test_student_loads_from_dev_checkpoint_without_guidance(tmp_path):
    run_distributed(_save, 1, "flux-dev", str(tmp_path))
    assert run_distributed(_load_and_compare, 2, "flux-dev", str(tmp_path), True, tp=2) == [0.0, 0.0]


def _load_other(env, directory):
    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.checkpoint_io import CheckpointError, load_model
    from megatron_senseflow.models.configs import make_arch

    arch = make_arch("tiny-sd3")
    model = build_model(arch, transformer_config(arch))
    try:
        load_model(model, arch, directory)
    except CheckpointError as e:
        return str(e)
    return None


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    run_distributed(_save, 1, "flux-dev", str(tmp_path))
    msg = run_distributed(_load_other, 1, str(tmp_path))[0]
    assert msg is not None and "holds a flux model" in msg and "this run builds sd3" in msg
