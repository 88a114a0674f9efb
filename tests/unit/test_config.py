"""Service configuration: defaults, YAML loading, every mistake named by its key, and command-line
overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster.config import ConfigError, RandomModelConfig, ServeConfig, load_config, validate_config
from cluster.model_spec import ModelSpec


def write(tmp_path: Path, text: str, name: str = "serve.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Good configurations
# ---------------------------------------------------------------------------------------------


def test_defaults_are_valid_and_consistent() -> None:
    config = load_config(None)

    assert config == ServeConfig()
    assert config.model.name == "moe"
    assert config.model.checkpoint is None
    assert config.model.random_or_default == RandomModelConfig()
    assert config.workers.count == 2
    assert config.router.port == 8001
    assert config.ray.namespace == "moe-serve"
    assert RandomModelConfig().spec() == ModelSpec(
        hidden_size=256, intermediate_size=512, num_experts=8, top_k=2, moe_layers=(0, 1),
        num_hidden_layers=2,
    )  # fmt: skip


def test_yaml_file_loads(tmp_path: Path) -> None:
    path = write(tmp_path, """
model:
  name: tiny-moe
  random: {layers: 3, experts: 4, hidden: 16, ffn: 32, top_k: 1, seed: 7}
workers:
  count: 3
  slots_per_worker: 5
  num_gpus: 0.5
  device: cpu
router:
  port: 0
  max_wait_ms: 2.5
ray:
  address: auto
