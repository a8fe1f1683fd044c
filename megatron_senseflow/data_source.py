"""What the trainer iterates over: encoded webdataset shards (data/loader.py) or synthetic batches.

Both yield dicts on the training device: "latent" [B, C, H, W], "text" [B, L, D],
"pooled" [B, P], optionally "image" [B, 3|1, R, R] in [-1, 1], "neg_text" /
"neg_pooled" (empty-prompt embeddings for real CFG), and "prompt". Both have
`state_dict()` / `load_state_dict()` / `merge_states()` so the position is
part of the checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import Config, ConfigError
from .rng import BatchRandom, sample_ids


class _Checkpointed:
    """Checkpoint part of a data source: the position of every data-parallel replica, merged into
    one record (`data_state.json`) from which any DP layout resumes."""

    name = "data"
    FILE = "data_state.json"
    dp_rank: int
    dp_size: int

    def save_state(self, step_dir: Path, async_save: bool = False) -> list:  # collective
        import torch.distributed as dist

        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, (self.dp_rank, self.state_dict()))
        per_dp = dict(states)  # ranks of one replica hold the same position
        merged = self.merge_states([per_dp[r] for r in range(self.dp_size)])
        if dist.get_rank() == 0:
            (step_dir / self.FILE).write_text(json.dumps(merged))
        return []

    def load_state(self, step_dir: Path) -> None:
        self.load_state_dict(json.loads((step_dir / self.FILE).read_text()))

    def shutdown(self) -> None:
        """End of a run: stop any worker processes at once."""


class SyntheticData(_Checkpointed):
    """Random samples that are a function of (data seed, global sample index): tests and smoke runs.

    Sample i is the same whatever the DP layout, so runs on different layouts see the same data.
    """

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, latent_channels: int, latent_side: int, arch, device):
        self.cfg, self.dp_rank, self.dp_size, self.device = cfg, dp_rank, dp_size, device
        self.shape = (latent_channels, latent_side, latent_side)
        self.text_shape = (cfg.data.text_max_length, arch.text_dim)
        self.pooled_dim = arch.pooled_dim
        self.batch = cfg.data.micro_batch_size * cfg.parallel.num_microbatches
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        ids = sample_ids(self.index, self.batch * self.dp_size, self.dp_rank, self.batch)
        rnd = BatchRandom(self.cfg.data.seed, 7, 0, ids)
        self.index += 1
        out = {"latent": rnd.randn(*self.shape), "text": rnd.randn(*self.text_shape), "pooled": rnd.randn(self.pooled_dim)}
        out["neg_text"] = torch.zeros_like(out["text"])
        out["neg_pooled"] = torch.zeros_like(out["pooled"])
        out = {k: v.to(self.device) for k, v in out.items()}
        out["prompt"] = [f"synthetic sample {i}" for i in ids]
        return out

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        return {"index": max(s["index"] for s in states)}


class ShardData(_Checkpointed):
    """Encoded shards through data.loader.ShardLoader, moved to the device, with empty-prompt embeddings."""

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, device):
        from megatron_senseflow.data.loader import ShardLoader

        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.loader = ShardLoader(cfg.data, dp_rank=dp_rank, dp_size=dp_size)
        self.device = device
        self.neg = self._empty_prompt(cfg.data.path)
        self._it = None

    @staticmethod
    def _empty_prompt(path: str) -> dict | None:
        from safetensors.torch import load_file

        root = Path(path)
        root = root if root.is_dir() else root.parent
        f = root / "empty_prompt.safetensors"
        return load_file(str(f)) if f.is_file() else None

    def __iter__(self):
        self._it = iter(self.loader)
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        out = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if self.neg is not None:
            b = out["text"].shape[0]
            out["neg_text"] = self.neg["text"].to(self.device).expand(b, -1, -1)[:, : out["text"].shape[1]]
            out["neg_pooled"] = self.neg["pooled"].to(self.device).expand(b, -1)
        return out

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def merge_states(self, states: list[dict]) -> dict:
        return type(self.loader).merge_states(states)

    def shutdown(self) -> None:
        self.loader.shutdown()


def build_data_source(cfg: Config, env, latent_channels: int, latent_side: int, arch, device):
    if cfg.data.path is None:
        return SyntheticData(cfg, env.dp_rank, env.dp, latent_channels, latent_side, arch, device)
    if not cfg.data.encoded:
        raise ConfigError(
            "training reads encoded shards (data.encoded=true); encode images first with "
            "`senseflow prepare-data --encode`."
        )
    return ShardData(cfg, env.dp_rank, env.dp, device)
