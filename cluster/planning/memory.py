"""Whether a model fits its workers' memory: a pure calculation over what each replica takes
(`moe-serve plan`; the sizes come from a checkpoint's headers, no weights read).

Steps (`plan_memory`):
1. A slot holds any replica, so it is as large as the largest one (`slot_bytes`).
2. Each worker keeps `reserve_fraction` of its memory free (activations, the runtime, the
   allocator's slack); the rest holds `slots_per_worker = usable // slot_bytes` slots.
3. The placement needs `min_replicas` replicas of every logical expert, on distinct workers,
   spread evenly: `ceil(logical * min_replicas / workers)` slots on the fullest worker.
4. It fits when that many slots fit on a worker; the slots left over
   (`total_slots - logical * min_replicas`) are room for hot-expert replicas.
The dense part (attention, norms, embeddings, LM head) is not on the workers: the router holds
it when it generates text; its share of the model is reported beside.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str) -> int:
    """"80GiB", "80GB", "81920MiB", "1.5TiB" or a plain number of bytes -> bytes; ValueError
    saying what is wrong and which units are known."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"memory size {text!r} is not a number with a unit, e.g. 80GiB, 80GB or 81920MiB")
    number, unit = float(match[1]), match[2].upper()
    if unit not in UNITS:
        known = ", ".join(u for u in ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"))
        raise ValueError(f"memory size {text!r} has an unknown unit {match[2]!r}; known: {known} "
                         f"(GB = 10^9 bytes, GiB = 2^30)")
    size = int(number * UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory size {text!r} must be more than 0 bytes")
    return size


@dataclass(frozen=True)
class MemoryPlan:
    """The answer of `plan_memory`; bytes throughout, `reason` in words."""

    fits: bool
    workers: int
    memory_per_worker: int
    usable_per_worker: int
    slot_bytes: int
    slots_per_worker: int
    slots_needed_per_worker: int
    total_slots: int
    logical_experts: int
    min_replicas: int
    spare_slots: int
    expert_bytes: int  # one replica of every logical expert
    dense_bytes: int
    reason: str

    @property
    def dense_share(self) -> float:
        """The dense part's share of the whole model (dense + one replica of every expert)."""
        total = self.dense_bytes + self.expert_bytes
        return self.dense_bytes / total if total else 0.0


def plan_memory(replica_bytes: Sequence[int], dense_bytes: int, workers: int, memory_per_worker: int,
                reserve_fraction: float = 0.1, min_replicas: int = 1) -> MemoryPlan:
    """replica_bytes: `[logical experts]` bytes of one replica of each; dense_bytes: the dense
    part as the router holds it; workers, memory_per_worker (bytes): the expert pool."""
    if not replica_bytes or min(replica_bytes) <= 0:
        raise ValueError(f"replica_bytes must list a positive size for each logical expert, got {len(replica_bytes)} "
                         f"sizes, smallest {min(replica_bytes, default=None)}")
    for name, value in (("workers", workers), ("memory_per_worker", memory_per_worker),
                        ("min_replicas", min_replicas)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction!r}")
    logical = len(replica_bytes)
    slot = max(replica_bytes)
    usable = int(memory_per_worker * (1 - reserve_fraction))
    slots = usable // slot
    needed = -(-logical * min_replicas // workers)
    total = slots * workers
    spare = total - logical * min_replicas
    if min_replicas > workers:
        fits, reason = False, (f"min_replicas {min_replicas} needs at least as many workers (replicas of one expert "
                               f"sit on distinct workers), got {workers}")
    elif slots < needed:
        fits = False
        reason = (f"each worker needs {needed} slots of {_gib(slot)} ({_gib(needed * slot)}) but has "
                  f"{_gib(usable)} usable ({slots} slots): {-spare} slots short; "
                  f"at least {_workers_needed(logical * min_replicas, slots)} workers of this size")
    else:
        fits, reason = True, (f"{logical * min_replicas} replicas in {total} slots over {workers} workers: "
                              f"{spare} spare slots for hot-expert replicas")
    return MemoryPlan(fits, workers, memory_per_worker, usable, slot, slots, needed, total, logical, min_replicas,
                      spare, sum(replica_bytes), dense_bytes, reason)


def _workers_needed(replicas: int, slots_per_worker: int) -> str:
    return "no number" if slots_per_worker == 0 else str(-(-replicas // slots_per_worker))


def _gib(n: int) -> str:
    """Bytes for people, in the largest binary unit that keeps a number >= 1."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
