"""`senseflow` command line: one verb per job, each implemented in its own module.

Verbs import their module lazily so `senseflow --help` stays fast and a
verb's heavy imports (megatron-core, diffusers) are paid only when used.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module that defines `add_arguments(parser)` and `run(args) -> int`, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("megatron_senseflow.train_cli", "distil a teacher into a few-step student (SenseFlow / DMD2 / SiD)"),
    "sample": ("megatron_senseflow.sample_cli", "1/2/4-step sampling from a checkpoint or an exported diffusers model"),
    "convert": ("megatron_senseflow.tools.convert_checkpoint", "convert weights between diffusers and Megatron layouts (import / export)"),
    "export": ("megatron_senseflow.tools.convert_checkpoint", "export a trained role to a diffusers transformer / pipeline directory"),
    "verify": ("megatron_senseflow.tools.verify_conversion", "check a converted checkpoint against diffusers' model (any TP/PP)"),
    "prepare-data": ("megatron_senseflow.data.prepare", "write webdataset shards from LAION-style sources; --encode adds latents"),
    "eval": ("megatron_senseflow.eval_cli", "FID / FID-T / patch FID / CLIP score of generated images"),
    "demo": ("megatron_senseflow.demo", "train a small digits teacher, distil it, evaluate (no downloads)"),
    "drill": ("megatron_senseflow.drill", "fault drill: kill -9, a corrupt checkpoint, a full disk; losses must not change"),
    "slurm": ("megatron_senseflow.slurm.launch", "write (and optionally submit) an sbatch script for a recipe"),
    "memory-plan": ("megatron_senseflow.memory_plan", "per-GPU memory of every role for a recipe and cluster shape"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="senseflow",
        description="SenseFlow distillation of FLUX / SD3.x on Megatron-core.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    return parser


def verb_parser(verb: str):
    """(module, argument parser) of one verb; every verb takes --no-progress (progress.py)."""
    module = importlib.import_module(VERBS[verb][0])
    sub = argparse.ArgumentParser(prog=f"senseflow {verb}", description=VERBS[verb][1])
    if hasattr(module, "add_arguments_for"):
        module.add_arguments_for(verb, sub)
    else:
        module.add_arguments(sub)
    if "--no-progress" not in sub._option_string_actions:
        sub.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                         help="no progress bars (they are drawn on a terminal only)")
    return module, sub


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"senseflow: unknown verb {argv[0]!r}; choose one of {', '.join(VERBS)}.", file=sys.stderr)
            return 2  # errors.USER_ERROR, without importing anything for a typo
        parser.print_help()
        return 0
    verb, rest = argv[0], argv[1:]
    from .train_cli import process_start

    process_start()
    module, sub = verb_parser(verb)
    args = sub.parse_args(rest)
    from .progress import set_enabled

    set_enabled(getattr(args, "progress", None))
    run = getattr(module, "run_for", None)
    from .errors import USER_ERROR, UserError

    try:
        return int((run(verb, args) if run else module.run(args)) or 0)
    except UserError as e:
        print(f"senseflow {verb}: {e}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
