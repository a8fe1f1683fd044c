"""`senseflow slurm` without a cluster: script generation, layout checks, env file, job.sh's decisions.

The real thing (sbatch, srun, signals, requeue on a running slurmctld/slurmd)
is tests/test_slurm_cluster.py; these run everywhere in well under a second each.
"""
from __future__ import annotations

import os
import argparse
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_senseflow import cli
from megatron_senseflow.config import ConfigError
from megatron_senseflow.slurm import launch

SLURM_DIR = Path(launch.__file__).resolve().parent


def _spec(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    launch.add_arguments(parser)
    args = parser.parse_args([*argv, "--output", str(tmp_path / "out")] if "--output" not in argv else list(argv))
    return launch.spec_from_args(args)


def _command_words(script: str) -> list[str]:
    body = script.split("SENSEFLOW_CMD=(\n", 1)[1].split("\n)\n", 1)[0]
    return subprocess.run(
        ["bash", "-c", f"a=({body}); printf '%s\\n' \"${{a[@]}}\""], capture_output=True, text=True, check=True
    ).stdout.splitlines()


# the teacher's architecture is read from its checkpoint's senseflow_model.json before anything is
# queued; a directory with only that file stands in for a converted 12B model here
def _teacher(root: Path, preset: str) -> Path:
    import json

    from megatron_senseflow.models.configs import arch_to_dict, presets

    d = root / "teachers" / preset
    d.mkdir(parents=True, exist_ok=True)
    (d / "senseflow_model.json").write_text(json.dumps({"format": 1, "arch": arch_to_dict(presets()[preset]),
                                                        "dtype": "bfloat16"}))
    return d


def assets(root: Path, preset: str) -> list[str]:
    out = [f"roles.teacher.checkpoint={_teacher(root, preset)}", "data.path=/data/shards",
           "roles.discriminator.dinov2=/ckpt/dinov2-large", "roles.discriminator.vae=/ckpt/vae"]
    return out + (["roles.discriminator.clip=/ckpt/clip-vit-large-patch14"] if preset.startswith("flux") else [])


@pytest.mark.parametrize(
    "recipe, preset, extra, tp, pp, template",
    [
        ("flux_dev", "flux-dev", [], 4, 1, "flux_dev"),
        ("sd35_large", "sd35-large", [], 2, 2, "sd35_large"),
        ("sd35_medium", "sd35-medium", [], 1, 1, "sd35_medium"),
        ("tiny", None, ["model.preset=tiny-flux"], 2, 1, "tiny"),
        # no recipe of its own: the tiny one with another preset picks the generic template
        ("tiny", "sd3-medium", ["model.preset=sd3-medium", "distill.guidance_mode=cfg",
                                "roles.discriminator.text_condition=clip_l"], 2, 1, "generic"),
    ],
)
def test_template_per_recipe_renders_a_valid_script(tmp_path, recipe, preset, extra, tp, pp, template):
    overrides = [*extra, *(assets(tmp_path, preset) if preset else [])]
    spec = _spec(tmp_path, recipe, *overrides, "--nodes", "4", "--gpus-per-node", "8", "--tp", str(tp), "--pp", str(pp), "--partition", "gpu", "--account", "proj1")
    assert spec.template.name == template
    text = launch.render(spec)
    assert "{{" not in text and "}}" not in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # shell syntax
    lines = text.splitlines()
    for directive in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj1",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={tmp_path / 'out'}/logs/slurm-%j.out",
    ):
        assert directive in lines, directive
    lead = int(spec.template.defaults["signal_lead"])
    assert f"#SBATCH --signal=B:USR1@{lead}" in lines
    # sbatch reads directives only up to the first command
    first_cmd = next(i for i, l in enumerate(lines) if l and not l.startswith("#"))
    assert all(i < first_cmd for i, l in enumerate(lines) if l.startswith("#SBATCH"))
    assert f"source {SLURM_DIR}/job.sh" in lines
    words = _command_words(text)
    expected = [
        str(launch.resolve_recipe(recipe).resolve()),
        f"train.output_dir={tmp_path / 'out'}",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        *overrides,
    ]
    assert words[-len(expected):] == expected
    assert words[:-len(expected)] == launch.default_entry()


