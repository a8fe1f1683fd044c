"""Programs that the real-Slurm tests run as the job command (`senseflow slurm --entry ...`).

    python tests/slurm_jobs.py allreduce CONFIG [overrides...]
    python tests/slurm_jobs.py counter   CONFIG [overrides...]

Both take what `senseflow train` takes (the launcher appends the config,
train.output_dir, parallel.tp/pp and the user's overrides) and go through the
product's bootstrap, `megatron_senseflow.distributed.init_distributed`, so a
job proves the whole path srun -> SLURM_* -> launch_env -> gloo process group
-> megatron parallel_state.

`counter` obeys the trainer's side of the Slurm contract (slurm/README.md):
SIGUSR1/SIGTERM only set a flag; at the next step boundary the ranks agree
(all_reduce MAX of the flag, since the signal reaches ranks at different
moments), save, and exit 0 without the DONE marker; a rerun with the same
output directory resumes from the saved step; after the last step it saves and
rank 0 writes DONE. Its "loss" depends on a per-rank RNG stream and on state
carried across steps, so a resume that loses either shows up as different
numbers from an uninterrupted run (`run_counter` is also what the test calls
for that reference run).

Run as a script (by absolute path), so it imports only the installed package,
not the `tests` package.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

# Set before the slow imports: a USR1 that arrives while torch is still
# importing must not kill the process (the default action) but request a stop.
_STOP = {"requested": False, "signal": None}


def _request_stop(signum, _frame):
    _STOP["requested"] = True
    _STOP["signal"] = signal.Signals(signum).name


def install_stop_handlers() -> None:
    signal.signal(signal.SIGUSR1, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)


def _write_json(path: Path, data) -> None:
    # write-then-rename: a reader (or a resume) never sees half a file
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def allreduce(cfg, env) -> dict:
    import torch
    import torch.distributed as dist

    x = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(x)
    names = [None] * env.world_size
    dist.all_gather_object(names, socket.gethostname())
    result = {
        "rank": env.rank,
        "world_size": env.world_size,
        "local_rank": env.local_rank,
        "backend": env.backend,
        "tp": env.tp,
        "pp": env.pp,
        "dp": env.dp,
        "tp_rank": env.tp_rank,
        "dp_rank": env.dp_rank,
        "allreduce_sum": x.item(),
        "hosts": names,
        "slurm_procid": os.environ.get("SLURM_PROCID"),
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
    }
    out = Path(cfg.train.output_dir)
    _write_json(out / f"allreduce-rank{env.rank}.json", result)
    dist.barrier()
    if env.rank == 0:  # finished, in the contract's terms: no requeue
        _write_json(out / "DONE", {"step": 0})
    return result


def run_counter(env, out: Path, max_steps: int, step_seconds: float = 0.0, stoppable: bool = True) -> dict:
    """The contract-obeying loop; returns {'status': 'done'|'stopped', 'step': ...}."""
    import torch
    import torch.distributed as dist

    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    latest = ckpt_dir / "latest.json"
    metrics = out / "metrics.jsonl"

    gen = torch.Generator().manual_seed(1000 + env.rank)
    x = torch.zeros(4, dtype=torch.float64)
    start = 0
    if latest.exists():  # resume
        start = json.loads(latest.read_text())["step"]
        state = torch.load(ckpt_dir / f"step{start}-rank{env.rank}.pt")
        x = state["x"]
        gen.set_state(state["rng"])
        if env.rank == 0 and metrics.exists():
            # drop lines past the checkpoint, as TensorBoard's purge_step does
            kept = [l for l in metrics.read_text().splitlines() if json.loads(l)["step"] < start]
            metrics.write_text("".join(l + "\n" for l in kept))
        print(f"rank {env.rank}: resumed from step {start}", flush=True)

    def save(step: int) -> None:
        torch.save({"x": x, "rng": gen.get_state()}, ckpt_dir / f"step{step}-rank{env.rank}.pt")
        dist.barrier()  # every rank's shard is on disk before the pointer moves
        if env.rank == 0:
            _write_json(latest, {"step": step})
            # the product's pointer (megatron_senseflow/checkpoint.py): the job script
            # reads it to tell a failure after progress from one without
            (ckpt_dir / "latest").write_text(f"step_{step:08d}")
        dist.barrier()

    for step in range(start, max_steps):
        noise = torch.randn(4, generator=gen, dtype=torch.float64)
        x = 0.9 * x + noise
        dist.all_reduce(x)
        x /= env.world_size
        loss = float((x * x).mean())
        if env.rank == 0:
            with metrics.open("a") as f:
                f.write(json.dumps({"step": step, "loss": loss}) + "\n")
        time.sleep(step_seconds)
        # step boundary: stop only if some rank was asked to, and all together
        flag = torch.tensor([1.0 if (stoppable and _STOP["requested"]) else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and step + 1 < max_steps:
            save(step + 1)
            if env.rank == 0:  # the stop-save is published: the job script may requeue now
                _write_json(out / "STOPPED", {"step": step + 1})
            print(f"rank {env.rank}: {_STOP['signal'] or 'peer stop'} -> saved at step {step + 1}, exiting 0", flush=True)
            return {"status": "stopped", "step": step + 1}
    save(max_steps)
    if env.rank == 0:
        _write_json(out / "DONE", {"step": max_steps, "loss": loss if max_steps > start else None})
    print(f"rank {env.rank}: done at step {max_steps}", flush=True)
    return {"status": "done", "step": max_steps}


def main(argv: list[str]) -> int:
    install_stop_handlers()
    if len(argv) < 2 or argv[0] not in ("allreduce", "counter"):
        print("usage: slurm_jobs.py allreduce|counter CONFIG [overrides...]", file=sys.stderr)
        return 2
    mode, config, overrides = argv[0], argv[1], argv[2:]
    from megatron_senseflow.config import load_config
    from megatron_senseflow.distributed import destroy_distributed, init_distributed

    cfg = load_config(config, overrides)
    env = init_distributed(cfg.parallel, seed=cfg.train.seed, device="cpu", timeout_min=10)
    print(f"rank {env.rank}/{env.world_size} up (tp={env.tp} pp={env.pp} dp={env.dp}, SLURM_PROCID={os.environ.get('SLURM_PROCID')})", flush=True)
    if mode == "allreduce":
        allreduce(cfg, env)
    else:
        # The step time travels as an environment variable: the config has no
        # field for it and unknown override keys are an error.
        run_counter(
            env,
            Path(cfg.train.output_dir),
            cfg.train.max_steps,
            step_seconds=float(os.environ.get("SENSEFLOW_TEST_STEP_SECONDS", "0.5")),
        )
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
