"""A real single-node Slurm on localhost for tests: install, start, submit, wait, tear down.

`SlurmCluster.start()` installs Debian's `slurm-wlm` and `munge` when they are
missing (root and apt-get needed), writes a private slurm.conf (its own ports,
state and spool directories under a temporary folder; no accounting database),
starts munged (unless one answers already), slurmctld and slurmd without
systemd, and waits until the node is idle. `stop()` cancels what is left and
stops every daemon it started. The session fixture `slurm_cluster` in
conftest.py wraps it; tests submit with `cluster.submit_and_wait(script)`.

When Slurm is missing and cannot be installed here (not root, or no apt-get)
the fixture skips with a message that says so; SENSEFLOW_REQUIRE_SLURM=1 turns
that skip into a failure. Where installing is possible (root with apt-get, as
on CI) a failed install is an error, not a skip, and so is a cluster that does
not come up (with the daemons' log tails). `make test-fast` leaves these
slow tests out.

Settings that matter on a 2-core test machine:
- `SlurmdParameters=config_overrides` + CPUs=4: two 2-task jobs fit even when
  the machine has fewer cores than that.
- `AuthInfo=cred_expire=20`: a requeued job waits cred_expire + 1 s in PENDING
  (default 120 s); shorter values risk expired step credentials on a loaded box.
- `SchedulerParameters=bf_interval=1,sched_interval=2`: the requeued job is
  started by the next scheduling pass (backfill's default interval is 30 s).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_senseflow.distributed import free_port

TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
DAEMONS = ("slurmctld", "slurmd", "munged")
PACKAGES = ("slurm-wlm", "munge")
MUNGE_SOCKET_DIR = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")


class SlurmUnavailable(RuntimeError):
    """Slurm is missing and this machine cannot install it: not root, or no apt-get (the tests skip)."""


class SlurmError(RuntimeError):
    """Slurm is installed but the test cluster misbehaved (always a test error)."""


def _run(cmd: list[str], timeout: float = 60, env: dict[str, str] | None = None, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def _installed() -> bool:
    return all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS) and shutil.which("sbatch") is not None


def ensure_installed() -> float:
    """Install slurm-wlm and munge with apt-get when missing; return the seconds it took (0 when present)."""
    if os.geteuid() != 0:
        # slurmd must be root to start job steps; munged and apt-get need it too
        raise SlurmUnavailable("a private single-node Slurm (slurmd, munged, and apt-get when missing) needs root; run the tests as root")
    if _installed():
        return 0.0
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm (slurm-wlm, munge) is not installed and this machine has no apt-get to install it")
    t0 = time.monotonic()
    # The man-db trigger rebuilds the manual index after the install: minutes on
    # a small machine, for pages nobody reads here.
    try:
        Path("/etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
        Path("/etc/dpkg/dpkg.cfg.d/01_noman").write_text("path-exclude /usr/share/man/*\n")
        Path("/var/lib/man-db/auto-update").unlink(missing_ok=True)
    except OSError:
        pass
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", *PACKAGES]
    proc = _run(install, timeout=900, env=env)
    if proc.returncode != 0:
        # A fresh image may carry no package lists yet.
        _run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"], timeout=600, env=env)
        proc = _run(install, timeout=900, env=env)
    if proc.returncode != 0 or not _installed():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SlurmError(f"apt-get install {' '.join(PACKAGES)} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return time.monotonic() - t0


@dataclass
class JobInfo:
    """`scontrol show job` of one job, as a dict of its Key=Value fields."""

    job_id: str
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> str:
        return self.fields.get("JobState", "UNKNOWN")

    @property
    def restarts(self) -> int:
        return int(self.fields.get("Restarts", "0"))

    @property
    def exit_code(self) -> str:
        return self.fields.get("ExitCode", "?")

    def __str__(self) -> str:
        keys = ("JobState", "Reason", "ExitCode", "Restarts", "RunTime", "StdOut")
        return f"job {self.job_id}: " + " ".join(f"{k}={self.fields.get(k, '?')}" for k in keys)


@dataclass
class SlurmCluster:
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="senseflow-slurm-")))
    node: str = "localhost"
    cpus: int = 4
    timings: dict[str, float] = field(default_factory=dict)
    _started: list[tuple[str, int]] = field(default_factory=list)
    _old_slurm_conf: str | None = None

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------ lifecycle

    def start(self, idle_timeout: float = 60) -> "SlurmCluster":
        self.timings["install_s"] = ensure_installed()
        t0 = time.monotonic()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        self._daemon("slurmctld", ["slurmctld"], self.root / "slurmctld.pid")
        self._start_nodes()
        # Clients (sbatch from the launcher, scontrol in job.sh) find this
        # cluster through SLURM_CONF; jobs inherit it from the submitting env.
        self._old_slurm_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        self.wait_idle(self.nodes, idle_timeout)
        self.timings["start_s"] = time.monotonic() - t0
        return self

    @property
    def nodes(self) -> list[str]:
        return [self.node]

    def _start_nodes(self) -> None:
        self._daemon("slurmd", ["slurmd", "-N", self.node], self.root / "slurmd.pid")

    def wait_idle(self, nodes: list[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while time.monotonic() < deadline:
            states = [self.run(["sinfo", "-h", "-n", n, "-o", "%T"]).stdout.strip() for n in nodes]
            if all(st == "idle" for st in states):
                return
            time.sleep(0.25)
        raise SlurmError(f"nodes {nodes} are {states}, not idle, {timeout:.0f} s after start\n{self.log_tails()}")

    def _start_munge(self) -> None:
        if _run(["bash", "-c", "munge -n | unmunge"], timeout=20).returncode == 0:
            return  # a munged is already serving the default socket; share it
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        MUNGE_SOCKET_DIR.chmod(0o755)
        # munged refuses to run as root; Debian's package runs it as `munge`.
        _run(["runuser", "-u", "munge", "--", "munged"], timeout=20, check=True)
        pid_file = MUNGE_SOCKET_DIR / "munged.pid"
        for _ in range(40):
            if pid_file.exists() and _run(["bash", "-c", "munge -n | unmunge"], timeout=20).returncode == 0:
                self._started.append(("munged", int(pid_file.read_text().strip())))
                return
            time.sleep(0.25)
        raise SlurmError("munged started but does not answer (munge -n | unmunge fails)")

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(
            f"""# Single-node test cluster written by tests/slurm_cluster.py