def test_big_recipe_without_teacher_is_refused_before_queueing(tmp_path):
    with pytest.raises(ConfigError, match=r"^roles\.teacher\.checkpoint is not set: a flux-dev run needs"):
        _spec(tmp_path, "flux_dev", "--nodes", "4", "--gpus-per-node", "8")
    with pytest.raises(ConfigError, match=r"^roles\.discriminator\.dinov2 is None"):
        _spec(tmp_path, "sd35_medium", *assets(tmp_path, "sd35-medium")[:2], "--nodes", "1", "--gpus-per-node", "8")


def test_default_entry_is_the_venv_senseflow_train():
    entry = launch.default_entry()
    assert Path(entry[0]).is_absolute()
    assert entry[-1] == "train"
    assert entry[0].startswith(str(Path(sys.executable).parent))  # the venv, not the resolved base python


def test_cli_writes_script_and_prints_sbatch(tmp_path, capsys):
    out = tmp_path / "run"
    # overrides after the options must reach the job (argparse alone would reject them)
    rc = cli.main(["slurm", "tiny", "--nodes", "1", "--gpus-per-node", "2", "--tp", "2", "--cpu", "--output", str(out), "train.max_steps=3"])
    assert rc == 0
    printed = capsys.readouterr().out
    script = out / "job.sbatch"
    assert f"sbatch {script}" in printed.splitlines()
    assert script.is_file() and os.access(script, os.X_OK)
    assert (out / "logs").is_dir()  # sbatch needs it for --output before the job starts
    text = script.read_text()
    words = _command_words(text)
    assert words[-3:] == ["parallel.pp=1", "train.device=cpu", "train.max_steps=3"]
    assert "#SBATCH --gpus-per-node" not in text  # --cpu asks for no GPUs
    assert "#SBATCH --exclusive" not in text  # the tiny template shares nodes


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nodes", "2", "--gpus-per-node", "8", "--tp", "4", "--pp", "3"], "2 node(s) x 8 GPUs = 16 processes is not a multiple of tp x pp = 4 x 3 = 12"),
        (["--nodes", "1", "--gpus-per-node", "6", "--tp", "4"], "1 node(s) x 6 GPUs = 6 processes is not a multiple of tp x pp = 4 x 1 = 4"),
        (["--nodes", "1", "--gpus-per-node", "8", "--tp", "8"], "tensor parallel size 8 does not divide FLUX's 4 attention heads; use one of 1, 2, 4."),
        (["--nodes", "0", "--gpus-per-node", "8"], "--nodes 0 must be at least 1."),
        (["--nodes", "1", "--gpus-per-node", "4", "--tp", "0"], "--tp 0 must be at least 1."),
        (["--nodes", "1", "--gpus-per-node", "4", "--pp", "8"], "pipeline parallel size 8 exceeds the model's 4 blocks"),
        (["--nodes", "1", "--gpus-per-node", "4", "--time", "1:00:00", "--signal-lead", "3550"], "--signal-lead 3550 s plus the up to 60 s by which Slurm may signal early is not shorter than the time limit 1:00:00 (3600 s)"),
        (["--nodes", "1", "--gpus-per-node", "4", "--time", "tomorrow"], "--time 'tomorrow' is not a Slurm time limit"),
        (["--nodes", "1", "--gpus-per-node", "4", "--template", "nope"], "no sbatch template 'nope'"),
        # settings that defeat requeue
        (["--nodes", "1", "--gpus-per-node", "4", "checkpoint.resume=false"], "checkpoint.resume=false would make every requeue of the job start again from step 0"),
        (["--nodes", "1", "--gpus-per-node", "4", "checkpoint.save_on_signal=false"], "checkpoint.save_on_signal=false would make the job ignore the USR1"),
        (["--nodes", "1", "--gpus-per-node", "4", "--retries-without-progress", "-1"], "--retries-without-progress -1 must be 0 or more."),
        (["--nodes", "1", "--gpus-per-node", "4", "--teardown-grace", "0"], "--teardown-grace 0 must be at least 1 second."),
        (["--nodes", "1", "--gpus-per-node", "4", "--container-mounts", "/a:/a"], "--container-mounts needs --container-image."),
    ],
)
def test_layout_and_job_errors_name_value_and_fix(tmp_path, capsys, argv, message):
    rc = cli.main(["slurm", "tiny", *argv, "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.count("\n") == 1  # one sentence, no traceback


def test_gres_instead_of_gpus_per_node(tmp_path):
    plain = launch.render(_spec(tmp_path, "tiny", "--nodes", "2", "--gpus-per-node", "8", "--gres")).splitlines()
    assert "#SBATCH --gres=gpu:8" in plain and not any(l.startswith("#SBATCH --gpus-per-node") for l in plain)
    typed = launch.render(_spec(tmp_path, "tiny", "--nodes", "2", "--gpus-per-node", "8", "--gres", "h100")).splitlines()
    assert "#SBATCH --gres=gpu:h100:8" in typed


def _srun_words(script: str) -> list[str]:
    body = script.split("SENSEFLOW_SRUN_ARGS=(\n", 1)[1].split("\n)\n", 1)[0]
    return subprocess.run(["bash", "-c", f"a=({body}); for w in \"${{a[@]}}\"; do echo \"$w\"; done"],
                          capture_output=True, text=True, check=True).stdout.splitlines()


def test_container_options_go_on_the_srun_line_only(tmp_path):
    spec = _spec(tmp_path, "tiny", "--nodes", "1", "--gpus-per-node", "2", "--container-image", "nvcr.io#org/sf:1",
                 "--container-mounts", "/lustre:/lustre", "--srun-arg=--gpu-bind=none")
    text = launch.render(spec)
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    assert _srun_words(text) == ["--gpu-bind=none", "--container-image=nvcr.io#org/sf:1", "--container-mounts=/lustre:/lustre"]
    assert not any(l.startswith("#SBATCH") and "--container" in l for l in text.splitlines())  # not on the batch shell
    words = _command_words(text)
    # inside the image: its own `senseflow train`, the bundled recipe by name
    assert words[:3] == ["senseflow", "train", "tiny"]
    # no site arguments: an empty array, and a template without the field is refused only when some are given
    assert _srun_words(launch.render(_spec(tmp_path, "tiny", "--nodes", "1", "--gpus-per-node", "2"))) == []
    old = tmp_path / "old.sbatch"
    old.write_text(launch.load_template("tiny").path.read_text().replace("{{srun_args}}", ""))
    with pytest.raises(ConfigError, match="has no {{srun_args}} field"):
        launch.render(_spec(tmp_path, "tiny", "--nodes", "1", "--gpus-per-node", "2", "--template", str(old),
                            "--srun-arg=--gpu-bind=none"))


def test_submit_environment_drops_launcher_and_allocation_variables():
    env = {"PATH": "/bin", "MASTER_ADDR": "localhost", "RANK": "3", "SLURM_CONF": "/etc/slurm.conf",
           "SLURM_MEM_PER_CPU": "4000", "SLURM_JOB_ID": "12", "SLURM_NTASKS": "1", "NCCL_DEBUG": "WARN"}
    kept, dropped = launch.submit_environment(env)
    assert kept == {"PATH": "/bin", "SLURM_CONF": "/etc/slurm.conf", "NCCL_DEBUG": "WARN"}
    assert dropped == ["MASTER_ADDR", "RANK", "SLURM_JOB_ID", "SLURM_MEM_PER_CPU", "SLURM_NTASKS"]
    # outside an allocation Slurm variables a user set on purpose stay
    kept, dropped = launch.submit_environment({"SLURM_CONF": "/x", "SLURM_TIME_FORMAT": "relative", "WORLD_SIZE": "2"})
    assert kept == {"SLURM_CONF": "/x", "SLURM_TIME_FORMAT": "relative"} and dropped == ["WORLD_SIZE"]


def test_sd35_large_tp_must_divide_38_heads(tmp_path):
    with pytest.raises(ConfigError, match="does not divide SD3's 38 attention heads; use one of 1, 2, 19, 38"):
        _spec(tmp_path, "tiny", "model.preset=sd35-large", "distill.guidance_mode=cfg", "--nodes", "1", "--gpus-per-node", "8", "--tp", "4")


def test_time_limit_forms():
    assert launch.time_limit_seconds("30") == 1800
    assert launch.time_limit_seconds("10:30") == 630
    assert launch.time_limit_seconds("24:00:00") == 86400
    assert launch.time_limit_seconds("2-00") == 172800
    assert launch.time_limit_seconds("1-02:03:04") == 93784


def test_output_dir_with_spaces_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="contains whitespace"):
        _spec(tmp_path, "tiny", "--nodes", "1", "--gpus-per-node", "1", "--output", str(tmp_path / "a b"))


def test_submit_without_sbatch_says_where_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    rc = cli.main(["slurm", "tiny", "--nodes", "1", "--gpus-per-node", "1", "--output", str(tmp_path / "o"), "--submit"])
    assert rc == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err


# --------------------------------------------------------------------------- env.sh


def _bash(script: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, env=env).stdout


def test_env_file_sets_defaults_and_yields_to_the_user():
    env_sh = SLURM_DIR / "env.sh"
    assert env_sh.is_file()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "TORCH_NCCL_", "FI_"))}
    base.pop("OMP_NUM_THREADS", None)
    out = _bash(f"source {env_sh}; echo $NCCL_IB_TIMEOUT $TORCH_NCCL_ASYNC_ERROR_HANDLING $NCCL_DEBUG $OMP_NUM_THREADS; bash -c 'echo $NCCL_IB_TIMEOUT'", env={**base, "SLURM_CPUS_PER_TASK": "6"})
    assert out.split() == ["22", "1", "WARN", "6", "22"]  # exported to children (srun)
    out = _bash(f"source {env_sh}; echo $NCCL_IB_TIMEOUT $NCCL_DEBUG", env={**base, "NCCL_IB_TIMEOUT": "19", "NCCL_DEBUG": "INFO"})
    assert out.split() == ["19", "INFO"]
    assert "_sf_default" not in _bash(f"source {env_sh}; declare -F", env=base)


