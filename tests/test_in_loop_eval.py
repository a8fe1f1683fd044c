"""In-loop evaluation (eval.every): the same numbers at DP1 and DP2, CLIP score, PickScore, HPSv2.1, ImageReward and
the aesthetic score by hand, and losses untouched by it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.tiny_clip import tiny_clip, tiny_pickscore
from tests.trainer_helpers import make_teacher, metrics, train_inprocess

VOLATILE = ("perf/", "mem/")


class TinyFeatures(torch.nn.Module):
    """A stand-in for Inception with its calling convention: uint8 [N, 3, H, W] -> [N, 8]."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(8, 3, 3, 3, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.conv2d(x.float() / 255.0, self.w, padding=1)
        return torch.tanh(y).mean(dim=(2, 3)) + y.std(dim=(2, 3))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    feats = root / "features.pt"
    torch.jit.script(TinyFeatures()).save(str(feats))
    return make_teacher(root / "teacher"), feats


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """A tiny CLIP, and the same CLIP with a logit scale of 87 as the PickScore model."""
    root = tmp_path_factory.mktemp("scorers")
    tiny_clip(root / "clip")
    tiny_pickscore(root / "clip", root / "pick", 87.0)
    return root / "clip", root / "pick"


@pytest.fixture(scope="module")
def learned(tmp_path_factory, scorers):
    """Stand-ins of HPSv2.1, ImageReward and the aesthetic head (tests/reward_standins.py), as eval.* overrides."""
    from tests.reward_standins import aesthetic_standin, hps_standin, imagereward_standin

    root = tmp_path_factory.mktemp("learned")
    hps, hps_clip = hps_standin(root)
    files = dict(hps=hps, hps_clip=hps_clip, imagereward=imagereward_standin(root),
                 aesthetic=aesthetic_standin(root, scorers[0]), clip=scorers[0])
    overrides = [f"eval.hpsv2={hps}", f"eval.hpsv2_clip={hps_clip}", f"eval.imagereward={files['imagereward']}",
                 f"eval.aesthetic={files['aesthetic']}"]
    return files, overrides


def _eval_at_start(env, overrides):
    from megatron_senseflow.config import load_config
    from megatron_senseflow.trainer import Trainer

    tr = Trainer(load_config("tiny", overrides), env)
    return tr.evaluator.run()


def _eval_recording(env, overrides):
    """The evaluation's metrics, and every (decoded sample, caption) it scored, in the order it scored them."""
    from megatron_senseflow.config import load_config
    from megatron_senseflow.trainer import Trainer

    tr = Trainer(load_config("tiny", overrides), env)
    seen, measure = [], tr.evaluator._measure

    def recording(image, prompt):
        seen.append((image.clone(), prompt))
        return measure(image, prompt)

    tr.evaluator._measure = recording
    return tr.evaluator.run(), seen


def test_dp2_gives_the_numbers_of_dp1_on_the_same_samples(setup, scorers, learned, tmp_path):
    teacher, feats = setup
    clip, pick = scorers
    base = [f"roles.teacher.checkpoint={teacher}", "eval.every=1", "eval.num_samples=5", "eval.batch=2",
            f"eval.features={feats}", "roles.generator.ema_decay=0.9", f"eval.clip={clip}", f"eval.pickscore={pick}", *learned[1]]
    one = run_distributed(_eval_at_start, 1, base + [f"train.output_dir={tmp_path / 'dp1'}"])[0]
    two = run_distributed(_eval_at_start, 2, base + [f"train.output_dir={tmp_path / 'dp2'}"])[0]
    assert set(one) == {f"eval/{ema}{metric}_{mode}" for ema in ("", "ema_") for metric in ("fd", "clip", "pickscore", "hpsv2", "imagereward", "aesthetic")
                        for mode in ("stochastic", "euler")}
    assert all(np.isfinite(v) for v in one.values())
    # batches {0, 1}, {2, 3}, {4 + padding}: replica 0 takes the first and the third, replica 1 the second and a
    # repeat (dropped); each sample sees the same batched forwards at DP1 and DP2, gathered in sample order
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-9, abs=1e-12), k
    # the reference features were computed once and cached
    assert len(list((tmp_path / "dp1" / "eval").glob("reference-*.npy"))) == 1


