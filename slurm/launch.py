"""`senseflow slurm`: write (and optionally submit) the sbatch script of a training run.

    senseflow slurm CONFIG --nodes N --gpus-per-node G [--tp T --pp P] [--output DIR]
                    [--time T] [--partition P] [--account A] [--submit] [overrides ...]

The script starts one process per GPU with `srun` (not one `torchrun` per node):
the bootstrap (`megatron_senseflow.distributed.launch_env`) already derives
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from SLURM_*, so no
rendezvous service or extra agent is needed; Slurm owns every rank, delivers
preemption signals to each of them directly and ends the step when one dies
(`srun --kill-on-bad-exit`). torchrun's agent would sit between Slurm and the
ranks with signal handling of its own: SIGUSR1 is not among the signals it
handles, so it kills the agent (checked in torch 2.13's elastic/multiprocessing),
and on SIGTERM the agent tears its workers down on its own 30 s timer; its
elastic restarts would also compete with Slurm's requeue.

A template per recipe lives next to this file (`flux_dev.sbatch`, ...), chosen by
the config's model preset; `generic.sbatch` covers the rest. Templates hold
`#SBATCH` resources and a `senseflow-defaults:` line; the job body (NCCL
environment from `env.sh`, per-restart logs, USR1 forwarding, requeue) is
`job.sh`, shared by all. The contract with the trainer (signals, exit status,
the DONE marker, the output layout) is in `slurm/README.md`.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_senseflow import preflight
from megatron_senseflow.checkpoint import DONE_MARKER  # noqa: F401 (job.sh requeues only without it)
from megatron_senseflow.config import RECIPE_DIR, Config, ConfigError, load_config, resolve_recipe

SLURM_DIR = Path(__file__).resolve().parent
SCRIPT_NAME = "job.sbatch"
"""Name of the batch script inside the output directory."""

# Model preset -> template. Presets without an entry use generic.sbatch.
PRESET_TEMPLATES = {
    "flux-dev": "flux_dev",
    "flux-schnell": "flux_dev",
    "flux-student": "flux_dev",
    "sd35-large": "sd35_large",
    "sd35-medium": "sd35_medium",
    "tiny-flux": "tiny",
    "tiny-sd3": "tiny",
}
TEMPLATE_NAMES = ("generic", "flux_dev", "sd35_large", "sd35_medium", "tiny")
# Slurm's --signal accepts at most 0xffff seconds, and may deliver the signal
# up to 60 s early (its timers are checked about once a minute).
MAX_SIGNAL_LEAD = 65535
SIGNAL_SLACK = 60

_FIELD = re.compile(r"\{\{(\w+)\}\}")
_DEFAULTS = re.compile(r"^# senseflow-defaults:(.*)$", re.M)


@dataclass(kw_only=True)
class Template:
    name: str
    path: Path
    text: str
    defaults: dict[str, str]


@dataclass(kw_only=True)
class JobSpec:
    """Everything the batch script depends on; `render` turns it into text."""

    config: Path
    """Recipe file, absolute."""
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    output_dir: Path
    """Absolute train.output_dir."""
    template: Template
    time: str
    signal_lead: int
    cpus_per_task: int
    exclusive: bool
    mem: str | None
    partition: str | None = None
    account: str | None = None
    sbatch_extra: list[str] = field(default_factory=list)
    """Extra `#SBATCH` options, as given (`--constraint=h100`)."""
    entry: list[str]
    """Program started once per task; the config and overrides follow it."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides after the launcher's own (train.output_dir, parallel.tp, parallel.pp)."""
    cpu: bool = False
    """No GPU request; the training processes run on CPU (tests, smoke runs)."""
    max_restarts: int = 100
    retries_without_progress: int = 1
    """Failures in a row without a new checkpoint that still requeue (job.sh)."""
    teardown_grace: int = 60
    """Seconds ranks get to exit after the first one ended or after the stop-save (srun --wait)."""
    srun_args: list[str] = field(default_factory=list)
    """Extra srun options (--container-image=..., --gpu-bind=...): on the srun line only."""
    gres: str | None = None
    """None: `--gpus-per-node=G`; '': `--gres=gpu:G`; a type: `--gres=gpu:TYPE:G`."""
    job_name: str
    workdir: Path
    script: Path

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def command(self) -> list[str]:
        """The per-task command: ENTRY CONFIG train.output_dir=OUT parallel.tp=T parallel.pp=P [overrides]."""
        cmd = [
            *self.entry,
            str(self.config),
            f"train.output_dir={self.output_dir}",
            f"parallel.tp={self.tp}",
            f"parallel.pp={self.pp}",
        ]
        if self.cpu:
            cmd.append("train.device=cpu")
        return cmd + list(self.overrides)