# --------------------------------------------------------------------------- job.sh decisions
# job.sh with stand-in srun/scancel/scontrol on PATH that record their calls;
# the real commands are exercised by tests/test_slurm_cluster.py.

_STUBS = {
    # srun: drop its own options, record, run the command (exec keeps the pid for scancel)
    "srun": 'echo "srun $*" >>"$STUB_LOG"; while [ "${1#--}" != "$1" ]; do shift; done; echo $$ >"$STUB_DIR/srun.pid"; exec "$@"',
    "scancel": 'echo "scancel $*" >>"$STUB_LOG"; kill -USR1 "$(cat "$STUB_DIR/srun.pid")"',
    # `show hostnames` / `show node` answer from STUB_NODES / STUB_NODEADDR; Slurm's requeue ends the batch
    # shell; STUB_SCONTROL_RC=1 plays a failing requeue
    "scontrol": """echo "scontrol $*" >>"$STUB_LOG"
case "$1 $2" in
    "show hostnames") echo "${STUB_NODES:-n1}" | tr ',' '\\n'; exit 0 ;;
    "show node") echo "NodeName=$4 Arch=x86_64 NodeAddr=${STUB_NODEADDR:-$4} NodeHostName=$4"; exit 0 ;;
esac
[ "${STUB_SCONTROL_RC:-0}" = 0 ] || exit 1; kill -TERM $PPID""",
}


