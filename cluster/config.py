"""Service configuration: pydantic models, loaded once from YAML and handed on by section.

Every key has a description; unknown keys, wrong types and inconsistent pairs are refused with
an error that names the key (and both values for a pair). Command-line flags override the
file through `ServeConfig.with_overrides`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.model_spec import ModelSpec


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _bounds(count: int, low: int | None, high: int | None) -> tuple[int, int]:
    """(fewest, most) of something scaled between optional bounds that default to `count`."""
    return (count if low is None else low), (count if high is None else high)


class RandomModelConfig(_Section):
    """A seeded random Mixtral-style model (with DeepSeek-style shared experts if `shared_ffn`),
    for demos and benchmarks."""

    layers: Annotated[int, Field(ge=1, description="number of MoE layers")] = 2
    experts: Annotated[int, Field(ge=1, description="experts per MoE layer")] = 8
    hidden: Annotated[int, Field(ge=1, description="hidden size H")] = 256
    ffn: Annotated[int, Field(ge=1, description="expert intermediate size F")] = 512
    top_k: Annotated[int, Field(ge=1, description="experts per token")] = 2
    shared_ffn: Annotated[int, Field(ge=0, description="intermediate size of the shared experts every token "
                                                       "also goes through (DeepSeek-style; 0: none)")] = 0
    seed: Annotated[int, Field(description="seed of every weight")] = 0
    dtype: Annotated[Literal["float32", "bfloat16", "float16", "fp8", "mxfp4"], Field(description="how the experts are stored and held by the workers: float32, bfloat16 or float16 (the random float32 weights rounded), fp8 (float8_e4m3fn in 128x128 blocks with float32 scales, as DeepSeek-V3 ships) or mxfp4 (gpt-oss's packed 4-bit values with a power-of-two scale per 32); the gate stays float32")] = "float32"

    @model_validator(mode="after")
    def _top_k_fits(self) -> RandomModelConfig:
        if self.top_k > self.experts:
            raise ValueError(f"random.top_k ({self.top_k}) exceeds random.experts ({self.experts})")
        if self.dtype == "mxfp4" and (self.hidden % 32 or self.ffn % 32):
            raise ValueError(f"random.dtype mxfp4 packs groups of 32 values: random.hidden ({self.hidden}) and "
                             f"random.ffn ({self.ffn}) must be multiples of 32")
        return self

    def spec(self) -> ModelSpec:
        return ModelSpec(
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            num_experts=self.experts,
            top_k=self.top_k,
            moe_layers=tuple(range(self.layers)),
            num_hidden_layers=self.layers,
            shared_intermediate_size=self.shared_ffn,
            expert_dtype=self.dtype,
        )


class ModelConfig(_Section):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                               description="model name clients use in requests")] = "moe"
    checkpoint: Annotated[str | None, Field(description="Hugging Face checkpoint directory (Mixtral, Qwen2/3-MoE or DeepSeek-V2/V3 layout)")] = None
    random: Annotated[RandomModelConfig | None, Field(description="seeded random model (when no checkpoint)")] = None
    expert_skip_threshold: Annotated[float, Field(ge=0, lt=1, description="expert skipping (opt-in): drop a token's routed experts whose renormalised gate weight (weight / the sum of its top-k weights) is below this, always keeping its top one, the kept weights scaled back to the top-k sum; fewer expert-tokens computed, at some cost in accuracy. 0: off. A request may set its own (parameter or field expert_skip_threshold)")] = 0.0

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.checkpoint is not None and self.random is not None:
            raise ValueError(
                f"give either model.checkpoint ({self.checkpoint!r}) or model.random, not both"
            )
        return self

    @property
    def random_or_default(self) -> RandomModelConfig | None:
        """The random model to build: the configured one, the default one, or None with a checkpoint."""
        if self.checkpoint is not None:
            return None
        return self.random or RandomModelConfig()


class WorkersConfig(_Section):
    count: Annotated[int, Field(ge=1, description="expert shard workers (Ray actors) to start with")] = 2
    min_workers: Annotated[int | None, Field(ge=1, description="fewest workers the autoscaler keeps; default: count")] = None
    max_workers: Annotated[int | None, Field(ge=1, description="most workers the autoscaler starts; default: count")] = None
    slots_per_worker: Annotated[int | None, Field(ge=1, description="replica slots per worker (memory budget); default: one replica of every expert plus 25% room for hot-expert replicas")] = None
    num_gpus: Annotated[Literal["auto"] | Annotated[float, Field(ge=0)], Field(description="GPUs per worker; auto: 1 when the cluster has GPUs, else 0")] = "auto"
    num_cpus: Annotated[float, Field(ge=0, description="CPUs Ray reserves per worker (fractional allowed)")] = 0.5
    torch_threads: Annotated[int, Field(ge=1, description="torch intra-op threads per worker")] = 1
    device: Annotated[Literal["auto", "cpu", "cuda"], Field(description="where expert math runs")] = "auto"
    compute_dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], Field(description="dtype of the expert math (the weights stay as the checkpoint stores them, FP8 / MXFP4 dequantized per expert as it runs; inputs, partial sums and the wire stay float32); auto: bfloat16 for 16-bit and quantized experts on a GPU or on a CPU with native BF16 matmul (AMX or AVX512-BF16), float16 for FP16 experts on a GPU, float32 otherwise and always for float32 experts")] = "auto"
    resources: Annotated[dict[str, Annotated[float, Field(gt=0)]], Field(description="custom Ray resources per worker, e.g. {expert_worker: 1} to land on the cluster's expert-worker nodes")] = {}
    spread: Annotated[bool, Field(description="spread the workers over the nodes (Ray's SPREAD strategy), so losing a node loses as few as possible; false packs them")] = True
    health_check_interval_s: Annotated[float, Field(gt=0, description="how often the supervisor probes every worker (a lost one is routed around, reloaded once Ray restarts it)")] = 0.5
    health_check_timeout_s: Annotated[float, Field(gt=0, description="a probe not answered within this long is missed")] = 1.0
    spares: Annotated[int, Field(ge=0, description="warm spare workers (started, libraries loaded, no replicas): a lost or hung worker's place is taken by one at once, without waiting for Ray to start a new process; counted in the resources asked of Ray's autoscaler")] = 0
    health_check_misses: Annotated[int, Field(ge=1, description="probes missed in a row before a silent worker counts as down; a worker a router saw fail counts at once, and one Ray restarted is reloaded at once (a probe can wait behind batch shares whose inputs are still on their way, so keep this high)")] = 10

    @model_validator(mode="after")
    def _bounds_hold_count(self) -> WorkersConfig:
        low, high = self.bounds
        if self.min_workers is not None and self.max_workers is not None and low > high:
            raise ValueError(f"workers.min_workers ({low}) exceeds workers.max_workers ({high})")
        if self.count < low:
            raise ValueError(f"workers.count ({self.count}) is below workers.min_workers ({low})")
        if self.count > high:
            raise ValueError(f"workers.count ({self.count}) exceeds workers.max_workers ({high})")
        reserved = {"CPU", "GPU", "memory", "object_store_memory"} & set(self.resources)
        if reserved:
            raise ValueError(
                f"workers.resources may only name custom resources; set {sorted(reserved)} with "
                f"workers.num_cpus / workers.num_gpus"
            )
        return self

    @property
    def bounds(self) -> tuple[int, int]:
        """(fewest, most) workers; each defaults to `count`."""
        return _bounds(self.count, self.min_workers, self.max_workers)


class RebalanceConfig(_Section):
    """When and how hot experts are replicated and placement rebalanced, live."""

    enabled: Annotated[bool, Field(description="rebalance automatically when load drifts")] = True
    threshold: Annotated[float, Field(gt=0, le=1, description="rebalance when live balancedness (min over layers) falls below this")] = 0.85
    hysteresis: Annotated[float, Field(ge=0, le=1, description="after a rebalance, trigger again only below (balancedness reached - hysteresis)")] = 0.05
    min_gain: Annotated[float, Field(ge=0, le=1, description="skip a plan that improves balancedness by less than this")] = 0.03
    min_interval_s: Annotated[float, Field(ge=0, description="least time between two automatic rebalances")] = 2.0
    check_interval_s: Annotated[float, Field(gt=0, description="how often the controller looks at the load")] = 0.5
    window_s: Annotated[float, Field(gt=0, description="sliding window of routed tokens the decisions use")] = 5.0
    min_window_tokens: Annotated[int, Field(ge=0, description="do not decide on fewer routed tokens than this")] = 2048
    min_replicas: Annotated[int, Field(ge=1, description="replicas every logical expert keeps")] = 1
    policy: Annotated[Literal["global", "node_aware"], Field(description="global, or spread an expert's replicas over nodes")] = "global"
    max_loads_per_step: Annotated[int, Field(ge=1, description="replicas loaded per migration step (bounds memory and pause)")] = 8
    copy_from_live: Annotated[bool, Field(description="copy new replicas from a live one through the object store instead of reading the checkpoint")] = True

    @model_validator(mode="after")
    def _window_covers_checks(self) -> RebalanceConfig:
        if self.window_s < self.check_interval_s:
            raise ValueError(
                f"rebalance.window_s ({self.window_s}) must be at least rebalance.check_interval_s ({self.check_interval_s})"
            )
        return self


class AutoscalingConfig(_Section):
    """When to add or remove expert shard workers (and, through Ray's autoscaler, GPU nodes).

    Load is counted in expert-tokens: a token routed to k experts counts k times. The worker
    count stays within `workers.min_workers` and `workers.max_workers`.
    """

    enabled: Annotated[bool, Field(description="add and remove workers from live load")] = False
    target_tokens_per_s_per_worker: Annotated[float, Field(gt=0, description="expert-tokens per second one worker should carry; more load per worker scales out")] = 20000.0
    max_queue_delay_ms: Annotated[float, Field(gt=0, description="scale out when requests wait longer than this in the router's queue (p90 over the window)")] = 200.0
    downscale_utilization: Annotated[float, Field(gt=0, le=1, description="scale in only while one worker fewer would still carry less than this fraction of the target")] = 0.6
    upscale_delay_s: Annotated[float, Field(ge=0, description="how long the load must call for more workers before they are added")] = 5.0
    downscale_delay_s: Annotated[float, Field(ge=0, description="how long the load must allow fewer workers before one is removed")] = 60.0
    max_step: Annotated[int, Field(ge=1, description="most workers added or removed by one decision")] = 4
    check_interval_s: Annotated[float, Field(gt=0, description="how often the autoscaler looks at the load")] = 1.0
    start_timeout_s: Annotated[float, Field(gt=0, description="give up on a new worker that has no node to run on after this long (cloud nodes take minutes)")] = 600.0
    router_max_waiting: Annotated[int, Field(ge=0, description="add a router (data-parallel attention, within router.min_count..max_count) when more generation requests than this per router wait for room in the KV caches")] = 4
    router_max_kv_usage: Annotated[float, Field(gt=0, le=1, description="add a router when a router's KV cache is fuller than this")] = 0.9


class MonitoringConfig(_Section):
    """Metrics on Ray's Prometheus endpoint and the history behind `moe-serve status --png`."""

    enabled: Annotated[bool, Field(description="export metrics through ray.util.metrics")] = True
    interval_s: Annotated[float, Field(gt=0, description="how often the control plane refreshes its gauges and load history")] = 1.0
    expert_series: Annotated[int, Field(ge=0, description="export load and replicas per (layer, expert) while the model has at most this many logical experts")] = 256
    hot_experts: Annotated[int, Field(ge=1, description="beyond expert_series, export the load of this many hottest experts, by rank")] = 16
    history_s: Annotated[float, Field(gt=0, description="how much per-expert load history status pictures show")] = 600.0


class RouterConfig(_Section):
    host: Annotated[str, Field(description="address the gRPC and HTTP servers bind; 0.0.0.0 exposes them")] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535, description="gRPC port; 0 picks a free one")] = 8001
    http_port: Annotated[int | None, Field(ge=0, le=65535, description="OpenAI-compatible HTTP port (text generation); 0 picks a free one, null serves no HTTP")] = 8000
    max_batch_tokens: Annotated[int, Field(ge=1, description="tokens per batch sent to the workers")] = 8192
    max_wait_ms: Annotated[float, Field(ge=0, description="how long a batch waits for more requests once a worker slot is free; 0: requests that queue while the workers are busy form the next batch")] = 0.0
    max_inflight_batches: Annotated[int, Field(ge=1, description="batches in the workers at once per layer")] = 2
    max_queued_tokens: Annotated[int, Field(ge=1, description="admission control: refuse a request with RESOURCE_EXHAUSTED when the model's queue would pass this many tokens (a lone request larger than this still goes)")] = 262144
    max_worker_inflight_tokens: Annotated[int, Field(ge=1, description="admission control: hold new batches while a worker has this many expert-token assignments in hand")] = 65536
    max_retries: Annotated[int, Field(ge=0, description="times a batch's share is sent again to other replicas after its worker was lost (bounded, so a request that kills workers cannot crash-loop them)")] = 1
    share_timeout_s: Annotated[float, Field(gt=0, description="a worker share unanswered this long (or share_timeout_factor x what its size took that worker lately, if longer) counts its worker as hung: the share goes to another replica and the supervisor restarts the worker if its computation is still running")] = 10.0
    share_timeout_factor: Annotated[float, Field(ge=1, description="how many times the time a share of its size took lately a share may take before its worker counts as hung")] = 20.0
    max_message_mb: Annotated[int, Field(ge=1, description="largest request or response message")] = 256
    torch_threads: Annotated[int, Field(ge=1, description="torch threads in the router (gate, combine)")] = 1
    num_cpus: Annotated[float, Field(ge=0, description="CPUs Ray reserves for the router actor (moe-serve deploy)")] = 1.0
    count: Annotated[int, Field(ge=1, description="routers to start with (moe-serve deploy): each runs the dense side and serves the same ports (SO_REUSEPORT on a node); several over one expert pool are data-parallel attention")] = 1
    min_count: Annotated[int | None, Field(ge=1, description="fewest routers the autoscaler keeps; default: count")] = None
    max_count: Annotated[int | None, Field(ge=1, description="most routers the autoscaler starts; default: count")] = None
    drain_s: Annotated[float, Field(ge=0, description="on SIGTERM (moe-serve serve): how long health says NOT_SERVING while requests are still served, so load balancers stop sending before the port closes")] = 5.0
    grace_s: Annotated[float, Field(ge=0, description="after the drain window: how long requests already in flight get to finish once new ones are refused")] = 10.0
    shared_memory: Annotated[bool, Field(description="serve the system shared memory extension (KServe v2, as Triton defines it): clients on this machine register POSIX shared memory regions (/dev/shm), and layer requests read their input from and write their outputs to them instead of carrying the bytes (zero-copy for co-located clients); off, its RPCs answer UNIMPLEMENTED. Only with a loopback host, unless shared_memory_on_exposed_host")] = False
    shared_memory_on_exposed_host: Annotated[bool, Field(description="allow shared_memory with a host that is not loopback: whoever reaches the port (with an inference token, when tokens are set) can then have the router map, read and write any shared memory object its user can open on this machine")] = False


    @model_validator(mode="after")
    def _count_within_bounds(self) -> RouterConfig:
        low, high = self.bounds
        if low > high:
            raise ValueError(f"router.min_count ({low}) exceeds router.max_count ({high})")
        if not low <= self.count <= high:
            raise ValueError(f"router.count ({self.count}) is outside router.min_count..router.max_count ({low}..{high})")
        return self

    @model_validator(mode="after")
    def _shared_memory_stays_local(self) -> RouterConfig:
        if self.shared_memory and not self.shared_memory_on_exposed_host and not is_loopback_host(self.host):
            raise ValueError(
                f"router.shared_memory ({self.shared_memory}) is on but router.host ({self.host!r}) is not a loopback "
                f"address: whoever reaches the port could have the router map, read and write this machine's shared "
                f"memory objects (only clients on this machine can use shared memory anyway). Bind router.host to "
                f"127.0.0.1, or set router.shared_memory_on_exposed_host: true (now "
                f"{self.shared_memory_on_exposed_host}) to allow it"
            )
        return self

    @property
    def bounds(self) -> tuple[int, int]:
        """(fewest, most) routers; each defaults to `count`."""
        return _bounds(self.count, self.min_count, self.max_count)


