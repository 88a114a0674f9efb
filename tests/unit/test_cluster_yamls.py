"""The Ray cluster launcher YAMLs we ship (deploy/cluster-*.yaml) pass Ray's own config checks.

Each file goes through `prepare_config` (merges the provider's defaults.yaml, as `ray up` does)
and `validate_config` (Ray's JSON schema plus its cross-field checks), then through our own
expectations: a GPU-less head, GPU worker types that advertise `expert_worker` (one per GPU),
sane min/max workers, an idle timeout, and a comment on every key. No Ray is started.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private import providers
from ray.autoscaler._private.util import prepare_config, validate_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
LOCAL = DEPLOY / "cluster-local.yaml"
EXPERT_RESOURCE = "expert_worker"
FAKE_HEAD_NODE_TYPE = "ray.head.default"  # the fake provider tags its head with this type

CLUSTER_FILES = [
    pytest.param(DEPLOY / "cluster-aws.yaml", id="aws"),
    pytest.param(DEPLOY / "cluster-gcp.yaml", id="gcp"),
    pytest.param(LOCAL, id="local-fake-multinode"),
]


@pytest.fixture(autouse=True)
def _fake_provider_needs_no_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """prepare_config merges a provider's defaults file. For `fake_multinode` that file is
    fake_multi_node/example.yaml, which the PyPI wheel does not ship; our local file stands in
    for it, so give the fake provider empty defaults: the file must be complete on its own."""
    empty_defaults = tmp_path / "empty-defaults.yaml"
    empty_defaults.write_text("{}\n")
    monkeypatch.setitem(providers._DEFAULT_CONFIGS, "fake_multinode", lambda: str(empty_defaults))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _ray_validate(config: dict) -> dict:
    """What `ray up` does before it launches anything; raises on a bad config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _worker_types(config: dict) -> dict[str, dict]:
    head = config["head_node_type"]
    return {name: t for name, t in config["available_node_types"].items() if name != head}


def _project_problems(config: dict) -> list[str]:
    """Our own expectations of a cluster file, beyond Ray's schema; [] when all hold."""
    problems = []
    node_types = config.get("available_node_types", {})
    head = node_types.get(config.get("head_node_type"), {})
    head_resources = head.get("resources", {})
    if head_resources.get("GPU", 0) != 0 or head_resources.get(EXPERT_RESOURCE, 0) != 0:
        problems.append(f"head node type must have no GPU and no {EXPERT_RESOURCE}, got {head_resources}")
    if head.get("max_workers") != 0:
        problems.append(f"head node type needs max_workers: 0, got {head.get('max_workers')}")
    expert_types = []
    for name, node_type in _worker_types(config).items():
        resources = node_type.get("resources", {})
        gpus, experts = resources.get("GPU", 0), resources.get(EXPERT_RESOURCE, 0)
        if experts and not 1 <= experts <= gpus:
            problems.append(f"{name}: {EXPERT_RESOURCE} must be between 1 and GPU; got {experts} with GPU {gpus}")
        elif experts and gpus:
            expert_types.append(name)
        low, high = node_type.get("min_workers"), node_type.get("max_workers")
        if low is None or high is None or not 0 <= low <= high:
            problems.append(f"{name}: needs 0 <= min_workers <= max_workers, got {low} and {high}")
    if not expert_types:
        problems.append(f"no worker node type with GPUs and {EXPERT_RESOURCE} >= 1")
    if not config.get("idle_timeout_minutes"):
        problems.append(f"idle_timeout_minutes must be set and > 0, got {config.get('idle_timeout_minutes')}")
    return problems


def _key_line_numbers(text: str) -> list[int]:
    """0-based numbers of the lines on which a mapping key starts, found by the YAML parser."""
    numbers, stack = set(), [yaml.compose(text)]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                numbers.add(key.start_mark.line)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return sorted(numbers)


def _ends_with_comment(line: str) -> bool:
    unquoted = re.sub(r'"[^"]*"|\'[^\']*\'', '""', line)  # a '#' inside quotes is no comment
    return re.search(r"\s#", unquoted) is not None


def _uncommented_keys(text: str) -> list[str]:
    """Lines that define a key with neither an end-of-line comment nor a comment line above."""
    lines = text.splitlines()
    bare = []
    for number in _key_line_numbers(text):
        above = lines[number - 1].strip() if number > 0 else ""
        if not _ends_with_comment(lines[number]) and not above.startswith("#"):
            bare.append(f"line {number + 1}: {lines[number].strip()}")
    return bare


