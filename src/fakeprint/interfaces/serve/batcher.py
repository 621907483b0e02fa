"""Dynamic batching: the images of requests that arrive together go through the model in one call.

Each request's images, already decoded (N x 100 x 100 x 3 uint8), become one job in a first-in first-out queue.
A task takes the oldest job, waits at most ``max_wait_ms`` for company, takes the jobs behind it in arrival order
while their images fit in ``max_batch`` (a job is never split: one larger than ``max_batch`` runs alone), and
calls the model once, in a worker thread, for all of them; each request gets its own rows back. While the model
runs, new jobs queue up, so under load every call is as full as the queue allows, and when the service is idle a
lone request waits ``max_wait_ms`` at most. This is what Triton's dynamic batcher and Ray Serve's ``@serve.batch``
do. ``model_calls`` such tasks run per event loop (Triton's instance count): one batch forms at a time, in arrival
order, and starts while the others' calls run, so the cores are not idle while a call's answers travel back and the
next requests arrive (on 2 cores, one model thread a call: about 10% more requests/s at concurrency 8, but twice the
p95 under hostile clients, whose connections then get less of the cores: so the default is 1).

- **Deadlines.** A job not started within ``deadline_s`` of its arrival is answered ``DeadlineExceeded`` (the app
  says 503 ``deadline_exceeded``, Retry-After) instead of running late for a client that has likely given up.
- **Cancellation.** A request whose handler is cancelled (its client went away) cancels its future; its job is
  dropped when its turn comes and never reaches the model.
- **Isolation.** Decoding is per request, before the queue: a bad upload fails its own request only. If a model
  call raises anyway, each of its jobs runs again alone, so that only the job that fails alone gets the error.
- **Fairness.** Jobs run in arrival order and a job holds at most its own images' share of a call; heavy uploads
  (many pixels to decode) are bounded before the queue, by the app.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import numpy as np

from fakeprint.engine.predict import Predictions
from fakeprint.interfaces.serve.metrics import ServiceMetrics


@dataclass(frozen=True)
class BatchPolicy:
    """``max_batch``: images per model call; ``max_wait_ms``: how long the oldest job waits for company;
    ``deadline_s``: how long a job may wait for its model call at all; ``model_calls``: calls in flight at once."""

    max_batch: int = 64
    max_wait_ms: float = 5.0
    deadline_s: float = 30.0
    model_calls: int = 1

    def as_dict(self) -> dict[str, float]:
        return {"max_batch": self.max_batch, "max_wait_ms": self.max_wait_ms, "deadline_s": self.deadline_s,
                "model_calls": self.model_calls}


class DeadlineExceeded(Exception):
    """A job waited longer than its deadline for a model call."""


@dataclass
class BatchResult:
    """One job's rows of a model call: its predictions, the call's time per image and how full it was."""

    predictions: Predictions
    model_ms_per_image: float
    batch_images: int
    batch_requests: int
    queued_ms: float


@dataclass
class _Job:
    images: np.ndarray
    future: asyncio.Future
    arrived: float
    deadline: float


class Batcher:
    """Gathers jobs into model calls (see the module's docstring). ``predict``: N images -> ``Predictions``,
    called from up to ``policy.model_calls`` worker threads at once (the torch and onnx classifiers allow it)."""

    def __init__(self, predict: Callable[[np.ndarray], Predictions], policy: BatchPolicy | None = None,
                 metrics: ServiceMetrics | None = None):
        self.predict = predict
        self.policy = policy or BatchPolicy()
        self.metrics = metrics or ServiceMetrics()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._collecting: asyncio.Lock | None = None
        self._queue: collections.deque[_Job] = collections.deque()
        self._wakeup: asyncio.Event | None = None

    async def submit(self, images: np.ndarray) -> BatchResult:
        """Classify ``images`` (one request's) in the next model call that has room for them."""
        self._ensure_running()
        assert self._wakeup is not None
        now = time.monotonic()
        job = _Job(images, asyncio.get_running_loop().create_future(), now, now + self.policy.deadline_s)
        self._queue.append(job)
        self.metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        return await job.future  # cancelled with the request: the job is then dropped unrun

    async def close(self) -> None:
        """Stop the batching task (the app's shutdown); jobs still queued are cancelled."""
        tasks, self._tasks = [t for t in self._tasks if not t.done()], []
        for task in tasks:
            task.cancel()
        if tasks:
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)
        while self._queue:
            self._queue.popleft().future.cancel()

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (the app restarted): the old loop's tasks and jobs are gone
            self._loop, self._wakeup, self._collecting, self._tasks = loop, asyncio.Event(), asyncio.Lock(), []
            self._queue = collections.deque(j for j in self._queue if j.future.get_loop() is loop)
        self._tasks = [t for t in self._tasks if not t.done()]  # a running call is never cancelled to make room
        while len(self._tasks) < max(1, self.policy.model_calls):
            self._tasks.append(loop.create_task(self._run(), name=f"fakeprint-batcher-{len(self._tasks)}"))

    async def _run(self) -> None:
        assert self._wakeup is not None and self._collecting is not None
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            async with self._collecting:  # one batch forms at a time; the others' model calls run meanwhile
                jobs = await self._collect()
            if jobs:
                await self._call(jobs)

    def _live_head(self) -> _Job | None:
        """The oldest job still wanted, dropping the cancelled ones and refusing those past their deadline."""
        now = time.monotonic()
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # cancelled: its client is gone
                self._queue.popleft()
            elif now > job.deadline:
                self._queue.popleft()
                self.metrics.refused.labels("deadline_exceeded").inc()
                job.future.set_exception(DeadlineExceeded(
                    f"waited {now - job.arrived:.1f} s for the model, longer than the deadline of "
                    f"{self.policy.deadline_s:g} s"))
            else:
                return job
        return None

    async def _collect(self) -> list[_Job]:
        assert self._wakeup is not None
        first = self._live_head()
        if first is None:
            self.metrics.queue_depth.set(0)
            return []
        jobs, n = [self._queue.popleft()], len(first.images)
        until = time.monotonic() + self.policy.max_wait_ms / 1e3
        while n < self.policy.max_batch:
            nxt = self._live_head()
            if nxt is None:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.clear()
                with anyio.move_on_after(left):
                    await self._wakeup.wait()
                continue
            if n + len(nxt.images) > self.policy.max_batch:
                break
            jobs.append(self._queue.popleft())
            n += len(nxt.images)
        self.metrics.queue_depth.set(len(self._queue))
        return jobs

    async def _call(self, jobs: list[_Job]) -> None:
        start = time.monotonic()
        t = time.perf_counter()
        try:
            batch = jobs[0].images if len(jobs) == 1 else np.concatenate([j.images for j in jobs])
            pred = await anyio.to_thread.run_sync(self.predict, batch)
        except Exception as e:  # noqa: BLE001 - handed to the jobs, never lost
            self.metrics.batch_failures.inc()
            if len(jobs) == 1:
                if not jobs[0].future.done():
                    jobs[0].future.set_exception(e)
                return
            for job in jobs:  # each alone: only the job that fails by itself gets an error
                await self._call([job])
            return
        seconds = time.perf_counter() - t
        m = self.metrics
        m.model_seconds.observe(seconds)
        m.batch_images.observe(len(batch))
        m.batch_requests.observe(len(jobs))
        per_image = seconds * 1e3 / max(len(batch), 1)
        offset = 0
        for job in jobs:
            n = len(job.images)
            m.queue_seconds.observe(start - job.arrived)
            if not job.future.done():
                job.future.set_result(BatchResult(pred.subset(slice(offset, offset + n)), per_image, len(batch), len(jobs),
                                                  (start - job.arrived) * 1e3))
            offset += n
