"""The Ray cluster a search runs on: finding it, describing it in one line, fitting trials on its
nodes, and checking before the first trial that every node can run one.

A trial may run on any node and, after a failure, resume on another one from its last checkpoint,
so every node needs (a) the same Python environment, raysemi included, and (b) the search's
`--storage` folder at the same path (Tune writes checkpoints there and the driver reads them).
The data and the MLflow store need not be shared: the driver reads the data once and trials get
it through Ray's object store, and the driver is MLflow's only writer (see `raysemi.tracking`).
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any

from raysemi.errors import UserError

HEAD_RESOURCE = "node:__internal_head__"


def ray_address_file() -> Path:
    """Where `ray start --head` records the cluster of this machine (what `--address auto` reads);
    Ray's own rule: $RAY_TMPDIR, else $TMPDIR on Linux, else /tmp."""
    tmp = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return Path(tmp or "/tmp") / "ray" / "ray_current_cluster"


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when no Ray cluster is at `address` (ray.init would wait)."""
    import socket

    if address == "auto":
        if not ray_address_file().is_file():
            raise UserError("--address: 'auto' but no Ray cluster runs on this machine; start one with "
                            "`ray start --head`, or give HOST:PORT of its head")
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address: {address!r} is invalid; expected 'auto' or HOST:PORT (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise UserError(f"--address: {address!r}: no Ray cluster answers ({err.strerror or err}); expected the "
                        "head's GCS address from `ray start --head` (port 6379 by default)") from None


def auth_token_available() -> bool:
    """Whether this machine has a Ray authentication token (where Ray looks for one)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def connect_error(address: str, err: BaseException, log: str = "") -> UserError:
    """ray.init's failure to join `address` (whose port answers), as one line that says what to do;
    `log`: what Ray printed meanwhile (its C++ client logs why it was refused)."""
    text = " ".join(str(err).split())
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        mine = "this machine's token is not the cluster's" if auth_token_available() else "this machine has no token"
    else:  # Ray sends a token to an explicit address only when told to
        mine = ("this machine has a token but sends it only with RAY_AUTH_MODE=token" if auth_token_available()
                else "this machine has no token")
    expected = ("expected RAY_AUTH_MODE=token and the head's token: copy the head's ~/.ray/auth_token here, or set "
                "RAY_AUTH_TOKEN")
    if "auth" in type(err).__name__.lower() or "InvalidAuthToken" in text + log or "token" in text.lower():
        return UserError(f"--address: {address!r}: the Ray cluster refused this driver's authentication ({mine}); "
                         f"{expected}")
    if "Failed to connect" in text:
        return UserError(f"--address: {address!r}: the Ray cluster there did not accept this driver ({text[:120]}); "
                         f"expected the cluster's Ray and Python versions and, if it uses token authentication, "
                         f"RAY_AUTH_MODE=token and its token ({mine})")
    return UserError(f"--address: {address!r}: no Ray cluster answers ({text[:160]})")


def join(address: str) -> None:
    """ray.init(address), or one line that says why not. While it connects, Ray's C++ client logs
    each refused attempt (with a wrong token: one line a second for ~15 s) straight to stderr: that
    output is held back, and shown as it was when the connection succeeds."""
    import tempfile

    import ray

    check_address(address)
    failure = None
    with tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        stderr = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            ray.init(address=address, logging_level="ERROR")
        except Exception as err:  # noqa: BLE001 - any failure to join is reported as one line
            failure = err
        finally:
            sys.stderr.flush()
            os.dup2(stderr, 2)
            os.close(stderr)
        held.seek(0)
        text = held.read().decode(errors="replace")
    if failure is not None:
        raise connect_error(address, failure, text) from None
    sys.stderr.write(text)
    sys.stderr.flush()


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _is_head(node: dict[str, Any]) -> bool:
    return HEAD_RESOURCE in node.get("Resources", {})


def _plural(n: float, word: str) -> str:
    return f"{n:g} {word}" + ("" if n == 1 else "s")


def _shape(node: dict[str, Any]) -> str:
    r = node.get("Resources", {})
    return f"{_plural(r.get('CPU', 0), 'CPU')}, {_plural(r.get('GPU', 0), 'GPU')}"


def describe(nodes: list[dict[str, Any]], address: str = "") -> str:
    """One line: the nodes with their CPUs and GPUs (grouped by shape past 4 nodes), and the totals."""
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes)
    ordered = sorted(nodes, key=lambda n: (not _is_head(n), n.get("NodeManagerAddress", "")))
    if len(ordered) <= 4:
        parts = [("head " if _is_head(n) else "") + f"{n.get('NodeManagerAddress', '?')}: {_shape(n)}"
                 for n in ordered]
    else:
        head = [n for n in ordered if _is_head(n)]
        parts = [f"head {n.get('NodeManagerAddress', '?')}: {_shape(n)}" for n in head]
        shapes: dict[str, int] = {}
        for n in ordered[len(head):]:
            shapes[_shape(n)] = shapes.get(_shape(n), 0) + 1
        parts += [f"{count} x ({shape})" for shape, count in shapes.items()]
    where = f" at {address}" if address else ""
    return (f"Ray cluster{where}: {_plural(len(nodes), 'node')}, {_plural(cpus, 'CPU')}, {_plural(gpus, 'GPU')} "
            f"({'; '.join(parts)})")


