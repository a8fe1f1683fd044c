"""diffusers <-> role checkpoint conversion (tools/convert_checkpoint.py): exact, streaming-format-true, loud on bad input.

Conversions that need megatron's parallel_state (the checkpoint layout is read
off a meta-device model) run in a forked 1-rank worker (tests/dist_helpers),
so the pytest process never holds a process group the later forks would inherit.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.convert_helpers import last_line, load_all, run_py, save_tiny
from tests.dist_helpers import run_distributed

# variant -> (dtype the tiny model is saved in, mixed dtypes)
ROUND_TRIP = {
    "flux-dev": (torch.bfloat16, False),
    "flux-student": (torch.float32, False),
    "sd35-medium": (torch.bfloat16, True),
    "sd35-large": (torch.float32, False),
    "qwen-image": (torch.bfloat16, True),
    "flux2-dev": (torch.bfloat16, False),
    "flux2-klein": (torch.float32, False),
}


# ---------------------------------------------------------------- fast: file formats, no process group
def test_sharded_writer_and_lazy_reader(tmp_path):
    from megatron_senseflow.tools.hf_io import INDEX_NAME, PlannedTensor, SafetensorsDir, ShardedSafetensorsWriter, parse_size

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(7, generator=g),
        "c.scale": torch.tensor(3.0, dtype=torch.float16),
        "d.weight": torch.randn(3, 100, generator=g),
    }
    plan = [PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    w = ShardedSafetensorsWriter(tmp_path, plan, parse_size("1KB"))
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = index["weight_map"]
    # a (4 KiB) is over the limit and alone; b + c fit in one shard; d does not fit beside them
    assert [shards[k] for k in tensors] == [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 2, 3)]
    back = load_all(tmp_path)  # the reference reader agrees, bitwise and in dtype
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    lazy = SafetensorsDir(tmp_path)
    assert lazy.info["a.weight"].shape == (64, 32) and lazy.info["a.weight"].dtype == torch.bfloat16
    assert torch.equal(lazy.get_part("d.weight", 1, 10, 20), tensors["d.weight"][:, 10:30])
    assert parse_size("10GB") == 10**10 and parse_size("2GiB") == 2 * 2**30 and parse_size("500kb") == 500_000


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    from megatron_senseflow.tools.hf_io import PlannedTensor, ShardedSafetensorsWriter

    w = ShardedSafetensorsWriter(tmp_path, [PlannedTensor("x", (2, 2), torch.float32)], 10**6)
    with pytest.raises(RuntimeError, match=r"plan expects x \(2, 2\)"):
        w.write("x", torch.zeros(2, 3))


def test_export_finds_the_role_checkpoint(tmp_path):
    from megatron_senseflow.models.checkpoint_io import write_meta
    from megatron_senseflow.models.configs import make_arch
    from megatron_senseflow.checkpoint import resolve_role_dir

    arch = make_arch("tiny-flux")
    step = tmp_path / "run" / "checkpoints" / "step_00000010"
    for role in ("generator", "fake_score"):
        (step / role).mkdir(parents=True)
        write_meta(step / role, arch, torch.bfloat16)
    (step / "COMPLETE").write_text("{}")  # what the trainer's CheckpointManager writes
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000010")
    assert resolve_role_dir(step / "generator") == step / "generator"  # a role checkpoint itself
    assert resolve_role_dir(step, "fake_score") == step / "fake_score"  # a step directory
    assert resolve_role_dir(tmp_path / "run").resolve() == (step / "generator").resolve()  # a train output dir


# ---------------------------------------------------------------- round trips (1-rank workers)
def _round_trip(env, variant, src, ckpt, out, student=False):
    from megatron_senseflow.tools.convert_checkpoint import export_checkpoint, import_checkpoint

    import_checkpoint(src, ckpt, student=student, progress=False)
    export_checkpoint(ckpt, out, max_shard_size="150KB", progress=False)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(ROUND_TRIP))
def test_round_trip_is_bitwise(tmp_path, variant):
    import diffusers

    dtype, mixed = ROUND_TRIP[variant]
    src = save_tiny(variant, tmp_path / "hf", dtype, mixed=mixed)
    assert len(list(src.glob("*.safetensors"))) > 2  # the index path is exercised
    run_distributed(_round_trip, 1, variant, str(src), str(tmp_path / "ckpt"), str(tmp_path / "out"))
    a, b = load_all(src), load_all(tmp_path / "out")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] == []
    assert json.loads((tmp_path / "out" / "config.json").read_text())["_class_name"] == json.loads(
        (src / "config.json").read_text())["_class_name"]
    cls = getattr(diffusers, json.loads((src / "config.json").read_text())["_class_name"])
    model = cls.from_pretrained(tmp_path / "out", torch_dtype=dtype)
    assert torch.equal(dict(model.named_parameters())["proj_out.weight"], a["proj_out.weight"].to(dtype))
    if variant.startswith("sd35"):  # Stability's single file of the export, read back by diffusers' own loader
        _single_file_loads_bitwise(cls, tmp_path / "out", tmp_path / "sd35.safetensors", a)


def _single_file_loads_bitwise(cls, exported, path, want: dict) -> None:
    """`write_single_file` of a diffusers export, loaded with diffusers' `from_single_file` (its own converter from
    the original layout; config= the export's folder, so no hub): every tensor equals the export's, dtype too."""
    from megatron_senseflow.tools.convert_checkpoint import write_single_file

    write_single_file(exported, path, progress=False)
    got = cls.from_single_file(str(path), config=str(exported), torch_dtype=None).state_dict()
    for k in want:  # from_single_file builds in fp32 without torch_dtype; compare after the same cast
        assert torch.equal(got[k], want[k].to(got[k].dtype)), k
    assert got.keys() == want.keys()


@pytest.mark.slow
@pytest.mark.parametrize("variant,num_dropped", [("flux-dev", 4), ("flux2-dev", 2)])  # FLUX.2's embedder has no biases
def test_student_round_trip_drops_only_the_guidance_embedder(tmp_path, variant, num_dropped):
    src = save_tiny(variant, tmp_path / "hf", torch.bfloat16)
    run_distributed(_round_trip, 1, variant, str(src), str(tmp_path / "ckpt"), str(tmp_path / "out"), True)
    a, b = load_all(src), load_all(tmp_path / "out")
    dropped = {k for k in a if ".guidance_embedder." in k}
    assert len(dropped) == num_dropped and b.keys() == a.keys() - dropped
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in b)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["guidance_embeds"] is False
    assert json.loads((tmp_path / "ckpt" / "senseflow_model.json").read_text())["arch"]["guidance_embeds"] is False


def _import_and_save_model(env, variant, src, imported, saved):
    from megatron_senseflow.models import build_model, hf_mapping, transformer_config
    from megatron_senseflow.models.checkpoint_io import save_model
    from tests.test_model_parity import reference
    from megatron_senseflow.tools.convert_checkpoint import import_checkpoint

    import_checkpoint(src, imported, progress=False)
    arch, ref = reference(variant)
    model = build_model(arch, transformer_config(arch))
    model.local_from_canonical(dict(hf_mapping.hf_to_ours(arch, ref.state_dict().__getitem__)))
    save_model(model, arch, saved)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["flux-dev", "sd35-medium"])
def test_import_writes_what_save_model_writes(tmp_path, variant):
    from torch.distributed.checkpoint import FileSystemReader

    src = save_tiny(variant, tmp_path / "hf")
    run_distributed(_import_and_save_model, 1, variant, str(src), str(tmp_path / "imp"), str(tmp_path / "saved"))

    def layout(d):
        md = FileSystemReader(str(d)).read_metadata().state_dict_metadata
        return {k: (tuple(v.size), v.properties.dtype) for k, v in md.items()}

    assert layout(tmp_path / "imp") == layout(tmp_path / "saved")
    if variant == "flux-dev":
        assert "single_blocks.0.linear_proj.weight/attn" in layout(tmp_path / "imp")
    for name in ("metadata.json", "senseflow_model.json"):
        assert json.loads((tmp_path / "imp" / name).read_text()) == json.loads((tmp_path / "saved" / name).read_text())
    assert (tmp_path / "imp" / "common.pt").is_file()


def _import(env, src, ckpt, student=False):
    from megatron_senseflow.tools.convert_checkpoint import import_checkpoint

    import_checkpoint(src, ckpt, student=student, progress=False)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["flux-dev", "sd35-medium"])
def test_imported_checkpoint_loads_at_tp2_and_pp2(tmp_path, variant):
    from tests.test_model_checkpoint import _load_and_compare

    src = save_tiny(variant, tmp_path / "hf")
    run_distributed(_import, 1, str(src), str(tmp_path / "ckpt"))
    assert max(run_distributed(_load_and_compare, 2, variant, str(tmp_path / "ckpt"), tp=2)) == 0.0
    assert max(run_distributed(_load_and_compare, 2, variant, str(tmp_path / "ckpt"), pp=2)) == 0.0


@pytest.mark.slow
def test_imported_student_loads_at_tp2(tmp_path):
    from tests.test_model_checkpoint import _load_and_compare

    src = save_tiny("flux-dev", tmp_path / "hf")
    run_distributed(_import, 1, str(src), str(tmp_path / "ckpt"), True)
    assert run_distributed(_load_and_compare, 2, "flux-dev", str(tmp_path / "ckpt"), True, tp=2) == [0.0, 0.0]


def _export(env, ckpt, out):
    from megatron_senseflow.tools.convert_checkpoint import export_checkpoint

    export_checkpoint(ckpt, out, progress=False)
    return True


@pytest.mark.slow
def test_export_of_a_checkpoint_saved_at_tp2(tmp_path):
    """What training writes (save_model from a TP=2 model) exports to the diffusers weights it started from."""
    from tests.test_model_checkpoint import _save
    from tests.test_model_parity import reference

    run_distributed(_save, 2, "flux-dev", str(tmp_path / "ckpt"), tp=2)
    run_distributed(_export, 1, str(tmp_path / "ckpt"), str(tmp_path / "out"))
    want = reference("flux-dev")[1].state_dict()
    got = load_all(tmp_path / "out")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------- errors people can act on
def _errors(env, root):
    """Each bad input -> the UserError message (or None if it did not raise)."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from megatron_senseflow.tools.convert_checkpoint import export_checkpoint, import_checkpoint
    from megatron_senseflow.errors import UserError

    root = Path(root)
    flux = save_tiny("flux-dev", root / "flux")
    sd3 = save_tiny("sd35-medium", root / "sd3", shard="10MB")
    sd = load_file(sd3 / "diffusion_pytorch_model.safetensors")

    def variant_dir(name, change):
        d = root / name
        d.mkdir()
        (d / "config.json").write_text((sd3 / "config.json").read_text())
        t = dict(sd)
        change(t)
        save_file(t, d / "diffusion_pytorch_model.safetensors")
        return d

    missing = variant_dir("missing", lambda t: (t.pop("proj_out.bias"), t.pop("norm_out.linear.bias"),
                                                 t.__setitem__("extra.weight", torch.zeros(2))))
    shape = variant_dir("shape", lambda t: t.__setitem__("transformer_blocks.1.ff.net.2.weight", torch.zeros(64, 128)))
    (root / "empty").mkdir()
    (root / "notmodel").mkdir()
    (root / "notmodel" / "config.json").write_text("{}")
    good = root / "good"
    import_checkpoint(flux, good, progress=False)
    base_sd3 = root / "base_sd3"
    base_sd3.mkdir()
    (base_sd3 / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "SD3Transformer2DModel"]}))

    cases = {
        "not_a_dir": lambda: import_checkpoint(root / "nope", root / "o1"),
        "no_transformer": lambda: import_checkpoint(root / "empty", root / "o2"),
        "not_diffusers": lambda: import_checkpoint(root / "notmodel", root / "o3"),
        "other_arch": lambda: import_checkpoint(flux, root / "o4", model="sd3"),
        "keys": lambda: import_checkpoint(missing, root / "o5"),
        "shape": lambda: import_checkpoint(shape, root / "o6"),
        "student_sd3": lambda: import_checkpoint(sd3, root / "o7", student=True),
        "variant": lambda: import_checkpoint(flux, root / "o8", variant="flux-dev"),
        "out_exists": lambda: import_checkpoint(flux, flux),
        "ckpt_missing": lambda: export_checkpoint(root / "empty", root / "o9"),
        "role_missing": lambda: export_checkpoint(root, root / "o10", role="teacher"),
        "base_family": lambda: export_checkpoint(good, root / "o11", base_pipeline=base_sd3),
    }
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = None
        except UserError as e:
            out[name] = str(e)
    return out