def _stubs(tmp_path) -> Path:
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    for name, body in _STUBS.items():
        p = stub_dir / name
        p.write_text("#!/bin/bash\n" + body + "\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return stub_dir


def _job(tmp_path, command: str, restart: int = 0, max_restarts: int = 100, cmd_line: str | None = None,
         **extra_env):
    """job.sh under stand-in Slurm commands, its step running `command` (or the batch line `cmd_line` as is)."""
    stub_dir = _stubs(tmp_path)
    out = tmp_path / "out"
    batch = tmp_path / "batch.sh"
    cmd_line = cmd_line or f"SENSEFLOW_CMD=(bash -c {shlex.quote(command)})"
    batch.write_text(
        f"SENSEFLOW_OUTPUT_DIR={out}\nSENSEFLOW_MAX_RESTARTS={max_restarts}\n{cmd_line}\nsource {SLURM_DIR}/job.sh\n"
    )
    env = {
        **os.environ,
        "PATH": f"{stub_dir}:{os.environ['PATH']}",
        "STUB_DIR": str(stub_dir),
        "STUB_LOG": str(tmp_path / "calls"),
        "SLURM_JOB_ID": "77",
        "SLURM_RESTART_COUNT": str(restart),
        "SLURM_NTASKS": "2",
        **extra_env,
    }
    return subprocess.Popen(["bash", str(batch)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out


def _calls(tmp_path) -> list[str]:
    p = tmp_path / "calls"
    return p.read_text().splitlines() if p.exists() else []


def test_job_sh_and_launcher_agree_on_the_marker_and_layout():
    text = (SLURM_DIR / "job.sh").read_text()
    assert f"_sf_done=$SENSEFLOW_OUTPUT_DIR/{launch.DONE_MARKER}\n" in text
    assert "job${SLURM_JOB_ID}-restart${_sf_restart}.log" in text
    for name in launch.TEMPLATE_NAMES:
        assert (SLURM_DIR / f"{name}.sbatch").is_file(), name
    assert set(launch.PRESET_TEMPLATES.values()) <= set(launch.TEMPLATE_NAMES)


def test_job_finished_when_done_marker_written(tmp_path):
    proc, out = _job(tmp_path, f'echo training; touch {tmp_path}/out/DONE')
    text, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, text
    assert "finished" in text
    assert not any(c.startswith("scontrol requeue") for c in _calls(tmp_path))
    assert "training" in (out / "logs" / "job77-restart0.log").read_text()


def test_job_requeues_after_clean_stop_without_done(tmp_path):
    proc, out = _job(tmp_path, "exit 0")
    text, _ = proc.communicate(timeout=30)
    assert "scontrol requeue 77" in _calls(tmp_path), text
    assert proc.returncode == -signal.SIGTERM  # ended by the requeue, as Slurm does
    assert "requeueing job 77 (restart 1)" in text


def test_failed_requeue_is_reported(tmp_path):
    proc, out = _job(tmp_path, "exit 0", STUB_SCONTROL_RC="1")
    text, _ = proc.communicate(timeout=30)
    assert proc.returncode == 66, text
    assert "scontrol requeue failed with status 1" in text


def test_a_batch_script_without_its_command_array_is_exit_64(tmp_path):
    """A hand-edited script that sets SENSEFLOW_CMD as a string: one line, the setup exit code, nothing started."""
    proc, _ = _job(tmp_path, "", cmd_line="SENSEFLOW_CMD='senseflow train x'")
    text, _ = proc.communicate(timeout=30)
    assert proc.returncode == 64, text
    assert "the batch script must set SENSEFLOW_CMD as a bash array" in text
    assert not _calls(tmp_path)  # no srun, no requeue


@pytest.mark.parametrize("code", [2, 3, 4, 5, 130])
def test_causes_a_rerun_cannot_fix_never_requeue(tmp_path, code):
    # a config error, a NaN abort, no intact checkpoint, a failed save, Ctrl-C: even after progress
    cmd = f"mkdir -p {tmp_path}/out/checkpoints; echo step_00000004 >{tmp_path}/out/checkpoints/latest; exit {code}"
    proc, out = _job(tmp_path, cmd)
    text, _ = proc.communicate(timeout=30)
    assert proc.returncode == code, text
    assert "a cause a rerun cannot fix" in text
    assert not any(c.startswith("scontrol requeue") for c in _calls(tmp_path))


def test_failure_after_progress_requeues_and_resets_the_count(tmp_path):
    # a lost node: the surviving ranks abort (any other status) after the run published a newer checkpoint
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / "latest").write_text("step_00000002")
    (tmp_path / "out" / "logs").mkdir()
    (tmp_path / "out" / "logs" / "failures-without-progress").write_text("1\n")
    proc, out = _job(tmp_path, f"echo step_00000004 >{tmp_path}/out/checkpoints/latest; exit 1")
    text, _ = proc.communicate(timeout=30)
    assert "scontrol requeue 77" in _calls(tmp_path), text
    assert "after progress (step_00000002 -> step_00000004)" in text
    assert not (out / "logs" / "failures-without-progress").exists()


def test_failure_without_progress_requeues_then_gives_up(tmp_path):
    # a loop that crashes at start: one retry (the default), then exit 67 instead of requeueing for ever
    proc, out = _job(tmp_path, "exit 1")
    text, _ = proc.communicate(timeout=30)
    assert "scontrol requeue 77" in _calls(tmp_path), text
    assert "failure 1 in a row, retry limit 1" in text
    (tmp_path / "calls").unlink()
    proc, out = _job(tmp_path, "exit 1", restart=1)
    text, _ = proc.communicate(timeout=30)
    assert proc.returncode == 67, text
    assert "2 time(s) in a row without a new checkpoint (limit 1); not requeueing" in text
    assert not any(c.startswith("scontrol requeue") for c in _calls(tmp_path))
    # the cap is a setting of the job (--retries-without-progress)
    (tmp_path / "out" / "logs" / "failures-without-progress").unlink()
    proc, out = _job(tmp_path, "exit 1", SENSEFLOW_RETRIES_WITHOUT_PROGRESS="0")
    assert proc.communicate(timeout=30) and proc.returncode == 67


def test_stale_done_marker_does_not_hide_a_preemption(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "DONE").write_text("{}")
    proc, out = _job(tmp_path, "exit 0")
    text, _ = proc.communicate(timeout=30)
    assert "scontrol requeue 77" in _calls(tmp_path), text


def test_usr1_to_batch_shell_is_forwarded_then_requeued(tmp_path):
    # the training command saves on USR1 and exits 0, as the trainer contract says
    proc, out = _job(tmp_path, 'trap "echo saved; exit 0" USR1; echo started; while :; do sleep 0.05; done')
    pid_file = tmp_path / "bin" / "srun.pid"
    deadline = time.monotonic() + 20
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@N does
    text, _ = proc.communicate(timeout=30)
    calls = _calls(tmp_path)
    assert "scancel --signal=USR1 77" in calls, text
    assert "scontrol requeue 77" in calls, text
    assert "USR1: stop requested" in text
    assert "saved" in (out / "logs" / "job77-restart0.log").read_text()


def test_stop_save_complete_requeues_without_waiting_for_hung_ranks(tmp_path):
    # on USR1 the rank saves, writes STOPPED, then hangs (as in a NCCL teardown): the job requeues after the grace
    cmd = (f'trap "echo step_00000003 >{tmp_path}/out/checkpoints/latest; echo {{}} >{tmp_path}/out/STOPPED" USR1; '
           f'mkdir -p {tmp_path}/out/checkpoints; while :; do sleep 0.05; done')
    proc, out = _job(tmp_path, cmd, SENSEFLOW_TEARDOWN_GRACE="2")
    pid_file = tmp_path / "bin" / "srun.pid"
    deadline = time.monotonic() + 20
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    text, _ = proc.communicate(timeout=30)
    waited = time.monotonic() - t0
    os.kill(int(pid_file.read_text()), signal.SIGKILL)  # the hung "rank" (Slurm would end the step on requeue)
    assert "scontrol requeue 77" in _calls(tmp_path), text
    assert "still run 2 s later; requeueing without waiting for them" in text
    assert waited < 15, waited


def test_step_kept_alive_after_a_rank_failed_is_ended_and_requeued(tmp_path):
    # a rank failed (wrote FAILED) after progress; srun stays alive, as it does waiting for a lost node's tasks
    cmd = (f'mkdir -p {tmp_path}/out/checkpoints; echo step_00000008 >{tmp_path}/out/checkpoints/latest; '
           f'echo \'{{"rank": 0, "exit_code": 1, "reason": "RuntimeError: Connection closed by peer"}}\' >{tmp_path}/out/FAILED; '
           'while :; do sleep 0.05; done')
    proc, out = _job(tmp_path, cmd, SENSEFLOW_TEARDOWN_GRACE="1", SENSEFLOW_KILL_SLACK="1")
    text, _ = proc.communicate(timeout=30)
    assert "Connection closed by peer" in text and "(a lost node's tasks cannot be reached); ending it" in text, text
    assert "failed with status 1 after progress (none -> step_00000008)" in text
    assert "scontrol requeue 77" in _calls(tmp_path)


def test_launcher_and_inherited_variables_do_not_reach_the_ranks(tmp_path):
    # a login profile's MASTER_ADDR=localhost and an interactive allocation's SLURM_MEM_PER_CPU; the
    # rendezvous address comes from the first node's NodeAddr, resolved once in the batch shell
    cmd = f'env >{tmp_path}/rank-env; touch {tmp_path}/out/DONE'
    proc, out = _job(tmp_path, cmd, MASTER_ADDR="localhost", MASTER_PORT="1234", RANK="5", WORLD_SIZE="9",
                     SLURM_MEM_PER_CPU="4000", TORCHELASTIC_RUN_ID="x", SLURM_JOB_NODELIST="gpu-[3-4]",
                     STUB_NODES="gpu-3,gpu-4", STUB_NODEADDR="127.0.0.1")
    text, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, text
    env = dict(line.split("=", 1) for line in (tmp_path / "rank-env").read_text().splitlines() if "=" in line)
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "SLURM_MEM_PER_CPU", "TORCHELASTIC_RUN_ID"):
        assert name not in env, name
    assert env["SENSEFLOW_MASTER_ADDR"] == "127.0.0.1"
    assert "scontrol show node -o gpu-3" in _calls(tmp_path)
    assert "rendezvous 127.0.0.1" in text


def test_srun_line_carries_teardown_and_site_arguments(tmp_path):
    stub_dir = tmp_path / "bin"
    out = tmp_path / "out"
    batch_extra = "SENSEFLOW_SRUN_ARGS=(--container-image=nvcr.io/x:1 '--container-mounts=/a b:/data')\n"
    proc, out = _job(tmp_path, f"touch {out}/DONE", SENSEFLOW_TEARDOWN_GRACE="45")
    proc.communicate(timeout=30)
    srun = [c for c in _calls(tmp_path) if c.startswith("srun ")][0]
    assert srun.startswith("srun --kill-on-bad-exit=1 --wait=45 --label bash -c"), srun
    # with site arguments: they go on the srun line, after ours and before the command
    batch = tmp_path / "batch.sh"
    batch.write_text(batch.read_text().replace("source ", batch_extra + "source ", 1))
    (tmp_path / "calls").unlink()
    env = {**os.environ, "PATH": f"{stub_dir}:{os.environ['PATH']}", "STUB_DIR": str(stub_dir),
           "STUB_LOG": str(tmp_path / "calls"), "SLURM_JOB_ID": "77"}
    subprocess.run(["bash", str(batch)], env=env, capture_output=True, timeout=30)
    srun = [c for c in _calls(tmp_path) if c.startswith("srun ")][0]
    assert "--label --container-image=nvcr.io/x:1 --container-mounts=/a b:/data bash -c" in srun, srun


def test_requeue_stops_at_max_restarts(tmp_path):
    proc, out = _job(tmp_path, "exit 0", restart=3, max_restarts=3)
    text, _ = proc.communicate(timeout=30)
    assert proc.returncode == 65, text
    assert "already restarted 3 times" in text
    assert not any(c.startswith("scontrol requeue") for c in _calls(tmp_path))


def test_per_restart_log_names(tmp_path):
    proc, out = _job(tmp_path, f"touch {tmp_path}/out/DONE", restart=2)
    proc.communicate(timeout=30)
    assert (out / "logs" / "job77-restart2.log").is_file()


# --------------------------------------------------------------------------- the Slurm fixture's skip rule


def test_slurm_fixture_skips_without_root_and_says_why(monkeypatch):
    from tests import slurm_cluster

    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(slurm_cluster.SlurmUnavailable, match="needs root"):
        slurm_cluster.ensure_installed()


def test_slurm_fixture_skips_without_apt(monkeypatch):
    from tests import slurm_cluster

    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(slurm_cluster, "_installed", lambda: False)
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: None)
    with pytest.raises(slurm_cluster.SlurmUnavailable, match="no apt-get"):
        slurm_cluster.ensure_installed()
