"""Admission policies: which waiting requests may start running this step (torch-free).

The scheduler walks the waiting queue in order and asks its policy about each request; the answer is
`True` (admit, if memory and the token budget allow), `False` (skip for this step: it keeps its place) or
a `RequestError` (the request can never run, e.g. its adapter failed to load: the scheduler reports it in
`SchedulerOutput.failed` and the engine finishes it with ERROR).

A yes may reserve something the request needs to run (an adapter slot: see `adapters.py`), so the
scheduler balances every yes with exactly one `on_release`: when the admitted request stops running
(finished, aborted, failed or preempted), or at once when memory refuses it after the policy agreed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from service.engine.outputs import RequestError
from service.engine.request import Request

Verdict = bool | RequestError


class AdmissionPolicy(Protocol):
    def begin_step(self, running: Sequence[Request]) -> None:
        """Called once per step before the waiting queue is walked."""
        ...

    def may_admit(self, request: Request) -> Verdict:
        """True admits, False skips the request for this step only, a RequestError fails it."""
        ...

    def on_release(self, request: Request) -> None:
        """Undo a yes: exactly once per `may_admit` that returned True (see the module doc)."""
        ...


class AdmitInOrder:
    """Admit strictly in queue order (priority, then arrival), limited only by memory and budget."""

    def begin_step(self, running: Sequence[Request]) -> None:
        pass

    def may_admit(self, request: Request) -> Verdict:
        return True

    def on_release(self, request: Request) -> None:
        pass