@pytest.mark.parametrize("path", CLUSTER_FILES)
def test_ray_accepts_cluster_file(path: Path) -> None:
    prepared = _ray_validate(_load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", CLUSTER_FILES)
def test_cluster_file_meets_project_expectations(path: Path) -> None:
    assert _project_problems(_load(path)) == []


@pytest.mark.parametrize("path", CLUSTER_FILES)
def test_every_key_has_a_comment(path: Path) -> None:
    assert _uncommented_keys(path.read_text()) == []


@pytest.mark.parametrize("path", CLUSTER_FILES)
def test_header_says_how_to_use_it(path: Path) -> None:
    header = path.read_text().split("\n\n", 1)[0]
    assert "moe-serve deploy deploy/<config>.yaml --address auto" in header
    assert "ray down" in header or "ray stop" in header


def test_local_file_is_complete_for_the_fake_autoscaler() -> None:
    """The running (v1) autoscaler reads the file as it is, without prepare_config, so the raw
    file must already pass validation; and the fake provider names its head ray.head.default."""
    config = _load(LOCAL)
    validate_config(config)
    assert config["provider"]["type"] == "fake_multinode"
    assert config["head_node_type"] == FAKE_HEAD_NODE_TYPE


def _misspelled_top_level_key(config: dict) -> None:
    config["idle_timeout_minute"] = config.pop("idle_timeout_minutes")


def _worker_without_resources(config: dict) -> None:
    del config["available_node_types"]["gpu.fake"]["resources"]


def _fractional_gpu(config: dict) -> None:
    config["available_node_types"]["gpu.fake"]["resources"]["GPU"] = 0.5


def _unknown_head_type(config: dict) -> None:
    config["head_node_type"] = "ray.head.missing"


def _min_workers_over_global_max(config: dict) -> None:
    config["available_node_types"]["gpu.fake"]["min_workers"] = config["max_workers"] + 1


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(_misspelled_top_level_key, id="misspelled-top-level-key"),
        pytest.param(_worker_without_resources, id="worker-type-without-resources"),
        pytest.param(_fractional_gpu, id="fractional-gpu-resource"),
        pytest.param(_unknown_head_type, id="head-type-not-defined"),
        pytest.param(_min_workers_over_global_max, id="min-workers-over-global-max"),
    ],
)
def test_ray_refuses_broken_config(breakage) -> None:
    config = _load(LOCAL)
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_validate(config)


@pytest.mark.parametrize(
    "breakage, expected",
    [
        pytest.param({"GPU": 1, EXPERT_RESOURCE: 2}, "between 1 and GPU", id="more-expert-workers-than-gpus"),
        pytest.param({"CPU": 1}, "no worker node type with GPUs", id="no-expert-worker-type"),
    ],
)
def test_project_checks_refuse_bad_worker_resources(breakage: dict, expected: str) -> None:
    config = _load(LOCAL)
    config["available_node_types"]["gpu.fake"]["resources"] = breakage
    assert any(expected in problem for problem in _project_problems(config))


def test_project_checks_refuse_gpu_head_and_bad_worker_counts() -> None:
    config = _load(LOCAL)
    config["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"]["GPU"] = 1
    config["available_node_types"]["gpu.fake"]["min_workers"] = 3
    del config["idle_timeout_minutes"]
    problems = " | ".join(_project_problems(config))
    assert "head node type must have no GPU" in problems
    assert "min_workers <= max_workers" in problems
    assert "idle_timeout_minutes" in problems


def test_comment_check_finds_an_uncommented_key() -> None:
    text = (
        "# what the cluster is called\n"
        "cluster_name: x\n"
        "provider:  # where nodes come from\n"
        "  type: aws\n"  # no comment, and the line above is a key line
        "  region: us-west-2  # the region\n"
        "  # the zone\n"
        '  availability_zone: "us-west-2a # not a comment"\n'
        '  tags: "a # b"\n'  # a '#' inside quotes is part of the value
        "nodes:\n"
        "  - name: a  # list items are keys too\n"
        "    size: 1\n"
    )
    assert _uncommented_keys(text) == [
        "line 4: type: aws",
        'line 8: tags: "a # b"',
        "line 9: nodes:",
        "line 11: size: 1",
    ]


def test_comment_check_passes_a_fully_commented_file() -> None:
    text = "# name\ncluster_name: x\nprovider: {type: aws}  # flow mapping keys share the line\n"
    assert _uncommented_keys(text) == []
