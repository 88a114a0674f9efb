"""Why a request could not be served, as the router knows it. Each servicer turns these into
gRPC statuses in one place (`servicer.status_code`, `AdminServicer._call`); nothing else in the
router knows status codes. The messages are meant for users.
"""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The request itself is at fault (a tensor, a parameter, a load or a placement that does not
    fit the model or the protocol); `str()` says what to change."""


class UnknownModel(LookupError):
    """The request names a model (or a model version) this server does not serve."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # LookupError would quote a single argument
        return self.message


class Unsupported(Exception):
    """The request asks for something this server does not offer: an extension that is off (the
    message says which setting turns it on) or that this router cannot offer at all."""


class ServingError(Exception):
    """A request the service could not serve now; `str()` is the message for the client."""


class ModelNotReady(ServingError):
    """The model is not serving yet (its workers are still loading)."""


class WorkerLost(ServingError):
    """A worker died, is restarting, has not loaded its replicas yet, or hangs (retryable).
    incarnation: the one the failed call went to (None: not known); hung: it did not answer
    within its deadline (it may still be alive)."""

    def __init__(self, worker: int, detail: str, incarnation: str | None = None, hung: bool = False):
        super().__init__(f"expert worker {worker} {detail}")
        self.worker = worker
        self.incarnation = incarnation
        self.hung = hung


class ExpertUnavailable(ServingError):
    """Tokens routed to logical experts that have no live replica right now."""

    def __init__(self, experts: list[tuple[int, int]], num_routed: int | None = None):
        """experts: (layer, expert) pairs; from `num_routed` on they are shared-expert pieces."""
        def name(layer: int, e: int) -> str:
            if num_routed is not None and e >= num_routed:
                return f"shared expert piece {e - num_routed} of layer {layer}"
            return f"expert {e} of layer {layer}"
        names = ", ".join(name(layer, e) for layer, e in experts[:8])
        more = f" and {len(experts) - 8} more" if len(experts) > 8 else ""
        super().__init__(
            f"{names}{more} has no live replica: its worker was lost and is being replaced; retry shortly"
        )
        self.experts = experts


class Overloaded(ServingError):
    """Admission control refused the request; the client should back off and retry."""
