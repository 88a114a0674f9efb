"""Migration planning: from the placement in service to a new one, make-before-break, in
bounded steps. Pure: the rebalancer applies the steps.

Each step loads at most `max_loads_per_step` new replicas, then publishes an intermediate
placement that uses them, then (once no batch uses the older placement) releases replicas the
new placement no longer has, as long as every logical expert keeps a live replica. The last
step's placement has the target's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.placement import EMPTY, Placement

Replica = tuple[int, int]  # (worker, logical expert)


@dataclass(frozen=True)
class MigrationStep:
    """loads: replicas to load before the switch; placement: what to publish after them;
    releases: replicas to drop once the older placement is drained."""

    loads: tuple[Replica, ...]
    placement: Placement
    releases: tuple[Replica, ...]


@dataclass(frozen=True)
class MigrationPlan:
    steps: tuple[MigrationStep, ...]

    @property
    def loads(self) -> int:
        return sum(len(s.loads) for s in self.steps)

    @property
    def releases(self) -> int:
        return sum(len(s.releases) for s in self.steps)


def plan_migration(old: Placement, new: Placement, max_loads_per_step: int = 8) -> MigrationPlan:
    """Steps from `old` to `new`; versions run `old.version + 1 ...`, the last is `new`'s rows."""
    if max_loads_per_step < 1:
        raise ValueError(f"max_loads_per_step must be >= 1, got {max_loads_per_step}")
    if (old.num_logical_experts, old.num_workers) != (new.num_logical_experts, new.num_workers):
        raise ValueError(
            f"placements differ in shape: {old.num_logical_experts} experts x {old.num_workers} "
            f"workers vs {new.num_logical_experts} x {new.num_workers}"
        )
    have, want = set(old.replica_set), set(new.replica_set)
    if have == want:
        return MigrationPlan(())
    to_load = sorted(want - have, key=lambda r: (r[1], r[0]))
    to_release = sorted(have - want)
    steps: list[MigrationStep] = []
    version = old.version
    while to_load or to_release:
        chunk, to_load = to_load[:max_loads_per_step], to_load[max_loads_per_step:]
        have |= set(chunk)
        released = _releasable(have, to_release, final=not to_load)
        have -= set(released)
        to_release = [r for r in to_release if r not in released]
        version += 1
        steps.append(MigrationStep(tuple(chunk), _as_placement(have, version, new), tuple(released)))
        if not chunk and not released:
            break
    return MigrationPlan(tuple(steps))


def _releasable(have: set[Replica], pending: list[Replica], final: bool) -> list[Replica]:
    """Pending releases that leave every expert served; all of them once every load is done."""
    if final:
        return list(pending)
    count: dict[int, int] = {}
    for _, e in have:
        count[e] = count.get(e, 0) + 1
    out = []
    for w, e in pending:
        if count[e] > 1:
            out.append((w, e))
            count[e] -= 1
    return out


def _as_placement(have: set[Replica], version: int, target: Placement) -> Placement:
    """Rows in the target's slot order where they match it, extra replicas after them, padded
    with empty slots to the target's row length (so free capacity stays visible)."""
    rows = []
    for w, target_row in enumerate(target.slots):
        mine = {e for ww, e in have if ww == w}
        row = [e if e in mine else EMPTY for e in target_row]
        extra = sorted(mine - set(row))
        for i, slot in enumerate(row):
            if slot == EMPTY and extra:
                row[i] = extra.pop(0)
        rows.append(row + extra)
    return Placement.from_mapping(version, target.num_logical_experts, rows)
