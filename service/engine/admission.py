"""Admission policies: which waiting requests may start running this step (torch-free).

The scheduler walks the waiting queue in order and asks its policy about each request; a policy
that says no makes the scheduler skip that request for this step (it keeps its place). Memory and
the token budget are the scheduler's own limits, checked after the policy agrees.

A yes may reserve something the request needs to run (an adapter slot: see `adapters.py`), so the
scheduler balances every yes with exactly one `on_release`: when the admitted request stops running
(finished, aborted, failed or preempted), or at once when memory refuses it after the policy agreed.
A policy that says no and sets `request.error` fails the request: the scheduler reports it in
`SchedulerOutput.failed` and the engine finishes it with ERROR.
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
        """False skips the request for this step only (or fails it, if `request.error` is set)."""
        ...

    def on_admit(self, request: Request) -> None:
        """The request was admitted (it is now running)."""
        ...

    def on_release(self, request: Request) -> None:
        """Undo a yes: exactly once per `may_admit` that returned True (see the module doc)."""
        ...


class AdmitInOrder:
    """Admit strictly in queue order (priority, then arrival), limited only by memory and budget."""

    def begin_step(self, running: Sequence[Request]) -> None:
        pass

    def may_admit(self, request: Request) -> bool:
        return True

    def on_admit(self, request: Request) -> None:
        pass

    def on_release(self, request: Request) -> None:
        pass
