"""Tiny diffusers models on disk and subprocess helpers shared by the conversion tests."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def save_tiny(variant: str, directory: Path, dtype: torch.dtype = torch.float32, seed: int = 0,
              shard: str = "200KB", mixed: bool = False) -> Path:
    """A seeded tiny diffusers transformer (tests/test_model_parity.reference) saved in several shards + index."""
    from tests.test_model_parity import reference

    _, ref = reference(variant, seed)
    ref = ref.to(dtype)
    if mixed:  # a model whose tensors do not all share one dtype
        ref.norm_out.to(torch.float32)
    ref.save_pretrained(directory, max_shard_size=shard)
    return Path(directory)


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(Path(directory) / "*.safetensors"))):
        out.update(load_file(f))
    return out


def run_py(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS` with this checkout first on the path, as a user's shell would run it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""