@pytest.mark.slow
def test_errors_name_the_value_and_the_fix(tmp_path):
    msg = run_distributed(_errors, 1, str(tmp_path))[0]
    assert all(m is not None for m in msg.values()), [k for k, m in msg.items() if m is None]
    assert "is not a directory" in msg["not_a_dir"]
    assert "neither a diffusers transformer directory" in msg["no_transformer"]
    assert "no _class_name" in msg["not_diffusers"]
    assert "--model sd3 was given" in msg["other_arch"] and "FluxTransformer2DModel" in msg["other_arch"]
    assert "misses 2 expected tensor(s): norm_out.linear.bias, proj_out.bias" in msg["keys"]
    assert "unexpected tensor(s): extra.weight" in msg["keys"]
    assert "transformer_blocks.1.ff.net.2.weight" in msg["shape"] and "(64, 128)" in msg["shape"] and "(64, 256)" in msg["shape"]
    assert "drop --student" in msg["student_sd3"]
    assert "--variant flux-dev means" in msg["variant"]
    assert "--overwrite" in msg["out_exists"]
    assert "not a senseflow checkpoint" in msg["ckpt_missing"]
    assert "holds roles good but no 'teacher'" in msg["role_missing"]
    assert "use a FLUX pipeline as base" in msg["base_family"]
    assert all(len(m.splitlines()) == 1 for m in msg.values())


