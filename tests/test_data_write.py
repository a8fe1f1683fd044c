"""Shard writer: the three sources, the paper's filters, shard limits, manifest, resume after a crash, CLI."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import megatron_senseflow.data.write as write_mod
from megatron_senseflow.data.imageops import Buckets, resize_center_crop
from megatron_senseflow.data.shards import read_manifest
from megatron_senseflow.data.write import WriteSettings, write_shards
from megatron_senseflow.config import ConfigError
from tests.data_helpers import SAFE_WDS_KEYS, absurd_png, photo, real_images, save_folder, save_img2dataset


def wds_samples(folder: Path) -> dict[str, dict]:
    """Read our shards with webdataset's own reader (its decoder limited to the members we wrote)."""
    urls = [str(folder / s["name"]) for s in read_manifest(folder)["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil", only=SAFE_WDS_KEYS)
    return {s["__key__"]: s for s in ds}


def test_folder_round_trip_read_by_webdataset(tmp_path):
    items = real_images(names=("astronaut", "chelsea", "coffee", "rocket", "coins"), variants=("full", "mirror", "crop_top_left"))
    src = save_folder(tmp_path / "src", items)
    man = write_shards(
        WriteSettings(format="folder", input=str(src), resolution=64, min_side=256, max_samples_per_shard=4),
        tmp_path / "out",
        workers=2,
    )
    big = {key: img for key, img, _ in items if min(img.size) >= 256}
    small = {key for key, img, _ in items if min(img.size) < 256}
    assert small, "the corpus must exercise the size filter"
    assert man["num_samples"] == len(big) and man["stats"]["filtered"] == {"too_small": len(small)}
    assert [s["count"] for s in man["shards"]] == [4] * (len(big) // 4) + ([len(big) % 4] if len(big) % 4 else [])
    assert man["stats"]["no_aesthetic_score"] == len(big) and man["stats"]["skipped"] == {}

    samples = wds_samples(tmp_path / "out")
    assert set(samples) == set(big)
    captions = {key: cap for key, _, cap in items}
    crops = {key: np.asarray(resize_center_crop(img, (64, 64)), dtype=np.float32) for key, img in big.items()}
    for key, s in samples.items():
        assert s["jpg"].size == (64, 64)
        assert s["txt"] == captions[key]
        assert (s["json"]["original_width"], s["json"]["original_height"]) == big[key].size
        # the stored pixels are the centre crop of this very photo: closer to it than to any other crop
        got = np.asarray(s["jpg"], dtype=np.float32)
        err = {other: np.abs(got - want).mean() for other, want in crops.items()}
        assert min(err, key=err.get) == key and err[key] < 12.0, (key, err)


def _crop(arr: np.ndarray, w: int, h: int) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr[:h, :w]))


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_filters_on_known_sizes_and_scores(tmp_path, policy):
    a = photo("astronaut")
    items = [
        ("exact", _crop(a, 300, 300), "a square crop of an astronaut"),  # side == min, score == min: kept
        ("short", _crop(a, 400, 299), "a wide crop of an astronaut"),  # one pixel short
        ("dull", _crop(a, 400, 300), "a dull crop of an astronaut"),  # score just below
        ("unscored", _crop(a, 300, 500), "a tall crop of an astronaut"),  # no score: policy decides
        ("silent", _crop(a, 320, 320), None),  # no caption
    ]
    scores = {"exact": 5.0, "short": 9.0, "dull": 4.99, "silent": 7.0}
    src = save_img2dataset(tmp_path / "laion", items, per_tar=3, scores=scores)
    man = write_shards(
        WriteSettings(format="img2dataset", input=str(src), resolution=32, min_side=300, min_aesthetic=5.0,
                      missing_aesthetic=policy),
        tmp_path / "out",
    )
    # img2dataset keys: tar number + index in the tar ("exact" is the first of tar 0, "unscored" of tar 1)
    kept = {"000000000"} | ({"000010000"} if policy == "keep" else set())
    samples = wds_samples(tmp_path / "out")
    assert set(samples) == kept
    filtered = {"too_small": 1, "low_aesthetic": 1} | ({} if policy == "keep" else {"no_aesthetic": 1})
    stats = man["stats"]
    assert stats["filtered"] == filtered
    assert stats["skipped"] == {"missing_caption": 1}
    assert stats["no_aesthetic_score"] == (1 if policy == "keep" else 0)
    assert stats["inputs"] == 5 and stats["written"] == len(kept)
    exact = samples["000000000"]
    assert exact["json"]["aesthetic"] == 5.0 and exact["txt"] == "a square crop of an astronaut"


