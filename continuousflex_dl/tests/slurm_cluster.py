"""A one-node SLURM cluster on localhost for tests: munged + slurmctld + slurmd in a temporary folder.

Uses Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them when missing, as root).
Everything (configuration, key, sockets, state, logs, job-completion records) lives in one
folder; the daemons run in the foreground as children of the test process and are stopped
by :meth:`LocalSlurm.stop`. ``sacct --completion`` reads the job-completion file, so no
database is needed. Also writes the Scipion ``hosts.conf`` with a SLURM queue that the tests
(and the README's cluster section) use.
"""
import os
import shutil
import socket
import subprocess
import time
import unittest
from pathlib import Path
from typing import Dict, List

PARTITION = "cfdl"
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sacct", "sinfo")

#: The Scipion host configuration of a SLURM queue; each chunk job asks for CPUS_PER_JOB cores.
#: (``%%T`` is squeue's state field: Scipion formats the command, so a literal % is doubled.)
HOSTS_CONF = """[localhost]
PARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d --map-by node %_(COMMAND)s
NAME = SLURM
MANDATORY = 0
SUBMIT_COMMAND = sbatch %_(JOB_SCRIPT)s
CANCEL_COMMAND = scancel %_(JOB_ID)s
CHECK_COMMAND = squeue -h -j %_(JOB_ID)s -o %%T
JOB_DONE_REGEX = COMPLETED|FAILED|CANCELLED|TIMEOUT|OUT_OF_MEMORY|NODE_FAIL|BOOT_FAIL|PREEMPTED
SUBMIT_TEMPLATE = #!/bin/bash
    #SBATCH --job-name=%_(JOB_NAME)s
    #SBATCH --partition=%_(JOB_QUEUE)s
    #SBATCH --output=%_(JOB_LOGS)s.out
    #SBATCH --error=%_(JOB_LOGS)s.err
    #SBATCH --ntasks=1
    #SBATCH --cpus-per-task=%_(CPUS_PER_JOB)s
    #SBATCH --time=%_(JOB_HOURS)s:00:00
    %_(JOB_COMMAND)s
QUEUES = {"<partition>": [["CPUS_PER_JOB", "1", "CPUs per job", "CPU cores of each chunk job"],
    ["QUEUE_FOR_JOBS", "Y", "Use queue for steps",
     "Y: the protocol runs here and each of its chunk steps is a job of this queue"]]}
QUEUES_DEFAULT = {"CPUS_PER_JOB": "1"}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """A running one-node cluster; ``env`` holds SLURM_CONF for the commands and their callers."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env: Dict[str, str] = dict(os.environ, SLURM_CONF=str(self.conf))
        self._daemons: List[subprocess.Popen] = []

    # ------------------------------------------------------------------ start / stop
    @classmethod
    def start_or_skip(cls, root: Path) -> "LocalSlurm":
        """Start the cluster, or raise unittest.SkipTest saying what is missing."""
        missing = [p for p in PROGRAMS if shutil.which(p) is None]
        if missing:
            raise unittest.SkipTest(f"SLURM test skipped: {', '.join(missing)} not found. Install Debian's "
                                    f"slurm-wlm and munge (as root: apt-get install slurm-wlm munge; .ci/run "
                                    f"does it) to run it.")
        if os.geteuid() != 0:
            raise unittest.SkipTest("SLURM test skipped: slurmd must run as root to start jobs; run the "
                                    "tests as root (as CI does) to include it.")
        cluster = cls(root)
        try:
            cluster._start()
        except RuntimeError as exc:
            cluster.stop()
            raise unittest.SkipTest(f"SLURM test skipped: the local cluster did not start ({exc}).")
        return cluster

    def _start(self) -> None:
        r = self.root
        for sub in ("state", "spool", "logs"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o700)  # munged refuses keys and sockets in folders others may write
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.socket = r / "munge.sock"
        node = socket.gethostname().split(".")[0]
        cpus = len(os.sched_getaffinity(0))
        self.conf.write_text(f"""ClusterName=cfdltest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'logs' / 'slurmctld.log'}
SlurmdLogFile={r / 'logs' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobCompType=jobcomp/filetxt
JobCompLoc={r / 'jobcomp.log'}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn(["munged", "-F", "-f", f"--socket={self.socket}", f"--key-file={key}",
                     f"--log-file={r / 'logs' / 'munged.log'}", f"--pid-file={r / 'munged.pid'}",
                     f"--seed-file={r / 'munged.seed'}"], "munged")
        self._wait(lambda: self.socket.exists(), "munged made no socket")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)], "slurmd")
        self._wait(lambda: self._command(["sinfo", "-h", "-o", "%T"]).strip().startswith("idle"),
                   "the node never became idle")

    def _spawn(self, argv: List[str], name: str) -> None:
        log = open(self.root / "logs" / f"{name}.out", "w")
        self._daemons.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _command(self, argv: List[str]) -> str:
        result = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=30)
        return result.stdout if result.returncode == 0 else ""

    def _wait(self, ready, what: str, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while not ready():
            dead = [p.args[0] for p in self._daemons if p.poll() is not None]
            if dead or time.time() > deadline:
                logs = "; ".join(f"{f.name}: {f.read_text()[-300:]}" for f in sorted((self.root / "logs").glob("*"))
                                 if f.is_file())
                raise RuntimeError(f"{what}{' (' + ', '.join(dead) + ' exited)' if dead else ''}; {logs}")
            time.sleep(0.3)

    def stop(self) -> None:
        """Stop the daemons this object started (in reverse order)."""
        for p in reversed(self._daemons):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._daemons = []

    # ------------------------------------------------------------------ use
    def hosts_conf(self, path: Path) -> Path:
        """Write a Scipion hosts.conf whose localhost has this cluster's SLURM queue."""
        path = Path(path)
        path.write_text(HOSTS_CONF.replace("<partition>", PARTITION))
        return path

    def finished_jobs(self) -> List[Dict[str, str]]:
        """Jobs recorded by ``sacct --completion``: dicts with JobID, JobName, State, ExitCode."""
        fields = ["JobID", "JobName", "State", "ExitCode"]
        out = self._command(["sacct", "--completion", "-n", "-P", "--format=" + ",".join(fields)])
        return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]
