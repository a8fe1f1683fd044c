"""`senseflow demo`: the whole method on a laptop-class CPU with no downloads.

1. Data: scikit-learn's handwritten digits (1797 real 8x8 scans) upsampled to
   16 x 16, with prompts such as "a handwritten digit seven", written to
   webdataset shards and encoded by the product's own `prepare-data` code.
2. Teacher: a small FLUX-architecture model (our models/ code, local spec)
   trained here with rectified flow, 10% empty prompts for classifier-free
   guidance. Cached under --cache keyed by its config: a second run skips it.
3. Distillation: `senseflow train` on a generated recipe (SenseFlow objective,
   tiny DINOv2 discriminator, IDA, ISG) through the same code path as a cluster
   run, including the distributed bootstrap (`--nproc 2` runs TP=2).
4. Evaluation: a digit classifier trained on the real digits scores prompt
   accuracy and the Frechet distance of its features (generated vs real) for
   the teacher at 50 and 4 Euler steps and the student at 4 steps.

Text encoder: frozen random word embeddings (a fixed-seed table over the
prompt vocabulary; pooled = their mean). The teacher's trainable context and
pooled embedders learn to read them; a trained text encoder would add a
second model to train and explain nothing about distillation.

Latent space: exact space-to-depth of the gray image (2 x 2 pixels -> 4
channels), so the 8 x 8 x 4 "latent" packs into FLUX's 16 tokens of 16 channels
and decoding is lossless (codec.SpaceToDepth).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {w}", "the number {w} written by hand", "a scan of a handwritten {w}"]
RES = 16  # the scans are 8 x 8; 16 x 16 keeps every stroke and the CPU cost small
TEXT_LEN = 6

TEACHER = {  # FLUX.1 architecture fields (models/flux/arch.py), small
    "in_channels": 16, "num_layers": 2, "num_single_layers": 3, "attention_head_dim": 16, "num_attention_heads": 4,
    "joint_attention_dim": 64, "pooled_projection_dim": 64, "guidance_embeds": False, "axes_dims_rope": [4, 6, 6],
}
TEACHER_TRAIN = {"steps": 1500, "batch": 64, "lr": 2e-3, "cfg_drop": 0.1, "seed": 0}
DEMO_EVAL_SAMPLES = 32  # the demo run's in-loop evaluation: 32 fixed samples, 5 times (two batches of 16 a sampler)


# --------------------------------------------------------------------------- text and pixels


class DigitsText:
    """Frozen random word embeddings: prompts -> (text [B, L, D], pooled [B, P]); see the module docstring."""

    family = "flux"
    text_key = "t5.npy"
    pooled_key = "clip_pooled.npy"
    max_length = TEXT_LEN

    def __init__(self, dim: int, pooled_dim: int, seed: int = 1234):
        vocab = sorted({w for t in TEMPLATES for w in t.replace("{w}", "").split()} | set(WORDS))
        self.vocab = {w: i for i, w in enumerate(vocab)}
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(len(vocab), dim, generator=g)
        self.pool = torch.randn(dim, pooled_dim, generator=g) / math.sqrt(dim)

    @property
    def text_dim(self) -> int:
        return self.table.shape[1]

    @property
    def pooled_dim(self) -> int:
        return self.pool.shape[1]

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        text = torch.zeros(len(prompts), TEXT_LEN, self.text_dim)
        pooled = torch.zeros(len(prompts), self.pooled_dim)
        for i, p in enumerate(prompts):
            ids = [self.vocab[w] for w in p.lower().split() if w in self.vocab][:TEXT_LEN]
            if ids:
                emb = self.table[ids]
                text[i, : len(ids)] = emb
                pooled[i] = emb.mean(0) @ self.pool
        return text, pooled


def digits_text() -> DigitsText:
    return DigitsText(TEACHER["joint_attention_dim"], TEACHER["pooled_projection_dim"])


class GrayLatent:
    """The latent codec `prepare-data --encode` calls: RGB in [-1, 1] -> gray -> space-to-depth."""

    latent_channels, factor = 4, 2

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images.float().mean(1, keepdim=True), 2)

    def describe(self) -> dict:
        return {"latent_channels": self.latent_channels, "vae_scale_factor": self.factor, "shift_factor": 0.0,
                "scaling_factor": 1.0, "latent": "gray image, 2 x 2 space-to-depth"}


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as [N, 1, RES, RES] in [-1, 1] (ink bright), and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(RES, RES), mode="bilinear", align_corners=False).clamp(0, 1)
    return x * 2 - 1, torch.tensor(d.target)


def prompt_for(label: int, k: int = 0) -> str:
    return TEMPLATES[k % len(TEMPLATES)].format(w=WORDS[label])


# --------------------------------------------------------------------------- data


def write_data(out: Path, text: DigitsText) -> Path:
    """Digits -> image folder -> shards (prepare-data) -> encoded shards (prepare-data --encode)."""
    from PIL import Image

    from megatron_senseflow.data.encode import EncodeSettings, encode_shards
    from megatron_senseflow.data.write import WriteSettings, write_shards

    encoded = out / "encoded"
    if (encoded / "manifest.json").is_file():
        return encoded
    images, labels = digit_images()
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        arr = ((img[0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).convert("RGB").save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(prompt_for(int(y), i))
    write_shards(WriteSettings(format="folder", input=str(folder), resolution=RES, min_side=RES, min_aesthetic=0.0,
                               max_samples_per_shard=300), out / "shards")
    encode_shards(EncodeSettings(input=str(out / "shards"), model_path=str(out / "encoder"), family="flux",
                                 text_max_length=TEXT_LEN, text_dtype="float32"), encoded, text, GrayLatent())
    return encoded


# --------------------------------------------------------------------------- teacher


def config_key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def train_teacher(directory: Path, text: DigitsText, log, steps: int | None = None) -> None:
    """Rectified-flow training of the small FLUX teacher on all digits (single process)."""
    from megatron_senseflow import flow
    from megatron_senseflow.config import ParallelConfig
    from megatron_senseflow.distributed import destroy_distributed, init_distributed
    from megatron_senseflow.roles import Denoiser
    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.checkpoint_io import save_model
    from megatron_senseflow.models.configs import make_arch

    tt = {**TEACHER_TRAIN, "steps": steps or TEACHER_TRAIN["steps"]}
    init_distributed(ParallelConfig(), seed=tt["seed"], device="cpu")
    arch = make_arch("tiny-flux", TEACHER)
    model = build_model(arch, transformer_config(arch))
    den = Denoiser(arch)
    images, labels = digit_images()
    latents = F.pixel_unshuffle(images, 2)
    prompts = [prompt_for(int(y), i) for i, y in enumerate(labels)]
    txt, pooled = text.encode(prompts)
    empty_t, empty_p = text.encode([""])
    opt = torch.optim.AdamW(model.parameters(), lr=tt["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * s / tt["steps"])))
    g = torch.Generator().manual_seed(tt["seed"])
    t0 = time.time()
    for step in range(tt["steps"]):
        idx = torch.randint(0, len(latents), (tt["batch"],), generator=g)
        x0, c, p = latents[idx], txt[idx].clone(), pooled[idx].clone()
        drop = torch.rand(tt["batch"], generator=g) < tt["cfg_drop"]
        c[drop], p[drop] = empty_t[0], empty_p[0]
        t = flow.logit_normal(torch.randn(tt["batch"], generator=g), 0.0, 1.0)
        eps = torch.randn(x0.shape, generator=g)
        v = den.velocity(model(**den.kwargs(flow.noise(x0, eps, t), t, c, p)), x0)
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == tt["steps"] - 1:
            log(f"teacher step {step + 1}/{tt['steps']}: flow-matching loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    save_model(model, arch, directory)
    destroy_distributed()


def ensure_teacher(cache: Path, log, steps: int | None = None) -> tuple[Path, DigitsText]:
    train = {**TEACHER_TRAIN, "steps": steps or TEACHER_TRAIN["steps"]}
    key = config_key({"arch": TEACHER, "train": train, "templates": TEMPLATES, "res": RES, "v": 1})
    root = cache / f"teacher-{key}"
    text = digits_text()
    if (root / "senseflow_model.json").is_file():
        log(f"teacher: cached at {root}")
        return root, text
    log(f"teacher: training {root} (once; later runs reuse it)")
    tmp = root.with_name(root.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    # a separate process: the teacher's process group must not outlive it
    code = ("import sys; from pathlib import Path; from megatron_senseflow import train_cli; "
            "train_cli.process_start(); from megatron_senseflow import demo; "
            "demo.train_teacher(Path(sys.argv[1]), demo.digits_text(), print, int(sys.argv[2]))")
    rc = subprocess.call([sys.executable, "-c", code, str(tmp), str(train["steps"])])
    if rc != 0:
        raise RuntimeError(f"teacher training failed (exit {rc})")
    tmp.rename(root)
    return root, text


# --------------------------------------------------------------------------- evaluation


class DigitNet(nn.Module):
    """Small CNN digit classifier; its penultimate features define the Frechet distance."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (RES // 4) ** 2, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> tuple[DigitNet, float]:
    """Trained on 80% of the real digits (with small shifts); returns the model and its held-out accuracy."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    n = int(0.8 * len(images))
    tr, te = perm[:n], perm[n:]
    torch.manual_seed(seed)
    net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for epoch in range(8):
        order = tr[torch.randperm(n, generator=g)]
        for i in range(0, n, 64):
            b = order[i : i + 64]
            x = images[b]
            shift = torch.randint(-1, 2, (2,), generator=g)
            x = torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            loss = F.cross_entropy(net(x), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(images[te]).argmax(1) == labels[te]).float().mean().item()
    return net, acc


@torch.no_grad()
def score(net: DigitNet, images: torch.Tensor, labels: torch.Tensor, ref_feats: np.ndarray) -> dict[str, float]:
    feats = net.body(images)
    acc = (net.head(feats).argmax(1) == labels).float().mean().item()
    from .evaluation import frechet_distance

    return {"fd": frechet_distance(feats.numpy().astype(np.float64), ref_feats), "accuracy": acc}


SAMPLERS = ("teacher_50", "teacher_4", "student_4_stochastic", "student_4_euler", "ema_4_stochastic", "ema_4_euler")


def evaluate(run_dir: Path, teacher_dir: Path, text: DigitsText, out: Path, per_digit: int, cfg_scale: float, log,
             which: tuple[str, ...] = SAMPLERS, grid: bool = True, classifier: tuple | None = None) -> dict:
    """Samples from teacher (50 and 4 Euler steps, CFG) and the student (4 steps, both samplers) -> table + grid.
    `classifier`: (net, held-out accuracy) of train_classifier, when the caller has trained it already."""
    from megatron_senseflow import flow
    from megatron_senseflow.config import ParallelConfig
    from megatron_senseflow.distributed import destroy_distributed, init_distributed
    from megatron_senseflow.roles import Denoiser
    from megatron_senseflow.sampling import guided, sample_euler, sample_student
    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.checkpoint_io import checkpoint_arch, load_trained

    init_distributed(ParallelConfig(), device="cpu")
    images, labels = digit_images()
    net, held_out = classifier or train_classifier(images, labels)
    with torch.no_grad():
        ref = net.body(images).numpy().astype(np.float64)
    log(f"digit classifier: {held_out:.1%} accuracy on held-out real digits")

    def load(path):
        arch = checkpoint_arch(path)
        m = build_model(arch, transformer_config(arch))
        load_trained(m, arch, path)  # full weights, or a LoRA student's adapters over the teacher
        return m.eval(), Denoiser(arch)

    teacher, t_den = load(teacher_dir)
    from megatron_senseflow.checkpoint import resolve_role_dir
    from megatron_senseflow.models.checkpoint_io import CheckpointError

    student, s_den = load(resolve_role_dir(run_dir, "generator"))
    # the EMA of the generator is the student a run ships (as in DMD2 and the paper); scored beside the raw one
    try:
        ema = load(resolve_role_dir(run_dir, "ema"))[0]
    except CheckpointError:  # a run without ema_decay
        ema = None
    y = torch.arange(10).repeat_interleave(per_digit)
    prompts = [prompt_for(int(v), i) for i, v in enumerate(y)]
    c, p = text.encode(prompts)
    ec, ep = text.encode([""] * len(prompts))
    noise = torch.randn(len(y), 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(2024))
    num_tokens = (RES // 4) ** 2
    m = flow.default_shift(s_den.arch, num_tokens, 4)
    taus = flow.anchors(4, m)

    def vel(model, den, cc, pp):
        return lambda x, s: den.velocity(model(**den.kwargs(x, s, cc, pp)), x)

    t_guided = guided(vel(teacher, t_den, c, p), vel(teacher, t_den, ec, ep), cfg_scale)
    results, rows = {}, {}
    with torch.no_grad():
        samplers = {
            "teacher_50": lambda: sample_euler(t_guided, noise, flow.teacher_sigmas(50, m)),
            "teacher_4": lambda: sample_euler(t_guided, noise, flow.teacher_sigmas(4, m)),
            "student_4_stochastic": lambda: sample_student(vel(student, s_den, c, p), noise, taus, "stochastic",
                                                           torch.Generator().manual_seed(7)),
            "student_4_euler": lambda: sample_student(vel(student, s_den, c, p), noise, taus, "euler"),
        }
        if ema is not None:
            samplers["ema_4_stochastic"] = lambda: sample_student(vel(ema, s_den, c, p), noise, taus, "stochastic",
                                                                  torch.Generator().manual_seed(7))
            samplers["ema_4_euler"] = lambda: sample_student(vel(ema, s_den, c, p), noise, taus, "euler")
        for name, fn in samplers.items():
            if name not in which:
                continue
            t0 = time.time()
            img = F.pixel_shuffle(fn(), 2).clamp(-1, 1)
            results[name] = score(net, img, y, ref)
            results[name]["seconds"] = round(time.time() - t0, 2)
            rows[name] = img[torch.arange(10) * per_digit]  # the first sample of each digit
            log(f"{name}: FD {results[name]['fd']:.2f}, prompt accuracy {results[name]['accuracy']:.1%}")
    results["real"] = {"classifier_held_out_accuracy": held_out}
    if grid:
        save_grid(rows, out / "grid.png")
    destroy_distributed()
    return results


def save_grid(rows: dict[str, torch.Tensor], path: Path) -> None:
    """One row per sampler, digits 0-9 left to right, 2x upscaled."""
    from PIL import Image

    tiles = []
    for imgs in rows.values():
        row = torch.cat([F.pad((im[0] + 1) / 2, (1, 1, 1, 1), value=1.0) for im in imgs], dim=1)
        tiles.append(row)
    grid = torch.cat(tiles, dim=0)
    arr = (grid.clamp(0, 1).numpy() * 255).astype(np.uint8)
    Image.fromarray(arr).resize((arr.shape[1] * 3, arr.shape[0] * 3), Image.NEAREST).save(path)


# --------------------------------------------------------------------------- the command


def demo_recipe(teacher: Path, data: Path, out: Path, steps: int, nproc: int, cfg: float, lora: int = 0,
                ttur: int = 5, ema_decay: float = 0.99) -> dict:
    """The demo's distillation recipe. TTUR 5 with an EMA of decay 0.99 is what brought the student within
    1.3x of the teacher's FD at 450 iterations (TTUR 2 without EMA: 1.8x at 300); the ablations keep TTUR 2
    without EMA, the setting their table was measured with."""
    recipe = {
        "purpose": "demo",
        "method": "senseflow",
        "model": {"preset": "tiny-flux", "arch": TEACHER, "params_dtype": "float32"},
        "parallel": {"tp": nproc},
        "data": {"path": str(data), "encoded": True, "resolution": RES, "micro_batch_size": 64, "num_workers": 0,
                 "shuffle_buffer": 500, "text_max_length": TEXT_LEN},
        "roles": {
            "teacher": {"checkpoint": str(teacher), "precision": "fp32"},
            "generator": {"precision": "fp32", "ema_decay": ema_decay, "optimizer": {"lr": 5e-5, "warmup_steps": 20}},
            "fake_score": {"precision": "fp32", "optimizer": {"lr": 3e-4}},
            "discriminator": {"precision": "fp32", "feature_layers": [1, 3], "text_condition": "pooled",
                              "optimizer": {"lr": 2e-4}},
        },
        "distill": {"num_steps": 4, "ttur": ttur, "guidance_mode": "cfg", "dmd_guidance": [cfg, cfg],
                    "isg_guidance": [cfg, cfg], "ida_lambda": 0.97, "isg_weight": 1.0, "gan_weight": 0.1},
        "train": {"max_steps": steps, "output_dir": str(out), "seed": 1, "device": "cpu"},
        "checkpoint": {"every": 100, "keep_last": 2},
        "logging": {"log_every": max(1, min(10, steps // 10)), "image_every": 100},
    }
    if lora:  # adapters of rank `lora` (alpha = rank) over the shared teacher; adapters want a 10x larger LR
        for role in ("generator", "fake_score"):
            rc = recipe["roles"][role]
            rc["lora"] = {"rank": lora, "alpha": float(lora)}
            rc["optimizer"]["lr"] *= 10
    return recipe


# --------------------------------------------------------------------------- ablations in miniature

# the paper's Fig. 3 (DMD2 at TTUR 5/10/20 against SenseFlow's IDA at TTUR 5/10) and Table 3 (without ISG,
# without the GAN term), plus SiD; each a change of the demo recipe
ABLATIONS = {
    "dmd2_ttur5": {"method": "dmd2", "distill": {"ttur": 5}},
    "dmd2_ttur10": {"method": "dmd2", "distill": {"ttur": 10}},
    "dmd2_ttur20": {"method": "dmd2", "distill": {"ttur": 20}},
    "senseflow_ttur5": {"distill": {"ttur": 5}},
    "senseflow_ttur10": {"distill": {"ttur": 10}},
    "senseflow_ttur20": {"distill": {"ttur": 20}},
    # Fig. 3's claim isolated: SenseFlow without IDA (lambda 1: the fake score is not blended), each TTUR
    "senseflow_no_ida_ttur5": {"distill": {"ttur": 5, "ida_lambda": 1.0}},
    "senseflow_no_ida_ttur10": {"distill": {"ttur": 10, "ida_lambda": 1.0}},
    "senseflow_no_ida_ttur20": {"distill": {"ttur": 20, "ida_lambda": 1.0}},
    "senseflow_no_isg": {"distill": {"isg_weight": 0.0}},
    "senseflow_no_gan": {"distill": {"gan_weight": 0.0}},
    # the authors' discriminator update (docs/recipes.md, difference 11), one switch at a time, at TTUR 5
    "senseflow_ttur5_carried_grad": {"distill": {"ttur": 5}, "roles": {"discriminator": {"generator_grad": "carried"}}},
    "senseflow_ttur5_authors_sn": {"distill": {"ttur": 5}, "roles": {"discriminator": {"spectral_norm": "authors"}}},
    "sid": {"method": "sid"},
}


# what `--ablate` runs without --variants (the README's table); the IDA/TTUR grid and the switches are named
DEFAULT_ABLATIONS = ["dmd2_ttur5", "dmd2_ttur10", "dmd2_ttur20", "senseflow_ttur5", "senseflow_ttur10",
                     "senseflow_no_isg", "senseflow_no_gan", "sid"]


class DigitFeatures(nn.Module):
    """The evaluation classifier's features with the in-loop evaluation's calling convention
    (uint8 RGB [N, 3, H, W] -> [N, 64]), saved as TorchScript for eval.features."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x[:, :1].float() / 127.5 - 1.0)


