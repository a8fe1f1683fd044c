"""Benchmark the streaming converters on a synthetic FLUX checkpoint of real width.

    python scripts/bench_convert.py [--single-layers 3] [--double-layers 2] [--shard-size 1GB] [--workdir DIR]

Writes random bf16 weights of a FLUX.1 transformer with the real widths
(24 heads x 128, T5 4096, CLIP 768) but fewer blocks (default 2 double + 3
single = 2.3 GB) as several safetensors shards, then times, each in a fresh
process so every peak RSS is its own:
  read    plain safetensors: every tensor of every shard read into memory once
  copy    plain safetensors: each shard loaded whole and written to a new file, synced
          (what any converter must at least do: read + write + flush the same bytes)
  import  tools/convert_checkpoint.py import -> role checkpoint (synced)
  export  role checkpoint -> diffusers shards (synced)
and checks the export equals the source bitwise. Throughput is source bytes
per second; RSS is the process' peak resident set (VmHWM), next to the
same process' RSS after its imports and the largest shard (goal: peak RSS
<= 1.5x the largest shard). Sources sit in the page cache when they are read
(they were just written), so reads measure memory copies, and the writes'
final sync measures the disk.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GB = 1e9


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_now() -> int:
    return _status("VmRSS")


def peak_rss() -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child would report
    # at least its parent's peak (here: the process that generated the source)
    return _status("VmHWM")


def make_source(directory: Path, double: int, single: int, shard_size: str) -> None:
    """Random bf16 FLUX weights, written tensor by tensor (never the whole model in memory)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from megatron_senseflow.models.configs import arch_to_diffusers_config, make_arch
    from megatron_senseflow.tools.hf_io import PlannedTensor, ShardedSafetensorsWriter, parse_size

    arch = make_arch("flux-dev", {"num_layers": double, "num_single_layers": single})
    config = arch_to_diffusers_config(arch)
    with torch.device("meta"):
        shapes = FluxTransformer2DModel(**{k: v for k, v in config.items() if k != "_class_name"}).state_dict()
    plan = [PlannedTensor(k, tuple(t.shape), torch.bfloat16) for k, t in shapes.items()]
    writer = ShardedSafetensorsWriter(directory, plan, parse_size(shard_size))
    g = torch.Generator().manual_seed(0)
    for t in plan:
        writer.write(t.key, (torch.randn(t.shape, generator=g) * 0.02).to(torch.bfloat16))
    writer.close()
    (directory / "config.json").write_text(json.dumps(config))


def phase(name: str, args: argparse.Namespace) -> dict:
    """One measured step, run in its own process (see main)."""
    import torch  # noqa: F401  (imports count in the baseline, not in the work)

    from megatron_senseflow.tools.convert_checkpoint import ensure_parallel_state, export_checkpoint, import_checkpoint
    from megatron_senseflow.tools.hf_io import SafetensorsDir

    src, ckpt, out = Path(args.src), Path(args.ckpt), Path(args.out)
    if name in ("import", "export"):
        ensure_parallel_state()  # the 1-rank gloo group the converters start themselves, outside the timing
    base = rss_now()
    start = time.perf_counter()
    if name == "read":
        from safetensors import safe_open

        for f in sorted(src.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    h.get_tensor(k).clone()  # get_tensor may map the file lazily: make it read the bytes
    elif name == "copy":
        from safetensors.torch import load_file, save_file

        from megatron_senseflow.tools.hf_io import fsync_tree

        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.glob("*.safetensors")):
            save_file({k: v.clone() for k, v in load_file(f).items()}, out / f.name)
        fsync_tree(out)
        shutil.rmtree(out)
    elif name == "import":
        import_checkpoint(src, ckpt, progress=False)
    elif name == "export":
        export_checkpoint(ckpt, out, max_shard_size=args.shard_size, progress=False)
    elif name == "compare":  # bitwise, tensor by tensor
        a, b = SafetensorsDir(src), SafetensorsDir(out)
        assert a.info.keys() == b.info.keys(), a.info.keys() ^ b.info.keys()
        for k in a.info:
            x, y = a.get(k), b.get(k)
            assert x.dtype == y.dtype and torch.equal(x, y), k
    seconds = time.perf_counter() - start
    return {"phase": name, "seconds": seconds, "baseline_rss": base, "peak_rss": peak_rss()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--double-layers", type=int, default=2)
    p.add_argument("--single-layers", type=int, default=3)
    p.add_argument("--shard-size", default="1GB", help="max safetensors shard size of the source and the export")
    p.add_argument("--workdir", help="where the three copies go (default: a temporary directory, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    src, ckpt, out = work / "hf", work / "ckpt", work / "out"
    try:
        t = time.perf_counter()
        make_source(src, args.double_layers, args.single_layers, args.shard_size)
        shards = sorted(src.glob("*.safetensors"))
        total = sum(f.stat().st_size for f in shards)
        largest = max(f.stat().st_size for f in shards)
        print(f"source: FLUX width 3072, {args.double_layers} double + {args.single_layers} single blocks, bf16, "
              f"{len(shards)} shards, {total / GB:.2f} GB on disk, largest shard {largest / GB:.2f} GB "
              f"(written in {time.perf_counter() - t:.0f}s)")
        results = {}
        for name in ("read", "copy", "import", "export", "compare"):
            cmd = [sys.executable, __file__, "--phase", name, "--src", str(src), "--ckpt", str(ckpt),
                   "--out", str(out), "--shard-size", args.shard_size]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-4000:], file=sys.stderr)
                return 1
            results[name] = json.loads(r.stdout.strip().splitlines()[-1])
        ckpt_size = sum(f.stat().st_size for f in ckpt.iterdir())
        print(f"role checkpoint: {ckpt_size / GB:.2f} GB on disk")
        print(f"{'phase':<8}{'seconds':>9}{'GB/s':>8}{'peak RSS GB':>13}{'after imports':>15}{'peak/largest shard':>20}")
        for name in ("read", "copy", "import", "export"):
            r = results[name]
            print(f"{name:<8}{r['seconds']:>9.1f}{total / GB / r['seconds']:>8.2f}{r['peak_rss'] / GB:>13.2f}"
                  f"{r['baseline_rss'] / GB:>15.2f}{r['peak_rss'] / largest:>20.2f}")
        for name in ("import", "export"):
            r = results[name]["seconds"]
            print(f"{name} throughput = {results['read']['seconds'] / r:.2f}x plain read, "
                  f"{results['copy']['seconds'] / r:.2f}x plain copy")
        worst = max(results[n]["peak_rss"] for n in ("import", "export"))
        verdict = "met" if worst <= 1.5 * largest else "NOT met"
        print(f"round trip bitwise: ok ({results['compare']['seconds']:.1f}s); "
              f"goal peak RSS <= 1.5x largest shard: {verdict} ({worst / largest:.2f}x)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
