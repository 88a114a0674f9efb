"""A fake autoscaling Ray cluster on one machine, for trying and testing the autoscaler.

`deploy/cluster-local.yaml` describes it: a head without GPUs and fake GPU worker nodes (Ray's
fake multi-node provider starts each "node" as Ray processes here). `LocalAutoscalingCluster`
boots it through `ray.cluster_utils.AutoscalingCluster`, which the PyPI wheel ships without the
example YAML it loads, so this subclass hands it our file instead.

`AutoscalingCluster` runs `ray stop --force`, which kills every Ray process it can see. Run it
only inside `isolated(argv)`: a new PID, mount and network namespace (loopback only, its own
/tmp/ray), with a small PID 1 that reaps Ray's daemons (`python -m cluster.app.local_cluster reap`).
Needs root and util-linux's `unshare`.
"""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from ray.cluster_utils import AutoscalingCluster

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "deploy" / "cluster-local.yaml"
EXPERT_RESOURCE = "expert_worker"  # the custom resource GPU worker nodes offer, one per GPU


class LocalAutoscalingCluster(AutoscalingCluster):
    """`AutoscalingCluster` booted from a complete cluster YAML (head type `ray.head.default`)."""

    def __init__(self, path: Path = CLUSTER_YAML, **config_kwargs):
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

        self._path = Path(path)
        config = yaml.safe_load(self._path.read_text())
        head = config["head_node_type"]
        if head != FAKE_HEAD_NODE_TYPE:
            raise ValueError(f"{path}: head_node_type must be {FAKE_HEAD_NODE_TYPE!r}, got {head!r}")
        workers = {k: v for k, v in config["available_node_types"].items() if k != head}
        head_resources = copy.deepcopy(config["available_node_types"][head]["resources"])  # start() pops keys
        os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
        super().__init__(head_resources, workers, **config_kwargs)

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = yaml.safe_load(self._path.read_text())
        config.update(config_kwargs)
        return config


def expert_nodes() -> list[dict]:
    """The live nodes that can host expert workers (Ray must be connected)."""
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(EXPERT_RESOURCE, 0) > 0]


def isolated(argv: list[str]) -> list[str]:
    """`argv` wrapped to run in its own PID, mount and network namespace (see the module doc)."""
    private = tempfile.mkdtemp(prefix="moe-serve-ray-")
    inner = " && ".join([
        "ip link set lo up",
        "mkdir -p /tmp/ray",
        f"mount --bind {shlex.quote(private)} /tmp/ray",
        "exec " + shlex.join([sys.executable, "-m", "cluster.app.local_cluster", "reap", *argv]),
    ])
    return ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--mount", "bash", "-c", inner]


def can_isolate() -> str | None:
    """None when `isolated` can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root for unshare (PID and network namespaces)"
    for tool in ("unshare", "ip", "mount"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"needs `{tool}` on PATH"
    return None


def _reap(argv: list[str]) -> int:
    """PID 1 of the namespace: run `argv`, reap every orphan (Ray's daemons), return its code."""
    child = subprocess.Popen(argv)
    while True:
        pid, status = os.wait()
        if pid == child.pid:
            return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "reap":
        sys.exit("usage: python -m cluster.app.local_cluster reap COMMAND [ARGS...]")
    sys.exit(_reap(sys.argv[2:]))
