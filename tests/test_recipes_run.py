"""Every bundled training recipe runs, with and without LoRA students, at its own recompute setting and precision.

Each recipe is loaded as written and shrunk only where a CPU needs it: the tiny architecture of its family (the
teacher's family is the recipe's), 32 px synthetic data, a random tiny DINOv2 and the pixel codec, the pooled
vector as the heads' condition, one iteration that updates the generator, the fake score and the discriminator
(distill.ttur=1; the SiD recipes update the generator every iteration anyway), and a layout of at most two ranks that keeps the recipe's kind of split
(tensor parallel, or pipeline parallel for SD3.5 Large). Everything else, model.recompute=full, bf16 weights, the
distributed optimizer with overlapped reduces, the laws and weights, is the recipe's. One launch per layout runs
every recipe of it, then again with rank-2 adapters on both students (the README's LoRA command), and the last
step's losses must be finite. (Fidelity of each term: test_recipe_fidelity, test_sid.)
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from tests.dist_helpers import run_distributed

pytestmark = pytest.mark.slow
RECIPES = Path(__file__).resolve().parents[1] / "megatron_senseflow" / "recipes"
# each family's tiny stand-in, shaped like the preset where the tiny default differs
TINY = {
    "flux-dev": ("tiny-flux", []),
    "sd35-large": ("tiny-sd3", ["model.arch.dual_attention_layers=[]"]),
    "sd35-medium": ("tiny-sd3", []),
    "sd3-medium": ("tiny-sd3", ["model.arch.dual_attention_layers=[]", "model.arch.qk_norm=null"]),
    "qwen-image": ("tiny-qwen-image", []),
    "flux2-dev": ("tiny-flux2", []),
    "flux2-klein-4b": ("tiny-flux2-klein", []),
}
LORA = ["roles.generator.lora.rank=2", "roles.fake_score.lora.rank=2"]


def training_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml")
                  if (yaml.safe_load(p.read_text()).get("purpose") or "training") == "training")


def layout_of(name: str) -> tuple[int, int]:
    """PP=2 for a pipeline-parallel recipe, TP=2 for every other (a TP=1 recipe's students are the same
    modules; TP=2 checks their adapters' split as well)."""
    par = yaml.safe_load((RECIPES / f"{name}.yaml").read_text()).get("parallel", {})
    return (1, 2) if par.get("pp", 1) > 1 else (2, 1)


def overrides(name: str, out: Path, tp: int, pp: int) -> list[str]:
    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    tiny, shape = TINY[recipe["model"]["preset"]]
    ttur = [] if recipe["method"] == "sid" else ["distill.ttur=1"]
    return ["purpose=test", f"model.preset={tiny}", *shape, "data.resolution=32", "data.text_max_length=8",
            "data.num_workers=0", "roles.discriminator.dinov2=tiny", "roles.discriminator.vae=null",
            "roles.discriminator.feature_layers=[0,1]", "roles.discriminator.text_condition=pooled",
            "roles.discriminator.clip=null", *ttur, "train.max_steps=1", f"train.output_dir={out}",
            "train.device=cpu", "checkpoint.every=0", "checkpoint.at_end=false", "logging.tensorboard=false", "logging.image_every=0",
            "logging.log_every=1", f"parallel.tp={tp}", f"parallel.pp={pp}"]


def _run_all(env, runs: list[tuple[str, list[str]]]):
    import json

    from megatron_senseflow.config import load_config
    from megatron_senseflow.trainer import Trainer

    out = {}
    for key, ov in runs:
        cfg = load_config(key.split("+")[0], ov)
        Trainer(cfg, env).run()
        if env.is_main:
            rows = [json.loads(ln) for ln in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
            out[key] = {"recompute": cfg.model.recompute, "dtype": cfg.model.params_dtype, "rows": rows,
                        "lora": cfg.roles.generator.lora.rank}
    return out


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_every_bundled_training_recipe_runs_with_and_without_lora(tmp_path, layout):
    tp, pp = layout
    names = [n for n in training_recipes() if layout_of(n) == layout]
    assert names, layout
    runs = []
    for name in names:
        for lora in (False, True):
            key = name + ("+lora" if lora else "")
            runs.append((key, overrides(name, tmp_path / key, tp, pp) + (LORA if lora else [])))
    got = run_distributed(_run_all, tp * pp, runs, tp=tp, pp=pp)[0]
    assert sorted(got) == sorted(k for k, _ in runs)
    for key, res in got.items():
        recipe = yaml.safe_load((RECIPES / f"{key.split('+')[0]}.yaml").read_text())
        assert res["recompute"] == recipe["model"]["recompute"] == "full" and res["dtype"] == "bfloat16", key
        assert res["lora"] == (2 if key.endswith("+lora") else 0)
        assert [r["step"] for r in res["rows"]] == [1], key
        last = res["rows"][-1]
        assert "gen/total" in last and "fake/fm" in last, (key, sorted(last))  # the generator updated
        bad = {k: v for k, v in last.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad and last["nan/total_skipped"] == 0.0, (key, bad)


def test_the_recipe_list_is_every_family_and_method():
    """Guards the test above against a recipe it would not run (a layout or family it does not know)."""
    names = training_recipes()
    assert {"flux_dev", "sd35_large", "sd35_medium", "sd3_medium", "qwen_image", "flux2_dev", "flux2_klein"} <= set(names)
    assert {n for n in names if n.endswith("_sid")} >= {"flux_dev_sid", "qwen_image_sid", "flux2_dev_sid"}
    for n in names:
        assert layout_of(n) in ((2, 1), (1, 2)), n
        assert yaml.safe_load((RECIPES / f"{n}.yaml").read_text())["model"]["preset"] in TINY, n