# --------------------------------------------------------------------------- templates


def load_template(name_or_path: str) -> Template:
    """A bundled template by name (flux_dev, generic, ...) or an .sbatch file of the same form."""
    p = Path(name_or_path)
    if not p.is_file():
        p = SLURM_DIR / f"{name_or_path.removesuffix('.sbatch')}.sbatch"
    if not p.is_file():
        raise ConfigError(
            f"no sbatch template {name_or_path!r}; give an .sbatch path or one of {', '.join(TEMPLATE_NAMES)}."
        )
    text = p.read_text()
    m = _DEFAULTS.search(text)
    defaults: dict[str, str] = {}
    if m:
        for item in m.group(1).split():
            key, _, value = item.partition("=")
            defaults[key] = value
    return Template(name=p.stem, path=p, text=text, defaults=defaults)


def template_for(cfg: Config) -> str:
    return PRESET_TEMPLATES.get(cfg.model.preset, "generic")


_TIME_FORMS = (
    (re.compile(r"^(\d+)$"), ("m",)),
    (re.compile(r"^(\d+):(\d+)$"), ("m", "s")),
    (re.compile(r"^(\d+):(\d+):(\d+)$"), ("h", "m", "s")),
    (re.compile(r"^(\d+)-(\d+)$"), ("d", "h")),
    (re.compile(r"^(\d+)-(\d+):(\d+)$"), ("d", "h", "m")),
    (re.compile(r"^(\d+)-(\d+):(\d+):(\d+)$"), ("d", "h", "m", "s")),
)
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def time_limit_seconds(text: str) -> int:
    """Seconds of a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)."""
    for pattern, units in _TIME_FORMS:
        m = pattern.match(text.strip())
        if m:
            return sum(int(v) * _UNIT_S[u] for v, u in zip(m.groups(), units))
    raise ConfigError(
        f"--time {text!r} is not a Slurm time limit; write minutes, HH:MM:SS or D-HH:MM:SS (e.g. 24:00:00)."
    )


# --------------------------------------------------------------------------- checks


def check_layout(cfg: Config, nodes: int, gpus_per_node: int, tp: int, pp: int) -> int:
    """Return the data-parallel size, or raise ConfigError naming the value and the fix."""
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes} must be at least 1.")
    if gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node {gpus_per_node} must be at least 1.")
    from megatron_senseflow.models.arch_base import LayoutError, check_world

    world = nodes * gpus_per_node
    cp = cfg.parallel.cp
    mp = tp * pp * cp
    try:
        check_world(world, tp, pp, cp)
    except LayoutError:
        what = f"tp x pp = {tp} x {pp} = {mp}" if cp == 1 else f"tp x pp x cp = {tp} x {pp} x {cp} = {mp}"
        raise ConfigError(
            f"{nodes} node(s) x {gpus_per_node} GPUs = {world} processes is not a multiple of {what}; "
            f"change --nodes/--gpus-per-node or --tp/--pp so that nodes x GPUs = tp x pp x data-parallel size."
        ) from None
    # the rest of the layout rule (TP divides the heads, PP at most the blocks, pp_split) is the model's
    preflight.check(cfg, world)
    return world // mp


def check_path(value: Path, flag: str) -> None:
    # `#SBATCH --output=...` is split on whitespace by sbatch and cannot be quoted.
    if re.search(r"\s", str(value)):
        raise ConfigError(f"{flag} {str(value)!r} contains whitespace, which #SBATCH lines cannot carry; choose a path without spaces.")


# --------------------------------------------------------------------------- rendering


def default_entry() -> list[str]:
    """`senseflow train` of the running interpreter's environment, as absolute paths.

    The venv's bin/ path is kept as is (not resolved): resolving the python
    symlink would leave the virtual environment.
    """
    exe = Path(sys.executable)
    script = exe.with_name("senseflow")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), "train"]
    return [str(exe), "-m", "megatron_senseflow.cli", "train"]


def _sbatch_line(option: str) -> str:
    return "#SBATCH " + option