def trials_on_gpus(gpus: float, gpus_per_trial: float) -> int:
    """How many trials of `gpus_per_trial` GPUs fit on `gpus` GPUs. Ray places a fraction of a GPU
    on one GPU, never split over two: at 0.4 a GPU holds 2 trials, so 2 GPUs hold 4, not 5."""
    if gpus_per_trial >= 1:
        return int(gpus / gpus_per_trial + 1e-9)
    per_gpu = int(1 / gpus_per_trial + 1e-9)
    whole = int(gpus + 1e-9)
    return whole * per_gpu + int((gpus - whole) / gpus_per_trial + 1e-9)  # --gpus 0.5: part of one GPU


def trial_slots(nodes: list[dict[str, Any]], cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials fit at once: a trial runs on one node, so per node, then summed."""
    total = 0
    for n in nodes:
        r = n.get("Resources", {})
        slots = int(r.get("CPU", 0) / cpus_per_trial + 1e-9) if cpus_per_trial > 0 else sys.maxsize
        if gpus_per_trial > 0:
            slots = min(slots, trials_on_gpus(r.get("GPU", 0), gpus_per_trial))
        total += slots
    return total


def largest_node(nodes: list[dict[str, Any]]) -> str:
    best = max(nodes, key=lambda n: (n.get("Resources", {}).get("GPU", 0), n.get("Resources", {}).get("CPU", 0)))
    return _shape(best)


def _look(path: str, expected: str) -> dict[str, Any]:
    """Runs on each node (shipped by value: it needs nothing but the standard library to run)."""
    import importlib.metadata
    import os
    import socket

    out: dict[str, Any] = {"host": socket.gethostname()}
    try:
        with open(path) as f:
            out["sees_storage"] = f.read() == expected
    except OSError:
        out["sees_storage"] = False
    out["storage_writable"] = os.access(os.path.dirname(path), os.W_OK)
    try:
        import raysemi

        out["raysemi"] = getattr(raysemi, "__version__", "?")
    except Exception as err:  # noqa: BLE001 - reported to the user as is
        out["import_error"] = f"{type(err).__name__}: {err}"
    for pkg in ("torch", "ray"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def check_nodes(storage: Path, nodes: list[dict[str, Any]], timeout: float = 120.0) -> list[str]:
    """Ask every node, before the first trial, whether it can import raysemi and sees `storage`
    (through a file the driver writes there). Raises a UserError naming the first node that cannot;
    returns warnings (a node that did not answer in time, versions that differ from the driver's)."""
    import importlib.metadata

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    import raysemi

    token = uuid.uuid4().hex
    probe = storage / f".raysemi-node-check-{token}"
    probe.write_text(token)
    look = ray.remote(num_cpus=0, max_retries=0)(_by_value(_look))
    try:
        refs = {n["NodeID"]: look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(probe), token) for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        answers = {}
        for node_id, ref in refs.items():
            if ref in ready:
                try:
                    answers[node_id] = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - the node died or could not start a worker
                    answers[node_id] = {"error": " ".join(str(err).split())[:200]}
    finally:
        probe.unlink(missing_ok=True)
    mine = {"raysemi": raysemi.__version__, "torch": importlib.metadata.version("torch")}
    return judge_nodes(storage, nodes, answers, mine, timeout)


def judge_nodes(storage: Path, nodes: list[dict[str, Any]], answers: dict[str, dict[str, Any]],
                mine: dict[str, str], timeout: float) -> list[str]:
    """check_nodes' verdict on what the nodes answered (node id -> `_look`'s dict)."""
    warnings = []
    for n in nodes:
        where = f"node {n.get('NodeManagerAddress', '?')} ({n['NodeID'][:8]})"
        a = answers.get(n["NodeID"])
        if a is None:
            warnings.append(f"{where} did not answer the node check in {timeout:g} s; not checked")
        elif "error" in a:
            warnings.append(f"{where}: node check failed ({a['error']}); not checked")
        elif "import_error" in a:
            raise UserError(f"{where} cannot import raysemi ({a['import_error']}); expected the same Python "
                            "environment on every node (raysemi, torch and Ray installed alike)")
        elif not a["sees_storage"]:
            raise UserError(f"--storage: {storage} is not the same folder on {where}, host {a['host']} (the "
                            "driver's test file is not there); on a multi-node cluster it must be shared storage "
                            "mounted at the same path on every node (e.g. NFS): trials checkpoint there and "
                            "resume from it on any node")
        elif not a["storage_writable"]:
            raise UserError(f"--storage: {storage} is not writable from {where}, host {a['host']}; trials on every "
                            "node write their checkpoints there")
        else:
            for pkg, version in mine.items():
                if a.get(pkg) != version:
                    warnings.append(f"{where} has {pkg} {a.get(pkg)}, the driver {version}; expected the same "
                                    "versions on every node")
    return warnings


def _by_value(fn):
    """`fn` as a function cloudpickle ships by value, so a node runs it without importing raysemi
    (the check must be able to report that raysemi is missing there)."""
    import types

    return types.FunctionType(fn.__code__, {"__builtins__": __builtins__}, fn.__name__, fn.__defaults__)


def node_of_this_driver() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()
