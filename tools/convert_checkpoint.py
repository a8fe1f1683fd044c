"""Weights between HuggingFace diffusers and our role checkpoints, both directions, streaming.

    senseflow convert import --hf FLUX.1-dev --out ckpt/teacher
    senseflow convert import --hf FLUX.1-dev --out ckpt/student --student
    senseflow export --ckpt RUN --out student-diffusers --base-pipeline FLUX.1-dev   (= senseflow convert export)
    senseflow export --ckpt RUN --out student.safetensors --single-file --dtype bf16

import: a diffusers transformer directory (or a pipeline directory, whose
`transformer/` is used) -> a role checkpoint (models/checkpoint_io.py) that
`load_model` reads at any TP/PP. `--student` drops FLUX.1-dev's guidance
embedder: SenseFlow's generator and fake score take no guidance scale.

export: a role checkpoint (or a training step directory holding one per role,
or a `senseflow train` output directory) -> a diffusers transformer directory
(config.json, safetensors shards, index), or with `--base-pipeline` a whole
pipeline directory whose `transformer/` is the exported one. `--single-file`: one
safetensors file in the original release's layout (FLUX.1: BFL's flux1-dev.safetensors;
SD3.x: Stability's), as ComfyUI and Forge load it and diffusers' `from_single_file`
reads it; `--ckpt` may then also be a diffusers transformer directory.

Tensors are mapped group by group with models/hf_mapping.py and written as
they are made, so memory stays near one tensor group whatever the model size.
Dtypes are kept as stored unless export gets `--dtype`.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import shutil
import time
from pathlib import Path

import torch

from megatron_senseflow.tools.hf_io import (
    ConversionError,
    PlannedTensor,
    SafetensorsDir,
    ShardedSafetensorsWriter,
    find_transformer_dir,
    fsync_tree,
    listed,
    parse_size,
)

DEFAULT_SHARD_SIZE = "10GB"  # diffusers' save_pretrained default
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


# ---------------------------------------------------------------- shared helpers
def ensure_parallel_state() -> None:
    """Megatron parallel_state for building the meta model that fixes the checkpoint layout (1 gloo rank here)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return
    from megatron_senseflow.config import ParallelConfig
    from megatron_senseflow.distributed import init_distributed

    init_distributed(ParallelConfig(tp=1, pp=1, cp=1), device="cpu")


def _progress(total: int, desc: str, enabled: bool | None):
    from megatron_senseflow.progress import bar

    return bar(total=total, desc=desc, unit="B", enabled=enabled, unit_scale=True, unit_divisor=1024)


