"""Streaming loader: round trip, DP/worker split, per-epoch reshuffle, resume at the same and another DP size."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
import torch
from PIL import Image

import megatron_senseflow.data.loader as loader_mod
from megatron_senseflow.data.loader import DataStateError, ShardLoader, shuffled
from megatron_senseflow.data.write import WriteSettings, write_shards
from megatron_senseflow.config import ConfigError, DataConfig
from tests.data_helpers import real_images, save_folder
from tests.dist_helpers import run_distributed

NAMES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field")
PER_SHARD = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 real photos (6 x 4 variants) in 6 shards of 4, at 32 px."""
    root = tmp_path_factory.mktemp("corpus")
    items = real_images(names=NAMES)
    save_folder(root / "src", items)
    s = WriteSettings(format="folder", input=str(root / "src"), resolution=32, min_side=200, max_samples_per_shard=PER_SHARD)
    man = write_shards(s, root / "shards", workers=2)
    assert man["num_samples"] == len(items) == 24
    return root / "shards", {key: caption for key, _, caption in items}


def cfg_for(folder, **kw) -> DataConfig:
    base = dict(path=str(folder), encoded=False, resolution=32, micro_batch_size=2, shuffle_buffer=5, num_workers=2, seed=7)
    return DataConfig(**{**base, **kw})


def take(loader: ShardLoader, n: int) -> list[tuple[str, int]]:
    """(key, epoch) of the next n batches' samples."""
    out = []
    for _ in range(n):
        b = next(loader)
        out += list(zip(b["key"], b["epoch"]))
    return out


def of_epoch(seq, epoch: int) -> list[str]:
    return [k for k, e in seq if e == epoch]