def test_json_source_counts_and_logs_every_bad_input(tmp_path, caplog):
    items = real_images(names=("coffee", "rocket"), variants=("full", "mirror"))
    root = tmp_path / "src"
    save_folder(root, items)
    (root / "garbage.jpg").write_bytes(b"this is not an image")
    (root / "bomb.png").write_bytes(absurd_png(100_000, 100_000))
    keys = [k for k, _, _ in items] + ["missing", "garbage", "bomb", "coffee-full", "empty"]
    paths = [f"{k}.jpg" for k, _, _ in items] + ["nowhere.jpg", "garbage.jpg", "bomb.png", "rocket-full.jpg", "coffee-mirror.jpg"]
    prompts = [c for _, _, c in items] + ["x", "y", "z", "a duplicate key", "   "]
    doc = root / "senseflow.json"
    doc.write_text(json.dumps({"keys": keys, "image_paths": paths, "prompts": prompts}))
    with caplog.at_level(logging.WARNING):
        man = write_shards(WriteSettings(format="json", input=str(doc), resolution=32, min_side=256), tmp_path / "out")
    assert man["stats"]["skipped"] == {
        "unreadable": 1, "undecodable": 1, "absurd_size": 1, "duplicate_key": 1, "missing_caption": 1,
    }
    assert set(wds_samples(tmp_path / "out")) == {k for k, _, _ in items}
    logged = caplog.text
    for reason in man["stats"]["skipped"]:
        assert reason in logged, f"{reason} was counted but never logged"


def test_json_source_with_unequal_lists_is_one_clear_error(tmp_path):
    doc = tmp_path / "bad.json"
    doc.write_text(json.dumps({"keys": ["a", "b"], "image_paths": ["a.jpg"], "prompts": ["x", "y"]}))
    with pytest.raises(ConfigError, match=r"lists of different lengths .*'image_paths': 1"):
        write_shards(WriteSettings(format="json", input=str(doc), resolution=32, min_side=1), tmp_path / "out")


def test_aspect_buckets(tmp_path):
    items = real_images(names=("coffee", "astronaut", "motorcycle_left"), variants=("full",))
    items.append(("tall", Image.fromarray(np.ascontiguousarray(photo("coffee")[:, :300])), "a tall strip of a coffee cup"))
    src = save_folder(tmp_path / "src", items)
    s = WriteSettings(format="folder", input=str(src), resolution=256, min_side=256, ratios=(1.0, 4 / 3, 3 / 4))
    man = write_shards(s, tmp_path / "out")
    sizes = {k: v["jpg"].size for k, v in wds_samples(tmp_path / "out").items()}
    b = Buckets(256, (1.0, 4 / 3, 3 / 4))
    assert sizes == {
        "coffee-full": b.size_for(4, 3), "astronaut-full": (256, 256),
        "motorcycle_left-full": b.size_for(4, 3), "tall": b.size_for(3, 4),
    }
    assert b.size_for(4, 3) == (320, 192) and man["sizes"] == [[256, 256], [320, 192], [192, 320]]