class GenerationConfig(_Section):
    """Text generation on the router (when the checkpoint has its dense weights and a tokenizer):
    continuous batching over a paged KV cache."""

    enabled: Annotated[bool, Field(description="generate text when the checkpoint allows it; false serves MoE layers only")] = True
    device: Annotated[Literal["auto", "cpu", "cuda"], Field(description="where the dense part of the model (attention, norms, LM head) runs")] = "auto"
    kv_cache_mb: Annotated[float, Field(gt=0, description="memory for the KV cache of all running sequences; blocks are handed out as sequences grow")] = 512.0
    block_size: Annotated[int, Field(ge=1, le=1024, description="tokens per KV-cache block")] = 16
    max_num_seqs: Annotated[int, Field(ge=1, description="sequences running (decoding or reading their prompt) at once")] = 64
    max_batch_tokens: Annotated[int, Field(ge=1, description="tokens one step computes: decode tokens plus prompt chunks")] = 2048
    prefill_chunk_tokens: Annotated[int, Field(ge=1, description="prompt tokens one sequence reads per step; longer prompts are read in chunks mixed with decode steps")] = 512
    max_waiting: Annotated[int, Field(ge=1, description="requests waiting for room in the cache; more are refused (HTTP 429, RESOURCE_EXHAUSTED)")] = 512
    max_model_len: Annotated[int | None, Field(ge=2, description="longest sequence (prompt + new tokens); default: the model's max_position_embeddings, within what the KV cache holds")] = None
    default_max_tokens: Annotated[int, Field(ge=1, description="new tokens when a request does not say")] = 16
    pipeline_microbatches: Annotated[bool, Field(description="split each step's batch in two and keep both in flight: while one half is at the expert workers, the other runs its attention (pays off when the dense side and the experts run on different devices)")] = False


