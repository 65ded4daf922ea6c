"""Admission policies: which waiting requests may start running this step (torch-free).

The scheduler walks the waiting queue in order and asks its policy about each request; a policy
that says no makes the scheduler skip that request for this step (it keeps its place). Memory and
the token budget are the scheduler's own limits, checked after the policy agrees.

This is the seam for the adapter-aware limit (at most `max_active_adapters` distinct extra keys per
step, rotating fairly): such a policy counts the extra keys of `running` in `begin_step`, answers
`may_admit` by whether the request's key is already active or a slot is left, and records keys in
`on_admit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from service.engine.request import Request


class AdmissionPolicy(Protocol):
    def begin_step(self, running: Sequence[Request]) -> None:
        """Called once per step before the waiting queue is walked."""
        ...

    def may_admit(self, request: Request) -> bool:
        """False skips the request for this step only."""
        ...

    def on_admit(self, request: Request) -> None:
        """The request was admitted (it is now running)."""
        ...


class AdmitInOrder:
    """Admit strictly in queue order (priority, then arrival), limited only by memory and budget."""

    def begin_step(self, running: Sequence[Request]) -> None:
        pass

    def may_admit(self, request: Request) -> bool:
        return True

    def on_admit(self, request: Request) -> None:
        pass
