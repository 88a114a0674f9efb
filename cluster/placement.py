"""Placement: which replica of which logical expert sits in which worker slot.

Glossary (the same words in code, metrics, CLI output and the README):
- **logical expert**: expert `e` of MoE layer `l`, as the model defines it. Placement numbers
  them globally as `moe_index * num_experts + e`, where `moe_index` is the layer's position
  among the model's MoE layers.
- **replica** (physical expert): one loaded copy of a logical expert. A hot expert has several.
- **slot**: a place in a worker that holds one replica's weights.
- **worker** / **shard**: one expert-shard Ray actor, usually one GPU.
- **placement**: which replica of which logical expert sits in which worker slot. It has a
  version; the router reads one placement per batch, so a new version takes effect atomically.
- **balancedness**: mean worker load / max worker load, 1.0 is perfect.

`Placement` is a frozen value: it checks itself on construction, and changes make a new value
with a higher version. It imports neither Ray nor gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

EMPTY = -1  # slot holds no replica


@dataclass(frozen=True)
class Placement:
    """Versioned map of worker slots to logical experts.

    slots: `[num_workers][slots_per_worker]` nested tuple; each entry is a global logical expert
        id in `[0, num_logical_experts)` or `EMPTY`. Workers may differ in slot count.
    """

    version: int
    num_logical_experts: int
    slots: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if self.version < 0:
            raise ValueError(f"placement version must be >= 0, got {self.version}")
        if self.num_logical_experts < 1:
            raise ValueError(f"num_logical_experts must be >= 1, got {self.num_logical_experts}")
        if not self.slots:
            raise ValueError("a placement needs at least one worker, got none")
        for w, row in enumerate(self.slots):
            for s, expert in enumerate(row):
                if expert != EMPTY and not 0 <= expert < self.num_logical_experts:
                    raise ValueError(
                        f"worker {w} slot {s} holds logical expert {expert}, outside "
                        f"0..{self.num_logical_experts - 1}"
                    )
            held = [e for e in row if e != EMPTY]
            if len(held) != len(set(held)):
                twice = sorted({e for e in held if held.count(e) > 1})
                raise ValueError(
                    f"worker {w} holds logical experts {twice} more than once; a second replica "
                    f"on the same worker adds no capacity"
                )
        missing = np.flatnonzero(self.replica_counts == 0)
        if missing.size:
            raise ValueError(
                f"logical experts {missing[:10].tolist()}{'...' if missing.size > 10 else ''} "
                f"have no replica in placement v{self.version}"
            )

    # ---- named constructors -------------------------------------------------------------

    @classmethod
    def round_robin(
        cls, num_logical_experts: int, num_workers: int, slots_per_worker: int | None = None, replicas: int = 1
    ) -> Placement:
        """`replicas` replicas of every logical expert, dealt out to workers in turn (version 0):
        replica c of expert e on worker (e + c) mod num_workers, so an expert's replicas sit on
        distinct workers.

        With `slots_per_worker` larger than needed, the extra slots stay `EMPTY` (room for hot
        expert replicas later); smaller than needed is an error.
        """
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not 1 <= replicas <= num_workers:
            raise ValueError(f"replicas must be 1..num_workers ({num_workers}), got {replicas}")
        rows: list[list[int]] = [[] for _ in range(num_workers)]
        for copy in range(replicas):
            for expert in range(num_logical_experts):
                rows[(expert + copy) % num_workers].append(expert)
        needed = max(len(r) for r in rows)
        if slots_per_worker is None:
            slots_per_worker = needed
        if slots_per_worker < needed:
            raise ValueError(
                f"{num_logical_experts} logical experts{'' if replicas == 1 else f' x {replicas} replicas'} do not fit "
                f"in {num_workers} workers x {slots_per_worker} slots; need at least {needed} slots per worker"
            )
        padded = (tuple(r + [EMPTY] * (slots_per_worker - len(r))) for r in rows)
        return cls(0, num_logical_experts, tuple(padded))

    @classmethod
    def replicated(cls, num_logical_experts: int, num_workers: int, copies: int = 2, version: int = 0) -> Placement:
        """`copies` replicas of every logical expert on distinct workers, expert e on workers
        e, e + 1, ... (mod `num_workers`): losing any `copies - 1` workers leaves every expert
        served."""
        if not 1 <= copies <= num_workers:
            raise ValueError(f"copies must be 1..num_workers ({num_workers}), got {copies}")
        rows: list[list[int]] = [[] for _ in range(num_workers)]
        for expert in range(num_logical_experts):
            for c in range(copies):
                rows[(expert + c) % num_workers].append(expert)
        return cls.from_mapping(version, num_logical_experts, rows)

    @classmethod
    def from_mapping(
        cls, version: int, num_logical_experts: int, mapping: dict[int, list[int]] | list[list[int]]
    ) -> Placement:
        """From `{worker: [expert per slot]}` or a list of rows (e.g. read back from a file)."""
        if isinstance(mapping, dict):
            if sorted(mapping) != list(range(len(mapping))):
                raise ValueError(f"workers must be numbered 0..{len(mapping) - 1}, got {sorted(mapping)}")
            rows = [mapping[w] for w in range(len(mapping))]
        else:
            rows = mapping
        return cls(version, num_logical_experts, tuple(tuple(int(e) for e in r) for r in rows))

    def check_successor(self, new: Placement) -> None:
        """ValueError unless `new` may follow this placement in service: a higher version of
        the same logical experts."""
        if new.version <= self.version:
            raise ValueError(f"placement v{new.version} is not newer than the one in service (v{self.version})")
        if new.num_logical_experts != self.num_logical_experts:
            raise ValueError(
                f"placement has {new.num_logical_experts} logical experts, the model has {self.num_logical_experts}"
            )

    def resized(self, num_workers: int, new_slots: int, version: int) -> Placement:
        """The same replicas on `num_workers` workers: new workers come with `new_slots` empty
        slots; workers past `num_workers` must hold nothing (migrate their replicas first)."""
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        held = [w for w in range(num_workers, self.num_workers) if self.experts_of(w)]
        if held:
            raise ValueError(
                f"workers {held} still hold replicas in placement v{self.version}; move them "
                f"away before removing the workers"
            )
        rows = list(self.slots[:num_workers])
        rows += [(EMPTY,) * new_slots] * (num_workers - len(rows))
        return Placement(version, self.num_logical_experts, tuple(rows))

    # ---- derived views (computed once per value) ---------------------------------------

    @property
    def num_workers(self) -> int:
        return len(self.slots)

    @cached_property
    def replica_counts(self) -> np.ndarray:
        """`[num_logical_experts]` int: replicas of each logical expert."""
        flat = np.array([e for row in self.slots for e in row if e != EMPTY], dtype=np.int64)
        return np.bincount(flat, minlength=self.num_logical_experts)

    @cached_property
    def replicas(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """`replicas[expert]` = the `(worker, slot)` pairs that hold that logical expert."""
        found: list[list[tuple[int, int]]] = [[] for _ in range(self.num_logical_experts)]
        for w, row in enumerate(self.slots):
            for s, expert in enumerate(row):
                if expert != EMPTY:
                    found[expert].append((w, s))
        return tuple(tuple(r) for r in found)

    @cached_property
    def primary(self) -> tuple[np.ndarray, np.ndarray]:
        """`(worker, slot)`, each `[num_logical_experts]`: the first replica of every expert.

        The fast path for experts with one replica: dispatch looks these up with one gather.
        """
        workers = np.array([r[0][0] for r in self.replicas], dtype=np.int64)
        slots = np.array([r[0][1] for r in self.replicas], dtype=np.int64)
        return workers, slots

    @cached_property
    def replica_set(self) -> frozenset[tuple[int, int]]:
        """Every replica as `(worker, logical expert)`; slot positions left out."""
        return frozenset((w, e) for w, row in enumerate(self.slots) for e in row if e != EMPTY)

    def experts_of(self, worker: int) -> list[tuple[int, int]]:
        """`[(slot, logical expert)]` hosted by `worker`, empty slots left out."""
        return [(s, e) for s, e in enumerate(self.slots[worker]) if e != EMPTY]

    def worker_load(self, expert_load: np.ndarray) -> np.ndarray:
        """`[num_workers]` load when each expert's load `[num_logical_experts]` is split evenly
        over its replicas."""
        per_replica = np.asarray(expert_load, dtype=np.float64) / self.replica_counts
        return np.array(
            [sum(per_replica[e] for e in row if e != EMPTY) for row in self.slots]
        )

    def balancedness(self, expert_load: np.ndarray) -> float:
        """Mean worker load / max worker load under `expert_load`; 1.0 when nothing is loaded."""
        load = self.worker_load(expert_load)
        peak = load.max()
        return 1.0 if peak <= 0 else float(load.mean() / peak)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "num_logical_experts": self.num_logical_experts,
            "slots": [list(r) for r in self.slots],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Placement:
        for key in ("version", "num_logical_experts", "slots"):
            if key not in data:
                raise ValueError(f"placement is missing key {key!r}; it has {sorted(data)}")
        return cls.from_mapping(int(data["version"]), int(data["num_logical_experts"]), data["slots"])


def slots_per_worker(num_logical_experts: int, num_workers: int, configured: int | None,
                     min_replicas: int = 1) -> int:
    """The configured slots, or room for `min_replicas` of every expert on `num_workers`
    workers (the fewest the service may run on) plus 25% for hot replicas.

    ValueError naming the keys when the configured slots cannot hold every expert there.
    """
    needed = -(-num_logical_experts * min_replicas // num_workers)
    if configured is None:
        return needed + max(1, needed // 4)
    if configured < needed:
        raise ValueError(
            f"workers.slots_per_worker ({configured}) is too small: {num_logical_experts} logical "
            f"experts x rebalance.min_replicas ({min_replicas}) on workers.min_workers ({num_workers}) "
            f"workers need at least {needed} slots per worker"
        )
    return configured


@dataclass(frozen=True, eq=False)
class ExpertShare:
    """One worker's share of a batch: the router sends it, the worker runs it (both name this
    type, so neither imports the other).

    expert_ids: `[S]` int global logical experts hosted by the worker; offsets: `[S + 1]` int,
    expert `expert_ids[i]` gets entries `offsets[i]:offsets[i + 1]` of token_idx and weights;
    token_idx: `[N]` int rows of the batch, grouped by expert; weights: `[N]` float gate weights.
    Checked on construction: the lengths agree and the offsets run from 0 to N without going back.
    """

    expert_ids: np.ndarray
    offsets: np.ndarray
    token_idx: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:
        for name in ("expert_ids", "offsets", "token_idx", "weights"):
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.ndim != 1:
                raise ValueError(f"share {name} must be a 1-d numpy array, got {type(value).__name__} "
                                 f"of shape {getattr(value, 'shape', None)}")
            kind = "f" if name == "weights" else "iu"
            if value.dtype.kind not in kind:
                raise ValueError(f"share {name} must be {'float' if kind == 'f' else 'integer'}, got {value.dtype}")
        experts, tokens = len(self.expert_ids), len(self.token_idx)
        if len(self.offsets) != experts + 1:
            raise ValueError(f"share offsets has {len(self.offsets)} entries for {experts} experts; needs {experts + 1}")
        if len(self.weights) != tokens:
            raise ValueError(f"share weights has {len(self.weights)} entries for {tokens} token rows")
        if self.offsets[0] != 0 or self.offsets[-1] != tokens or (np.diff(self.offsets) < 0).any():
            raise ValueError(f"share offsets must rise from 0 to the {tokens} token rows, got "
                             f"{self.offsets[:8].tolist()}{' ...' if experts > 7 else ''}")

    @property
    def num_tokens(self) -> int:
        """Expert-token assignments in the share (a token sent to two experts counts twice)."""
        return int(self.token_idx.shape[0])


@dataclass(frozen=True)
class WorkerRef:
    """How routers reach one worker now: its actor handle and the incarnation it answers as
    (new each time Ray restarts it). What a router hears about a worker is about one
    incarnation: a late failure of an old one says nothing about the worker in service."""

    handle: Any
    incarnation: str

    def __repr__(self) -> str:
        return f"WorkerRef(incarnation={self.incarnation[:8]})"