def test_round_trip_images_prompts_and_one_epoch(corpus):
    folder, captions = corpus
    loader = ShardLoader(cfg_for(folder, num_workers=0, micro_batch_size=3), 0, 1)
    batch = next(loader)
    assert batch["image"].shape == (3, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() < -0.5 and 0.5 < batch["image"].max() <= 1.0
    assert batch["prompt"] == [captions[k] for k in batch["key"]]
    seen = take(loader, 7) + list(zip(batch["key"], batch["epoch"]))
    assert sorted(of_epoch(seen, 0)) == sorted(captions), "one epoch is every sample exactly once"
    assert loader.stats() == {"samples": 24, "skipped": {}}
    # a loader at another resolution resizes on the fly, as the writer would have
    small = next(ShardLoader(cfg_for(folder, resolution=16, num_workers=0), 0, 1))
    assert small["image"].shape == (2, 3, 16, 16)


def test_epochs_reshuffle_with_the_seed(corpus):
    folder, captions = corpus
    a = take(ShardLoader(cfg_for(folder), 0, 1), 24)
    b = take(ShardLoader(cfg_for(folder), 0, 1), 24)
    c = take(ShardLoader(cfg_for(folder, seed=8), 0, 1), 24)
    assert a == b, "same seed, same order"
    assert a != c, "another seed, another order"
    e0, e1 = of_epoch(a, 0), of_epoch(a, 1)
    assert sorted(e0) == sorted(e1) == sorted(captions) and e0 != e1
    # without a shuffle buffer a worker streams whole shards in tar order
    plain = [k for k, _ in take(ShardLoader(cfg_for(folder, shuffle_buffer=0, num_workers=0, micro_batch_size=4), 0, 1), 6)]
    assert sorted(plain[i : i + 4] for i in range(0, 24, 4)) == sorted(shard_keys(folder))


def shard_keys(folder) -> list[list[str]]:
    from megatron_senseflow.data.shards import ShardSet, iter_samples

    return [[s.key for s in iter_samples(url)] for url in ShardSet.open(str(folder)).urls]


def test_dp_ranks_split_shards_disjointly_and_cover_the_epoch(corpus):
    folder, captions = corpus
    per_rank = [of_epoch(take(ShardLoader(cfg_for(folder), r, 3), 8), 0) for r in range(3)]
    assert sorted(sum(per_rank, [])) == sorted(captions)
    whole = [set(keys) for keys in shard_keys(folder)]
    for keys in per_rank:  # each rank reads two whole shards
        assert len(keys) == 8 and sum(shard <= set(keys) for shard in whole) == 2


def test_the_shuffle_is_a_function_of_what_is_left():
    """After k picks the buffer is the first `capacity` unpicked items, so a resumed shuffle continues exactly."""

    class It:
        def __init__(self, i):
            self.index = i

    items = [It(i) for i in range(40)]
    full = [x.index for x in shuffled(iter(items), 6, key=99, start=0)]
    assert sorted(full) == list(range(40)) and full != list(range(40))
    for k in (0, 5, 17, 39):
        consumed = set(full[:k])
        rest = [x.index for x in shuffled((x for x in items if x.index not in consumed), 6, key=99, start=k)]
        assert rest == full[k:]


# 9 batches of 2 per rank cross the first epoch boundary; batches of 3 over 2 workers stop mid-turn
@pytest.mark.parametrize("stop,batch", [(3, 2), (9, 2), (3, 3), (5, 1)])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_the_same_dp_size_continues_exactly(corpus, stop, batch, workers, monkeypatch):
    folder, _ = corpus
    monkeypatch.setattr(loader_mod, "CHUNK", 3)  # workers' chunks then end inside epochs of this small corpus
    cfg = cfg_for(folder, num_workers=workers, micro_batch_size=batch)
    straight = [take(ShardLoader(cfg, r, 2), 14) for r in range(2)]
    first = [ShardLoader(cfg, r, 2) for r in range(2)]
    before = [take(ld, stop) for ld in first]
    saved = json.loads(json.dumps(ShardLoader.merge_states([ld.state_dict() for ld in first])))
    assert len(json.dumps(saved)) < 1000, "the position is small"
    resumed = []
    for r in range(2):
        ld = ShardLoader(cfg, r, 2)
        ld.load_state_dict(saved)
        resumed.append(before[r] + take(ld, 14 - stop))
    assert resumed == straight


def _resume_across(folder, old_dp: int, new_dp: int, stop: int, workers: int = 2):
    cfg = cfg_for(folder, num_workers=workers)
    first = [ShardLoader(cfg, r, old_dp) for r in range(old_dp)]
    before = [kv for ld in first for kv in take(ld, stop)]
    saved = ShardLoader.merge_states([ld.state_dict() for ld in first])
    after = []
    for r in range(new_dp):
        ld = ShardLoader(cfg, r, new_dp)
        ld.load_state_dict(saved)
        after += take(ld, 48 // new_dp)  # four epochs' worth: epochs 0 and 1 certainly finish
    return before, after


# (4, *, 3): ranks 2 and 3 own one shard each and have left epoch 0 (and forgotten it)
# while ranks 0 and 1 are still in it; merge_states must know what they consumed.
@pytest.mark.parametrize(
    "old_dp,new_dp,stop,workers", [(2, 1, 3, 2), (1, 2, 5, 2), (2, 3, 4, 2), (2, 1, 8, 2), (4, 1, 3, 1), (4, 2, 3, 0)]
)
def test_resume_at_another_dp_size_neither_repeats_nor_skips(corpus, old_dp, new_dp, stop, workers):
    folder, captions = corpus
    before, after = _resume_across(folder, old_dp, new_dp, stop, workers)
    for epoch in (0, 1):
        got = Counter(of_epoch(before, epoch) + of_epoch(after, epoch))
        assert got == Counter(list(captions)), f"epoch {epoch}: repeats {[k for k, n in got.items() if n > 1]}, " \
                                         f"skips {sorted(set(captions) - set(got))}"
    assert not [k for k, n in Counter(of_epoch(after, 2)).items() if n > 1]


def test_state_survives_two_resumes_and_counts_stats(corpus):
    folder, captions = corpus
    cfg = cfg_for(folder)
    seen = []
    state = None
    for dp in (2, 1, 2):
        loaders = [ShardLoader(cfg, r, dp) for r in range(dp)]
        for ld in loaders:
            if state is not None:
                ld.load_state_dict(state)
            seen += take(ld, 2)
        state = ShardLoader.merge_states([ld.state_dict() for ld in loaders])
    assert len(seen) == 20 and Counter(k for k, _ in seen).most_common(1)[0][1] == 1
    assert state["epoch"] == 0 and state["stats"] == {}


def test_close_and_continue_does_not_repeat(corpus):
    folder, captions = corpus
    ld = ShardLoader(cfg_for(folder), 0, 1)
    seq = take(ld, 5)
    ld.close()
    seq += take(ld, 7)
    assert Counter(of_epoch(seq, 0)) == Counter(list(captions))


def test_state_errors_are_one_clear_sentence(corpus, tmp_path):
    folder, _ = corpus
    cfg = cfg_for(folder)
    a, b = ShardLoader(cfg, 0, 2), ShardLoader(cfg, 1, 2)
    with pytest.raises(DataStateError, match=r"exactly one state per DP rank 0\.\.1, got ranks \[0\]"):
        ShardLoader.merge_states([a.state_dict()])
    with pytest.raises(DataStateError, match="needs the output of ShardLoader.merge_states"):
        a.load_state_dict(b.state_dict())
    other = ShardLoader(replace(cfg, path=str(folder / "shard-00000{0..4}-00.tar")), 0, 1)
    with pytest.raises(DataStateError, match="belongs to another shard list"):
        other.load_state_dict(ShardLoader.merge_states([a.state_dict(), b.state_dict()]))
    with pytest.raises(ConfigError, match="6 shards, fewer than the 7 data-parallel ranks"):
        ShardLoader(cfg, 0, 7)
    with pytest.raises(ConfigError, match="holds image shards but data.encoded=true"):
        ShardLoader(replace(cfg, encoded=True), 0, 1)
    with pytest.raises(ConfigError, match="no manifest.json in"):
        ShardLoader(replace(cfg, path=str(tmp_path)), 0, 1)


def test_glob_without_manifest_counts_the_tars(corpus, tmp_path):
    folder, captions = corpus
    import shutil

    for tar in folder.glob("*.tar"):
        shutil.copy(tar, tmp_path / tar.name)
    ld = ShardLoader(cfg_for(tmp_path, path=str(tmp_path / "*.tar"), num_workers=0), 0, 1)
    assert ld.shards.counts == (4,) * 6
    assert Counter(of_epoch(take(ld, 12), 0)) == Counter(list(captions))


def _replica_keys(env, folder):
    cfg = cfg_for(folder, num_workers=1)
    return {"dp": env.dp_rank, "tp": env.tp_rank, "keys": take(ShardLoader(cfg, env.dp_rank, env.dp), 6)}


@pytest.mark.slow
def test_tp_peers_get_identical_samples_dp_replicas_disjoint(corpus):
    folder, captions = corpus
    res = run_distributed(_replica_keys, 4, folder, tp=2)
    by = {(r["dp"], r["tp"]): r["keys"] for r in res}
    assert by[(0, 0)] == by[(0, 1)] and by[(1, 0)] == by[(1, 1)]
    epoch0 = of_epoch(by[(0, 0)], 0) + of_epoch(by[(1, 0)], 0)
    assert Counter(epoch0) == Counter(list(captions)), "replicas are disjoint and together cover the epoch"


def test_bucketed_shards_batch_by_shape(tmp_path):
    items = real_images(names=("coffee", "astronaut", "rocket"), variants=("full", "mirror"))
    tall = [(f"{k}-tall", img.transpose(Image.Transpose.ROTATE_90), c) for k, img, c in items[:2]]
    save_folder(tmp_path / "src", items + tall)
    s = WriteSettings(format="folder", input=str(tmp_path / "src"), resolution=256, min_side=256,
                      ratios=(1.0, 4 / 3, 3 / 4), max_samples_per_shard=3)
    write_shards(s, tmp_path / "shards")
    cfg = cfg_for(tmp_path / "shards", resolution=256, num_workers=0, micro_batch_size=2, shuffle_buffer=8)
    ld = ShardLoader(cfg, 0, 1)
    seen, resumed = [], False
    for _ in range(8):
        if ld._pending and not resumed:  # a sample waiting for a partner of its shape is not consumed yet
            state = ld.state_dict()
            ld, resumed = ShardLoader(cfg, 0, 1), True
            ld.load_state_dict(state)
        b = next(ld)
        assert b["image"].shape[0] == 2 and b["image"].shape[2:] in {(256, 256), (192, 320), (320, 192)}
        seen += list(zip(b["key"], b["epoch"]))
    assert resumed, "the corpus should make a sample wait for a partner at some point"
    assert Counter(of_epoch(seen, 0)) == Counter(k for k, _, _ in items + tall)
