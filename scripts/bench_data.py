"""Loader throughput: ShardLoader against a bare webdataset loop over the same shards, in one run.

    PYTHONPATH=. python scripts/bench_data.py                       # builds a corpus from scikit-image photos
    PYTHONPATH=. python scripts/bench_data.py --shards DIR --resolution 1024 --workers 0 4 8

The baseline is `webdataset.WebDataset(shards).decode("pil")` iterated in
one process (its decoder limited to jpg/txt/json, so it never unpickles).
Ours delivers more: float tensors in [-1, 1], batched, shuffled, with the
position tracked; the second row is the bare loop doing that conversion
too, to show what is conversion and what is loader. The ratio at
workers=0 compares equal process counts; rows with workers > 0 show what
the worker processes add (the default DataConfig has 2). Goal: >= 0.9.
Each figure is the best of --repeats passes over every sample, timed from
the first sample (batch) on, so worker start-up is left out.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from megatron_senseflow.data.loader import ShardLoader
from megatron_senseflow.data.shards import ShardSet
from megatron_senseflow.data.write import WriteSettings, write_shards
from megatron_senseflow.config import DataConfig

PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")


def build_corpus(out: Path, num_samples: int, resolution: int) -> Path:
    """Random crops and mirror images of scikit-image's photographs, written as shards at `resolution`."""
    import skimage.data

    rng = np.random.default_rng(0)
    src = out / "src"
    src.mkdir(parents=True)
    photos = [getattr(skimage.data, name)()[..., :3] for name in PHOTOS]
    for i in range(num_samples):
        arr = photos[i % len(photos)]
        h, w = arr.shape[:2]
        side = int(rng.integers(min(h, w) * 3 // 5, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = arr[top : top + side, left : left + side][:, :: 1 if i % 2 else -1]
        Image.fromarray(np.ascontiguousarray(crop)).save(src / f"{i:06d}.jpg", quality=92)
        (src / f"{i:06d}.txt").write_text(f"a crop of the {PHOTOS[i % len(PHOTOS)].replace('_', ' ')} photograph")
    settings = WriteSettings(format="folder", input=str(src), resolution=resolution, min_side=1, max_samples_per_shard=64)
    write_shards(settings, out / "shards", workers=2)
    return out / "shards"


def bare(urls: list[str], n: int, as_float: bool = False) -> float:
    seen, start = 0, None
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil", only=("jpg", "txt", "json")):
        img = sample["jpg"].convert("RGB")
        if as_float:  # what a training step needs: float32 [3, H, W] in [-1, 1]
            np.asarray(img).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        seen += 1
        start = start or time.perf_counter()  # the clock starts at the first sample, as for ours
    assert seen == n, f"the bare loop read {seen} of {n} samples"
    return (n - 1) / (time.perf_counter() - start)


def ours(cfg: DataConfig, n: int) -> float:
    loader = ShardLoader(cfg, 0, 1)
    first = next(loader)["image"].shape[0]  # worker start-up is paid once per run, not per sample
    start, seen = time.perf_counter(), first
    while seen < n:
        seen += next(loader)["image"].shape[0]
    rate = (seen - first) / (time.perf_counter() - start)
    loader.close()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", help="shard folder (default: build one from scikit-image photos)")
    p.add_argument("--samples", type=int, default=448, help="corpus size when building one")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.shards) if args.shards else build_corpus(Path(tmp), args.samples, args.resolution)
        shards = ShardSet.open(str(folder))
        n = shards.num_samples
        runs = {
            "webdataset .decode(pil), 1 proc": lambda: bare(list(shards.urls), n),
            "  same + float CHW [-1,1], 1 proc": lambda: bare(list(shards.urls), n, as_float=True),
        }
        for workers in args.workers:
            cfg = DataConfig(path=str(folder), encoded=False, resolution=args.resolution,
                             micro_batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer, num_workers=workers)
            label = f"ShardLoader, workers={workers}" + (" (1 proc)" if workers == 0 else "")
            runs[label] = lambda cfg=cfg: ours(cfg, n - n % args.batch_size)  # whole batches only
        # interleaved passes, so a busy moment on a shared machine hits every loader alike
        rates = {label: fn() for label, fn in runs.items()}
        for _ in range(args.repeats - 1):
            for label, fn in runs.items():
                rates[label] = max(rates[label], fn())
        base = rates["webdataset .decode(pil), 1 proc"]
        print(f"{n} samples in {len(shards.urls)} shards at {args.resolution} px, batch {args.batch_size}, "
              f"best of {args.repeats} interleaved passes")
        print(f"{'loader':<34}{'samples/s':>10}{'ratio':>8}")
        for label, rate in rates.items():
            print(f"{label:<34}{rate:>10.1f}{rate / base:>8.2f}")


if __name__ == "__main__":
    main()
