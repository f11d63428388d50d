"""Real cluster services for tests: an `mlflow server` (HTTP tracking, as a cluster uses) and a single-node Slurm.

Any test can use them: tests/conftest.py imports the fixtures `mlflow_server` (one server per test session) and
`slurm_cluster` (one cluster per test session, started on first use).

- `mlflow_server`: `mlflow server` on a free loopback port with a sqlite backend and a local artifact folder
  (artifacts are proxied over HTTP, `mlflow-artifacts:/`, as cluster jobs need), in its own process group
  (lora_sweep.tracking.ui.running_server); teardown stops the whole group and checks that nothing of it is left.
  Tests share it: give each test its own experiment name. Ready in 7-25 s (2 busy cores).
- `slurm_cluster`: Debian's Slurm 22.05 (`slurm-wlm`, `munge`; .ci/run installs them with apt-get). The fixture
  writes a `slurm.conf` for this one machine (its CPUs, sockets and memory as `slurmd -C` reports them, two fake
  GPUs as `gres` so `--gpus-per-node` is honoured and each job gets its own CUDA_VISIBLE_DEVICES,
  `proctrack/linuxproc`, no cgroups, no accounting), creates a munge key, starts `munged`, `slurmctld` and `slurmd`
  in the foreground in one process group of their own, on free ports bound to 127.0.0.1 only
  (`CommunicationParameters=NoCtldInAddrAny,NoInAddrAny`: srun's ports too), and waits until `sinfo` shows the node
  idle (about 1 s). Tuned for tests: the scheduler runs every 1-2 s and a requeued job waits `cred_expire` = 10 s
  (Slurm's defaults: 30-60 s and 120 s). Clients find it through `SLURM_CONF` (`cluster.env`); no job accounting,
  so `sacct` fails, as on clusters without slurmdbd. Teardown cancels every job, stops the daemons and
  asserts that no process carrying this cluster's `SLURM_CONF` (daemons, slurmstepd, job processes) is left.
  Skipped with the reason when the binaries are missing or we are not root (slurmd runs jobs as their user).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "srun", "scancel", "squeue")
FAKE_GPUS = 2


# --------------------------------------------------------------------------------------------------- MLflow server

@dataclass(frozen=True)
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT: what MLFLOW_TRACKING_URI is set to
    root: Path  # holds mlflow.db (the backend store) and mlruns/ (the artifacts the server proxies)
    pgid: int
    log_path: Path


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """One `mlflow server` for the test session (sqlite backend, loopback, proxied local artifacts)."""
    from lora_sweep.tracking.ui import running_server

    root = tmp_path_factory.mktemp("mlflow-server")
    store = f"sqlite:///{root / 'mlflow.db'}"
    with running_server(store, port=free_port(), timeout_s=90, log_path=root / "server.log") as server:
        pgid = server.process.pid
        yield MlflowServer(server.url, root, pgid, server.log_path)
    deadline = time.monotonic() + 10
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(pgid), f"mlflow server processes left in group {pgid}"


# ------------------------------------------------------------------------------------------------------- Slurm

def which(binary: str) -> str | None:
    """A Slurm or munge binary on PATH, or in /usr/sbin and /sbin (daemons live there; not every PATH has them)."""
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")


def slurm_unavailable() -> str | None:
    """Why a local Slurm cannot run here (None when it can)."""
    missing = [b for b in SLURM_BINARIES if which(b) is None]
    if missing:
        return (f"Slurm binaries missing ({', '.join(missing)}): apt-get install slurm-wlm munge "
                "(.ci/run does this when it can)")
    if os.geteuid() != 0:
        return "not root: slurmd must run as root to start jobs (and munged to read its key)"
    return None


def free_port() -> int:
    """A port the OS says is free right now (so a test's server does not clash with a developer's own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_hardware() -> str:
    """`slurmd -C`'s hardware fields for this machine (CPUs, Boards, SocketsPerBoard, CoresPerSocket,
    ThreadsPerCore, RealMemory in MiB), so the node registers without a mismatch that would drain it."""
    slurmd = which("slurmd") or "slurmd"
    out = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=30, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("NodeName="))
    return " ".join(f for f in line.split()[1:] if not f.startswith("UpTime"))


