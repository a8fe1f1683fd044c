"""`senseflow demo`, `sample`, `export` and `eval` end to end, shortened.

The demo runs exactly as `make demo` does (teacher training in its own process,
prepare-data, `senseflow train` as a subprocess, evaluation), with a 30-step
teacher, 4 distillation steps and 5 samples per digit, so its numbers are
meaningless; what is checked is that every stage ran and wrote what a user
reads. The demo's real numbers are in the README (`make demo`).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_senseflow import cli
from tests.tiny_clip import tiny_clip, tiny_pickscore

pytestmark = pytest.mark.slow

SENSEFLOW = [sys.executable, "-m", "megatron_senseflow.cli"]


def _run(*args, cwd=None, check=True):
    r = subprocess.run([*SENSEFLOW, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"senseflow {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    r = _run("demo", "--out", root / "out", "--cache", root / "cache", "--teacher-steps", 30, "--steps", 4,
             "--per-digit", 5, "--eval-samples", 4)
    return root, r.stdout


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def test_demo_trains_teacher_distils_and_scores_every_sampler(demo):
    root, stdout = demo
    out = root / "out"
    assert "teacher: training" in stdout and "teacher step 30/30" in stdout
    results = json.loads((out / "results.json").read_text())
    from megatron_senseflow.demo import SAMPLERS

    # the demo keeps an EMA of the generator (decay 0.99): it is scored beside the raw generator
    assert set(SAMPLERS) <= set(results) and "ema_4_euler" in SAMPLERS
    for name in SAMPLERS:
        fd, acc = results[name]["fd"], results[name]["accuracy"]
        assert math.isfinite(fd) and fd >= 0, (name, fd)
        assert 0.0 <= acc <= 1.0 and acc * 50 == pytest.approx(round(acc * 50)), (name, acc)  # 50 samples
    assert results["real"]["classifier_held_out_accuracy"] > 0.9  # the classifier itself must work
    # the table the user reads, one line per sampler
    for name in SAMPLERS:
        assert any(line.startswith(name) for line in stdout.splitlines()), name
    # grid: 6 rows (samplers) x 10 digits of 16 px + 1 px border each side, 3x upscaled
    grid = _png(out / "grid.png")
    assert grid.shape[:2] == (6 * 18 * 3, 10 * 18 * 3)
    # the distillation went through the product's trainer: checkpoint, TensorBoard, metrics
    run = out / "run"
    assert (run / "checkpoints" / "step_00000004" / "generator").is_dir()
    assert (run / "checkpoints" / "step_00000004" / "ema").is_dir()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4
    assert json.loads((run / "DONE").read_text())["step"] == 4
    # the in-loop evaluation (on by default; 4 samples here, every max(1, 4 // 5) = 1 iteration): the generator's and
    # the EMA's FD curves
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("eval/fd_euler", "eval/fd_stochastic", "eval/ema_fd_euler"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4], tag


def test_teacher_cache_is_reused(demo):
    from megatron_senseflow import demo as demo_mod

    root, _ = demo
    lines = []
    path, _ = demo_mod.ensure_teacher(root / "cache", lines.append, 30)
    assert lines == [f"teacher: cached at {path}"]
    # another teacher config is another cache entry, not the old weights
    assert demo_mod.config_key({"a": 1}) != demo_mod.config_key({"a": 2})


def test_demo_nproc_2_distils_lora_students_at_tp2_and_evaluates_at_tp1(demo, tmp_path):
    root, _ = demo
    r = _run("demo", "--out", tmp_path / "out", "--cache", root / "cache", "--teacher-steps", 30, "--steps", 2,
             "--per-digit", 2, "--nproc", 2, "--lora", 4, "--eval-samples", 0)
    assert "teacher: cached" in r.stdout
    assert not (tmp_path / "out" / "run" / "eval").exists()  # --eval-samples 0: no in-loop evaluation
    assert "senseflow on 2 rank(s) tp=2 pp=1 dp=1" in r.stdout
    assert "LoRA adapters over the teacher's weights" in r.stdout
    meta = json.loads((tmp_path / "out" / "run" / "checkpoints" / "step_00000002" / "generator" /
                       "senseflow_model.json").read_text())
    assert meta["lora"]["rank"] == 4  # the evaluation below loaded these adapters over the cached teacher
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(math.isfinite(results[k]["fd"]) for k in ("student_4_stochastic", "student_4_euler"))


def test_demo_ablate_trains_each_variant_with_in_loop_evaluation(demo, tmp_path):
    """One variant at two seeds: each run's curve and numbers from its in-loop evaluation, the row their mean
    and spread."""
    root, _ = demo
    out = tmp_path / "out"
    r = _run("demo", "--ablate", "--variants", "dmd2_ttur5", "--seeds", 2, "--out", out, "--cache", root / "cache",
             "--teacher-steps", 30, "--steps", 4, "--per-digit", 2, "--eval-samples", 16)
    assert "teacher: cached" in r.stdout
    res = json.loads((out / "ablation.json").read_text())
    assert list(res["rows"]) == ["dmd2_ttur5"]
    runs, row = res["runs"]["dmd2_ttur5"], res["rows"]["dmd2_ttur5"]
    assert [run["seed"] for run in runs] == row["seeds"] == [1, 2]
    for run in runs:
        # eval.every = max(1, 4 // 10) = 1: an FD at every iteration, from the in-loop evaluation's own numbers
        assert [s for s, _ in run["curve"]] == [1, 2, 3, 4]
        fds = [v for _, v in run["curve"]]
        assert run["final_fd"] == fds[-1] and run["best_fd"] == min(fds)
        assert run["fd_spread_last_third"] == max(fds[-1:]) - min(fds[-1:])
        assert 0 <= run["accuracy_euler"] <= 1
    assert runs[0]["curve"] != runs[1]["curve"]  # the seed changed the run
    finals = [run["final_fd"] for run in runs]
    assert row["final_fd"]["mean"] == pytest.approx(sum(finals) / 2)
    assert row["final_fd"]["sd"] == pytest.approx(abs(finals[0] - finals[1]) / math.sqrt(2))
    assert res["curves"]["dmd2_ttur5"][-1][1] == pytest.approx(sum(finals) / 2)
    # each run's recipe is the demo recipe with the variant's change and its seed
    for tag, seed in (("dmd2_ttur5", 1), ("dmd2_ttur5_seed1", 2)):
        recipe = (out / "ablation" / f"{tag}.yaml").read_text()
        assert "method: dmd2" in recipe and "ttur: 5" in recipe and f"seed: {seed}" in recipe
    png = _png(out / "ablation.png")
    assert png.shape[:2] == (520, 900) and len(np.unique(png.reshape(-1, png.shape[-1]), axis=0)) > 4
    assert "| dmd2_ttur5 |" in (out / "ablation.md").read_text() and " ± " in (out / "ablation.md").read_text()


def test_fd_spread_is_the_range_of_the_last_third():
    from megatron_senseflow.demo import fd_spread

    assert fd_spread([9.0, 1.0, 5.0, 2.0, 4.0, 3.0]) == 1.0  # last third: 4, 3
    assert fd_spread([2.0]) == 0.0


@pytest.fixture(scope="module")
def prompts(demo):
    root, _ = demo
    p = root / "prompts.txt"
    p.write_text("a handwritten digit three\na handwritten digit seven\n\na handwritten digit zero\n")
    return p


def _sample(src_flag, src, out, prompts, *extra):
    return _run("sample", src_flag, src, "--text-encoder", "demo", "--resolution", 16, "--prompts", prompts,
                "--out", out, "--batch", 4, "--per-prompt", 2, *extra)


def test_sample_from_checkpoint_is_seeded_and_per_prompt(demo, prompts, tmp_path):
    root, _ = demo
    run = root / "out" / "run"
    _sample("--ckpt", run, tmp_path / "a", prompts, "--sampler", "stochastic", "--seed", "3")
    _sample("--ckpt", run, tmp_path / "b", prompts, "--sampler", "stochastic", "--seed", "3")
    _sample("--ckpt", run, tmp_path / "c", prompts, "--sampler", "stochastic", "--seed", "4")
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert names == [f"{i:05d}_{k:02d}.png" for i in range(3) for k in range(2)]  # the blank line is no prompt
    assert (tmp_path / "a" / "prompts.txt").read_text().splitlines()[2] == "a handwritten digit zero"
    a = [_png(tmp_path / "a" / n) for n in names]
    assert a[0].shape == (16, 16)  # grey digits at the requested resolution
    assert all(np.array_equal(x, _png(tmp_path / "b" / n)) for x, n in zip(a, names))
    assert not all(np.array_equal(x, _png(tmp_path / "c" / n)) for x, n in zip(a, names))
    assert not np.array_equal(a[0], a[1])  # two samples of one prompt differ


@pytest.mark.parametrize("steps", [1, 2])
def test_sample_one_and_two_steps(demo, prompts, tmp_path, steps):
    root, _ = demo
    _sample("--ckpt", root / "out" / "run", tmp_path, prompts, "--steps", steps, "--sampler", "euler")
    assert len(list(tmp_path.glob("*.png"))) == 6


def test_exported_diffusers_student_samples_like_the_checkpoint(demo, prompts, tmp_path):
    root, _ = demo
    run = root / "out" / "run"
    _run("export", "--ckpt", run, "--out", tmp_path / "hf", "--no-progress")
    assert (tmp_path / "hf" / "config.json").is_file()
    _sample("--ckpt", run, tmp_path / "m", prompts, "--sampler", "euler")
    _sample("--diffusers", tmp_path / "hf", tmp_path / "d", prompts, "--sampler", "euler")
    for p in sorted((tmp_path / "m").glob("*.png")):
        diff = np.abs(_png(p).astype(int) - _png(tmp_path / "d" / p.name).astype(int))
        assert diff.max() <= 1, p.name  # same weights, same noise: at most one grey level of rounding


def test_sample_refuses_an_empty_prompt_file(demo, tmp_path):
    root, _ = demo
    empty = tmp_path / "none.txt"
    empty.write_text("\n\n")
    r = _run("sample", "--ckpt", root / "out" / "run", "--text-encoder", "demo", "--prompts", empty, "--out", tmp_path / "o",
             check=False)
    assert r.returncode == 2 and "holds no prompts" in r.stderr


# --------------------------------------------------------------------------- eval


class _StandInInception(torch.nn.Module):
    """Stand-in for the TorchScript Inception: uint8 NCHW -> 64 fixed random features.

    The real network is a download the tests cannot make; what the test checks is
    our plumbing (folders, resizing, patches, torchmetrics' Frechet distance), which
    the feature extractor does not change.
    """

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 16 * 16, 64, generator=g) / 28.0, requires_grad=False)

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 16).flatten(1)
        return torch.tanh(x @ self.proj)


def _write_pngs(folder: Path, images: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}_00.png")


def test_eval_fid_and_patch_fid(tmp_path):
    from megatron_senseflow.demo import digit_images

    torch.jit.script(_StandInInception()).save(str(tmp_path / "inception.pt"))
    images, _ = digit_images()
    digits = ((images[:, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    big = np.kron(digits, np.ones((20, 20), dtype=np.uint8))  # 320 px, so patch FID takes real crops
    _write_pngs(tmp_path / "real", big[:40])
    _write_pngs(tmp_path / "real2", big[40:80])
    noise = np.random.default_rng(0).integers(0, 256, size=(40, 320, 320), dtype=np.uint8)
    _write_pngs(tmp_path / "noise", noise)

    def evaluate(images, reference):
        out = tmp_path / f"{images}-{reference}.json"
        args = ["eval", "--images", tmp_path / images, "--reference", tmp_path / reference, "--inception",
                tmp_path / "inception.pt", "--metrics", "fid,patch_fid", "--patches-per-image", 2, "--out", out]
        if images == "real":  # once as users run it; in-process otherwise (the interpreter start-up is most of the time)
            _run(*args)
        else:
            assert cli.main(list(map(str, args))) == 0
        return json.loads(out.read_text())

    same = evaluate("real", "real")
    other_digits = evaluate("real2", "real")
    noise_vs_real = evaluate("noise", "real")
    assert same["num_images"] == 40
    assert abs(same["fid"]) < 1e-2
    assert same["fid"] < other_digits["fid"] < noise_vs_real["fid"]
    assert other_digits["patch_fid"] < noise_vs_real["patch_fid"]
    # small generated images against large references: the note says patch FID compares unlike things (it is not
    # FID: the references are cropped, the samples resized), and both numbers come out different
    _write_pngs(tmp_path / "small", digits[80:120].repeat(4, axis=1).repeat(4, axis=2))  # 64 px
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        mixed = evaluate("small", "real")
    assert "some generated images are below the 299 px patch (64 px)" in err.getvalue()
    assert "equals FID" not in err.getvalue() and mixed["patch_fid"] != mixed["fid"]


def _eval_three_images(tmp_path, seed: int, flag: str, model_dir: Path, metric: str) -> tuple[float, list[str]]:
    """Three random images with one prompt each, scored by `senseflow eval --metrics METRIC`."""
    rng = np.random.default_rng(seed)
    _write_pngs(tmp_path / "imgs", rng.integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8))
    lines = ["a red cat", "two dogs", "a blue house"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    _run("eval", "--images", tmp_path / "imgs", flag, model_dir, "--prompts", tmp_path / "prompts.txt",
         "--metrics", metric, "--out", tmp_path / "r.json")
    key = {"clip": "clip_score"}.get(metric, metric)
    return json.loads((tmp_path / "r.json").read_text())[key], lines


def test_eval_clip_score_pairs_each_image_with_its_prompt(tmp_path):
    """CLIPScore through our loader equals 100 * max(cos, 0) computed by hand with the same model."""
    from transformers import CLIPModel, CLIPProcessor

    tiny_clip(tmp_path / "clip")
    got, lines = _eval_three_images(tmp_path, 1, "--clip", tmp_path / "clip", "clip")

    from megatron_senseflow.eval_cli import list_images, load_uint8

    model = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    proc = CLIPProcessor.from_pretrained(tmp_path / "clip")
    imgs = [load_uint8(p) for p in list_images(tmp_path / "imgs")]
    with torch.no_grad():
        batch = proc(text=lines, images=imgs, return_tensors="pt", padding=True)
        i = model.get_image_features(pixel_values=batch["pixel_values"])
        t = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    i = getattr(i, "pooler_output", i)
    t = getattr(t, "pooler_output", t)
    cos = torch.nn.functional.cosine_similarity(i, t)
    assert got == pytest.approx(float((100 * cos.clamp(min=0)).mean()), abs=1e-3)


def test_eval_pickscore_is_the_learned_scale_times_the_cosine(tmp_path):
    """PickScore_v1's reference computation, by hand: normalised embeddings, logit_scale.exp() * dot, no clamp."""
    from transformers import CLIPModel, CLIPProcessor

    tiny_clip(tmp_path / "clip")
    tiny_pickscore(tmp_path / "clip", tmp_path / "pick", 87.0)
    model = CLIPModel.from_pretrained(tmp_path / "pick").eval()
    got, lines = _eval_three_images(tmp_path, 3, "--pickscore", tmp_path / "pick", "pickscore")

    from megatron_senseflow.eval_cli import list_images, load_uint8

    proc = CLIPProcessor.from_pretrained(tmp_path / "pick")
    scores = []
    for p, prompt in zip(list_images(tmp_path / "imgs"), lines):
        with torch.no_grad():
            i = model.get_image_features(**proc(images=[load_uint8(p)], return_tensors="pt"))
            t = model.get_text_features(**proc(text=[prompt], padding=True, truncation=True, return_tensors="pt"))
        i, t = getattr(i, "pooler_output", i), getattr(t, "pooler_output", t)
        i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
        scores.append(87.0 * float((t @ i.T)[0, 0]))
    assert got == pytest.approx(sum(scores) / len(scores), rel=1e-4)


def test_coco_protocol_picks_the_highest_clip_caption_per_image(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from megatron_senseflow.eval_cli import list_images, load_uint8

    tiny_clip(tmp_path / "clip")
    rng = np.random.default_rng(2)
    _write_pngs(tmp_path / "coco", rng.integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8))
    files = sorted(p.name for p in (tmp_path / "coco").glob("*.png"))
    captions = {f: [f"a photo number {i} of a cat", "two dogs on grass", f"a house {i}", "the sky"] for i, f in enumerate(files)}
    coco = {"images": [{"id": 10 + i, "file_name": f} for i, f in enumerate(files)],
            "annotations": [{"image_id": 10 + i, "caption": c} for i, f in enumerate(files) for c in captions[f]]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    assert cli.main(["eval", "--images", str(tmp_path / "coco"), "--clip", str(tmp_path / "clip"),
                     "--select-captions", str(tmp_path / "captions.json"), "--out", str(tmp_path / "coco5k.txt")]) == 0
    got = (tmp_path / "coco5k.txt").read_text().splitlines()

    model = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    proc = CLIPProcessor.from_pretrained(tmp_path / "clip")
    want = []
    for p in list_images(tmp_path / "coco"):
        opts = captions[p.name]
        with torch.no_grad():
            b = proc(text=opts, images=[load_uint8(p)], return_tensors="pt", padding=True)
            i = model.get_image_features(pixel_values=b["pixel_values"])
            t = model.get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        i, t = getattr(i, "pooler_output", i), getattr(t, "pooler_output", t)
        want.append(opts[int(torch.nn.functional.cosine_similarity(i, t).argmax())])
    assert got == want


def test_eval_says_what_is_missing(tmp_path, capsys):
    _write_pngs(tmp_path / "imgs", np.zeros((2, 8, 8), dtype=np.uint8))
    assert cli.main(["eval", "--images", str(tmp_path / "imgs"), "--metrics", "fid"]) == 2
    assert "FID needs --reference" in capsys.readouterr().err
    assert cli.main(["eval", "--images", str(tmp_path / "nothing-here"), "--metrics", "clip"]) == 2
    assert "is not a folder of images" in capsys.readouterr().err