ClusterName=senseflowtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=20
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MinJobAge=3600
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _daemon(self, name: str, cmd: list[str], pid_file: Path) -> None:
        _run(cmd, timeout=30, env=self.env, check=True)  # both daemonise
        for _ in range(80):
            if pid_file.exists() and pid_file.read_text().strip():
                self._started.append((name, int(pid_file.read_text().strip())))
                return
            time.sleep(0.25)
        raise SlurmError(f"{name} did not write {pid_file}\n{self.log_tails()}")

    def stop(self) -> None:
        """Cancel remaining jobs, stop the daemons this cluster started, restore SLURM_CONF."""
        if self.conf.exists() and any(n == "slurmctld" for n, _ in self._started):
            try:
                self.run(["scancel", "--full", "--quiet", "--user", "root"], timeout=20)
                time.sleep(1)
                self.run(["scontrol", "shutdown"], timeout=20)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for name, pid in reversed(self._started):
            self._terminate(pid, name)
        self._started.clear()
        if self._old_slurm_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._old_slurm_conf

    @staticmethod
    def _terminate(pid: int, name: str, grace: float = 10) -> None:
        def alive() -> bool:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
                if done:
                    return False
            except ChildProcessError:
                pass  # daemons double-fork: not our child
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return False
            # "pid (comm) state ...": a zombie (Z) is dead, whoever reaps it; a
            # recycled pid with another name is not ours to kill.
            comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
            return state not in "ZX" and comm == name

        deadline = time.monotonic() + grace
        sent = False
        while alive():
            if not sent:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    return
                sent = True
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.1)

    # ------------------------------------------------------------------ jobs

    def run(self, cmd: list[str], timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
        return _run(cmd, timeout=timeout, env=self.env, check=check)

    def submit(self, script: str | Path, *sbatch_args: str) -> str:
        out = self.run(["sbatch", "--parsable", *sbatch_args, str(script)], check=True).stdout
        return out.strip().split(";")[0]

    def job_info(self, job_id: str) -> JobInfo:
        # `scontrol show job` works without an accounting database (sacct does not)
        # for MinJobAge seconds after the job ends.
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        fields: dict[str, str] = {}
        if proc.returncode == 0:
            for token in proc.stdout.split():
                key, sep, value = token.partition("=")
                if sep and key not in fields:
                    fields[key] = value
        return JobInfo(str(job_id), fields)

    def wait(self, job_id: str, timeout: float = 300, poll: float = 0.5) -> JobInfo:
        """Wait until the job reaches a terminal state; raise SlurmError with its output on timeout."""
        deadline = time.monotonic() + timeout
        info = self.job_info(job_id)
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.state in TERMINAL_STATES:
                return info
            time.sleep(poll)
        self.run(["scancel", str(job_id)])
        raise SlurmError(f"{info} still not finished after {timeout:.0f} s (cancelled)\n{self.job_output(info)}\n{self.log_tails()}")

    def submit_and_wait(self, script: str | Path, *sbatch_args: str, timeout: float = 300) -> JobInfo:
        return self.wait(self.submit(script, *sbatch_args), timeout=timeout)

    def job_output(self, info: JobInfo, max_chars: int = 4000) -> str:
        path = info.fields.get("StdOut")
        if not path or not Path(path).exists():
            return f"(no batch output for job {info.job_id})"
        return f"--- {path}\n" + Path(path).read_text(errors="replace")[-max_chars:]

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log}\n" + "\n".join(tail))
        return "\n".join(out)


