"""Why the demo's raw generator, and its EMA under the re-noising sampler, trail the EMA's Euler samples:
measurements on a finished `senseflow demo` run (issue 28; the README's "What `make demo` shows" quotes them).

    python scripts/study_demo_students.py demo_out       # the --out of a finished `senseflow demo`

For each set of weights (the teacher's, the generator's, the EMA's, the EMA with the teacher's share taken out,
and blends of teacher and generator) it prints the Frechet distance to the real digits (the demo table's
digit-classifier features, 1000 samples, the demo's fixed noise) of
1. each step's x0 prediction under both 4-step samplers (Euler; re-noising, the paper's default);
2. one-step predictions from real digits noised to each anchor: the input the student trains on half the time.

The EMA starts from the generator's initial weights, which are the teacher's, and moves once per generator
update: after n updates at decay d it holds d^n of the teacher (0.99^90 = 0.40 in the demo). `ema_debiased`
= (EMA - d^n teacher) / (1 - d^n) is the same average of the generator's iterates without that share.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the --out folder of a finished `senseflow demo`")
    p.add_argument("--per-digit", type=int, default=100)
    p.add_argument("--blends", default="0.2,0.4,0.6", help="teacher shares of the teacher/generator weight blends")
    args = p.parse_args()

    from megatron_senseflow import demo, flow
    from megatron_senseflow.checkpoint import resolve_role_dir
    from megatron_senseflow.config import ParallelConfig
    from megatron_senseflow.distributed import destroy_distributed, init_distributed
    from megatron_senseflow.models import build_model, transformer_config
    from megatron_senseflow.models.checkpoint_io import checkpoint_arch, load_trained
    from megatron_senseflow.roles import Denoiser

    run = args.out / "run"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    teacher_dir = Path(cfg["roles"]["teacher"]["checkpoint"])
    decay = cfg["roles"]["generator"]["ema_decay"]
    updates = cfg["train"]["max_steps"] // cfg["distill"]["ttur"]  # EMA updates = generator updates
    init_distributed(ParallelConfig(), device="cpu")
    images, labels = demo.digit_images()
    net, _ = demo.train_classifier(images, labels)  # the demo table's classifier (seed 0)
    torch.set_grad_enabled(False)

    def load(path):
        arch = checkpoint_arch(path)
        m = build_model(arch, transformer_config(arch))
        load_trained(m, arch, path)
        return m.eval(), arch

    teacher, arch = load(teacher_dir)
    gen, _ = load(resolve_role_dir(run, "generator"))
    ema, _ = load(resolve_role_dir(run, "ema"))
    den = Denoiser(arch)
    T, G, E = (m.state_dict() for m in (teacher, gen, ema))
    share = decay ** updates

    def combine(coeffs: dict[str, float]):
        sd = {}
        for k, v in T.items():
            if torch.is_tensor(v) and v.is_floating_point():
                sd[k] = sum(c * {"T": T, "G": G, "E": E}[name][k] for name, c in coeffs.items())
            else:
                sd[k] = v
        m = build_model(arch, transformer_config(arch))
        m.load_state_dict(sd)
        return m.eval()

    models = {"teacher weights": teacher, "generator": gen, "ema": ema,
              "ema_debiased": combine({"E": 1 / (1 - share), "T": -share / (1 - share)})}
    for a in (float(x) for x in args.blends.split(",")):
        models[f"{a:g} teacher + {1 - a:g} generator"] = combine({"T": a, "G": 1 - a})

    ref = net.body(images).numpy().astype(np.float64)
    text = demo.digits_text()
    n = 10 * args.per_digit
    y = torch.arange(10).repeat_interleave(args.per_digit)
    c, pooled = text.encode([demo.prompt_for(int(v), i) for i, v in enumerate(y)])
    noise = torch.randn(n, 4, demo.RES // 2, demo.RES // 2, generator=torch.Generator().manual_seed(2024))
    taus = flow.anchors(4, flow.default_shift(arch, (demo.RES // 4) ** 2, 4))
    # real digits for the one-step predictions: the first n scans with their own prompts
    real = F.pixel_unshuffle(images[:n], 2)
    rc, rp = text.encode([demo.prompt_for(int(v), i) for i, v in enumerate(labels[:n])])
    eps = torch.randn(real.shape, generator=torch.Generator().manual_seed(5))

    def fd(x0, lab):
        return demo.score(net, F.pixel_shuffle(x0, 2).clamp(-1, 1), lab, ref)["fd"]

    def velocity(model, cc, pp):
        return lambda x, s: den.velocity(model(**den.kwargs(x, s, cc, pp)), x)

    def steps(model, mode):
        v, x, out = velocity(model, c, pooled), noise, []
        g = torch.Generator().manual_seed(7)  # the demo table's re-noising draws
        for k, tau in enumerate(taus):
            s = torch.full((n,), tau)
            vel = v(x, s)
            x0 = flow.x0_from_v(x, s, vel)
            out.append(fd(x0, y))
            nxt = taus[k + 1] if k + 1 < len(taus) else 0.0
            if mode == "euler":
                x = flow.euler(x, s, torch.full_like(s, nxt), vel)
            elif k + 1 < len(taus):
                x = flow.noise(x0, torch.randn(x.shape, generator=g), torch.full_like(s, nxt))
        return out

    def one_step(model):
        v = velocity(model, rc, rp)
        res = []
        for tau in taus:
            s = torch.full((n,), tau)
            x = flow.noise(real, eps, s)
            res.append(fd(flow.x0_from_v(x, s, v(x, s)), labels[:n]))
        return res

    anchors = ", ".join(f"{t:.3f}" for t in taus)
    print(f"run {run}: {updates} generator updates, EMA decay {decay}: the EMA holds {share:.3f} of the teacher")
    print(f"anchors {anchors}; FD of {n} samples (the demo table's Euler / re-noising rows are the step-4 columns)\n")
    head = "| weights | " + " | ".join(f"Euler x0 @{t:.2f}" for t in taus) + " | " + \
        " | ".join(f"re-noising x0 @{t:.2f}" for t in taus) + " | " + \
        " | ".join(f"one step from real @{t:.2f}" for t in taus) + " |"
    print(head)
    print("|---" * (1 + 3 * len(taus)) + "|")
    for name, model in models.items():
        cells = steps(model, "euler") + steps(model, "stochastic") + one_step(model)
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in cells) + " |", flush=True)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
