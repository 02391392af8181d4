"""Micro-batching: texts of concurrent requests share one forward pass.

A request's texts wait in a bounded queue. One worker takes the oldest request, then keeps adding requests
for the same model route (task, adapter, generation bound) until it holds `max_batch` texts or `max_wait_s`
has passed, and runs them in one call on a single model thread, so that the event loop stays free to accept
and reject requests meanwhile. The wait applies under concurrent load only, that is when the previous forward
pass served more than one request: a lone client would otherwise wait `max_wait_s` on every request for
company that never comes (requests that arrive while the model is busy join the next batch anyway). A request with more than `max_batch` texts is cut into parts of at most
`max_batch`. Admission is decided at once: when the queue cannot take a request's texts it is refused
(`Overloaded`, which the server answers with 503 and Retry-After) instead of waiting for room.

Nothing here knows about models or HTTP: `run(key, items) -> results` (one result per item, in order) is
the model, and keys only have to be hashable.
"""

import asyncio
import itertools
import logging
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Hashable

log = logging.getLogger("tunelab.serve")


class Overloaded(Exception):
    """The queue has no room for the request's texts, or the server is shutting down."""


class BatchFailed(Exception):
    """The model raised on this request's texts (logged with its traceback where it happened)."""


@dataclass
class _Job:
    key: Hashable
    items: list
    future: asyncio.Future
    seq: int  # arrival order: the oldest job is served first, whatever its key


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    sizes: Counter = field(default_factory=Counter)  # items per forward call -> how many calls
    busy_s: float = 0.0  # time the model thread spent on batches
    rejected: int = 0  # requests refused for lack of room
    failed: int = 0  # requests whose texts made the model raise


class MicroBatcher:
    def __init__(self, run: Callable[[Hashable, list], list], max_batch: int, max_wait_s: float, queue_size: int):
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.stats = BatchStats()
        self.queued = 0  # items waiting for a forward pass
        self._pending: dict[Hashable, deque[_Job]] = {}
        self._seq = itertools.count()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._last_requests = 0  # requests the previous forward pass served: >1 means concurrent load

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        # One model thread: the model, its tokenizer and the task objects are used by this thread only.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tunelab-model")
        self._worker = asyncio.create_task(self._loop(), name="tunelab-batcher")
        self._worker.add_done_callback(self._worker_done)

    @property
    def accepting(self) -> bool:
        return self._worker is not None and not self._worker.done() and not self._closing

    async def submit(self, key: Hashable, items: list) -> list:
        """Results for `items`, in order. Raises Overloaded at once when there is no room, BatchFailed when
        the model raised on these items."""
        if not self.accepting:
            raise Overloaded("the server is shutting down")
        if self.queued + len(items) > self.queue_size:
            self.stats.rejected += 1
            raise Overloaded(f"the queue is full ({self.queued} of {self.queue_size} texts waiting); retry later")
        loop = asyncio.get_running_loop()
        jobs = []
        for k in range(0, len(items), self.max_batch):
            job = _Job(key, items[k:k + self.max_batch], loop.create_future(), next(self._seq))
            self._pending.setdefault(key, deque()).append(job)
            jobs.append(job)
        self.queued += len(items)
        self._arrived.set()
        # If the client goes away, gather cancels the parts; the worker skips cancelled parts.
        parts = await asyncio.gather(*(j.future for j in jobs))
        return [r for part in parts for r in part]

    async def close(self) -> None:
        """Take no more requests, answer every queued one, then stop the worker and the model thread."""
        self._closing = True
        if self._worker is None:
            return
        self._arrived.set()
        await self._worker
        self._executor.shutdown(wait=True)

    # --- the worker ------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                key = await self._oldest_key()
                if key is None:  # closing, and nothing left
                    return
                batch = self._take(key, [])
                deadline = loop.time() + self.max_wait_s
                while self._size(batch) < self.max_batch and not self._closing and self._last_requests > 1:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except asyncio.TimeoutError:
                        break
                    batch = self._take(key, batch)
                if batch:
                    self._last_requests = len(batch)
                    await self._execute(key, batch)
        finally:
            # Only reached with jobs left if the worker itself was cancelled: nobody may wait forever.
            for q in self._pending.values():
                for job in q:
                    if not job.future.done():
                        job.future.set_exception(Overloaded("the server is shutting down"))
            self._pending.clear()
            self.queued = 0

    async def _oldest_key(self):
        while True:
            if self._pending:
                return min(self._pending, key=lambda k: self._pending[k][0].seq)
            if self._closing:
                return None
            self._arrived.clear()
            await self._arrived.wait()

    @staticmethod
    def _size(batch: list[_Job]) -> int:
        return sum(len(j.items) for j in batch)

    def _take(self, key, batch: list[_Job]) -> list[_Job]:
        """Add the key's waiting jobs, oldest first, while they fit into max_batch items."""
        q = self._pending.get(key)
        n = self._size(batch)
        while q and n + len(q[0].items) <= self.max_batch:
            job = q.popleft()
            self.queued -= len(job.items)
            if job.future.done():  # cancelled: its client is gone
                continue
            batch.append(job)
            n += len(job.items)
        if q is not None and not q:
            del self._pending[key]
        return batch

    async def _execute(self, key, batch: list[_Job]) -> None:
        items = [it for job in batch for it in job.items]
        start = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self.run, key, items)
            if len(results) != len(items):
                raise RuntimeError(f"the model returned {len(results)} results for {len(items)} inputs")
        except Exception:
            if len(batch) > 1:
                # One request's input must not fail the others: run each request alone to find which.
                for job in batch:
                    await self._execute(key, [job])
                return
            log.exception("prediction failed (route %r, %d texts)", key, len(items))
            self.stats.failed += 1
            if not batch[0].future.done():
                batch[0].future.set_exception(BatchFailed())
            return
        self.stats.batches += 1
        self.stats.items += len(items)
        self.stats.sizes[len(items)] += 1
        self.stats.busy_s += time.perf_counter() - start
        k = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(results[k:k + len(job.items)])
            k += len(job.items)

    def _worker_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the batching worker stopped", exc_info=task.exception())
