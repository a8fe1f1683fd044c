"""Run monitoring on rank 0: TensorBoard scalars and image grids, a JSONL metrics file, console lines.

`OUT/metrics.jsonl` holds every logged step with full-precision floats (the
resume tests compare it to the last digit); TensorBoard gets the same scalars
under `OUT/tensorboard`, and resumed runs keep appending to both.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

# bf16 dense peak TFLOP/s per GPU, for MFU when logging.peak_tflops is not set
KNOWN_PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "H800": 989.0, "B200": 2250.0, "L40S": 362.0}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for k, v in KNOWN_PEAKS.items():
        if k in name:
            return v
    return None


def keep_rows_up_to(path: Path, step: int) -> int:
    """Drop the rows of a metrics file past `step` (what a killed run logged after its last checkpoint, and a
    line the kill cut short); the number of rows kept."""
    if not path.exists():
        return 0
    kept = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["step"] <= step:
                kept.append(ln)
        except (ValueError, KeyError, TypeError):
            pass
    path.write_text("".join(ln + "\n" for ln in kept))
    return len(kept)


def pace(step_time: float | None, step: int, max_steps: int | None) -> str:
    """' 2.31 s/it, ETA 12 min 5 s' from the last logging interval's time per iteration (evaluation and saves
    inside it included), or '' before there is one."""
    if not step_time or not math.isfinite(step_time):
        return ""
    rate = f"{1 / step_time:.2f} it/s" if step_time < 1 else f"{step_time:.2f} s/it"
    if not max_steps or step >= max_steps:
        return f", {rate}"
    left = round(step_time * (max_steps - step))
    h, rem = divmod(left, 3600)
    m, sec = divmod(rem, 60)
    eta = f"{h} h {m} min" if h else f"{m} min {sec} s" if m else f"{sec} s"
    return f", {rate}, ETA {eta}"


class Monitor:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0,
                 max_steps: int | None = None):
        self.enabled = enabled
        self.max_steps = max_steps
        self.writer = None
        self.jsonl = None
        self.t0 = time.time()
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        path = out_dir / "metrics.jsonl"
        if resume_step:
            keep_rows_up_to(path, resume_step)
        self.jsonl = path.open("a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in sorted(values.items())}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        main = {k: clean[k] for k in ("gen/total", "fake/fm", "disc/loss", "perf/samples_per_s") if k in clean}
        line = f"[step {step}" + (f"/{self.max_steps}" if self.max_steps else "") + "] "
        line += " ".join(f"{k}={v:.4g}" for k, v in main.items())
        print(line + pace(clean.get("perf/step_time_s"), step, self.max_steps), flush=True)

    def images(self, step: int, tag: str, grid_CHW: torch.Tensor) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, grid_CHW.clamp(0, 1), step)
            self.writer.flush()

    def text(self, step: int, tag: str, message: str) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, message, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def image_grid(images_BCHW: torch.Tensor, nrow: int) -> torch.Tensor:
    """[-1, 1] images -> one [3, H', W'] grid in [0, 1]."""
    x = ((images_BCHW.float().clamp(-1, 1) + 1) / 2).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    b, c, h, w = x.shape
    ncol = max(1, min(nrow, b))
    nrows = math.ceil(b / ncol)
    grid = torch.ones(c, nrows * (h + 2) + 2, ncol * (w + 2) + 2)
    for i in range(b):
        r, q = divmod(i, ncol)
        grid[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + q * (w + 2) : 2 + q * (w + 2) + w] = x[i]
    return grid