def render(spec: JobSpec) -> str:
    site = []
    if spec.partition:
        site.append(_sbatch_line(f"--partition={spec.partition}"))
    if spec.account:
        site.append(_sbatch_line(f"--account={spec.account}"))
    if spec.exclusive:
        site.append(_sbatch_line("--exclusive"))
    if spec.mem is not None:
        site.append(_sbatch_line(f"--mem={spec.mem}"))
    for extra in spec.sbatch_extra:
        site.append(_sbatch_line(extra if extra.startswith("-") else f"--{extra}"))
    if spec.cpu:
        gpu_request = "# CPU run (--cpu): no GPU request; the processes run on CPU with gloo."
    elif spec.gres is not None:
        kind = f"gpu:{spec.gres}:" if spec.gres else "gpu:"
        gpu_request = _sbatch_line(f"--gres={kind}{spec.gpus_per_node}")
    else:
        gpu_request = _sbatch_line(f"--gpus-per-node={spec.gpus_per_node}")
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    generated = (
        f"# Written by `senseflow slurm` from {spec.template.path.name} on {stamp}:\n"
        f"#   {spec.nodes} node(s) x {spec.gpus_per_node} = {spec.world_size} processes, "
        f"tp={spec.tp} pp={spec.pp} dp={spec.world_size // (spec.tp * spec.pp)}\n"
        f"# Submit with: sbatch {shlex.quote(str(spec.script))}"
    )
    fields = {
        "generated": generated,
        "job_name": spec.job_name,
        "nodes": str(spec.nodes),
        "gpus_per_node": str(spec.gpus_per_node),
        "gpu_request": gpu_request,
        "cpus_per_task": str(spec.cpus_per_task),
        "time": spec.time,
        "site_directives": "\n".join(site) if site else "# (no partition/account given: the cluster's defaults apply)",
        "signal_lead": str(spec.signal_lead),
        "output_dir": str(spec.output_dir),
        "workdir": str(spec.workdir),
        "output_dir_sh": shlex.quote(str(spec.output_dir)),
        "script_sh": shlex.quote(str(spec.script)),
        "max_restarts": str(spec.max_restarts),
        "retries_without_progress": str(spec.retries_without_progress),
        "teardown_grace": str(spec.teardown_grace),
        "srun_args": "\n".join("    " + shlex.quote(word) for word in spec.srun_args),
        "command": "\n".join("    " + shlex.quote(word) for word in spec.command()),
        "slurm_dir_sh": shlex.quote(str(SLURM_DIR)),
    }

    if spec.srun_args and "{{srun_args}}" not in spec.template.text:
        raise ConfigError(f"template {spec.template.path} has no {{{{srun_args}}}} field, so --srun-arg / --container-* "
                          "would be dropped; add a `SENSEFLOW_SRUN_ARGS=( {{srun_args}} )` array before it sources job.sh.")

    def fill(m: re.Match) -> str:
        name = m.group(1)
        if name not in fields:
            raise ConfigError(
                f"template {spec.template.path} uses an unknown field {{{{{name}}}}}; known fields: {', '.join(sorted(fields))}."
            )
        return fields[name]

    return _FIELD.sub(fill, spec.template.text)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="recipe YAML path or bundled recipe name (tiny, flux_dev, sd35_large, sd35_medium)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides passed to the trainer (after the options), e.g. train.max_steps=5000")
    g = parser.add_argument_group("layout")
    g.add_argument("--nodes", type=int, required=True, help="number of nodes")
    g.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node = training processes per node")
    g.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the config's parallel.tp)")
    g.add_argument("--pp", type=int, default=None, help="pipeline-parallel size (default: the config's parallel.pp)")
    g = parser.add_argument_group("job")
    g.add_argument("--output", default=None, help="output directory (default: the config's train.output_dir); rerunning with the same one resumes")
    g.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 (default: the template's)")
    g.add_argument("--partition", default=None, help="Slurm partition")
    g.add_argument("--account", default=None, help="Slurm account")
    g.add_argument("--job-name", default=None, help="job name (default: senseflow-<recipe>)")
    g.add_argument("--signal-lead", type=int, default=None, help="seconds before the time limit at which the job saves and requeues (default: the template's)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per training process (default: the template's)")
    g.add_argument("--max-restarts", type=int, default=100, help="stop requeueing after this many restarts (default 100)")
    g.add_argument("--retries-without-progress", type=int, default=1,
                   help="after a failure (lost node, crashed rank) requeue when a newer checkpoint was published since the "
                        "restart; without one, at most this many times in a row (default 1)")
    g.add_argument("--teardown-grace", type=int, default=60,
                   help="seconds ranks get to exit after the first one ended or after the stop-save (default 60)")
    g.add_argument("--gres", nargs="?", const="", default=None, metavar="TYPE",
                   help="request GPUs as --gres=gpu[:TYPE]:G instead of --gpus-per-node=G (sites whose submit filter wants gres)")
    g.add_argument("--srun-arg", action="append", default=[], metavar="OPTION",
                   help="extra srun option for the training step, repeatable, e.g. --srun-arg=--gpu-bind=none")
    g.add_argument("--container-image", default=None,
                   help="run the training step in this pyxis/enroot image (srun --container-image; the batch shell stays on "
                        "the host, where scontrol and scancel live); the entry becomes `senseflow train` inside it")
    g.add_argument("--container-mounts", default=None,
                   help="srun --container-mounts for the image, e.g. /lustre:/lustre (the output, data and checkpoint "
                        "paths must exist at the same place inside)")
    g.add_argument("--sbatch", action="append", default=[], metavar="OPTION", help="extra #SBATCH option, repeatable, e.g. --sbatch=--constraint=h100")
    g.add_argument("--template", default=None, help=f"sbatch template: one of {', '.join(TEMPLATE_NAMES)} or a path (default: chosen by model preset)")
    g.add_argument("--script", default=None, help=f"where to write the batch script (default: OUTPUT/{SCRIPT_NAME})")
    g.add_argument("--workdir", default=None, help="working directory of the job (default: the current directory)")
    g.add_argument("--cpu", action="store_true", help="request no GPUs and run the processes on CPU (train.device=cpu); for smoke tests")
    g.add_argument("--entry", default=None, help="program started once per task instead of `senseflow train` (the config and overrides follow it); for tests and custom trainers")
    g.add_argument("--submit", action="store_true", help="submit with sbatch instead of printing the command")
    # `CONFIG --nodes 4 ... train.max_steps=10`: plain parse_args assigns the
    # (empty) overrides right after CONFIG and then rejects the trailing ones;
    # the intermixed parser collects positionals from anywhere on the line.
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    recipe = resolve_recipe(args.config).resolve()
    base = load_config(str(recipe), list(args.overrides))
    tp = base.parallel.tp if args.tp is None else args.tp
    pp = base.parallel.pp if args.pp is None else args.pp
    for flag, value in (("--tp", tp), ("--pp", pp)):
        if value < 1:
            raise ConfigError(f"{flag} {value} must be at least 1.")
    # Validate exactly the config the job will run: recipe + overrides + layout.
    cfg = load_config(str(recipe), [*args.overrides, f"parallel.tp={tp}", f"parallel.pp={pp}"])
    check_layout(cfg, args.nodes, args.gpus_per_node, tp, pp)
    # the paths are the job's (a container's mounts, say): the ranks read their config files, here only whether
    # they are set is checked
    missing = preflight.missing_assets(cfg, read_files=False)
    if missing:  # refuse before the job waits in the queue only to stop at its first line
        raise ConfigError(missing[0])
    # settings that would turn the job's requeues into restarts from step 0, or swallow the time-limit signal
    if not cfg.checkpoint.resume:
        raise ConfigError("checkpoint.resume=false would make every requeue of the job start again from step 0; "
                          "leave it on (a fresh run takes a fresh --output).")
    if not cfg.checkpoint.save_on_signal:
        raise ConfigError("checkpoint.save_on_signal=false would make the job ignore the USR1 sent before its time "
                          "limit and lose every step since the last periodic save; leave it on.")

    template = load_template(args.template or template_for(cfg))
    d = template.defaults
    time = args.time or d.get("time", "24:00:00")
    limit = time_limit_seconds(time)
    lead = args.signal_lead if args.signal_lead is not None else int(d.get("signal_lead", "600"))
    if not 0 < lead <= MAX_SIGNAL_LEAD:
        raise ConfigError(f"--signal-lead {lead} must be between 1 and {MAX_SIGNAL_LEAD} seconds.")
    if lead + SIGNAL_SLACK >= limit:
        raise ConfigError(
            f"--signal-lead {lead} s plus the up to {SIGNAL_SLACK} s by which Slurm may signal early is not shorter "
            f"than the time limit {time} ({limit} s); lower --signal-lead or raise --time."
        )
    cpus = args.cpus_per_task if args.cpus_per_task is not None else int(d.get("cpus_per_task", "1"))
    if cpus < 1:
        raise ConfigError(f"--cpus-per-task {cpus} must be at least 1.")
    for flag, value in (("--max-restarts", args.max_restarts), ("--retries-without-progress", args.retries_without_progress)):
        if value < 0:
            raise ConfigError(f"{flag} {value} must be 0 or more.")
    if args.teardown_grace < 1:
        raise ConfigError(f"--teardown-grace {args.teardown_grace} must be at least 1 second.")
    srun_args = list(args.srun_arg)
    if args.container_image:
        srun_args.append(f"--container-image={args.container_image}")
    if args.container_mounts:
        if not args.container_image:
            raise ConfigError("--container-mounts needs --container-image.")
        srun_args.append(f"--container-mounts={args.container_mounts}")

    output = Path(args.output or cfg.train.output_dir).expanduser().absolute()
    workdir = Path(args.workdir or os.getcwd()).expanduser().absolute()
    script = Path(args.script).expanduser().absolute() if args.script else output / SCRIPT_NAME
    for flag, path in (("--output", output), ("--workdir", workdir)):
        check_path(path, flag)
    if args.entry:
        entry = shlex.split(args.entry)
    elif args.container_image:
        entry = ["senseflow", "train"]  # the image's own installation; this host's venv is not inside it
    else:
        entry = default_entry()
    if args.container_image and recipe.parent == RECIPE_DIR.resolve():
        recipe_arg = Path(recipe.stem)  # a bundled recipe by name, found in the image's installation
    else:
        recipe_arg = recipe
    if not entry:
        raise ConfigError("--entry is empty; give the program to start once per task, or leave --entry out for `senseflow train`.")
    return JobSpec(
        config=recipe_arg,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tp=tp,
        pp=pp,
        output_dir=output,
        template=template,
        time=time,
        signal_lead=lead,
        cpus_per_task=cpus,
        exclusive=d.get("exclusive", "false") == "true",
        mem=d.get("mem"),
        partition=args.partition,
        account=args.account,
        sbatch_extra=list(args.sbatch),
        entry=entry,
        overrides=list(args.overrides),
        cpu=args.cpu,
        max_restarts=args.max_restarts,
        retries_without_progress=args.retries_without_progress,
        teardown_grace=args.teardown_grace,
        srun_args=srun_args,
        gres=args.gres,
        job_name=args.job_name or f"senseflow-{recipe.stem}",
        workdir=workdir,
        script=script,
    )


def write_script(spec: JobSpec) -> Path:
    text = render(spec)
    # sbatch opens --output before the script runs: the logs folder must exist.
    (spec.output_dir / "logs").mkdir(parents=True, exist_ok=True)
    spec.script.parent.mkdir(parents=True, exist_ok=True)
    spec.script.write_text(text)
    spec.script.chmod(0o755)
    return spec.script


# Set by another launcher (torchrun, ours) in the submitting shell; never meant for the job.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SENSEFLOW_LAUNCHER", "SENSEFLOW_MASTER_ADDR")


def submit_environment(environ: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The environment sbatch exports to the job, and what was left out. sbatch passes the whole
    submitting environment on; another launcher's rank variables are dropped, and so, when submitting
    from inside an allocation (SLURM_JOB_ID set), is every SLURM_* variable of that allocation but
    SLURM_CONF: its memory request, node list and task counts would override the new job's."""
    inside = "SLURM_JOB_ID" in environ
    dropped = sorted(k for k in environ if k in _LAUNCHER_VARS or (inside and k.startswith("SLURM_") and k != "SLURM_CONF"))
    return {k: v for k, v in environ.items() if k not in dropped}, dropped


def submit(script: Path) -> str:
    """sbatch the script; return the job id."""
    if shutil.which("sbatch") is None:
        raise ConfigError(f"sbatch is not on PATH; run this on a Slurm login node, or submit {script} there.")
    env, dropped = submit_environment(dict(os.environ))
    if dropped:
        where = f"inside job {os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ else "here"
        print(f"not passed to the job (set {where} for another launch): {' '.join(dropped)}")
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch {script} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    script = write_script(spec)
    dp = spec.world_size // (spec.tp * spec.pp)
    print(
        f"wrote {script} ({spec.template.name} template): {spec.nodes} node(s) x {spec.gpus_per_node} = "
        f"{spec.world_size} processes, tp={spec.tp} pp={spec.pp} dp={dp}, output {spec.output_dir}"
    )
    if not args.submit:
        print(f"sbatch {shlex.quote(str(script))}")
        return 0
    job_id = submit(script)
    print(f"submitted job {job_id}; logs in {spec.output_dir / 'logs'}")
    return 0
