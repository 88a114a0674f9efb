from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Placement(_message.Message):
    __slots__ = ("version", "num_logical_experts", "workers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_LOGICAL_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    num_logical_experts: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerReplicas]
    def __init__(self, version: _Optional[int] = ..., num_logical_experts: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerReplicas, _Mapping]]] = ...) -> None: ...

class WorkerReplicas(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, experts: _Optional[_Iterable[int]] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("index", "node_id", "replicas", "calls", "tokens", "busy_s", "outstanding_tokens", "replica_tokens")
    class ReplicaTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUSY_S_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_TOKENS_FIELD_NUMBER: _ClassVar[int]
    index: int
    node_id: str
    replicas: int
    calls: int
    tokens: int
    busy_s: float
    outstanding_tokens: int
    replica_tokens: _containers.ScalarMap[int, int]
    def __init__(self, index: _Optional[int] = ..., node_id: _Optional[str] = ..., replicas: _Optional[int] = ..., calls: _Optional[int] = ..., tokens: _Optional[int] = ..., busy_s: _Optional[float] = ..., outstanding_tokens: _Optional[int] = ..., replica_tokens: _Optional[_Mapping[int, int]] = ...) -> None: ...

class RebalanceEvent(_message.Message):
    __slots__ = ("applied", "reason", "from_version", "to_version", "moves", "balancedness_before", "balancedness_after", "duration_s", "bytes_moved", "age_s")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_AFTER_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    reason: str
    from_version: int
    to_version: int
    moves: int
    balancedness_before: float
    balancedness_after: float
    duration_s: float
    bytes_moved: int
    age_s: float
    def __init__(self, applied: _Optional[bool] = ..., reason: _Optional[str] = ..., from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., moves: _Optional[int] = ..., balancedness_before: _Optional[float] = ..., balancedness_after: _Optional[float] = ..., duration_s: _Optional[float] = ..., bytes_moved: _Optional[int] = ..., age_s: _Optional[float] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("model", "layers", "num_experts", "window_s", "window_tokens", "tokens_per_s", "balancedness", "placement_version", "workers", "recent_events", "num_shared_experts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    RECENT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    num_experts: int
    window_s: float
    window_tokens: _containers.RepeatedScalarFieldContainer[int]
    tokens_per_s: _containers.RepeatedScalarFieldContainer[float]
    balancedness: _containers.RepeatedScalarFieldContainer[float]
    placement_version: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerLoad]
    recent_events: _containers.RepeatedCompositeFieldContainer[RebalanceEvent]
    num_shared_experts: int
    def __init__(self, model: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., num_experts: _Optional[int] = ..., window_s: _Optional[float] = ..., window_tokens: _Optional[_Iterable[int]] = ..., tokens_per_s: _Optional[_Iterable[float]] = ..., balancedness: _Optional[_Iterable[float]] = ..., placement_version: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerLoad, _Mapping]]] = ..., recent_events: _Optional[_Iterable[_Union[RebalanceEvent, _Mapping]]] = ..., num_shared_experts: _Optional[int] = ...) -> None: ...

class PlacementRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class PlacementResponse(_message.Message):
    __slots__ = ("model", "placement")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    placement: Placement
    def __init__(self, model: _Optional[str] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("model", "load")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    model: str
    load: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model: _Optional[str] = ..., load: _Optional[_Iterable[float]] = ...) -> None: ...

class ReplicaChange(_message.Message):
    __slots__ = ("worker", "expert", "added")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    worker: int
    expert: int
    added: bool
    def __init__(self, worker: _Optional[int] = ..., expert: _Optional[int] = ..., added: _Optional[bool] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("current", "proposed", "moves", "balancedness_current", "balancedness_proposed", "changes")
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_CURRENT_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    current: Placement
    proposed: Placement
    moves: int
    balancedness_current: _containers.RepeatedScalarFieldContainer[float]
    balancedness_proposed: _containers.RepeatedScalarFieldContainer[float]
    changes: _containers.RepeatedCompositeFieldContainer[ReplicaChange]
    def __init__(self, current: _Optional[_Union[Placement, _Mapping]] = ..., proposed: _Optional[_Union[Placement, _Mapping]] = ..., moves: _Optional[int] = ..., balancedness_current: _Optional[_Iterable[float]] = ..., balancedness_proposed: _Optional[_Iterable[float]] = ..., changes: _Optional[_Iterable[_Union[ReplicaChange, _Mapping]]] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("model", "placement")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    placement: Placement
    def __init__(self, model: _Optional[str] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("model", "force")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    force: bool
    def __init__(self, model: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("model", "history")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    model: str
    history: bool
    def __init__(self, model: _Optional[str] = ..., history: _Optional[bool] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("model", "status_json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    status_json: str
    def __init__(self, model: _Optional[str] = ..., status_json: _Optional[str] = ...) -> None: ...