def _check_keys(where: str, missing, unexpected, fix: str) -> None:
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"misses {len(missing)} expected tensor(s): {listed(missing)}")
        if unexpected:
            parts.append(f"has {len(unexpected)} unexpected tensor(s): {listed(unexpected)}")
        raise ConversionError(f"{where} {' and '.join(parts)}; {fix}")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConversionError(f"{out} already exists and is not empty; choose another --out or pass --overwrite.")
        # an interrupted import leaves only *.distcp files; those are ours to replace too
        ours = any((out / n).exists() for n in ("senseflow_model.json", ".metadata", "config.json", "model_index.json"))
        ours = ours or any(out.glob("*.distcp"))
        if not ours:
            raise ConversionError(f"{out} does not look like a checkpoint or diffusers directory; "
                                  "refusing to delete it for --overwrite, choose another --out.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- import
def check_variant(arch, variant: str, where) -> None:
    """Refuse a config that is not the named release (all architecture fields must match the preset)."""
    from megatron_senseflow.models.configs import arch_to_dict, presets

    known = presets()
    if variant not in known:
        raise ConversionError(f"--variant {variant!r} is unknown; choose one of {', '.join(sorted(known))}.")
    want, have = arch_to_dict(known[variant]), arch_to_dict(arch)
    if variant == "flux-student":  # the student is read from a FLUX.1-dev teacher
        want["guidance_embeds"] = have.get("guidance_embeds")
    for k in sorted(set(want) | set(have)):
        if want.get(k) != have.get(k):
            raise ConversionError(
                f"{where} has {k}={have.get(k)!r}, but --variant {variant} means {k}={want.get(k)!r}; "
                "check the path or drop --variant."
            )


def import_checkpoint(
    hf: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    variant: str | None = None,
    student: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """diffusers transformer / pipeline directory -> role checkpoint at `out`. Returns `out`."""
    from megatron_senseflow.models import hf_mapping
    from megatron_senseflow.models.checkpoint_io import checkpoint_layout
    from megatron_senseflow.models.configs import arch_of_diffusers_dir
    from megatron_senseflow.tools.megatron_io import write_role_checkpoint

    src = find_transformer_dir(hf)
    arch_src = arch_of_diffusers_dir(src, model)
    if variant is not None:
        check_variant(arch_src, variant, src / "config.json")
        student = student or variant == "flux-student"
    if student and not arch_src.guidance_embeds:
        raise ConversionError(f"--student drops the teacher's guidance embedder (FLUX.1-dev, FLUX.2-dev), but {src} "
                              f"holds a {arch_src.label} model without one; drop --student.")
    arch = dataclasses.replace(arch_src, guidance_embeds=False) if student else arch_src
    files = SafetensorsDir(src)

    expected = set(hf_mapping.hf_keys(arch_src))
    present = set(files.info)
    _check_keys(f"{src}", expected - present, present - expected,
                f"it is not a complete {arch_src.diffusers_class} for its config.json (or a newer diffusers layout).")

    ensure_parallel_state()
    layout = checkpoint_layout(arch)
    groups = hf_mapping.groups(arch)
    if set(layout) != {g.ours for g in groups}:  # the mapping and the model disagree: a bug here, not a user error
        raise RuntimeError(f"hf_mapping and the model disagree on tensors: {listed(set(layout) ^ {g.ours for g in groups})}")

    # expected diffusers shapes: our model's shapes through the mapping, on meta tensors
    for hk, t in hf_mapping.ours_to_hf(arch, lambda k: torch.empty(layout[k].shape, device="meta")):
        if files.info[hk].shape != tuple(t.shape):
            raise ConversionError(
                f"tensor {hk} in {files.info[hk].file.name} has shape {files.info[hk].shape}, but config.json "
                f"({arch.num_attention_heads} heads x {arch.attention_head_dim}) expects {tuple(t.shape)}; "
                "config.json and the weights come from different models."
            )

    plan: list[PlannedTensor] = []
    source: dict[str, tuple] = {}
    for grp in groups:
        dtypes = {files.info[k].dtype for k in grp.theirs}
        if len(dtypes) > 1:
            raise ConversionError(f"{listed(grp.theirs)} have different dtypes {sorted(map(str, dtypes))}; "
                                  "they are fused into one tensor, so cast them to one dtype first.")
        dtype = dtypes.pop()
        stored = layout[grp.ours]
        for part in stored.parts:
            plan.append(PlannedTensor(part.key, part.shape, dtype))
            source[part.key] = (grp, stored, part)

    def produce(key: str) -> torch.Tensor:
        grp, stored, part = source[key]
        if len(stored.parts) == 1:
            return hf_mapping.group_to_ours(arch, grp, files.get)
        length = part.shape[part.dim]
        if grp.kind == "copy":  # read only this part's columns
            return files.get_part(grp.theirs[0], part.dim, part.start, length)
        return hf_mapping.group_to_ours(arch, grp, files.get).narrow(part.dim, part.start, length).clone()

    out = Path(out)
    _prepare_out(out, overwrite)
    total = sum(t.nbytes for t in plan)
    with _progress(total, "import", progress) as bar:
        write_role_checkpoint(out, arch, plan, produce, bar)
    return out


# ---------------------------------------------------------------- export
def _copy_pipeline(base: Path, out: Path, arch, link: str) -> None:
    import json

    index = base / "model_index.json"
    if not index.is_file():
        raise ConversionError(f"--base-pipeline {base} has no model_index.json, so it is not a diffusers pipeline.")
    entry = json.loads(index.read_text()).get("transformer")
    if not entry or entry[1] != arch.diffusers_class:
        raise ConversionError(
            f"--base-pipeline {base} has transformer {entry[1] if entry else None}, but the checkpoint holds a "
            f"{arch.diffusers_class}; use a {arch.label} pipeline as base."
        )
    for item in sorted(base.iterdir()):
        if item.name == "transformer":
            continue
        dst = out / item.name
        if link == "symlink":
            dst.symlink_to(item.resolve(), target_is_directory=item.is_dir())
        elif item.is_dir():
            shutil.copytree(item, dst, copy_function=os.link if link == "hardlink" else shutil.copy2)
        elif link == "hardlink":
            os.link(item, dst)
        else:
            shutil.copy2(item, dst)


def _apply_overrides(out: Path, arch) -> None:
    """The family's config entries for the student's pipeline (models/family.py pipeline_overrides), written into
    copies: a component the copy links to (--link symlink / hardlink) is made a file of its own first, so the base
    pipeline is never changed."""
    import json

    from megatron_senseflow.models import family_of

    index = json.loads((out / "model_index.json").read_text())
    for rel, updates in family_of(arch).pipeline_overrides(arch, index).items():
        path = out / rel
        top = out / Path(rel).parts[0]
        if top.is_symlink():  # a linked component folder (or file): copy it in before editing
            target = top.resolve()
            top.unlink()
            shutil.copytree(target, top) if target.is_dir() else shutil.copy2(target, top)
        cfg = json.loads(path.read_text()) if path.is_file() else {}
        cfg.update(updates)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
        tmp.replace(path)  # a new file: a hard link to the base's stays untouched


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    *,
    role: str = "generator",
    base_pipeline: str | Path | None = None,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    dtype: str | torch.dtype | None = None,
    link: str = "copy",
    overwrite: bool = False,
    progress: bool | None = None,
    lora: bool = False,
    merge: bool = False,
    base: str | Path | None = None,
) -> Path:
    """Role checkpoint -> diffusers transformer directory (or pipeline directory). Returns the transformer dir.

    A checkpoint of LoRA adapters (models/lora.py) exports with `lora` as a diffusers LoRA file (see
    export_lora), or with `merge` as full weights: its base (`base`, else the one its metadata names) plus
    scale * B A per adapted linear."""
    import json

    from megatron_senseflow.models import hf_mapping
    from megatron_senseflow.models.checkpoint_io import CheckpointError, checkpoint_arch, checkpoint_layout
    from megatron_senseflow.models.configs import arch_to_diffusers_config

    from megatron_senseflow.checkpoint import resolve_role_dir
    from megatron_senseflow.tools.megatron_io import RoleCheckpointReader

    from megatron_senseflow.models.checkpoint_io import read_meta
    from megatron_senseflow.models.lora import canonical_delta, spec_from_meta

    role_dir = resolve_role_dir(ckpt, role)
    try:
        arch = checkpoint_arch(role_dir)
        lora_info = read_meta(role_dir).get("lora")
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    if (lora or merge) and not lora_info:
        raise ConversionError(f"{role_dir} holds full weights, not LoRA adapters; export it without --lora / --merge.")
    if lora_info and not (lora or merge):
        raise ConversionError(f"{role_dir} holds LoRA adapters (rank {lora_info['rank']}); choose --lora (a diffusers "
                              f"LoRA file for load_lora_weights) or --merge (full weights: base + adapters).")
    if lora:
        return export_lora(role_dir, out, arch, spec_from_meta(lora_info), overwrite=overwrite,
                           guidance=trained_guidance(arch, ckpt))
    adapters = None
    if merge:
        spec = spec_from_meta(lora_info)
        base = base or lora_info.get("base")
        if not base:
            raise ConversionError(f"{role_dir} names no base checkpoint (its run had a random teacher); pass --base DIR.")
        ensure_parallel_state()
        a_layout = checkpoint_layout(arch, spec)
        a_reader = RoleCheckpointReader(role_dir)
        adapters = {g.ours[: -len(".lora")]: g for g in hf_mapping.lora_groups(arch, spec.targets)}
        role_dir = resolve_role_dir(base, role)  # the weights below are the base's
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"--dtype {dtype} is unknown; use one of {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    max_bytes = parse_size(max_shard_size)
    reader = RoleCheckpointReader(role_dir)

    ensure_parallel_state()
    layout = checkpoint_layout(arch)
    want = {p.key: p.shape for st in layout.values() for p in st.parts}
    extra = set(reader.tensors) - set(want)
    if merge:  # a FLUX.1-dev base keeps the guidance embedder the student drops
        extra = {k for k in extra if not k.startswith("time_text_embed.guidance_embedder")}
    _check_keys(f"{role_dir}", set(want) - set(reader.tensors), extra,
                f"it does not hold the {arch.family} model its {role_dir.name}/senseflow_model.json describes.")
    for key, shape in want.items():
        if merge and key.startswith("time_text_embed.guidance_embedder"):
            continue
        if reader.tensors[key][0] != shape:
            raise ConversionError(f"tensor {key} in {role_dir} has shape {reader.tensors[key][0]}, but its "
                                  f"senseflow_model.json architecture expects {shape}; the checkpoint is damaged.")

    def stored_dtype(st) -> torch.dtype:
        kinds = {reader.tensors[p.key][1] for p in st.parts}
        if len(kinds) > 1:
            raise ConversionError(f"the parts of {st.key} in {role_dir} have different dtypes; the checkpoint is damaged.")
        return dtype or kinds.pop()

    groups = hf_mapping.groups(arch)
    plan = [
        PlannedTensor(hk, tuple(t.shape), t.dtype)
        for grp in groups
        for hk, t in hf_mapping.group_to_hf(
            arch, grp, torch.empty(layout[grp.ours].shape, dtype=stored_dtype(layout[grp.ours]), device="meta"))
    ]

    out = Path(out)
    _prepare_out(out, overwrite)
    tdir = out
    if base_pipeline is not None:
        _copy_pipeline(Path(base_pipeline), out, arch, link)
        _apply_overrides(out, arch)
        tdir = out / "transformer"
    writer = ShardedSafetensorsWriter(tdir, plan, max_bytes)
    with _progress(sum(t.nbytes for t in plan), "export", progress) as bar:
        for grp in groups:
            t = reader.read_canonical(layout[grp.ours])
            module = grp.ours[: -len(".weight")]
            if adapters is not None and grp.ours.endswith(".weight") and module in adapters:
                a = a_reader.read_canonical(a_layout[f"{module}.lora.A"])
                b = a_reader.read_canonical(a_layout[f"{module}.lora.B"])
                t = (t.float() + canonical_delta(a, b, adapters[module].kind == "qkv", arch.attention_head_dim,
                                                 spec.scale)).to(t.dtype)
            if dtype is not None:
                t = t.to(dtype)
            for hk, ht in hf_mapping.group_to_hf(arch, grp, t):
                writer.write(hk, ht)
                bar.update(ht.numel() * ht.element_size())
            del t
    writer.close()
    config = arch_to_diffusers_config(arch)
    try:
        config["_diffusers_version"] = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:  # still a valid config; diffusers only records its version
        pass
    (tdir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    fsync_tree(out)
    return tdir


def export_lora(role_dir: Path, out: str | Path, arch, spec, *, overwrite: bool = False,
                guidance: float | None = None) -> Path:
    """Adapters -> `out/pytorch_lora_weights.safetensors` in the diffusers layout that
    FluxPipeline / SD3Pipeline.load_lora_weights read (`transformer.<module>.lora_A.weight`, fused QKV split into
    to_q / to_k / to_v). The scale alpha / r is folded into B, so the file means the same under any alpha a
    loader assumes for a file without alphas (diffusers: alpha = r). Returns `out`."""
    from safetensors.torch import save_file

    from megatron_senseflow.models import hf_mapping
    from megatron_senseflow.models.checkpoint_io import checkpoint_layout
    from megatron_senseflow.tools.megatron_io import RoleCheckpointReader

    ensure_parallel_state()
    layout = checkpoint_layout(arch, spec)
    reader = RoleCheckpointReader(role_dir)
    missing = set(p.key for st in layout.values() for p in st.parts) - set(reader.tensors)
    _check_keys(f"{role_dir}", missing, set(), "it does not hold the adapters its senseflow_model.json describes.")
    tensors = {}
    for key, t in hf_mapping.lora_to_hf(arch, spec.targets, lambda k: reader.read_canonical(layout[k])):
        if key.endswith(".lora_B.weight"):
            t = t * spec.scale
        tensors[f"transformer.{key}"] = t.contiguous()
    out = Path(out)
    _prepare_out(out, overwrite)
    path = out / "pytorch_lora_weights.safetensors"
    meta = {"format": "pt"}
    if guidance is not None:  # the guidance embedding the student trained at (loaders ignore unknown keys)
        meta["senseflow.guidance_scale"] = f"{guidance:g}"
    save_file(tensors, str(path), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600; readable like the rest of an export
    fsync_tree(out)
    return out


def is_diffusers_dir(path: str | Path) -> bool:
    """A diffusers transformer or pipeline folder (not a senseflow checkpoint)."""
    p = Path(path)
    return (p / "config.json").is_file() or (p / "transformer" / "config.json").is_file()


def single_file_target(out: str | Path, overwrite: bool) -> Path:
    """--out of --single-file: a .safetensors file, replaced only with --overwrite."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConversionError(f"--out {out}: with --single-file, name the file to write (e.g. student.safetensors).")
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} exists; pass --overwrite to replace it.")
    return out


def write_single_file(src: str | Path, out: str | Path, *, overwrite: bool = False,
                      progress: bool | None = None) -> str:
    """A diffusers transformer directory -> one safetensors file in its family's original single-file layout
    (models/single_file.py), written tensor by tensor: memory stays near the largest fused tensor. Returns the
    layout's name (for the command's last line)."""
    from megatron_senseflow.models import family_of
    from megatron_senseflow.models.configs import arch_of_diffusers_dir

    src = find_transformer_dir(src)
    arch = arch_of_diffusers_dir(src)
    family = family_of(arch)
    if family.single_file is None:
        raise ConversionError(f"--single-file writes FLUX.1's and SD3.x's original layouts; {arch.label} has none "
                              "here: load its exported diffusers folder (diffusers and ComfyUI read it).")
    out = single_file_target(out, overwrite)
    files = SafetensorsDir(src)
    try:
        steps = family.single_file_recipe(files.info)
    except KeyError as e:
        raise ConversionError(f"{src}: {e.args[0]}; it is not a complete {arch.diffusers_class}.") from None
    plan = []
    for st in steps:
        infos = [files.info[k] for k in st.sources]
        if len({i.dtype for i in infos}) > 1:
            raise ConversionError(f"{listed(st.sources)} in {src} have different dtypes; they are fused into one "
                                  "tensor, so export with --dtype.")
        plan.append(PlannedTensor(st.key, st.shape([i.shape for i in infos]), infos[0].dtype))
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    writer = ShardedSafetensorsWriter(partial, plan, max_shard_bytes=1 << 62)  # one shard: the file itself
    with _progress(sum(t.nbytes for t in plan), "single file", progress) as bar:
        for st, planned in zip(steps, plan):
            writer.write(st.key, st.make([files.get(k) for k in st.sources]))
            bar.update(planned.nbytes)
    writer.close()
    fsync_tree(partial)
    os.replace(partial / writer.names[0], out)  # whole or not at all
    shutil.rmtree(partial)
    return family.single_file


# ---------------------------------------------------------------- command line
def _add_import_args(p: argparse.ArgumentParser) -> None:
    from megatron_senseflow.models import FAMILIES

    p.add_argument("--hf", required=True, help="diffusers pipeline directory (its transformer/ is used) or transformer directory")
    p.add_argument("--out", required=True, help="role checkpoint directory to write")
    p.add_argument("--model", choices=sorted(FAMILIES), help="refuse a config of another family")
    p.add_argument("--variant", help="refuse a config that is not this release (a model preset: flux-dev, "
                                     "flux-student, sd35-large, qwen-image, flux2-dev, ...)")
    p.add_argument("--student", action="store_true", help="write the SenseFlow FLUX student: FLUX.1-dev without guidance embedder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="role checkpoint, training step directory, or `senseflow train` output directory")
    p.add_argument("--out", required=True, help="directory to write (transformer directory, or pipeline with --base-pipeline)")
    p.add_argument("--role", default="generator", help="role to export from a step directory (default: generator)")
    p.add_argument("--base-pipeline", help="diffusers pipeline whose other components are copied; the export replaces transformer/")
    p.add_argument("--link", choices=["copy", "symlink", "hardlink"], default="copy",
                   help="how --base-pipeline components reach --out (default: copy)")
    p.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE, help=f"largest safetensors shard (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast on the way out (default: keep the stored dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory at --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--lora", action="store_true", help="a LoRA run's adapters as a diffusers LoRA file "
                     "(--out/pytorch_lora_weights.safetensors, for load_lora_weights)")
    how.add_argument("--merge", action="store_true", help="a LoRA run's adapters merged into full weights")
    p.add_argument("--single-file", action="store_true",
                   help="one safetensors file (--out FILE.safetensors) in the original release's layout (FLUX.1: BFL's "
                        "flux1-dev; SD3.x: Stability's), for ComfyUI / Forge / from_single_file; --ckpt may be a "
                        "diffusers transformer folder")
    p.add_argument("--base", help="with --merge: the base role checkpoint (default: the one the adapters record)")


def add_arguments_for(verb: str, parser: argparse.ArgumentParser) -> None:
    """`senseflow convert import|export ...` and `senseflow export ...`."""
    if verb == "export":
        _add_export_args(parser)
        return
    sub = parser.add_subparsers(dest="direction", metavar="{import,export}", required=True)
    _add_import_args(sub.add_parser("import", help="diffusers -> role checkpoint"))
    _add_export_args(sub.add_parser("export", help="role checkpoint -> diffusers"))


def run_for(verb: str, args: argparse.Namespace) -> int:
    direction = "export" if verb == "export" else args.direction
    prog = f"senseflow {verb}" + ("" if verb == "export" else f" {direction}")
    start = time.perf_counter()
    if direction == "import":
        out = import_checkpoint(args.hf, args.out, model=args.model, variant=args.variant, student=args.student,
                                overwrite=args.overwrite, progress=args.progress)
        what = "role checkpoint"
    elif args.single_file and is_diffusers_dir(args.ckpt):
        layout = write_single_file(args.ckpt, args.out, overwrite=args.overwrite, progress=args.progress)
        print(f"{prog}: wrote single file {args.out} ({layout}) in {time.perf_counter() - start:.1f}s")
        return 0
    else:
        from megatron_senseflow.checkpoint import resolve_role_dir

        role_dir = resolve_role_dir(args.ckpt, args.role)
        step = role_dir.parent.name if role_dir.parent.name.startswith("step_") else "a role checkpoint"
        print(f"{prog}: exporting the {role_dir.name} of {step} ({role_dir})", flush=True)
        if args.single_file:
            what = f"single file ({export_single_file(args)})"
        else:
            export_checkpoint(args.ckpt, args.out, role=args.role, base_pipeline=args.base_pipeline,
                              max_shard_size=args.max_shard_size, dtype=args.dtype, link=args.link,
                              overwrite=args.overwrite, progress=args.progress, lora=args.lora, merge=args.merge,
                              base=args.base)
            what = "diffusers LoRA" if args.lora else "diffusers pipeline" if args.base_pipeline else "diffusers transformer"
        out = Path(args.out)
        hint = sampling_hint(role_dir, args.ckpt)
    print(f"{prog}: wrote {what} {out} in {time.perf_counter() - start:.1f}s")
    if direction == "export" and hint:
        print(f"{prog}: the stock pipeline's default call does not sample at the student's anchors; call it as {hint}")
    if direction == "export":
        from megatron_senseflow.models.checkpoint_io import checkpoint_arch

        g = trained_guidance(checkpoint_arch(role_dir), args.ckpt)
        if g is not None:
            print(f"{prog}: the student keeps the teacher's guidance embedder and was trained with guidance {g:g}: "
                  f"call the pipeline with guidance_scale={g:g} (its default is the teacher's)")
    return 0


def export_single_file(args: argparse.Namespace) -> str:
    """`senseflow export --single-file` of a trained role: the diffusers export into a folder beside --out, then
    that folder in the original layout (write_single_file, whose layout it returns); the folder is removed."""
    if args.lora or args.base_pipeline:
        raise ConversionError("--single-file writes full weights: for a LoRA run add --merge (a LoRA file for ComfyUI "
                              "is --lora: ComfyUI reads diffusers' LoRA layout), and leave out --base-pipeline.")
    out = single_file_target(args.out, args.overwrite)  # refused before the export's work, not after
    staging = out.parent / f".{out.name}.diffusers"
    export_checkpoint(args.ckpt, staging, role=args.role, dtype=args.dtype, overwrite=True, progress=args.progress,
                      merge=args.merge, base=args.base)
    try:
        return write_single_file(staging, out, overwrite=args.overwrite, progress=args.progress)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def trained_guidance(arch, ckpt) -> float | None:
    """The fixed guidance embedding a student that keeps the teacher's guidance embedder trained at (LoRA students,
    SiD's FLUX students: distill.student_guidance of its run); None for students without the embedder. A stock
    pipeline's call must pass it as guidance_scale."""
    from megatron_senseflow.config import DistillConfig
    from megatron_senseflow.sample_cli import training_config

    if not arch.guidance_embeds:
        return None
    run = training_config(str(ckpt))
    return (run.distill if run is not None else DistillConfig()).student_guidance


def sampling_hint(role_dir: Path, ckpt) -> str | None:
    """The family's stock-pipeline call that samples the exported student at its anchors, when the default call
    does not (SD3.x: its scheduler cannot express linspace(1, 1/K, K) shifted; models/family.py sampling_call)."""
    from megatron_senseflow.models import family_of
    from megatron_senseflow.models.checkpoint_io import checkpoint_arch
    from megatron_senseflow.sample_cli import training_config

    arch = checkpoint_arch(role_dir)
    run = training_config(str(ckpt))
    k = run.distill.num_steps if run is not None else 4
    return family_of(arch).sampling_call(arch, [1 - i / k for i in range(k)])
