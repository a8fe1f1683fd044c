"""`senseflow train CONFIG [overrides...] [--nproc N] [--dry-run [--json]]`.

One process per GPU. Under torchrun or srun the launcher's variables are
used; `--nproc N` starts N local processes through torch.distributed.run
(CPU runs use gloo). Rerunning the same command with the same
train.output_dir resumes from its latest checkpoint. `--dry-run` prints the
recipe card (recipe_card.py) and starts nothing. Options and overrides may
come in any order.
"""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="recipe YAML path or bundled recipe name (tiny, flux_dev, sd35_large, sd35_medium)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 train.max_steps=100")
    p.add_argument("--nproc", type=int, default=1, help="local processes to start (ignored under torchrun/srun)")
    p.add_argument("--dry-run", action="store_true", help="check the recipe and print its card; train nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: the card as one JSON object")
    p.parse_args = p.parse_intermixed_args  # type: ignore[method-assign]  (overrides after options too)


def _launched() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


# megatron-core and torch warn at import and on first use about optional CUDA packages and
# their own internal deprecations; expected on CPU or without apex, and they bury the
# progress lines. Anything else still shows.
_KNOWN_NOISE = (
    "Transformer Engine and Apex are not installed",
    "full scope is deprecated",
    "`load_state_dict` is deprecated",
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    # megatron-core's distributed optimizer reads .grad of its shard views in zero_grad
    "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
)


def process_start() -> None:
    """What every entry point (`senseflow VERB`, the rank entry below, torchrun's verify entry) does before it
    imports megatron-core: the known warnings quieted, the processes it forks ended with it
    (procs.children_die_with_me), and on a CPU-only machine megatron's fused kernels left uncompiled
    (cpu_megatron.leave_fusions_uncompiled)."""
    from .procs import children_die_with_me

    quiet_known_warnings()
    children_die_with_me()
    from .cpu_megatron import leave_fusions_uncompiled

    leave_fusions_uncompiled()


def quiet_known_warnings() -> None:
    import re
    import warnings

    for msg in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=re.escape(msg))
    import torch

    if not torch.cuda.is_available():
        # advice about overlapping CUDA streams; on a GPU it stays (slurm/env.sh sets the variable)
        warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended")


def run(args: argparse.Namespace) -> int:
    from . import signals

    signals.install()
    from . import preflight

    cfg = preflight.load_run_config(args.config, args.overrides)  # fail fast, before starting processes
    if args.dry_run:
        from .recipe_card import print_card

        return print_card(cfg, args.nproc if args.nproc > 1 else None, args.json)
    missing = preflight.missing_assets(cfg)
    if missing:
        from .config import ConfigError

        raise ConfigError(missing[0])
    if args.nproc > 1 and not _launched():
        cfg.validate(world_size=args.nproc)
        from .checkpoint import CheckpointManager
        from .launcher import launch

        ckpt = CheckpointManager(f"{cfg.train.output_dir}/checkpoints")
        return launch(args.nproc, [args.config, *args.overrides], ckpt.latest)
    return _train(cfg)


def _train(cfg) -> int:
    """This process's rank of the run; every way a run ends becomes one line and an exit code (errors.py)."""
    from . import errors, signals
    from .distributed import destroy_distributed, init_distributed
    from .trainer import run_training

    rank = int(os.environ.get("RANK", "0"))
    try:
        env = init_distributed(cfg.parallel, seed=cfg.train.seed, device=cfg.train.device)
        try:
            return run_training(cfg, env)
        finally:
            destroy_distributed()
    except errors.RunEnded as e:
        if rank == 0 or os.environ.get("SENSEFLOW_LAUNCHER"):
            print(f"senseflow train: {e}", file=sys.stderr, flush=True)
        _mark_failed(cfg, rank, e.exit_code, str(e))
        return e.exit_code
    except (KeyboardInterrupt, Exception) as e:
        if not signals.interrupted():
            _mark_failed(cfg, rank, 1, f"{type(e).__name__}: {e}")
            raise
        # Ctrl-C, or a collective broken because another rank stopped on it: no traceback
        if rank == 0 and not os.environ.get("SENSEFLOW_LAUNCHER"):  # the launcher says it for --nproc runs
            from .checkpoint import CheckpointManager

            last = CheckpointManager(f"{cfg.train.output_dir}/checkpoints").latest()
            where = f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"
            print(f"senseflow train: interrupted; {where} (rerun the same command to resume from it).",
                  file=sys.stderr, flush=True)
        return errors.INTERRUPTED


def _mark_failed(cfg, rank: int, code: int, reason: str) -> None:
    """OUT/FAILED for the Slurm job script: a rank whose peer is on a lost node ends with an error, but srun
    waits for the lost node's tasks until Slurm declares the node down (minutes); the script ends the
    step once this appears and the others had their grace (slurm/job.sh). Best effort: never masks the error."""
    import json
    from pathlib import Path

    from .checkpoint import FAILED_MARKER

    try:
        out = Path(cfg.train.output_dir)
        tmp = out / f".{FAILED_MARKER}.{rank}"
        tmp.write_text(json.dumps({"rank": rank, "exit_code": code, "reason": reason.splitlines()[0][:300] if reason else ""}) + "\n")
        os.replace(tmp, out / FAILED_MARKER)
    except OSError:
        pass


def main() -> int:
    """The rank entry (`python -m megatron_senseflow.train_cli`, under torchrun, srun or `--nproc`)."""
    from . import signals

    signals.install()  # before torch is imported: a signal during start-up must not kill the rank
    process_start()  # `senseflow train` does this in cli.main; this is the torchrun entry
    p = argparse.ArgumentParser(prog="senseflow train", description=__doc__)
    add_arguments(p)
    from .errors import USER_ERROR, UserError

    try:
        code = run(p.parse_args())
    except UserError as e:
        print(f"senseflow train: {e}", file=sys.stderr)
        code = USER_ERROR
    # end now: interpreter shutdown would join data-loader workers and other helper processes, which a
    # failed or interrupted run may have left blocked on a pipe nobody reads
    from . import mcore_compat

    mcore_compat.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