class RayConfig(_Section):
    address: Annotated[str | None, Field(description="Ray cluster to join ('auto' or host:port); none starts an embedded one")] = None
    namespace: Annotated[str, Field(min_length=1, description="Ray namespace of every actor")] = "moe-serve"


def is_loopback_host(host: str) -> bool:
    """True for a bind address only this machine can reach: localhost, 127.0.0.0/8, ::1."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


_File = Annotated[str | None, Field(min_length=1)]


class SecurityConfig(_Section):
    """TLS and bearer tokens for the router's gRPC port. Paths, never secrets: every file is read
    once when the server starts, on the machine the router runs on, and a missing or unreadable
    file is refused naming its key and path."""

    tls_cert_file: Annotated[_File, Field(description="PEM server certificate (chain); with tls_key_file the port speaks TLS only")] = None
    tls_key_file: Annotated[_File, Field(description="PEM private key of tls_cert_file")] = None
    tls_client_ca_file: Annotated[_File, Field(description="PEM CA bundle; when set, every client must present a certificate it signed (mutual TLS)")] = None
    inference_tokens_file: Annotated[_File, Field(description="bearer tokens, one per line ('#' comments); when set, inference and reflection calls need one of them or an admin token")] = None
    admin_tokens_file: Annotated[_File, Field(description="bearer tokens, one per line ('#' comments); when set, admin calls need one of them; required when router.host is not a loopback address")] = None

    @model_validator(mode="after")
    def _tls_pairs(self) -> SecurityConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            given, missing = ("tls_cert_file", "tls_key_file") if self.tls_key_file is None else ("tls_key_file", "tls_cert_file")
            raise ValueError(
                f"security.{given} ({getattr(self, given)!r}) needs security.{missing} (not set): "
                f"TLS takes a certificate and its key"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                f"security.tls_client_ca_file ({self.tls_client_ca_file!r}) needs security.tls_cert_file "
                f"and security.tls_key_file (not set): client certificates are checked only over TLS"
            )
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


class ServeConfig(_Section):
    model: ModelConfig = ModelConfig()
    workers: WorkersConfig = WorkersConfig()
    router: RouterConfig = RouterConfig()
    generation: GenerationConfig = GenerationConfig()
    rebalance: RebalanceConfig = RebalanceConfig()
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    ray: RayConfig = RayConfig()
    security: SecurityConfig = SecurityConfig()

    @model_validator(mode="after")
    def _exposed_admin_needs_tokens(self) -> ServeConfig:
        if not is_loopback_host(self.router.host) and self.security.admin_tokens_file is None:
            raise ValueError(
                f"router.host ({self.router.host!r}) is not a loopback address but security.admin_tokens_file "
                f"is not set: anyone who reaches the port could change the placement. Set "
                f"security.admin_tokens_file (and TLS), or bind router.host to 127.0.0.1"
            )
        return self

    @model_validator(mode="after")
    def _sections_agree(self) -> ServeConfig:
        low, high = self.workers.bounds
        if self.rebalance.min_replicas > low:
            raise ValueError(
                f"rebalance.min_replicas ({self.rebalance.min_replicas}) exceeds workers.min_workers "
                f"({low}): replicas of one expert sit on distinct workers"
            )
        if self.autoscaling.enabled and low == high and self.router.bounds[0] == self.router.bounds[1]:
            raise ValueError(
                f"autoscaling.enabled is true but workers.min_workers ({low}) equals workers.max_workers ({high}) "
                f"and router.min_count equals router.max_count ({self.router.bounds[0]}): set a range to scale within"
            )
        return self

    def with_overrides(self, **dotted: object) -> ServeConfig:
        """`with_overrides(**{"router.port": 0})`; None values are ignored. Re-validated."""
        data = self.model_dump()
        for key, value in dotted.items():
            if value is None:
                continue
            section, _, field = key.partition(".")
            if section not in data or not field:
                raise ConfigError(f"unknown setting {key!r}; settings are section.key, sections: {sorted(data)}")
            data[section][field] = value
            if key == "model.checkpoint":
                data["model"]["random"] = None
        return validate_config(data, source="command line")


class ConfigError(ValueError):
    """A configuration mistake; the message names the file and the key."""


def validate_config(data: object, source: str = "config") -> ServeConfig:
    try:
        return ServeConfig.model_validate(data or {})
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(top level)"
            # a check across sections (top level) quotes its values itself, not the whole config
            got = "" if e["type"] == "missing" or not e["loc"] else f" (got {e.get('input')!r})"
            lines.append(f"  {key}: {e['msg']}{got}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None


def load_config(path: str | Path | None) -> ServeConfig:
    """Read a YAML file (or defaults when `path` is None)."""
    if path is None:
        return ServeConfig()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; expected a YAML config") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return validate_config(data, source=str(path))
