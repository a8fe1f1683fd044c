"""In-loop evaluation: Frechet distance of the generator's 4-step samples against the real data, and
their CLIP score and PickScore against their own captions when those models are given.

Every `eval.every` iterations the generator (and its EMA, when there is one)
samples the conditioning of a fixed evaluation set, 4-step stochastic and
Euler, with fixed noise; the samples are decoded, passed through a TorchScript
feature network (`eval.features`: clean-fid's Inception for real runs) and
compared with the features of the same samples' real latents, decoded
(computed once and cached in OUT/eval/). With `eval.clip` / `eval.pickscore` each
sample is also scored against its caption by that CLIP on the rank that drew it
(the formulas of `senseflow eval`).

What keeps it honest:
- The evaluation set is samples 0..N-1 of the data stream read by a separate
  data source with a one-replica view, so it is the same whatever the
  data-parallel layout; each DP replica samples every dp-th of them and the
  features are gathered in sample order. Sample i's noise comes from its own
  generator seeded by (train.seed, i), and samples run one at a time, so a
  sample's pixels do not depend on which rank or batch produced it: DP2 gives
  DP1's numbers.
- No random draw of training is touched: evaluation uses its own generators and
  its own data source, and leaves the generator's weights as it found them
  (the EMA is swapped in and the trained weights restored bit for bit). With
  evaluation on, the losses of every step are those of a run without it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .weights import trainable_params

EVAL_SEED = 7919  # offset of the evaluation noise streams from train.seed


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples)."""
    import warnings

    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # fewer samples than feature dimensions (the demo's 32) make the covariances singular: scipy warns, and
        # still returns the root that the distance needs (the FD of a few samples is a trend, not a score)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images, 1 or 3 channels -> uint8 RGB [N, 3, H, W] (what the feature networks take)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InLoopEval:
    def __init__(self, trainer):
        from .data_source import build_data_source

        t = self.trainer = trainer
        c = t.cfg.eval
        self.n = c.num_samples
        self.features = torch.jit.load(c.features, map_location="cpu").eval()
        # the first n samples of the stream, as one data-parallel replica would read them
        one = type("OneReplica", (), {"dp_rank": 0, "dp": 1})()
        source = build_data_source(t.cfg, one, t.latent_channels, t.latent_side, t.t_arch, torch.device("cpu"))
        rows: list[dict] = []
        try:
            for batch in source:
                b = batch["latent"].shape[0]
                rows += [{**{k: batch[k][i] for k in ("latent", "text", "pooled")},
                          "prompt": batch["prompt"][i] if "prompt" in batch else None} for i in range(b)]
                if len(rows) >= self.n:
                    break
        finally:
            source.shutdown()
        if len(rows) < self.n:
            from .config import ConfigError

            raise ConfigError(f"eval.num_samples={self.n} but the data holds only {len(rows)} samples.")
        self.rows = rows[: self.n]
        self.scorers = {}  # metric -> (model, processor): CLIP score and PickScore against each sample's caption
        for metric, where in (("clip", c.clip), ("pickscore", c.pickscore)):
            if where is None:
                continue
            if any(row["prompt"] is None for row in self.rows):
                from .config import ConfigError

                raise ConfigError(f"eval.{metric} scores samples against their captions, but the data has none.")
            from .eval_cli import load_clip

            model, proc = load_clip(where)
            self.scorers[metric] = (model.to(t.dev), proc)
        self.learned = {}  # metric -> an image_rewards scorer: HPSv2.1, ImageReward, the aesthetic score
        for metric, where in (("hpsv2", c.hpsv2), ("imagereward", c.imagereward), ("aesthetic", c.aesthetic)):
            if where is None:
                continue
            if metric != "aesthetic" and any(row["prompt"] is None for row in self.rows):
                from .config import ConfigError

                raise ConfigError(f"eval.{metric} scores samples against their captions, but the data has none.")
            from .eval_cli import learned_scorer

            self.learned[metric] = learned_scorer(metric, c.hpsv2, c.hpsv2_clip, c.imagereward, c.aesthetic,
                                                  c.clip).to(t.dev)
        # sample i is always in batch i // eval.batch, whatever the data-parallel size, so each sample sees the same
        # batched forwards and the numbers do not depend on the layout; replicas take whole batches in turn
        dp, r, b = t.env.dp, t.env.dp_rank, c.batch
        batches = [list(range(s, min(s + b, self.n))) for s in range(0, self.n, b)]
        self.mine = batches[r::dp]
        self.per_rank = -(-len(batches) // dp)  # every replica runs as many batches (collectives inside TP/PP groups)
        self.batch, self.first = b, batches[0]
        self.reference = self._reference()

    def _features(self, images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.features(to_uint8(images).cpu()).double().numpy()

    def _reference(self) -> np.ndarray | None:
        """Features of the real samples, decoded (rank 0; cached by what determines them)."""
        t = self.trainer
        if not t.env.is_main:
            return None
        c = t.cfg
        key = hashlib.sha256(json.dumps([c.data.path, c.data.seed, c.data.resolution, self.n, c.eval.features,
                                         c.roles.discriminator.vae]).encode()).hexdigest()[:16]
        path = Path(c.train.output_dir) / "eval" / f"reference-{key}.npy"
        if path.is_file():
            return np.load(path, allow_pickle=False)
        with torch.no_grad():
            feats = np.concatenate([self._features(t.codec.decode(row["latent"][None].to(t.dev).float()))
                                    for row in self.rows])
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, feats, allow_pickle=False)
        return feats

    @torch.no_grad()
    def _sample_all(self, mode: str) -> dict[int, np.ndarray]:
        from .sampling import sample_student

        t = self.trainer
        out = {}
        for j in range(self.per_rank):
            # padding: a replica short of batches repeats one, results dropped; a short batch repeats its last sample
            idx = self.mine[j] if j < len(self.mine) else (self.mine[-1] if self.mine else self.first)
            full = idx + [idx[-1]] * (self.batch - len(idx))
            gens = [torch.Generator().manual_seed(t.cfg.train.seed + EVAL_SEED + i) for i in full]
            noise = torch.cat([torch.randn(1, t.latent_channels, t.latent_side, t.latent_side, generator=g)
                               for g in gens]).to(t.dev)
            text = torch.stack([self.rows[i]["text"] for i in full]).to(t.dev)
            pooled = torch.stack([self.rows[i]["pooled"] for i in full]).to(t.dev)
            guide = t.objective.student_guidance(text)
            x0 = sample_student(lambda x, s: t.G.forward(x, s, text, pooled, guide), noise, t.taus, mode, gens)
            if j < len(self.mine):
                images = t.codec.decode(x0.float())
                for k, i in enumerate(idx):
                    out[i] = self._measure(images[k : k + 1], self.rows[i]["prompt"])
        return out

    def _measure(self, image: torch.Tensor, prompt: str | None) -> dict:
        """One decoded sample [1, C, H, W] in [-1, 1] -> its features and, per scorer, cos(image, caption)."""
        from .eval_cli import clip_cosines

        out = {"features": self._features(image)[0]}
        for metric, (model, proc) in self.scorers.items():
            out[metric] = float(clip_cosines(model, proc, [to_uint8(image)[0].cpu()], [prompt], 1, load=None)[0])
        for metric, scorer in self.learned.items():  # the decoded sample as the PNG `senseflow sample` writes
            out[metric] = float(scorer.scores([to_uint8(image)[0].cpu()], [prompt])[0])
        return out

    def _metrics(self, mine: dict[int, dict], suffix: str) -> dict[str, float]:
        """Collective: gather every replica's samples in sample order; the metrics on rank 0."""
        from .eval_cli import clip_score_of, pick_score_of

        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if not self.trainer.env.is_main:
            return {}
        merged = {}
        for part in gathered:
            merged.update(part)
        rows = [merged[i] for i in range(self.n)]
        logs = {f"fd_{suffix}": frechet_distance(np.stack([r["features"] for r in rows]), self.reference)}
        score_of = {"clip": lambda model, cos: clip_score_of(cos), "pickscore": pick_score_of}
        for metric, (model, _) in self.scorers.items():
            cosines = torch.tensor([r[metric] for r in rows], dtype=torch.float64)
            logs[f"{metric}_{suffix}"] = score_of[metric](model, cosines)
        for metric in self.learned:
            logs[f"{metric}_{suffix}"] = float(np.mean([r[metric] for r in rows]))
        return logs

    def run(self) -> dict[str, float]:
        """Collective. The metrics on rank 0 (empty elsewhere)."""
        t = self.trainer
        logs: dict[str, float] = {}
        variants = [("", None)] + ([("ema_", t.ema)] if t.ema is not None else [])
        for prefix, ema in variants:
            params = trainable_params(t.G.module)
            saved = [p.detach().clone() for p in params] if ema is not None else None
            if ema is not None:
                with torch.no_grad():
                    for p, s in zip(params, ema.state()):
                        p.copy_(s.to(p.dtype))
            try:
                for mode in ("stochastic", "euler"):
                    for k, v in self._metrics(self._sample_all(mode), mode).items():
                        logs[f"eval/{prefix}{k}"] = v
            finally:
                if saved is not None:
                    with torch.no_grad():
                        for p, s in zip(params, saved):
                            p.copy_(s)
        return logs