def _fake_gpu_devices(root: Path) -> int:
    """Character devices standing in for /dev/nvidiaN (each a copy of /dev/null: Slurm only needs a device to
    count and index; without cgroups nothing is fenced). Returns how many were made: 0 where mknod is refused."""
    for i in range(FAKE_GPUS):
        try:
            os.mknod(root / f"gpu{i}", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except OSError:
            return 0
    return FAKE_GPUS


def slurm_conf(root: Path, node: str, hardware: str, ctld_port: int, slurmd_port: int, gpus: int) -> str:
    """A minimal slurm.conf for one node on loopback; every path under `root`."""
    return f"""\
# One-node test cluster written by tests/cluster_fixtures.py
ClusterName=lorasweeptest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
KillWait=5
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 {hardware}{f" Gres=gpu:{gpus}" if gpus else ""} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    gpus: int  # fake GPUs the node declares (0 where devices could not be made: then ask for none)
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm clients (sbatch, sinfo, submitit): this cluster's SLURM_CONF."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=timeout)

    def node_state(self) -> str:
        out = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%t")
        return out.stdout.strip() if out.returncode == 0 else f"(sinfo failed: {out.stderr.strip()})"

    def logs(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def listening(self) -> list[tuple[int, str, str, int]]:
        """(pid, name, address, port) of every TCP listener of this cluster's processes (daemons, srun, jobs)."""
        import psutil

        ours = {pid for pid, _ in self.leftovers()}
        found = []
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.pid in ours:
                try:
                    name = psutil.Process(conn.pid).name()
                except psutil.Error:
                    name = "?"
                found.append((conn.pid, name, conn.laddr.ip, conn.laddr.port))
        return found

    def leftovers(self) -> list[tuple[int, str]]:
        """Live processes whose environment names this cluster's slurm.conf: the daemons, slurmstepd and jobs."""
        import psutil

        marker = str(self.conf)
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                    continue
                if proc.environ().get("SLURM_CONF") == marker:
                    found.append((proc.pid, " ".join(proc.info["cmdline"] or [])[:160]))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found


def start_slurm(root: Path, ready_timeout_s: float = 60) -> SlurmCluster:
    """Write the config and key under `root` (keep it short: munge's socket path must fit 107 bytes), start
    munged, slurmctld and slurmd in one new process group, and wait until the node is idle."""
    node = socket.gethostname().split(".")[0]
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    for folder in (root, root / "munge"):  # clients of any user may reach munged's socket (it warns otherwise)
        folder.chmod(0o755)
    gpus = _fake_gpu_devices(root)
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, node, node_hardware(), free_port(), free_port(), gpus))
    if gpus:
        (root / "gres.conf").write_text(f"NodeName={node} Name=gpu File={root}/gpu[0-{gpus - 1}]\n")
    cluster = SlurmCluster(root, conf, node, gpus)
    env = cluster.env
    log = root / "log"
    commands = [
        [which("munged") or "munged", "--foreground", "--force", f"--socket={root}/munge/munge.socket",
         f"--key-file={key}", f"--log-file={log}/munged.log", f"--pid-file={root}/munge/munged.pid",
         f"--seed-file={root}/munge/munged.seed"],
        [which("slurmctld") or "slurmctld", "-D", "-c", "-f", str(conf)],
        [which("slurmd") or "slurmd", "-D", "-N", node, "-f", str(conf)],
    ]
    try:
        for command in commands:
            group = cluster.processes[0].pid if cluster.processes else 0  # munged leads the group
            name = Path(command[0]).name
            with open(log / f"{name}.out", "ab") as out:
                cluster.processes.append(subprocess.Popen(
                    command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root,
                    preexec_fn=lambda g=group: os.setpgid(0, g)))  # process_group= needs Python 3.11
            if name == "munged" and not _wait(lambda: (root / "munge" / "munge.socket").exists(), 20):
                raise RuntimeError("munged did not create its socket")
        if not _wait(lambda: cluster.node_state() == "idle", ready_timeout_s, interval=0.5):
            raise RuntimeError(f"the node is not idle after {ready_timeout_s:.0f} s: {cluster.node_state()}")
        exposed = [x for x in cluster.listening() if x[2] != "127.0.0.1"]
        if exposed:
            raise RuntimeError(f"Slurm listens beyond loopback: {exposed}")
    except BaseException as exc:
        left = stop_slurm(cluster)
        raise RuntimeError(f"local Slurm did not start: {exc} (left: {left})\n{cluster.logs()}") from exc
    return cluster


def _wait(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def stop_slurm(cluster: SlurmCluster, grace_s: float = 15) -> list[tuple[int, str]]:
    """Cancel every job, stop the daemons' group (SIGTERM, then SIGKILL), then SIGKILL any process still carrying
    this cluster's SLURM_CONF. Returns what had to be killed that way (should be nothing)."""
    if cluster.processes and cluster.processes[-1].poll() is None:
        cluster.run("scancel", "--full", "--user", "root", timeout=10)
        _wait(lambda: not cluster.run("squeue", "-h", timeout=10).stdout.strip(), grace_s, interval=0.5)
    if cluster.processes:
        pgid = cluster.processes[0].pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            if _wait(lambda: all(p.poll() is not None for p in cluster.processes), wait_s) and not _group_alive(pgid):
                break
    _wait(lambda: not cluster.leftovers(), 5, interval=0.2)  # e.g. slurmstepd finishing a cancelled job
    stragglers = cluster.leftovers()
    for pid, _ in stragglers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return stragglers


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running one-node Slurm for the test session (see the module docstring); skipped where it cannot run."""
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))  # short: unix socket paths are limited
    try:
        cluster = start_slurm(root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield cluster
    finally:
        left = stop_slurm(cluster)
        logs = cluster.logs()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the test Slurm left after teardown (killed now): {left}\n{logs}"