""")

    config = load_config(path)

    assert config.model.name == "tiny-moe"
    assert config.model.random == RandomModelConfig(layers=3, experts=4, hidden=16, ffn=32, top_k=1, seed=7)
    assert config.model.random_or_default.spec().moe_layers == (0, 1, 2)
    assert (config.workers.count, config.workers.slots_per_worker) == (3, 5)
    assert config.workers.num_gpus == 0.5
    assert config.workers.device == "cpu"
    assert (config.router.port, config.router.max_wait_ms) == (0, 2.5)
    assert config.router.max_batch_tokens == 8192  # untouched keys keep defaults
    assert config.ray.address == "auto"


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == ServeConfig()


def test_checkpoint_config_has_no_random_model(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "model: {checkpoint: /models/mixtral}\n"))

    assert config.model.checkpoint == "/models/mixtral"
    assert config.model.random_or_default is None


def test_sections_are_frozen() -> None:
    config = ServeConfig()
    with pytest.raises(ValueError, match="frozen"):
        config.router.port = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Mistakes, each named by its key
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "detail"),
    [
        pytest.param("bogus: 1\n", "bogus", "Extra inputs are not permitted", id="unknown-top-level"),
        pytest.param("router: {prot: 80}\n", "router.prot", "Extra inputs are not permitted",
                     id="unknown-nested"),
        pytest.param("model: {random: {expert: 4}}\n", "model.random.expert",
                     "Extra inputs are not permitted", id="unknown-deeply-nested"),
        pytest.param("workers: {count: two}\n", "workers.count", "valid integer", id="wrong-type"),
        pytest.param("router: {max_wait_ms: [1]}\n", "router.max_wait_ms", "valid number",
                     id="wrong-type-list"),
        pytest.param("workers: {count: -1}\n", "workers.count", "greater than or equal to 1",
                     id="negative-count"),
        pytest.param("router: {port: 70000}\n", "router.port", "less than or equal to 65535",
                     id="port-too-large"),
        pytest.param("workers: {device: tpu}\n", "workers.device", "'auto', 'cpu' or 'cuda'",
                     id="unknown-device"),
        pytest.param("model: {name: 'has space'}\n", "model.name", "should match pattern",
                     id="bad-model-name"),
        pytest.param("router: 5\n", "router", "valid dictionary", id="section-not-a-mapping"),
    ],
)  # fmt: skip
def test_mistake_names_the_key(tmp_path: Path, text: str, key: str, detail: str) -> None:
    path = write(tmp_path, text)

    message = config_error(path)

    assert message.startswith(f"{path}: invalid configuration\n")
    assert re.search(rf"^  {re.escape(key)}: .*{re.escape(detail)}", message, re.MULTILINE), message


def test_every_mistake_is_listed(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "workers: {count: 0, num_cpus: -1}\nbogus: 1\n"))

    assert "workers.count:" in message
    assert "workers.num_cpus:" in message
    assert "bogus:" in message


def test_top_k_above_experts_names_both_values(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "model: {random: {experts: 2, top_k: 3}}\n"))

    assert "random.top_k (3) exceeds random.experts (2)" in message
    assert "model.random:" in message


def test_checkpoint_and_random_both_given(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "model: {checkpoint: /ckpt, random: {seed: 1}}\n"))

    assert "give either model.checkpoint ('/ckpt') or model.random, not both" in message


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "router: {port: [1\n")
    assert config_error(path).startswith(f"{path}: not valid YAML: ")


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("42\n", "int"), ("hello\n", "str")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    assert config_error(path) == f"{path}: top level must be a mapping of sections, got {kind}"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert config_error(path) == f"{path}: cannot read config file: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert config_error(tmp_path) == f"{tmp_path}: cannot read config file: Is a directory"


def test_binary_file_is_a_config_error(tmp_path: Path) -> None:
    # e.g. a checkpoint passed by mistake: not UTF-8 text
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\xff\xfe\x00\x01binary")

    assert config_error(path).startswith(f"{path}: ")


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------


def test_overrides_apply_dotted_keys() -> None:
    config = ServeConfig().with_overrides(**{"router.port": 0, "workers.count": 5, "model.name": "m2"})

    assert config.router.port == 0
    assert config.workers.count == 5
    assert config.model.name == "m2"
    assert config.router.host == "127.0.0.1"  # others untouched


def test_overrides_ignore_none() -> None:
    base = ServeConfig().with_overrides(**{"router.port": 9000})

    assert base.with_overrides(**{"router.port": None, "ray.address": None}) == base


def test_overrides_are_validated() -> None:
    with pytest.raises(ConfigError) as info:
        ServeConfig().with_overrides(**{"workers.count": 0})

    message = str(info.value)
    assert message.startswith("command line: invalid configuration\n")
    assert "workers.count:" in message and "(got 0)" in message


def test_checkpoint_override_clears_random(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "model: {random: {experts: 4, top_k: 1}}\n"))

    overridden = config.with_overrides(**{"model.checkpoint": "/ckpt"})

    assert overridden.model.checkpoint == "/ckpt"
    assert overridden.model.random is None
    assert overridden.model.random_or_default is None


def test_validate_config_accepts_none() -> None:
    assert validate_config(None) == ServeConfig()


# ---------------------------------------------------------------------------------------------
# Worker bounds and autoscaling
# ---------------------------------------------------------------------------------------------


def test_autoscaling_file_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
workers:
  count: 2
  min_workers: 1
  max_workers: 16
  num_gpus: 1
  resources: {expert_worker: 1}
autoscaling:
  enabled: true
  target_tokens_per_s_per_worker: 50000
  max_queue_delay_ms: 80
  upscale_delay_s: 10
  downscale_delay_s: 300
"""))

    assert config.workers.bounds == (1, 16)
    assert config.workers.resources == {"expert_worker": 1.0}
    assert config.autoscaling.enabled
    assert config.autoscaling.target_tokens_per_s_per_worker == 50000
    assert (config.autoscaling.upscale_delay_s, config.autoscaling.downscale_delay_s) == (10, 300)
    assert config.autoscaling.max_step == 4  # untouched keys keep defaults


