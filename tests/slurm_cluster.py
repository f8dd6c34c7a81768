"""A real single-node Slurm cluster for tests: Debian's munged, slurmctld and slurmd, started and stopped here.

Configuration and every daemon's state live in a scratch folder: the
configuration is passed with SLURM_CONF, so the machine's /etc/slurm is left
alone, and this cluster's own munged keeps its socket, pid, log and seed there
(slurm.conf's AuthInfo names the socket), so nothing is left in /run/munge or
/var/lib/munge. Only daemons this module started are stopped.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Sequence

from distclip.cluster import free_ports

CONF = """\
ClusterName=distclip-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait=5
FirstJobId={first_job}
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo")


class SlurmCluster:
    def __init__(self, scratch: Path):
        missing = [b for b in BINARIES if shutil.which(b) is None]
        if missing:
            raise RuntimeError(
                f"Slurm is not installed ({', '.join(missing)} missing): run scripts/setup.sh, which installs "
                "Debian's slurmctld, slurmd, slurm-client and munge"
            )
        self.dir = scratch
        self.host = socket.gethostname()
        self.conf = scratch / "slurm.conf"
        self._pids: List[int] = []

    @property
    def env(self) -> Dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        ports = free_ports(2)
        # Job ids start high and vary, and PMIx keeps its per-step folders in our scratch folder:
        # a step killed by an earlier run leaves /tmp/spmix_appdir_<uid>_<job>.<step> behind,
        # which would make the same step id of a new cluster fail to launch.
        (self.dir / "pmix").mkdir(exist_ok=True)
        (self.dir / "mpi.conf").write_text(f"PMIxCliTmpDirBase={self.dir / 'pmix'}\n")
        self.conf.write_text(CONF.format(host=self.host, d=self.dir, cpus=os.cpu_count() or 2,
                                         ctld_port=ports[0], d_port=ports[1], first_job=1000 + ports[0] % 50000))
        munge = self.dir / "munge"
        munge.mkdir(mode=0o700, exist_ok=True)
        # --force: as root (the only user these tests run as), with its files in our scratch folder.
        subprocess.run(["munged", "--force", f"--socket={munge / 'munge.socket'}", f"--pid-file={munge / 'munged.pid'}",
                        f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"],
                       check=True, timeout=30)
        self._pids.append(self._read_pid(munge / "munged.pid", timeout))
        subprocess.run(["slurmctld", "-i"], env=self.env, check=True, timeout=30)
        subprocess.run(["slurmd"], env=self.env, check=True, timeout=30)
        for name in ("slurmctld", "slurmd"):
            self._pids.append(self._read_pid(self.dir / f"{name}.pid", timeout))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True, timeout=10)
            if out.stdout.strip() in ("idle", "mixed"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node never became idle (sinfo: {out.stdout!r} {out.stderr!r}):\n{self.logs()}")

    def _read_pid(self, path: Path, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                return int(path.read_text().strip())
            time.sleep(0.2)
        raise RuntimeError(f"{path.name} never appeared:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.dir.glob("*.log")))

    def sbatch_wait(self, script: str, args: List[str], env: Dict[str, str], timeout: float = 300,
                    script_args: Sequence[str] = ()) -> subprocess.CompletedProcess:
        """`sbatch --wait`, polling twice a second (sbatch --wait itself backs off to 32 s between polls).

        Returns returncode 0 if the job completed, else 1, with `stdout` the job's final fields."""
        job = self.submit(script, args, env, script_args)
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job)
            if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                break
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job], env=self.env, capture_output=True, timeout=30)
                raise subprocess.TimeoutExpired(["sbatch", script], timeout)
            time.sleep(0.5)
        return subprocess.CompletedProcess(["sbatch", script], int(fields["JobState"] != "COMPLETED"),
                                           " ".join(f"{k}={v}" for k, v in fields.items()), "")

    def submit(self, script: str, args: List[str], env: Dict[str, str], script_args: Sequence[str] = ()) -> str:
        """`sbatch` without waiting; returns the job ID."""
        cmd = ["sbatch", "--parsable"] + args + [script] + list(script_args)
        r = subprocess.run(cmd, env={**self.env, **env}, capture_output=True, text=True, timeout=60, check=True)
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job`'s fields (JobState, Restarts, ...)."""
        r = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], env=self.env, capture_output=True,
                           text=True, timeout=30, check=True)
        return dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)

    def stop(self) -> None:
        """Cancels every job, then stops the daemons this cluster started and any step they left behind.

        slurmstepd daemonizes (it is no child of slurmd), so leftover steps are found as the slurmstepd
        processes whose environment names this cluster's configuration (slurmd passes its SLURM_CONF on):
        another cluster's steps, another test run's included, are left alone.
        """
        import psutil

        # scancel reaches this cluster's slurmctld only (SLURM_CONF): its jobs, no one else's.
        subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self._new_steps():
            time.sleep(0.5)
        for pid in reversed(self._pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 20
        for pid in self._pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for step in self._new_steps():
            for proc in step.children(recursive=True) + [step]:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass

    def _new_steps(self):
        import psutil

        mine = f"SLURM_CONF={self.conf}".encode()
        steps = []
        for p in psutil.process_iter(["name"]):
            if p.info["name"] != "slurmstepd":
                continue
            try:
                with open(f"/proc/{p.pid}/environ", "rb") as f:
                    if mine in f.read().split(b"\0"):
                        steps.append(p)
            except OSError:  # gone meanwhile
                continue
        return steps


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