def test_max_shard_bytes_splits_a_job(tmp_path):
    items = real_images(names=("astronaut", "rocket"), variants=("full", "mirror", "crop_top_left"))
    src = save_folder(tmp_path / "src", items)
    limit = 12_000
    man = write_shards(
        WriteSettings(format="folder", input=str(src), resolution=64, min_side=256, max_shard_bytes=limit),
        tmp_path / "out",
    )
    names = [s["name"] for s in man["shards"]]
    assert len(names) > 1 and all(n.startswith("shard-000000-") for n in names)
    assert sum(s["count"] for s in man["shards"]) == len(items)
    for s in man["shards"]:
        size = (tmp_path / "out" / s["name"]).stat().st_size
        assert size == s["bytes"]
        assert s["count"] == 1 or size <= limit + 10240  # a tar ends on a 10 KiB record
    assert set(wds_samples(tmp_path / "out")) == {k for k, _, _ in items}


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {s["name"]: (folder / s["name"]).read_bytes() for s in read_manifest(folder)["shards"]}


def test_rerun_after_a_crash_writes_only_the_missing_shards(tmp_path, monkeypatch):
    items = real_images(names=("astronaut", "chelsea", "coffee"), variants=("full", "mirror"))
    src = save_folder(tmp_path / "src", items)
    s = WriteSettings(format="folder", input=str(src), resolution=32, min_side=256, max_samples_per_shard=1)
    reference = write_shards(s, tmp_path / "ref")

    real_run_job = write_mod.run_job
    ran: list[int] = []

    def crashing(job, *args):
        if job == 3:
            raise KeyboardInterrupt("power cut")
        ran.append(job)
        return real_run_job(job, *args)

    monkeypatch.setattr(write_mod, "run_job", crashing)
    with pytest.raises(KeyboardInterrupt):
        write_shards(s, tmp_path / "out")
    assert ran == [0, 1, 2] and not (tmp_path / "out" / "manifest.json").exists()
    # a crash between renaming job 2's tar and recording it leaves the tar without a record
    (tmp_path / "out" / "_progress" / "job-000002.json").unlink()
    (tmp_path / "out" / ".shard-000004-00.tar.tmp").write_bytes(b"half a tar")

    ran.clear()
    monkeypatch.setattr(write_mod, "run_job", lambda job, *a: ran.append(job) or real_run_job(job, *a))
    again = write_shards(s, tmp_path / "out")
    assert sorted(ran) == [2, 3, 4, 5]
    assert again["shards"] == reference["shards"] and again["stats"] == reference["stats"]
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "ref")
    assert not list((tmp_path / "out").glob(".*.tmp"))
    urls = [str(tmp_path / "out" / x["name"]) for x in again["shards"]]
    keys = [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False)]
    assert sorted(keys) == sorted(k for k, _, _ in items)  # each sample exactly once

    with pytest.raises(ConfigError, match="started with other inputs or settings .*settings"):
        write_shards(WriteSettings(format="folder", input=str(src), resolution=48, min_side=256), tmp_path / "out")


def test_aesthetic_scores_from_folder_sidecars_and_the_authors_json(tmp_path):
    items = real_images(names=("coffee", "rocket"), variants=("full", "mirror"))
    keys = [k for k, _, _ in items]
    scores = dict(zip(keys, (6.0, 4.0, 5.5, None)))
    src = save_folder(tmp_path / "src", items, meta={k: {"aesthetic": v} for k, v in scores.items() if v is not None})
    s = dict(resolution=32, min_side=256, missing_aesthetic="drop")
    man = write_shards(WriteSettings(format="folder", input=str(src), **s), tmp_path / "folder")
    assert set(wds_samples(tmp_path / "folder")) == {keys[0], keys[2]}
    assert man["stats"]["filtered"] == {"low_aesthetic": 1, "no_aesthetic": 1}

    doc = src / "senseflow.json"
    doc.write_text(json.dumps({"keys": keys, "image_paths": [f"{k}.jpg" for k in keys],
                               "prompts": [c for _, _, c in items], "aesthetic": list(scores.values())}))
    man = write_shards(WriteSettings(format="json", input=str(doc), **s), tmp_path / "json")
    assert set(wds_samples(tmp_path / "json")) == {keys[0], keys[2]}
    assert man["stats"]["filtered"] == {"low_aesthetic": 1, "no_aesthetic": 1}
