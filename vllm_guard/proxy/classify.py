"""Which priority class a request runs in: its tenant's, or a less urgent one it asks for."""

from __future__ import annotations

from collections.abc import Mapping

from vllm_guard.core.classes import PriorityClass, Tenant
from vllm_guard.proxy.responses import ErrorResponse, bad_request

CLASS_HEADER = b"x-vllm-guard-class"
_PRIORITY_BOUND = 2**31  # vLLM hands priorities to its engine core as 64-bit integers


def resolve_class(
    tenant: Tenant, requested: bytes | None, classes: Mapping[str, PriorityClass]
) -> PriorityClass | ErrorResponse:
    """`requested` is the raw `x-vllm-guard-class` header value, if any.

    A tenant may lower its own urgency (an interactive tenant running a batch job), never
    raise it: asking for a more urgent class is refused with 403, not silently clamped, so
    a misconfigured client finds out.
    """
    own = tenant.priority_class
    if requested is None:
        return own
    name = requested.decode("latin-1").strip().lower()
    wanted = classes.get(name)
    if wanted is None:
        return bad_request(
            f"Unknown priority class {name!r} in x-vllm-guard-class; known: {', '.join(classes)}."
        )
    if wanted.rank < own.rank:
        return ErrorResponse(
            403,
            f"Tenant {tenant.name!r} runs in class {own.name!r} and may not raise its requests "
            f"to {wanted.name!r}; only a less urgent class may be requested.",
            "permission_denied",
            "class_not_allowed",
        )
    return wanted


def clamp_priority(requested: object, priority_class: PriorityClass) -> int | ErrorResponse:
    """The vLLM `priority` to send: the class's, or the client's own if it is less urgent."""
    if requested is None:
        return priority_class.vllm_priority
    if type(requested) is not int or not -_PRIORITY_BOUND <= requested < _PRIORITY_BOUND:
        return bad_request(
            f"'priority' must be an integer from {-_PRIORITY_BOUND} to {_PRIORITY_BOUND - 1}.",
            param="priority",
        )
    return max(requested, priority_class.vllm_priority)
