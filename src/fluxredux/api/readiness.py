"""The checks behind /ready, run concurrently within one budget.

A readiness probe must answer while what it probes does not: a load balancer or an
orchestrator waits a few seconds for it, and an object store that accepts connections and
then says nothing would otherwise hold /ready as long as its client's timeouts (18 s
before they were bounded). So every check runs on a thread of its own, all at once, and
/ready answers when they have all answered or the budget is spent, naming each check that
did not ("storage: no answer within 2 s") beside what the others said.

A blocking call cannot be interrupted: a check that overran goes on on its thread until
its own timeouts end it. The next /ready waits on that same call rather than start another,
so a hung dependency holds one thread per check, not one per probe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

# What /ready may take in all: well within the few seconds probes are given by default
# (Kubernetes: 1 s timeout, often raised; load balancers: 2-5 s).
READY_BUDGET_SECONDS = 2.0

# A check: blocking, returns the problems it found (empty: fine).
Check = Callable[[], list[str]]


class Readiness:
    def __init__(self, budget: float = READY_BUDGET_SECONDS) -> None:
        self.budget = budget
        # Its own threads: creates waiting on a hung store must not leave the checks queued
        # behind them in the default executor (nor the other way round).
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ready")
        self._running: dict[str, asyncio.Future[list[str]]] = {}

    async def problems(self, checks: Mapping[str, Check]) -> list[str]:
        """Every check's problems, in the order given; a check that has not answered within
        the budget is one problem, "<name>: no answer within <budget> s"."""
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[list[str]]] = {}
        for name, check in checks.items():
            running = self._running.get(name)
            # A call of another event loop (an app served again in tests) cannot be awaited here.
            if running is None or running.done() or running.get_loop() is not loop:
                running = loop.run_in_executor(self._executor, check)
                # Retrieved here so that one finishing after its /ready gave up logs nothing.
                running.add_done_callback(_consume)
                self._running[name] = running
            futures[name] = running
        await asyncio.wait(list(futures.values()), timeout=self.budget)
        found: list[str] = []
        for name, future in futures.items():
            if not future.done():
                found.append(f"{name}: no answer within {self.budget:g} s")
            elif future.cancelled():  # the server is closing: close() cancelled it unstarted
                found.append(f"{name}: not checked (the server is stopping)")
            elif (error := future.exception()) is not None:
                log.error("the readiness check %r failed", name, exc_info=error)
                found.append(f"{name}: the check failed ({type(error).__name__})")
            else:
                found += future.result()
        return found

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _consume(future: asyncio.Future[list[str]]) -> None:
    if not future.cancelled():
        future.exception()