# --------------------------------------------------------------------------- two nodes

NETNS_BRIDGE = "sfbr0"
NETNS_SUBNET = "10.77.0"  # .1 the bridge (slurmctld, the test), .2 and up the nodes
NETNS_IFNAME = "sfnet0"  # the node side of each veth pair, same name in every namespace (GLOO_SOCKET_IFNAME)


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to make network namespaces"
    probe = f"sfprobe{os.getpid()}"
    proc = _run(["ip", "netns", "add", probe], timeout=20)
    if proc.returncode != 0:
        return f"`ip netns add` failed: {(proc.stderr or proc.stdout).strip()}"
    _run(["ip", "netns", "del", probe], timeout=20)
    return None


@dataclass
class TwoNodeCluster(SlurmCluster):
    """One slurmctld and two slurmd "nodes" n1 and n2, each in its own network namespace.

    Each node is a namespace `sf-nK` holding one end of a veth pair (NETNS_IFNAME,
    10.77.0.(K+1)/24); the other ends hang on a bridge in the root namespace
    (10.77.0.1, where slurmctld and the test run). slurmd started inside a
    namespace passes it to slurmstepd and every task, so a job's ranks on n1 and
    n2 talk to each other over the bridge as two hosts would; killing every
    process in `sf-n2` is a lost node. The names n1/n2 resolve nowhere: Slurm
    reaches the nodes through NodeAddr, and so must the product's rendezvous.
    Nothing leaves the machine (no route, no forwarding). Processes on one
    machine still share a hostname, so the tests set GLOO_SOCKET_IFNAME
    (gloo would otherwise pick the address the hostname resolves to, which
    exists only in the root namespace; on a real cluster it is the node's own).
    """

    node: str = "n1"
    cpus: int = 2
    # Slurm's default: a lost node is declared down (and its jobs NODE_FAIL-requeued by Slurm itself)
    # only after this long. A real cluster's surviving ranks abort on NCCL errors well before that, and
    # the job script must decide; a short value here would let Slurm's own requeue hide that path.
    slurmd_timeout: int = 300

    @property
    def nodes(self) -> list[str]:
        return ["n1", "n2"]

    def addr(self, node: str) -> str:
        return f"{NETNS_SUBNET}.{self.nodes.index(node) + 2}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), "GLOO_SOCKET_IFNAME": NETNS_IFNAME}

    def job_environment(self, monkeypatch) -> None:
        """What a job submitted from this process needs (it inherits the submitting environment);
        only the submission may see it: in-process ranks of the test have no such interface."""
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", NETNS_IFNAME)

    def _net(self, *cmd: str) -> None:
        _run(["ip", *cmd], timeout=20, check=True)

    def _teardown_net(self) -> None:
        for node in self.nodes:
            _run(["ip", "netns", "del", f"sf-{node}"], timeout=20)
            _run(["ip", "link", "del", f"sfv-{node}"], timeout=20)
        _run(["ip", "link", "del", NETNS_BRIDGE], timeout=20)

    def start(self, idle_timeout: float = 60) -> "TwoNodeCluster":
        why = netns_unavailable()
        if why:
            raise SlurmUnavailable(why)
        self._teardown_net()  # what an interrupted earlier session left
        self._net("link", "add", NETNS_BRIDGE, "type", "bridge")
        self._net("addr", "add", f"{NETNS_SUBNET}.1/24", "dev", NETNS_BRIDGE)
        self._net("link", "set", NETNS_BRIDGE, "up")
        for node in self.nodes:
            ns = f"sf-{node}"
            self._net("netns", "add", ns)
            self._net("link", "add", f"sfv-{node}", "type", "veth", "peer", "name", NETNS_IFNAME, "netns", ns)
            self._net("link", "set", f"sfv-{node}", "master", NETNS_BRIDGE, "up")
            self._net("-n", ns, "addr", "add", f"{self.addr(node)}/24", "dev", NETNS_IFNAME)
            self._net("-n", ns, "link", "set", NETNS_IFNAME, "up")
            self._net("-n", ns, "link", "set", "lo", "up")
        super().start(idle_timeout)
        return self

    def _write_conf(self) -> None:
        super()._write_conf()
        r = self.root
        text = self.conf.read_text()
        # slurmctld runs only on a host of this name (localhost is accepted only with 127.0.0.1)
        text = text.replace("# Single-node", "# Two-node").replace(
            "SlurmctldHost=n1(127.0.0.1)", f"SlurmctldHost={socket.gethostname()}({NETNS_SUBNET}.1)")
        text = text.replace(f"SlurmdSpoolDir={r}/spool", f"SlurmdSpoolDir={r}/spool/%n")
        text = text.replace(f"SlurmdPidFile={r}/slurmd.pid", f"SlurmdPidFile={r}/slurmd.%n.pid")
        text = text.replace(f"SlurmdLogFile={r}/log/slurmd.log", f"SlurmdLogFile={r}/log/slurmd.%n.log")
        head, _, _ = text.partition("NodeName=")
        head += f"SlurmdTimeout={self.slurmd_timeout}\n"
        for node in self.nodes:
            head += f"NodeName={node} NodeAddr={self.addr(node)} CPUs={self.cpus} State=UNKNOWN\n"
        head += f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP\n"
        self.conf.write_text(head)

    def _start_nodes(self) -> None:
        for node in self.nodes:
            self.start_node(node)

    def start_node(self, node: str) -> None:
        (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        pid_file = self.root / f"slurmd.{node}.pid"
        pid_file.unlink(missing_ok=True)
        # nsenter, not `ip netns exec`: that one also mounts a fresh /sys, which hides the cgroup
        # file system slurmd needs at start
        self._daemon("slurmd", ["nsenter", f"--net=/run/netns/sf-{node}", "slurmd", "-N", node], pid_file)

    def kill_node(self, node: str) -> list[int]:
        """A lost node: SIGKILL to every process in its namespace (slurmd, slurmstepd, the ranks)."""
        pids = [int(p) for p in _run(["ip", "netns", "pids", f"sf-{node}"], timeout=20).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def stop(self) -> None:
        super().stop()
        for node in self.nodes:
            self.kill_node(node)
        self._teardown_net()