def test_clip_score_and_pickscore_are_the_papers_formulas_on_the_samples_and_their_captions(setup, scorers, learned,
                                                                                            tmp_path):
    """By hand, with the models themselves: CLIPScore = mean 100 max(cos, 0); PickScore = logit_scale.exp() x mean
    cos (87 here), each sample against its own caption, over the 4 samples of one sampler; HPSv2.1, ImageReward and
    the aesthetic score: the mean of their references (tests/test_image_rewards.py) on each sample saved as a PNG."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    from tests.test_image_rewards import References

    teacher, feats = setup
    clip, pick = scorers
    logs, seen = run_distributed(_eval_recording, 1, [
        f"roles.teacher.checkpoint={teacher}", "eval.every=1", "eval.num_samples=4", f"eval.features={feats}",
        f"eval.clip={clip}", f"eval.pickscore={pick}", f"train.output_dir={tmp_path}", *learned[1]])[0]
    assert [p for _, p in seen] == [f"synthetic sample {i}" for i in range(4)] * 2  # stochastic, then Euler

    def cosines(directory, samples):
        model, proc = CLIPModel.from_pretrained(directory).eval(), CLIPProcessor.from_pretrained(directory)
        out = []
        for image, prompt in samples:
            pixels = ((image[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).expand(3, -1, -1)
            with torch.no_grad():
                i = model.get_image_features(**proc(images=[pixels], return_tensors="pt"))
                t = model.get_text_features(**proc(text=[prompt], padding=True, return_tensors="pt"))
            i, t = getattr(i, "pooler_output", i), getattr(t, "pooler_output", t)
            out.append(float((i / i.norm()) @ (t / t.norm()).T))
        return np.array(out)

    for k, mode in enumerate(("stochastic", "euler")):
        samples = seen[4 * k: 4 * k + 4]
        assert logs[f"eval/clip_{mode}"] == pytest.approx(np.mean(100 * np.maximum(cosines(clip, samples), 0)), rel=1e-5)
        assert logs[f"eval/pickscore_{mode}"] == pytest.approx(87.0 * np.mean(cosines(pick, samples)), rel=1e-5)

    refs = References(learned[0])
    for k, mode in enumerate(("stochastic", "euler")):
        want = {"hpsv2": [], "imagereward": [], "aesthetic": []}
        for j, (image, prompt) in enumerate(seen[4 * k: 4 * k + 4]):
            png = tmp_path / f"{mode}{j}.png"
            pixels = ((image[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).expand(3, -1, -1)
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(png)
            for metric, values in want.items():
                values.append(refs(metric, png, prompt))
        for metric, values in want.items():
            assert logs[f"eval/{metric}_{mode}"] == pytest.approx(np.mean(values), abs=1e-5), metric


def test_enabling_it_leaves_the_losses_bit_identical(setup, tmp_path):
    teacher, feats = setup
    base = [f"roles.teacher.checkpoint={teacher}", "train.max_steps=4", "logging.log_every=1",
            "logging.tensorboard=false", "checkpoint.every=0", "checkpoint.at_end=false",
            "roles.generator.ema_decay=0.9"]
    train_inprocess(2, base + [f"train.output_dir={tmp_path / 'off'}"])
    train_inprocess(2, base + [f"train.output_dir={tmp_path / 'on'}", "eval.every=2", "eval.num_samples=4",
                               f"eval.features={feats}"])
    off = {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in metrics(tmp_path / "off")}
    on = {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in metrics(tmp_path / "on")}
    assert sorted(on) == sorted(off) == [1, 2, 3, 4]
    for step in off:
        evals = {k: v for k, v in on[step].items() if k.startswith("eval/")}
        assert bool(evals) == (step % 2 == 0), step
        assert {k: v for k, v in on[step].items() if not k.startswith("eval/")} == off[step], step


def test_eval_without_features_is_one_sentence():
    from megatron_senseflow.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval.every is set but eval.features is not"):
        load_config("tiny", ["eval.every=10"])
    with pytest.raises(ConfigError, match="eval.clip=/nowhere is not a directory"):
        load_config("tiny", ["eval.every=10", "eval.features=f.pt", "eval.clip=/nowhere"])