def test_bounds_default_to_the_count() -> None:
    assert ServeConfig().workers.bounds == (2, 2)
    assert ServeConfig().with_overrides(**{"workers.count": 5}).workers.bounds == (5, 5)
    assert not ServeConfig().autoscaling.enabled


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("workers: {count: 2, min_workers: 4, max_workers: 3}\n",
                     "workers.min_workers (4) exceeds workers.max_workers (3)", id="min-above-max"),
        pytest.param("workers: {count: 1, min_workers: 2, max_workers: 4}\n",
                     "workers.count (1) is below workers.min_workers (2)", id="count-below-min"),
        pytest.param("workers: {count: 5, max_workers: 4}\n",
                     "workers.count (5) exceeds workers.max_workers (4)", id="count-above-max"),
        pytest.param("workers: {resources: {GPU: 1}}\n",
                     "workers.resources may only name custom resources; set ['GPU'] with", id="reserved-resource"),
        pytest.param("autoscaling: {enabled: true}\n",
                     "autoscaling.enabled is true but workers.min_workers (2) equals workers.max_workers (2)",
                     id="autoscaling-without-range"),
        pytest.param("workers: {count: 2, min_workers: 1, max_workers: 3}\nrebalance: {min_replicas: 2}\n",
                     "rebalance.min_replicas (2) exceeds workers.min_workers (1)", id="replicas-above-min-workers"),
    ],
)  # fmt: skip
def test_inconsistent_pairs_name_both_keys_and_values(tmp_path: Path, text: str, message: str) -> None:
    assert message in config_error(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "key", "detail"),
    [
        pytest.param("autoscaling: {target_tps: 5}\n", "autoscaling.target_tps", "Extra inputs", id="unknown-key"),
        pytest.param("autoscaling: {target_tokens_per_s_per_worker: 0}\n",
                     "autoscaling.target_tokens_per_s_per_worker", "greater than 0", id="zero-target"),
        pytest.param("autoscaling: {downscale_utilization: 1.5}\n", "autoscaling.downscale_utilization",
                     "less than or equal to 1", id="utilization-above-one"),
        pytest.param("autoscaling: {upscale_delay_s: soon}\n", "autoscaling.upscale_delay_s", "valid number",
                     id="delay-wrong-type"),
        pytest.param("workers: {resources: {expert_worker: -1}}\n", "workers.resources.expert_worker",
                     "greater than 0", id="negative-resource"),
        pytest.param("workers: {max_workers: 0}\n", "workers.max_workers", "greater than or equal to 1",
                     id="zero-max-workers"),
    ],
)  # fmt: skip
def test_autoscaling_mistake_names_the_key(tmp_path: Path, text: str, key: str, detail: str) -> None:
    message = config_error(write(tmp_path, text))
    assert re.search(rf"^  {re.escape(key)}: .*{re.escape(detail)}", message, re.MULTILINE), message


# ---------------------------------------------------------------------------------------------
# Security and draining
# ---------------------------------------------------------------------------------------------


def test_security_file_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
router: {host: 0.0.0.0, drain_s: 2, grace_s: 30}
security:
  tls_cert_file: /etc/moe/server.crt
  tls_key_file: /etc/moe/server.key
  tls_client_ca_file: /etc/moe/clients-ca.crt
  inference_tokens_file: /etc/moe/inference-tokens
  admin_tokens_file: /etc/moe/admin-tokens