def save_features(net: DigitNet, out: Path) -> Path:
    """The classifier's features as the TorchScript file eval.features reads."""
    path = out / "digit_features.pt"
    torch.jit.script(DigitFeatures(net.body)).save(str(path))
    return path


def _merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for k, v in change.items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def fd_spread(curve: list[float]) -> float:
    """Oscillation: max - min of the Frechet distance over the last third of the evaluations."""
    tail = curve[len(curve) - max(1, len(curve) // 3):]
    return max(tail) - min(tail)


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """FD against iteration, one line per variant, with axes, grid and legend (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=100)
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", markersize=3, linewidth=1.5, label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("Frechet distance (digit-classifier features)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


SEED_KEYS = ("final_fd", "best_fd", "fd_spread_last_third", "accuracy_euler", "accuracy_stochastic",
             "fd_euler_after", "fd_stochastic_after")


def summarise_seeds(runs: list[dict]) -> dict:
    """Mean, sample standard deviation (0 for one seed), min and max over seeds of each number; total seconds."""
    out = {"seeds": [r["seed"] for r in runs], "seconds": round(sum(r["seconds"] for r in runs), 1)}
    for k in SEED_KEYS:
        v = np.array([r[k] for r in runs], dtype=np.float64)
        out[k] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                  "min": float(v.min()), "max": float(v.max())}
    return out


def ablation_table(rows: dict, seeds: int, eval_images: int) -> list[str]:
    def cell(x, pct=False):
        f = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.2f}")
        return f(x["mean"]) + (f" ± {f(x['sd'])}" if seeds > 1 else "")

    what = "mean ± sd over seeds " + ", ".join(str(s) for s in next(iter(rows.values()))["seeds"]) if seeds > 1 else "one seed"
    lines = [f"({what})", "",
             "| variant | final FD | best FD | FD spread, last third | prompt accuracy (Euler / stochastic) | "
             f"FD, {eval_images} samples (Euler) | FD, {eval_images} samples (stochastic) | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {cell(r['final_fd'])} | {cell(r['best_fd'])} | {cell(r['fd_spread_last_third'])} | "
                     f"{cell(r['accuracy_euler'], True)} / {cell(r['accuracy_stochastic'], True)} | "
                     f"{cell(r['fd_euler_after'])} | {cell(r['fd_stochastic_after'])} | {r['seconds']:.0f} s |")
    return lines


def ablate(args, teacher: Path, text: DigitsText, data: Path, out: Path, log) -> int:
    """Every variant of ABLATIONS (or --variants) from the one cached teacher, with the in-loop evaluation on."""
    import yaml

    images, labels = digit_images()
    net, acc = train_classifier(images, labels)
    feats = save_features(net, out)
    names = args.variants.split(",") if args.variants else DEFAULT_ABLATIONS
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        from .config import ConfigError

        raise ConfigError(f"unknown ablation variant(s) {unknown}; choose from {', '.join(ABLATIONS)}.")
    every = max(1, args.steps // 10)
    rows, curves, runs = {}, {}, {}
    for name in names:
        for extra_seed in range(args.seeds):
            tag = name if extra_seed == 0 else f"{name}_seed{extra_seed}"
            run_dir = out / "ablation" / tag
            recipe = _merge(demo_recipe(teacher, data, run_dir, args.steps, 1, args.cfg, ttur=2, ema_decay=0.0),
                            ABLATIONS[name])
            recipe["train"]["seed"] += extra_seed  # the first seed is the demo's own
            recipe["eval"] = {"every": every, "num_samples": args.eval_samples or 128, "batch": 32,
                              "features": str(feats)}
            recipe["logging"]["image_every"] = 0
            path = out / "ablation" / f"{tag}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            log(f"ablation {tag}: senseflow train {path}")
            t0 = time.time()
            # evaluate() of the previous variant initialised torch.distributed in this process, which left its
            # rendezvous variables in os.environ (and its port bound): the next run must choose its own
            env = {k: v for k, v in os.environ.items()
                   if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
            rc = subprocess.call([sys.executable, "-m", "megatron_senseflow.cli", "train", str(path)],
                                 stdout=subprocess.DEVNULL, env=env)
            seconds = time.time() - t0
            if rc != 0:
                print(f"senseflow demo: ablation {tag} failed (exit {rc}); rerun {path} to see why.", file=sys.stderr)
                return rc
            evals = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
            curve = [(r["step"], r["eval/fd_euler"]) for r in evals if "eval/fd_euler" in r]
            res = evaluate(run_dir, teacher, text, out, args.per_digit, args.cfg, log,
                           which=("student_4_stochastic", "student_4_euler"), grid=False, classifier=(net, acc))
            fds = [v for _, v in curve]
            runs.setdefault(name, []).append({
                "seed": recipe["train"]["seed"], "curve": curve, "final_fd": fds[-1], "best_fd": min(fds),
                "fd_spread_last_third": fd_spread(fds), "accuracy_euler": res["student_4_euler"]["accuracy"],
                "accuracy_stochastic": res["student_4_stochastic"]["accuracy"],
                "fd_euler_after": res["student_4_euler"]["fd"],
                "fd_stochastic_after": res["student_4_stochastic"]["fd"], "seconds": round(seconds, 1)})
        rows[name] = summarise_seeds(runs[name])
        curves[name] = [(step, float(np.mean([r["curve"][i][1] for r in runs[name]])))
                        for i, (step, _) in enumerate(runs[name][0]["curve"])]
    seeds = f", mean over {args.seeds} seeds" if args.seeds > 1 else ""
    plot_curves(curves, out / "ablation.png",
                f"in-loop FD (Euler, {args.eval_samples or 128} samples{seeds}) against iteration, {args.steps} iterations, "
                "batch 64")
    lines = ablation_table(rows, args.seeds, 10 * args.per_digit)
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    (out / "ablation.json").write_text(json.dumps({"rows": rows, "curves": curves, "runs": runs}, indent=1))
    print("\n".join(lines))
    print(f"\nablation: {out / 'ablation.png'}  {out / 'ablation.md'}  {out / 'ablation.json'}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (results.json, grid.png, the training run)")
    p.add_argument("--cache", default=os.environ.get("SENSEFLOW_CACHE", str(Path.home() / ".cache" / "megatron_senseflow")),
                   help="where the trained teacher is cached (keyed by its config)")
    p.add_argument("--nproc", type=int, default=1, help="processes for the distillation (2 runs TP=2)")
    p.add_argument("--steps", type=int, default=450, help="distillation iterations")
    p.add_argument("--per-digit", type=int, default=100, help="samples per digit for the evaluation")
    p.add_argument("--cfg", type=float, default=1.0, help="teacher CFG scale, in distillation and for the teacher rows")
    p.add_argument("--ablate", action="store_true",
                   help="instead of the one student: train the ablation variants (DMD2 at TTUR 5/10/20, SenseFlow at "
                        "TTUR 5/10, without ISG, without the GAN term, SiD) with the in-loop evaluation on; writes "
                        "ablation.png (FD against iteration) and ablation.md / .json")
    p.add_argument("--variants", default=None,
                   help="comma list of ablation variants (default: " + ",".join(DEFAULT_ABLATIONS) + "; also: "
                        + ",".join(k for k in ABLATIONS if k not in DEFAULT_ABLATIONS) + ")")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs of each ablation variant with train.seed 1, 2, ...: the table gives mean ± sd")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="fixed samples of the in-loop evaluation (TensorBoard's eval/fd_* curves): the demo run "
                        f"evaluates them 5 times (default {DEMO_EVAL_SAMPLES}; 0 turns it off), each ablation variant "
                        "10 times (default 128)")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="distil LoRA students: adapters of this rank over the shared teacher (0: full fine-tuning)")
    p.add_argument("--teacher-steps", type=int, default=TEACHER_TRAIN["steps"],
                   help="teacher training steps (fewer only for smoke tests: a weak teacher makes a weak student)")


def run(args: argparse.Namespace) -> int:
    import yaml

    t_start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[demo {time.time() - t_start:5.0f}s] {msg}", flush=True)

    teacher, text = ensure_teacher(Path(args.cache), log, args.teacher_steps)
    data = write_data(out, text)
    log(f"data: encoded shards in {data}")
    if args.ablate:
        return ablate(args, teacher, text, data, out, log)
    run_dir = out / "run"
    # the table's classifier, trained once: its features also drive the in-loop evaluation (TensorBoard's eval/fd_*
    # curves of the generator and the EMA, both samplers)
    images, labels = digit_images()
    classifier = train_classifier(images, labels)
    spec = demo_recipe(teacher, data, run_dir, args.steps, args.nproc, args.cfg, lora=args.lora)
    n_eval = DEMO_EVAL_SAMPLES if args.eval_samples is None else args.eval_samples
    if n_eval:
        spec["eval"] = {"every": max(1, args.steps // 5), "num_samples": n_eval, "batch": min(n_eval, 16),
                        "features": str(save_features(classifier[0], out))}
    recipe = out / "demo_recipe.yaml"
    recipe.write_text(yaml.safe_dump(spec, sort_keys=False))
    log(f"distillation: senseflow train {recipe} --nproc {args.nproc}")
    # one thread per rank: the demo model's ops are too small to split over cores (on 2 cores, 0.68 s per iteration
    # against 1.38 s with two threads); the teacher's training and the evaluation do not change with it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rc = subprocess.call([sys.executable, "-m", "megatron_senseflow.cli", "train", str(recipe), "--nproc", str(args.nproc)],
                         env=env)
    if rc != 0:
        print(f"senseflow demo: distillation failed (exit {rc}); its output is above.", file=sys.stderr)
        return rc
    results = evaluate(run_dir, teacher, text, out, args.per_digit, args.cfg, log, classifier=classifier)
    results["seconds_total"] = round(time.time() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\nsampler                 Frechet distance   prompt accuracy")
    for name in SAMPLERS:
        if name not in results:
            continue
        r = results[name]
        print(f"{name:22s} {r['fd']:16.2f} {r['accuracy']:16.1%}")
    print(f"\nresults: {out / 'results.json'}   grid: {out / 'grid.png'}   TensorBoard: {run_dir / 'tensorboard'}")
    return 0
