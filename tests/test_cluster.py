"""The search on a real two-node Ray cluster with a real MLflow tracking server, all on this machine
and started as a user would, with the scripts of examples/cluster/ (the walk-through of its README):

- a Ray head and a worker node (`ray start --block`, one CPU each, so that two trials at once land
  one per node), with token authentication on, as start_head.sh / start_worker.sh set it up;
- `mlflow server` on 127.0.0.1 with a SQLite store and proxied artifacts (--artifacts-destination);
- `python -m raysemi.search --address HEAD --tracking-uri http://... --storage ...` in a subprocess,
  and beside it one without the cluster's token, which must be refused with one line.

Once a trial on the worker node has reported, the worker node is killed (all its processes at
once, like a machine that goes away): the trial must be retried from its checkpoint on the head.
Then the driver is interrupted (Ctrl-C) and restarted with the command it printed: the search
must finish, and the server must hold one parent run and exactly one run per trial, each with a
final status, every evaluation logged once, and the node(s) it ran on.

Everything the test starts carries a marker in its environment, and the nodes, the server and the
drivers run in process groups of their own: the finalizer stops the groups, then kills by pid any
process left with the marker (Ray starts its workers in groups of their own), and fails if one
survives.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Collection
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "cluster"
MARKER = "RAYSEMI_TEST_CLUSTER"


def free_ports(n: int, taken: Collection[int] = ()) -> list[int]:
    """n distinct free ports, none of them in `taken`: the sockets stay bound until all are
    chosen (one port bound and closed at a time may come back twice: Ray then refused two of its
    components on the same port)."""
    sockets: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < n:
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in taken:
                ports.append(port)
        return ports
    finally:
        for s in sockets:
            s.close()


def wait_for(predicate, timeout: float, what: str, procs=(), every: float = 0.25) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{what}: {p.name} exited with {p.returncode}:\n{p.tail()}")
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout:g} s\n" + "\n".join(p.tail() for p in procs))


class Proc:
    """A process in its own group (session), its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> None:
        self.name, self.log = name, log
        self._out = open(log, "w")
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.popen.pid

    def poll(self):
        return self.popen.poll()

    @property
    def returncode(self):
        return self.popen.returncode

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        return f"--- {self.name} ({self.log}):\n{self.text()[-n:]}"

    def kill_group(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the group, SIGKILL to what is left after `grace` seconds."""
        self.kill_group(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill_group(signal.SIGKILL)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._out.close()


def processes_with_marker(token: str) -> list[int]:
    """Pids of this user's processes whose environment holds MARKER=token (what this test started)."""
    needle = f"{MARKER}={token}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def processes_of_node(node: "Proc", token: str) -> list[int]:
    """A Ray node started by `ray start --block`: the processes of its group (raylet, agents, ...)
    and the Ray workers its raylet started (each in a process group of its own)."""
    mine = processes_with_marker(token)
    group = {pid for pid in mine if pgid_of(pid) == node.pid}
    return sorted(group | {pid for pid in mine if parent_of(pid) in group})


class Cluster:
    """Head, worker and MLflow server as a user starts them (examples/cluster/*.sh), on loopback
    ports chosen here, with a short private Ray temp dir (Ray's socket paths are length-limited and
    its ray_current_cluster file must not tell other Ray users on this machine about this cluster)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.token = secrets.token_hex(8)
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="rsc-", dir="/tmp"))
        self.procs: dict[str, Proc] = {}
        self.mlflow_left: list[int] = []
        self.env = {**os.environ,
                    MARKER: self.token,
                    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
                    "RAY_TMPDIR": str(self.ray_tmp),
                    # the node scripts switch token authentication on; a driver given an explicit
                    # --address is told to (RAY_AUTH_MODE=token), as the README says
                    "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0",
                    # a lost node is noticed within seconds, not the default ~30 s
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3",
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(name, None)
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.ray_port, self.mlflow_port = free_ports(2)
        self.ports = {self.ray_port, self.mlflow_port}  # every port handed out, the nodes' included
        self.address = f"127.0.0.1:{self.ray_port}"
        self.uri = f"http://127.0.0.1:{self.mlflow_port}"

    def node_args(self) -> list[str]:
        """One CPU per node; every port `ray start` would take a fixed default for is chosen here,
        since two nodes share this machine (and other Ray users may be on it); all distinct."""
        listen, grpc, metrics, runtime_env = free_ports(4, self.ports)
        self.ports |= {listen, grpc, metrics, runtime_env}
        return ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(100 * 2**20), "--block",
                "--dashboard-agent-listen-port", str(listen), "--dashboard-agent-grpc-port", str(grpc),
                "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env)]

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, args, {**self.env, **(env or {})}, self.tmp / f"{name}.log")
        self.procs[name] = proc
        return proc

    def up(self) -> None:
        head = self.start("head", ["bash", str(SCRIPTS / "start_head.sh"), "--include-dashboard", "false",
                                   *self.node_args()], {"RAY_PORT": str(self.ray_port)})
        mlflow = self.start("mlflow", ["bash", str(SCRIPTS / "start_mlflow.sh"), "--workers", "1"],
                            {"MLFLOW_DIR": str(self.tmp / "mlflow"), "MLFLOW_HOST": "127.0.0.1",
                             "MLFLOW_PORT": str(self.mlflow_port)})
        wait_for(lambda: "Ray runtime started" in head.text(), 90, "Ray head", [head])
        worker = self.start("worker", ["bash", str(SCRIPTS / "start_worker.sh"), self.address, *self.node_args()])
        wait_for(lambda: "Ray runtime started" in worker.text(), 90, "Ray worker node", [worker])
        wait_for(self.mlflow_answers, 120, "MLflow server", [mlflow])

    def mlflow_answers(self) -> bool:
        try:
            return urllib.request.urlopen(f"{self.uri}/health", timeout=2).read().strip() == b"OK"
        except OSError:
            return False

    def down(self) -> None:
        """teardown.sh for the MLflow server (as a user would; `ray stop` would stop every Ray
        process of this user on the machine, other tests' too), then every process group."""
        mlflow = self.procs.get("mlflow")
        if mlflow is not None and mlflow.poll() is None:
            subprocess.run(["bash", str(SCRIPTS / "teardown.sh"), "mlflow"], env={**self.env, "MLFLOW_DIR": str(
                self.tmp / "mlflow")}, capture_output=True, timeout=60)
            self.mlflow_left = [pid for pid in processes_with_marker(self.token) if pgid_of(pid) == mlflow.pid]
        for name, proc in reversed(list(self.procs.items())):
            proc.stop(grace=1.0 if name in ("head", "worker") else 5.0)  # a Ray node drains for 30 s on SIGTERM
        for pid in processes_with_marker(self.token):  # a Ray worker that left its group, say
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.up()
        yield c
    finally:
        c.down()
        assert not processes_with_marker(c.token), "processes of the test cluster survived its teardown"
        assert not c.mlflow_left, f"examples/cluster/teardown.sh left MLflow processes {c.mlflow_left}"


def mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("raysemi-search")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, kids


SAMPLES = 3
# 12 reports of ~0.6 s each on 2 cores: the window in which the test can catch a trial mid-way on the
# worker (reports 2 to 7) is ~3.6 s wide (with 4 reports it was ~1 s, and a loaded CI machine missed
# it once), and the caught trial has at least 5 reports left when it is retried on the head, so the
# search is still running when the test sees the retry report and presses Ctrl-C (with 8 reports,
# one could be left, and once the head's worker took the next trial without a new process, the
# search finished first)
ITERATIONS = 120
#: the caught trial's last checkpoint is at most this report
CAUGHT_BY = 6


def search_args(*extra: str) -> list[str]:
    return [sys.executable, "-m", "raysemi.search", *extra]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_search_spreads_over_two_nodes_survives_losing_one_and_resumes(cluster, tiny_phantom, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("base_lr: {type: loguniform, low: 0.02, high: 0.1}\n")
    storage = tmp_path / "runs"

    # 0. a driver without the cluster's token is refused with one line (it runs beside the search:
    # Ray's client takes ~15 s to give up)
    home = tmp_path / "home-without-token"
    home.mkdir()
    refused = cluster.start("refused", search_args(
        "--method", "supervised", "--data", str(tiny_phantom), "--labeled-patients", "3", "--gpus", "0",
        "--storage", str(tmp_path / "refused"), "--address", cluster.address, "--tracking-uri", cluster.uri),
        {"HOME": str(home), "RAY_AUTH_TOKEN": ""})
    driver = cluster.start("driver", search_args(
        "--method", "supervised", "--data", str(tiny_phantom), "--labeled-patients", "3", "--patch-size", "32", "32",
        "--batch-size", "8", "--labeled-bs", "4", "--eval-batch-size", "16", "--max-iterations", str(ITERATIONS),
        "--eval-interval", "10", "--grace-period", str(ITERATIONS),  # no early stopping: every trial runs to the end
        "--num-samples", str(SAMPLES), "--search-space", str(space), "--seed", "1", "--gpus", "0",
        "--cpus-per-trial", "1", "--max-failures", "2", "--name", "c", "--storage", str(storage),
        "--address", cluster.address, "--tracking-uri", cluster.uri), {"RAY_AUTH_MODE": "token"})

    # 1. once a trial on the worker node has reported to the driver (so Tune knows a checkpoint of
    # it) and has evaluations left, the worker node goes away: all its processes at once. To catch
    # the trial mid-way, this is read from /proc and --storage, not from MLflow: Tune runs a trial in
    # its own folder, named <strategy>_<trial id>, in a Ray worker that the node's raylet started;
    # the trial writes its checkpoints to --storage, checkpoint_00000<k> at its k-th report, and
    # waits at each report until the driver has taken the previous result (so with a second
    # checkpoint written, the driver has the first).
    worker = cluster.procs["worker"]
    seen: dict[str, str] = {}

    def trial_on_worker_mid_way() -> bool:
        for pid in processes_of_node(worker, cluster.token):
            try:
                folder = Path(os.readlink(f"/proc/{pid}/cwd")).name
            except OSError:
                continue
            if folder.startswith("supervised_"):
                done = [int(c.name.rsplit("_", 1)[1]) for c in (storage / "c" / folder).glob("checkpoint_*")]
                if done and 1 <= max(done) <= CAUGHT_BY:  # reported twice, with evaluations left
                    seen["trial_id"] = folder.split("_", 1)[1]
                    return True
        return False

    wait_for(trial_on_worker_mid_way, 180, "a trial mid-way on the worker node", [driver], every=0.05)
    for pid in processes_of_node(worker, cluster.token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, (parent,), _ = mlflow_runs(cluster.uri)
    seen["head"] = parent.data.tags["driver_node_id"]

    wait_for(lambda: refused.poll() is not None, 60, "the driver without a token to give up")
    lines = [line for line in refused.text().splitlines() if line.strip()]
    # the cluster is joined before the data is loaded: the error is the only line
    assert refused.returncode == 2 and len(lines) == 1, lines
    assert lines[0] == (f"error: --address: '{cluster.address}': the Ray cluster refused this driver's authentication "
                        "(this machine has no token); expected RAY_AUTH_MODE=token and the head's token: copy the "
                        "head's ~/.ray/auth_token here, or set RAY_AUTH_TOKEN"), lines

    # 2. that trial is retried from its checkpoint on the head; once it has reported from there,
    # the driver is interrupted (Ctrl-C) ...
    def moved_trial_reported_from_head() -> bool:
        _, _, kids = mlflow_runs(cluster.uri)
        return any(k.data.tags["trial_id"] == seen["trial_id"] and k.data.tags.get("node_id") == seen["head"]
                   for k in kids)

    wait_for(moved_trial_reported_from_head, 150, "the lost trial retried on the head", [driver])
    driver.popen.send_signal(signal.SIGINT)
    try:
        driver.popen.wait(90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the search did not stop on Ctrl-C\n{driver.tail()}")
    first = driver.text()
    assert driver.returncode == 130 and "--resume" in first, driver.tail(6000)
    # the driver said what it joined, before the first trial (Ray gives a node started on
    # 127.0.0.1 this machine's own address, so the host is not checked)
    assert re.search(rf"^Ray cluster at [\d.]+:{cluster.ray_port}: 2 nodes, 2 CPUs, 0 GPUs \(head ", first, re.M)
    assert first.index("Ray cluster at") < first.index("search folder:") < first.index("== Status ==")

    # 3. ... and restarted as a user would: with the command it printed (its name, --resume and the
    # cluster: the search's own settings and tracking URI were saved with it), on what is left of
    # the cluster
    (hint,) = re.findall(r"continue with: python (-m raysemi\.search .*)$", first, re.M)
    assert shlex.split(hint) == ["-m", "raysemi.search", "--name", "c", "--storage", str(storage), "--resume",
                                 "--address", cluster.address]
    again = cluster.start("driver-resumed", [sys.executable, *shlex.split(hint)], {"RAY_AUTH_MODE": "token"})
    try:
        again.popen.wait(200)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the resumed search did not finish\n{again.tail()}")
    out = again.text()
    assert again.returncode == 0, again.tail(6000)
    assert "continuing search 'c'" in out and "resuming search c" in out
    assert re.search(rf"^Ray cluster at [\d.]+:{cluster.ray_port}: 1 node, 1 CPU, 0 GPUs", out, re.M), out

    # everything is in the one server: one parent, one run per trial, each with a final status
    client, parents, kids = mlflow_runs(cluster.uri)
    (parent,) = parents
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "finished"
    assert "1 node" in parent.data.tags["cluster"]  # the latest driver's
    assert len(kids) == SAMPLES and len({k.data.tags["trial_id"] for k in kids}) == SAMPLES
    assert all(k.data.tags["mlflow.parentRunId"] == parent.info.run_id for k in kids)
    assert all(k.info.status == "FINISHED" and k.data.tags["status"] == "completed" for k in kids), \
        [(k.data.tags.get("status"), k.data.tags.get("last_error")) for k in kids]
    for k in kids:  # every evaluation logged once, whichever node or driver reported it
        steps = [m.step for m in client.get_metric_history(k.info.run_id, "val/dice")]
        assert steps == list(range(10, ITERATIONS + 1, 10)), (k.data.tags["trial_id"], steps)
        assert client.get_metric_history(k.info.run_id, "train/loss")
    # the trials ran on both nodes; the one that lost its node, in the same run, on both
    (moved,) = [k for k in kids if k.data.tags["trial_id"] == seen["trial_id"]]
    lost, head = moved.data.tags["node_ids"].split(",")
    assert head == seen["head"] == moved.data.tags["node_id"] and lost != head
    assert {n for k in kids for n in k.data.tags["node_ids"].split(",")} == {head, lost}
    # (at least once: the retry may be placed on the lost node before Ray has noticed it is gone)
    assert int(moved.data.tags["retries"]) >= 1 and "actor" in moved.data.tags["last_error"].lower()

    # the search's artifacts went through the server into its --artifacts-destination
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "best_config.yaml", "best_checkpoint.pt", "plots"} <= artifacts
    stored = list((tmp_path / "mlflow" / "artifacts").rglob("leaderboard.csv"))
    assert len(stored) == 1 and parent.info.run_id in str(stored[0])

    # the real server, asked by a host name it was not started with, is refused at the start
    host = socket.gethostname()
    if socket.gethostbyname(host) == "127.0.0.1":
        from raysemi.errors import UserError
        from raysemi.tracking import check_tracking_uri

        with pytest.raises(UserError, match=f"refuses requests addressed to '{host}:{cluster.mlflow_port}'"):
            check_tracking_uri(f"http://{host}:{cluster.mlflow_port}")


# ---- fast checks, no cluster -------------------------------------------------------------------------
def node(ip: str, cpus: float, gpus: float = 0, head: bool = False, node_id: str = "") -> dict:
    resources = {"CPU": cpus, "GPU": gpus, **({"node:__internal_head__": 1.0} if head else {})}
    return {"NodeID": node_id or secrets.token_hex(28), "NodeManagerAddress": ip, "Alive": True,
            "Resources": {k: v for k, v in resources.items() if v}}


def test_cluster_is_described_in_one_line_head_first():
    from raysemi.cluster import describe

    line = describe([node("10.0.0.2", 16, 8), node("10.0.0.1", 8, head=True)], "10.0.0.1:6379")
    assert line == ("Ray cluster at 10.0.0.1:6379: 2 nodes, 24 CPUs, 8 GPUs "
                    "(head 10.0.0.1: 8 CPUs, 0 GPUs; 10.0.0.2: 16 CPUs, 8 GPUs)")
    many = describe([node("10.0.0.1", 8, head=True)] + [node(f"10.0.1.{i}", 16, 8) for i in range(6)]
                    + [node("10.0.2.1", 4, 1)])
    assert many == ("Ray cluster: 8 nodes, 108 CPUs, 49 GPUs (head 10.0.0.1: 8 CPUs, 0 GPUs; "
                    "6 x (16 CPUs, 8 GPUs); 1 x (4 CPUs, 1 GPU))")
    assert "\n" not in many


@pytest.mark.parametrize("cpus_per_trial,gpus_per_trial,slots", [(1, 0, 3), (2, 0, 1), (1, 1, 2), (1, 0.5, 3),
                                                                  (1, 2, 0), (3, 0, 0)])
def test_trials_are_fitted_per_node(cpus_per_trial, gpus_per_trial, slots):
    from raysemi.cluster import trial_slots

    assert trial_slots([node("a", 2, 1), node("b", 1, 1)], cpus_per_trial, gpus_per_trial) == slots


@pytest.mark.parametrize("per,slots", [(0.4, 4), (0.3, 6), (0.25, 8), (0.5, 4), (1, 2), (2, 1)])
def test_a_fraction_of_a_gpu_is_packed_on_one_gpu_never_split_over_two(per, slots):
    """As Ray places them: 2 GPUs at 0.4 a trial hold 4 trials (2 each), not 5."""
    from argparse import Namespace

    from raysemi.cluster import trial_slots
    from raysemi.search import check_resources

    assert trial_slots([node("c", 16, 2)], 1, per) == slots
    args = Namespace(gpus=2, gpus_per_trial=per, cpus_per_trial=1)
    assert check_resources(args, {"CPU": 16, "GPU": 2})[2] == slots  # the concurrency the search allows
    assert check_resources(Namespace(gpus=0.5, gpus_per_trial=0.25, cpus_per_trial=1), {"CPU": 16, "GPU": 1})[2] == 2


def test_a_trial_bigger_than_any_node_is_refused_though_the_totals_allow_it():
    from argparse import Namespace

    from raysemi.errors import UserError
    from raysemi.search import check_resources

    nodes = [node("10.0.0.1", 8, 1, head=True), node("10.0.0.2", 8, 1)]
    args = Namespace(gpus=2, gpus_per_trial=2, cpus_per_trial=1)
    assert check_resources(args, {"CPU": 16, "GPU": 2})[2] == 1  # what the totals alone say
    with pytest.raises(UserError, match=r"--cpus-per-trial 1 --gpus-per-trial 2: a trial runs on one node, but no "
                                        r"node has that many \(the largest has 8 CPUs, 1 GPU\)"):
        check_resources(args, {"CPU": 16, "GPU": 2}, nodes)
    # fractions: 4 trials per GPU, on both nodes
    assert check_resources(Namespace(gpus=2, gpus_per_trial=0.25, cpus_per_trial=2), {"CPU": 16, "GPU": 2},
                           nodes) == (2.0, 0.25, 8)


def test_node_verdicts_name_the_node_and_what_it_lacks(tmp_path):
    from raysemi.cluster import judge_nodes
    from raysemi.errors import UserError

    n = node("10.0.0.7", 4, node_id="ab12cd34" + "0" * 48)
    ok = {"host": "w7", "sees_storage": True, "storage_writable": True, "raysemi": "0.1.0", "torch": "2.5.0"}
    mine = {"raysemi": "0.1.0", "torch": "2.5.0"}
    assert judge_nodes(tmp_path, [n], {n["NodeID"]: ok}, mine, 60) == []
    with pytest.raises(UserError, match=rf"--storage: {tmp_path} is not the same folder on node 10.0.0.7 \(ab12cd34\), "
                                        r"host w7 .* shared storage mounted at the same path on every node"):
        judge_nodes(tmp_path, [n], {n["NodeID"]: {**ok, "sees_storage": False}}, mine, 60)
    with pytest.raises(UserError, match=r"not writable from node 10.0.0.7"):
        judge_nodes(tmp_path, [n], {n["NodeID"]: {**ok, "storage_writable": False}}, mine, 60)
    with pytest.raises(UserError, match=r"node 10.0.0.7 \(ab12cd34\) cannot import raysemi \(ModuleNotFoundError"):
        judge_nodes(tmp_path, [n], {n["NodeID"]: {**ok, "import_error": "ModuleNotFoundError: raysemi"}}, mine, 60)
    assert judge_nodes(tmp_path, [n], {}, mine, 60) == [
        "node 10.0.0.7 (ab12cd34) did not answer the node check in 60 s; not checked"]
    (warning,) = judge_nodes(tmp_path, [n], {n["NodeID"]: {**ok, "torch": "2.4.1"}}, mine, 60)
    assert "has torch 2.4.1, the driver 2.5.0" in warning


def test_the_node_check_runs_where_raysemi_cannot_be_imported(tmp_path):
    """It is shipped by value, so a node without raysemi runs it and says so (instead of failing
    to unpickle it with an error about the check itself)."""
    from ray import cloudpickle

    from raysemi.cluster import _by_value, _look

    probe = tmp_path / "probe"
    probe.write_text("token")
    fn = cloudpickle.dumps(_by_value(_look))
    code = ("import pickle, sys; sys.modules['raysemi'] = None; "  # as on a node without raysemi
            f"print(pickle.loads(sys.stdin.buffer.read())({str(probe)!r}, 'token'))")
    out = subprocess.run([sys.executable, "-c", code], input=fn, capture_output=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr.decode()
    answer = eval(out.stdout.decode())  # noqa: S307 - a dict literal printed by the line above
    assert answer["sees_storage"] and answer["storage_writable"]
    assert "import of raysemi halted" in answer["import_error"]
    assert _look(str(probe), "other")["sees_storage"] is False


def test_storage_that_is_not_writable_or_a_uri_is_refused_before_anything_starts(tmp_path, capsys):
    from raysemi.errors import run_cli
    from raysemi.search import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for storage, needle in ((blocker / "runs", f"--storage: {blocker / 'runs'} is not writable (Not a directory)"),
                            ("s3://bucket/runs", "--storage: 's3://bucket/runs': URIs are not supported")):
        t0 = time.time()
        code = run_cli(main, ["--method", "supervised", "--storage", str(storage),
                              "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {needle}"), err
        assert time.time() - t0 < 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_address_auto_without_a_cluster_on_this_machine(tiny_phantom, tmp_path, monkeypatch, capsys):
    from raysemi.errors import run_cli
    from raysemi.search import main

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where `ray start --head` would leave its address
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = run_cli(main, ["--method", "supervised", "--data", str(tiny_phantom), "--labeled-patients", "2",
                          "--address", "auto", "--storage", str(tmp_path / "runs"),
                          "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == ("error: --address: 'auto' but no Ray cluster runs on this machine; start one "
                                     "with `ray start --head`, or give HOST:PORT of its head")


@pytest.mark.parametrize("mode,token,why", [
    ("token", "abc", "this machine's token is not the cluster's"),
    ("token", "", "this machine has no token"),
    ("", "abc", "this machine has a token but sends it only with RAY_AUTH_MODE=token"),
    ("", "", "this machine has no token"),
])
def test_a_refused_authentication_says_what_this_machine_lacks(tmp_path, monkeypatch, mode, token, why):
    """Ray sends this machine's token to an explicit --address only with RAY_AUTH_MODE=token (it
    does so by itself for 'auto' only), and says in Python merely "Failed to connect": its C++
    client logged the reason."""
    from raysemi.cluster import connect_error

    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token-file"))
    log = "[...] gcs_client.cc:210: Failed to get cluster ID from GCS server: RPC error: InvalidAuthToken: ..."
    failed = ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")
    assert str(connect_error("10.0.0.1:6379", failed, log)) == (
        f"--address: '10.0.0.1:6379': the Ray cluster refused this driver's authentication ({why}); expected "
        "RAY_AUTH_MODE=token and the head's token: copy the head's ~/.ray/auth_token here, or set RAY_AUTH_TOKEN")


def test_other_failures_to_join_say_what_was_expected():
    from raysemi.cluster import connect_error

    failed = ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")
    assert "did not accept this driver (Failed to connect" in str(connect_error("10.0.0.1:6379", failed, ""))
    assert "no Ray cluster answers (Connection refused)" in str(connect_error("h:1", OSError("Connection refused")))


@pytest.mark.parametrize("api_status,needle", [
    (403, "the MLflow server refuses requests addressed to '127.0.0.1:{port}' (403); expected its IP address, or a "
          "server started with --allowed-hosts 127.0.0.1:{port}"),
    (401, "the MLflow server wants credentials (401)"),
    (200, None),
])
def test_a_tracking_server_that_answers_health_but_refuses_the_api(monkeypatch, api_status, needle):
    """MLflow 3's server answers /health whatever the Host header, then refuses its API with 403
    unless the host is allowed (the usual `--tracking-uri http://headnode:5000` case)."""
    import http.server
    import threading

    from raysemi.errors import UserError
    from raysemi.tracking import check_tracking_uri

    class Stub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            code = 200 if self.path == "/health" else api_status
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"OK" if code == 200 else b"no")

        def log_message(self, *args):
            pass

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    server = http.server.HTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        if needle is None:
            check_tracking_uri(f"http://127.0.0.1:{port}")
        else:
            with pytest.raises(UserError) as err:
                check_tracking_uri(f"http://127.0.0.1:{port}")
            assert str(err.value).startswith(f"tracking_uri: 'http://127.0.0.1:{port}': " + needle.format(port=port))
    finally:
        server.shutdown()
        server.server_close()