"""))

    security = config.security
    assert security.tls and security.tls_client_ca_file == "/etc/moe/clients-ca.crt"
    assert (security.inference_tokens_file, security.admin_tokens_file) == ("/etc/moe/inference-tokens", "/etc/moe/admin-tokens")
    assert (config.router.drain_s, config.router.grace_s) == (2, 30)


def test_security_is_off_by_default_on_a_loopback_bind() -> None:
    config = ServeConfig()
    assert config.router.host == "127.0.0.1"
    assert not config.security.tls and config.security.admin_tokens_file is None
    assert (config.router.drain_s, config.router.grace_s) == (5.0, 10.0)


@pytest.mark.parametrize("host", [
    pytest.param("127.0.0.1", id="ipv4-loopback"),
    pytest.param("127.0.0.2", id="ipv4-loopback-net"),
    pytest.param("::1", id="ipv6-loopback"),
    pytest.param("[::1]", id="ipv6-loopback-bracketed"),
    pytest.param("localhost", id="localhost"),
    pytest.param("LocalHost", id="localhost-any-case"),
])
def test_loopback_binds_need_no_admin_tokens(host: str) -> None:
    assert ServeConfig().with_overrides(**{"router.host": host}).router.host == host


@pytest.mark.parametrize("host", [
    pytest.param("0.0.0.0", id="all-ipv4"),
    pytest.param("::", id="all-ipv6"),
    pytest.param("10.0.0.5", id="private-address"),
    pytest.param("router.internal", id="host-name"),
])
def test_exposed_bind_without_admin_tokens_is_refused_naming_both_keys(tmp_path: Path, host: str) -> None:
    message = config_error(write(tmp_path, f"router: {{host: '{host}'}}\n"))
    assert f"router.host ('{host}') is not a loopback address but security.admin_tokens_file is not set" in message

    allowed = load_config(write(tmp_path, f"router: {{host: '{host}'}}\nsecurity: {{admin_tokens_file: /etc/t}}\n", "ok.yaml"))
    assert allowed.router.host == host


def test_host_override_is_checked_against_the_security_section() -> None:
    with pytest.raises(ConfigError, match=r"router.host \('0.0.0.0'\) .* security.admin_tokens_file"):
        ServeConfig().with_overrides(**{"router.host": "0.0.0.0"})
    secured = validate_config({"security": {"admin_tokens_file": "/etc/t"}})
    assert secured.with_overrides(**{"router.host": "0.0.0.0"}).router.host == "0.0.0.0"


@pytest.mark.parametrize(("text", "message"), [
    pytest.param("security: {tls_cert_file: /c.crt}\n",
                 "security.tls_cert_file ('/c.crt') needs security.tls_key_file (not set)", id="cert-without-key"),
    pytest.param("security: {tls_key_file: /c.key}\n",
                 "security.tls_key_file ('/c.key') needs security.tls_cert_file (not set)", id="key-without-cert"),
    pytest.param("security: {tls_client_ca_file: /ca.crt}\n",
                 "security.tls_client_ca_file ('/ca.crt') needs security.tls_cert_file and security.tls_key_file",
                 id="client-ca-without-cert"),
])  # fmt: skip
def test_security_pairs_name_both_keys(tmp_path: Path, text: str, message: str) -> None:
    assert message in config_error(write(tmp_path, text))


@pytest.mark.parametrize(("text", "key", "detail"), [
    pytest.param("security: {admin_token: abc}\n", "security.admin_token", "Extra inputs", id="inline-token-key"),
    pytest.param("security: {admin_tokens_file: ''}\n", "security.admin_tokens_file", "at least 1 character",
                 id="empty-path"),
    pytest.param("security: {inference_tokens_file: [a, b]}\n", "security.inference_tokens_file", "valid string",
                 id="path-not-a-string"),
    pytest.param("router: {drain_s: -1}\n", "router.drain_s", "greater than or equal to 0", id="negative-drain"),
    pytest.param("router: {grace_s: soon}\n", "router.grace_s", "valid number", id="grace-not-a-number"),
])  # fmt: skip
def test_security_and_drain_mistakes_name_the_key(tmp_path: Path, text: str, key: str, detail: str) -> None:
    message = config_error(write(tmp_path, text))
    assert re.search(rf"^  {re.escape(key)}: .*{re.escape(detail)}", message, re.MULTILINE), message


# ---------------------------------------------------------------------------------------------
# Shared memory: off by default, loopback only unless allowed
# ---------------------------------------------------------------------------------------------


def test_shared_memory_is_off_by_default() -> None:
    router = ServeConfig().router
    assert (router.shared_memory, router.shared_memory_on_exposed_host) == (False, False)


def test_shared_memory_on_a_loopback_host_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "router: {shared_memory: true}\n"))
    assert config.router.shared_memory


@pytest.mark.parametrize("host", [
    pytest.param("0.0.0.0", id="all-ipv4"),
    pytest.param("10.0.0.5", id="private-address"),
    pytest.param("router.internal", id="host-name"),
])
def test_shared_memory_on_an_exposed_host_is_refused_naming_both_keys(tmp_path: Path, host: str) -> None:
    secured = "security: {admin_tokens_file: /etc/t}\n"

    message = config_error(write(tmp_path, f"router: {{host: '{host}', shared_memory: true}}\n{secured}"))
    allowed = load_config(write(tmp_path, f"router: {{host: '{host}', shared_memory: true, "
                                          f"shared_memory_on_exposed_host: true}}\n{secured}", "ok.yaml"))

    assert f"router.shared_memory (True) is on but router.host ('{host}') is not a loopback address" in message
    assert "set router.shared_memory_on_exposed_host: true (now False) to allow it" in message
    assert allowed.router.shared_memory and allowed.router.host == host


def test_shared_memory_override_is_checked_against_the_host() -> None:
    exposed = validate_config({"router": {"host": "0.0.0.0"}, "security": {"admin_tokens_file": "/etc/t"}})
    with pytest.raises(ConfigError, match=r"router.shared_memory \(True\) .* router.host \('0.0.0.0'\)"):
        exposed.with_overrides(**{"router.shared_memory": True})
