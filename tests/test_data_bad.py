"""A corrupt-shard corpus with every kind of bad data: each is skipped, counted and logged, never fatal.

Also proves that shard contents are never unpickled: the corpus carries
pickles (a `.pyd` member and an object-dtype `.npy`) that create a file when
unpickled, and the file must not appear.
"""
from __future__ import annotations

import io
import json
import logging
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset.writer import TarWriter

from megatron_senseflow.data.loader import ShardLoader, epoch_order
from megatron_senseflow.data.shards import FORMAT, VERSION
from megatron_senseflow.config import ConfigError, DataConfig
from tests.data_helpers import absurd_png, jpeg, real_images


class Trap:
    """Unpickling this creates `path`: evidence that something unpickled shard contents."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_tar(path: Path, samples: list[dict]) -> bytes:
    with TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)
    return path.read_bytes()


def write_manifest(folder: Path, shards: list[tuple[str, int]], **extra) -> None:
    doc = {"format": FORMAT, "version": VERSION, "kind": "images", "resolution": 32, "ratios": [1.0],
           "shards": [{"name": n, "count": c} for n, c in shards], **extra}
    (folder / "manifest.json").write_text(json.dumps(doc))


def _good(key: str, img: Image.Image, caption: str, size: int = 32) -> dict:
    return {"__key__": key, "jpg": jpeg(img.convert("RGB").resize((size, size))), "txt": caption.encode()}


def _cut_inside_member(data: bytes, sample_index: int) -> bytes:
    """Bytes of a tar cut in the middle of sample `sample_index`'s jpg data (tarfile raises on it)."""
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        jpgs = [m for m in tf.getmembers() if m.name.endswith(".jpg")]
    member = jpgs[sample_index]
    return data[: member.offset_data + member.size // 2]


def _cut_at_sample(data: bytes, sample_index: int) -> bytes:
    """Bytes of a tar cut exactly before sample `sample_index`'s first header (reads as a clean, short tar)."""
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        first = [m for m in tf.getmembers() if m.name.startswith(f"s{sample_index}.")][0]
    return data[: first.offset]


@pytest.fixture
def raw_corpus(tmp_path):
    photos = real_images(names=("astronaut", "coffee", "rocket", "chelsea"), variants=("full", "mirror"))
    good = [_good(f"good{i}", img, cap) for i, (_, img, cap) in enumerate(photos)]
    trap = tmp_path / "UNPICKLED"
    img = photos[0][1]
    mixed = [
        good[0],
        {"__key__": "undecodable", "jpg": b"\xff\xd8\xff not really a jpeg", "txt": b"a broken image"},
        {"__key__": "nocaption", "jpg": good[1]["jpg"]},
        {"__key__": "blank", "jpg": good[1]["jpg"], "txt": b"   \n"},
        {"__key__": "bomb", "png": absurd_png(100_000, 100_000), "txt": b"a decompression bomb"},
        {"__key__": "speck", "jpg": jpeg(img.resize((4, 4))), "txt": b"a four pixel image"},
        {**good[2], "__key__": "extras", "pyd": pickle.dumps(Trap(trap)), "pth": b"PK\x03\x04 torch zip"},
        {"__key__": "noimage", "txt": b"a caption without an image"},
        {"__key__": "latin1", "jpg": good[3]["jpg"], "txt": "caf\xe9".encode("latin-1")},
    ]
    write_tar(tmp_path / "mixed.tar", mixed)
    full = write_tar(tmp_path / "whole.tar", [{**g, "__key__": f"s{i}"} for i, g in enumerate(good[4:7])])
    (tmp_path / "cut-inside.tar").write_bytes(_cut_inside_member(full, 1))  # s0 survives, s1 s2 lost
    (tmp_path / "cut-between.tar").write_bytes(_cut_at_sample(full, 2))  # s0 s1 survive, s2 lost
    write_tar(tmp_path / "longer.tar", [{**good[7], "__key__": "listed"}, {**good[5], "__key__": "unlisted"}])
    write_manifest(tmp_path, [("mixed.tar", 9), ("cut-inside.tar", 3), ("cut-between.tar", 3),
                              ("gone.tar", 2), ("longer.tar", 1)])
    delivered = ["good0", "extras", "s0", "s0", "s1", "listed"]
    skipped = {
        "undecodable": 2, "missing_caption": 2, "absurd_size": 2, "missing_image": 1,
        "truncated_tar": 3, "unreadable": 2, "extra_sample": 1, "unknown_key": 2,
    }
    return tmp_path, trap, delivered, skipped


def _drain_first_epoch(loader: ShardLoader) -> list[str]:
    """Keys of epoch 0, read until the first sample of epoch 1 (micro_batch_size 1)."""
    keys = []
    while True:
        b = next(loader)
        if b["epoch"][0] == 1:
            return keys
        keys += b["key"]


@pytest.mark.parametrize("workers", [0, 1])
def test_every_kind_of_bad_sample_is_skipped_counted_and_logged(raw_corpus, caplog, workers):
    folder, trap, delivered, skipped = raw_corpus
    # no shuffle buffer and one reader: epoch 1 starts with the first sample of its first shard, which
    # is good unless that shard is the missing one; so the counters after epoch 0 are known exactly
    cfg = DataConfig(path=str(folder), encoded=False, resolution=32, micro_batch_size=1, shuffle_buffer=0,
                     num_workers=workers, seed=3)
    loader = ShardLoader(cfg, 0, 1)
    if loader.shards.names[epoch_order(cfg.seed, 1, 5)[0]] == "gone.tar":
        skipped = {**skipped, "unreadable": skipped["unreadable"] * 2}
    with caplog.at_level(logging.WARNING, logger="data"):
        keys = _drain_first_epoch(loader)
    assert Counter(keys) == Counter(delivered)
    assert loader.stats() == {"samples": len(delivered) + 1, "skipped": skipped}
    for reason in skipped:
        assert reason in caplog.text, f"{reason} was counted but not logged"
    assert "mixed.tar:extras member pyd" in caplog.text
    assert not trap.exists(), "a .pyd member was unpickled"
    # the counters travel with the position, so a resumed run reports the whole run's skips
    assert ShardLoader.merge_states([loader.state_dict()])["stats"] == skipped


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _pickled_npy(trap: Path) -> bytes:
    """An object-dtype .npy whose payload is a pickle that creates `trap`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    return buf.getvalue() + pickle.dumps([Trap(trap)])


def test_encoded_corpus_rejects_non_finite_and_misshapen_arrays(tmp_path, caplog):
    rng = np.random.default_rng(0)
    img = jpeg(real_images(names=("coffee",), variants=("full",))[0][1].resize((16, 16)))
    trap = tmp_path / "UNPICKLED"

    def sample(key, latent=None, text=None, pooled=None, **extra):
        s = {"__key__": key, "jpg": img, "txt": f"caption of {key}".encode(),
             "latent.npy": _npy(rng.standard_normal((4, 8, 8)).astype(np.float32) if latent is None else latent),
             "t5.npy": _npy(rng.standard_normal((6, 8)).astype(np.float16) if text is None else text),
             "clip_pooled.npy": _npy(rng.standard_normal(5).astype(np.float32) if pooled is None else pooled)}
        return {k: v for k, v in {**s, **extra}.items() if v is not None}

    nan = np.zeros((4, 8, 8), np.float32)
    nan[1, 2, 3] = np.nan
    inf = np.zeros((6, 8), np.float16)
    inf[0, 0] = np.inf
    samples = [  # the good ones last: the first batch then has read every bad one
        sample("nan", latent=nan),
        sample("inf", text=inf),
        sample("tall", latent=np.zeros((4, 9, 8), np.float32)),
        sample("channels", latent=np.zeros((3, 8, 8), np.float32)),
        sample("ints", latent=np.zeros((4, 8, 8), np.int32)),
        {**sample("pickled"), "latent.npy": _pickled_npy(trap)},
        {k: v for k, v in sample("nopooled").items() if k != "clip_pooled.npy"},
        {k: v for k, v in sample("noimage").items() if k != "jpg"},
        sample("good0"), sample("good1"), sample("good2"),
    ]
    write_tar(tmp_path / "enc.tar", samples)
    encoder = {"latent_key": "latent.npy", "text_key": "t5.npy", "pooled_key": "clip_pooled.npy",
               "latent_channels": 4, "vae_scale_factor": 2, "text_shape": [6, 8], "pooled_dim": 5}
    write_manifest(tmp_path, [("enc.tar", len(samples))], kind="encoded", resolution=16, encoder=encoder)
    cfg = DataConfig(path=str(tmp_path), encoded=True, resolution=16, micro_batch_size=3, shuffle_buffer=0,
                     num_workers=0, text_max_length=6)
    loader = ShardLoader(cfg, 0, 1)
    with caplog.at_level(logging.WARNING, logger="data"):
        batch = next(loader)
    assert sorted(batch["key"]) == ["good0", "good1", "good2"]
    assert batch["text"].dtype == batch["latent"].dtype == batch["pooled"].dtype == batch["image"].dtype
    assert loader.stats()["skipped"] == {
        "non_finite": 2, "bad_shape": 3, "undecodable": 1, "missing_field": 1, "missing_image": 1,
    }
    assert "t5.npy holds NaN or inf" in caplog.text and "latent.npy is int32 [4, 8, 8], expected float 4x?x?" in caplog.text
    assert not trap.exists(), "an object .npy was unpickled"


def test_a_corpus_with_nothing_usable_is_an_error_not_a_hang(tmp_path):
    write_tar(tmp_path / "junk.tar", [{"__key__": f"j{i}", "jpg": b"junk", "txt": b"x"} for i in range(3)])
    write_manifest(tmp_path, [("junk.tar", 3)])
    cfg = DataConfig(path=str(tmp_path), encoded=False, resolution=32, micro_batch_size=1, num_workers=0)
    with pytest.raises(ConfigError, match=r"no usable sample in 4 consecutive samples .* the shards are broken"):
        next(ShardLoader(cfg, 0, 1))
