"""PlacementHub: the control plane's side of the placement in service, and its routers.

The control plane decides placements; routers serve with them. The hub keeps the authoritative
placement and fans each change out to every attached router (`RouterLink`), in process or in
another Ray actor: `publish` makes a version current everywhere, `drained` waits until no router
still runs a batch on an older one (make-before-break), `set_workers` tells the routers which
worker handles a placement's indices name (None for a worker that is down: lost, restarting
or reloading, see `cluster.control.supervisor`), and `take_reports` collects the routed load.

A router that stops answering is detached (its batches died with it), so a lost router never
stalls a migration. The hub imports neither Ray nor gRPC.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Protocol

from cluster.placement import Placement, WorkerRef
from cluster.planning.load_stats import RouterReport

log = logging.getLogger(__name__)


class RouterLink(Protocol):
    """How the control plane reaches one router (see `cluster.app.launcher` and `cluster.app.service`)."""

    name: str

    def publish(self, placement: Placement) -> Awaitable[None]:
        """Make `placement` current at the router; its next batch uses it."""

    def drained(self, version: int, timeout_s: float) -> Awaitable[None]:
        """Resolve once the router runs no batch on a placement older than `version`."""

    def set_workers(self, workers: Sequence[WorkerRef | None]) -> Awaitable[None]:
        """The worker of each placement index, in order (handle and incarnation); None: do not
        send there."""

    def take_report(self) -> Awaitable[RouterReport]:
        """The routed load since the previous report."""


class PlacementHub:
    def __init__(self, placement: Placement, link_timeout_s: float = 30.0):
        self._current = placement
        self._links: dict[str, RouterLink] = {}
        self._workers: list[WorkerRef] = []
        self._down: set[int] = set()
        self._timeout_s = link_timeout_s

    def __repr__(self) -> str:
        return f"PlacementHub(version={self._current.version}, routers={sorted(self._links)})"

    @property
    def current(self) -> Placement:
        return self._current

    @property
    def routers(self) -> list[str]:
        return sorted(self._links)

    @property
    def workers(self) -> list[WorkerRef | None]:
        """Each worker as routers get it: its handle and incarnation, None for one that is down."""
        return [None if i in self._down else ref for i, ref in enumerate(self._workers)]

    @property
    def down(self) -> frozenset[int]:
        return frozenset(self._down)

    def incarnation(self, worker: int) -> str | None:
        """The incarnation of `worker` in service (None: no such worker)."""
        return self._workers[worker].incarnation if worker < len(self._workers) else None

    async def mark_down(self, worker: int) -> None:
        """Routers stop sending to `worker` (lost or restarting) until `mark_up`."""
        self._down.add(worker)
        await self._each("set_workers", lambda link: link.set_workers(self.workers))

    async def mark_up(self, worker: int, ref: WorkerRef | None = None) -> None:
        """`worker` holds its replicas again (as incarnation `ref`, after Ray restarted it):
        routers may send to it."""
        if ref is not None:
            self._workers[worker] = ref
        self._down.discard(worker)
        await self._each("set_workers", lambda link: link.set_workers(self.workers))

    async def readmit(self) -> None:
        """Tell every router again which workers serve: a router that counted one down after a
        failure of the incarnation still in service (which answers again) uses it again."""
        await self._each("set_workers", lambda link: link.set_workers(self.workers))

    async def attach(self, link: RouterLink) -> None:
        """Add a router (or replace one of the same name) and bring it up to date. It is added
        first, so a placement published meanwhile reaches it too (routers ignore older ones)."""
        self._links[link.name] = link
        await link.set_workers(self.workers)
        await link.publish(self._current)

    def detach(self, name: str) -> None:
        """Forget a router that leaves service (its batches are done: it has drained)."""
        self._links.pop(name, None)

    async def publish(self, placement: Placement) -> None:
        """Make `placement` current here and at every router. Versions only go up."""
        self._current.check_successor(placement)
        if placement.num_workers > len(self._workers):
            raise ValueError(
                f"placement v{placement.version} names {placement.num_workers} workers; "
                f"{len(self._workers)} are known"
            )
        self._current = placement
        await self._each("publish", lambda link: link.publish(placement))

    async def drained(self, version: int, timeout_s: float = 60.0) -> None:
        """Wait until no router runs a batch on a placement older than `version`."""
        await self._each("drain", lambda link: link.drained(version, timeout_s), timeout_s + self._timeout_s)

    async def set_workers(self, workers: Sequence[WorkerRef]) -> None:
        """All the workers (scaling); the ones marked down stay down."""
        self._workers = list(workers)
        self._down = {w for w in self._down if w < len(self._workers)}
        await self._each("set_workers", lambda link: link.set_workers(self.workers))

    async def take_reports(self) -> list[RouterReport]:
        results = await self._each("report", lambda link: link.take_report())
        return [r for r in results if r is not None]

    async def _each(self, what: str, call, timeout_s: float | None = None) -> list:
        """`call(link)` on every router at once; a router that fails is detached."""
        links = list(self._links.values())
        results = await asyncio.gather(
            *(asyncio.wait_for(call(link), timeout_s or self._timeout_s) for link in links),
            return_exceptions=True,
        )
        out = []
        for link, result in zip(links, results):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError) or (what == "drain" and isinstance(result, TimeoutError)):
                    raise result  # a batch that never ends stops the migration, as in-process
                log.warning("router %s failed to %s (%r); detached", link.name, what, result)
                if self._links.get(link.name) is link:
                    del self._links[link.name]
                out.append(None)
            else:
                out.append(result)
        return out