# ---------------------------------------------------------------- the command lines
@pytest.mark.slow
def test_command_lines(tmp_path):
    src = save_tiny("sd35-large", tmp_path / "hf", torch.bfloat16)
    r = run_py("-m", "megatron_senseflow.cli", "convert", "import", "--hf", str(src), "--out", str(tmp_path / "ckpt"),
               "--model", "sd3")
    assert r.returncode == 0, r.stderr
    step = tmp_path / "step"
    step.mkdir()
    (tmp_path / "ckpt").rename(step / "generator")  # a training step directory holds one checkpoint per role
    r = run_py("-m", "megatron_senseflow.cli", "export", "--ckpt", str(step), "--out", str(tmp_path / "out"),
               "--max-shard-size", "100KB", "--dtype", "fp32", "--no-progress")
    assert r.returncode == 0, r.stderr
    a, b = load_all(src), load_all(tmp_path / "out")
    assert a.keys() == b.keys() and all(b[k].dtype == torch.float32 and torch.equal(a[k].float(), b[k]) for k in a)
    # Stability's single file of the trained role (the diffusers export staged beside it, then removed)
    r = run_py("-m", "megatron_senseflow.cli", "export", "--ckpt", str(step), "--out", str(tmp_path / "sd35.safetensors"),
               "--single-file", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob(".*")), "the staged diffusers export was left behind"
    from diffusers import SD3Transformer2DModel

    got = SD3Transformer2DModel.from_single_file(str(tmp_path / "sd35.safetensors"), config=str(src),
                                                 torch_dtype=torch.bfloat16).state_dict()
    assert got.keys() == a.keys() and all(torch.equal(got[k], a[k]) for k in a)
    r = run_py("-m", "megatron_senseflow.cli", "export", "--ckpt", str(step), "--out", str(tmp_path / "s.bin"),
               "--single-file")
    assert r.returncode == 2 and "name the file to write" in last_line(r.stderr)
    r = run_py("-m", "megatron_senseflow.cli", "convert", "import", "--hf", str(src), "--out", str(tmp_path / "x"),
               "--model", "flux")
    assert r.returncode == 2 and "--model flux was given" in last_line(r.stderr)
    assert not (tmp_path / "x").exists()
