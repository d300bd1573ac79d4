"""The dynamic batcher: requests from every RPC meet in one queue and leave as one forward pass.

Shape (after Ray Serve's batching): a small record per request holding its input rows and a future,
a bounded queue, a loop that takes up to `max_batch_size` rows (waiting at most `max_queue_delay`
seconds for the batch to fill; 0 = take what is waiting), stacks them and awaits the forward pass, which
runs off the event loop (in a child process, service/forward_process.py, or in a worker thread,
`ThreadForward`) so the loop keeps accepting requests, and resolves every caller's future exactly once:
with its own slice of the outputs, or with the error of the batch (errors fan out to every waiting caller).

With a delay, a lone caller (one request waiting, and the last batch held one request) is not kept
waiting: the delay buys batch size only when callers are actually concurrent.

A request's rows never split across batches: an ActBatch frame goes through in one forward pass (a frame
larger than `max_batch_size` runs alone). Requests whose deadline has passed are dropped before the
forward pass; a full queue refuses new requests at once (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, NamedTuple

import grpc
import numpy as np

from service.metrics import ServiceMetrics
from service.validation import RequestError, Rows

log = logging.getLogger(__name__)


class Outputs(NamedTuple):
    """A forward pass's answer for k rows: arrays of shape (k,)."""
    version: int
    action: np.ndarray  # int64
    log_prob: np.ndarray  # float32
    prob: np.ndarray  # float32
    value: np.ndarray  # float32


# forward(obs (B, O) f32, mask (B, N) bool, unit (B,) i64, greedy (B,) bool) -> Outputs for B rows.
Forward = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], Outputs]
# The same, awaited: what the batcher calls. It must not run the forward pass on the event loop.
AsyncForward = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], Awaitable[Outputs]]


class ThreadForward:
    """Runs a blocking `Forward` in one worker thread (the in-process choice: `--forward-worker thread`).

    Simple, but under load each batch's hand-off costs more than the forward pass (the thread and the
    event loop take turns at the GIL); `ProcessForward` avoids that."""

    def __init__(self, forward: Forward):
        self.forward = forward
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="phalanx-forward")

    async def __call__(self, obs: np.ndarray, mask: np.ndarray, unit: np.ndarray, greedy: np.ndarray) -> Outputs:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.forward, obs, mask, unit, greedy)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)


@dataclass(slots=True)
class _Request:
    rows: Rows
    future: asyncio.Future
    enqueued: float  # time.perf_counter() when it joined the queue
    deadline: float | None  # time.perf_counter() after which nobody waits for the answer


class Batcher:
    """Collects requests into batches for `forward`, one batch at a time.

    `await batcher.submit(rows, deadline)` -> Outputs for those rows; raises RequestError
    (RESOURCE_EXHAUSTED when full, DEADLINE_EXCEEDED when dropped, or the batch's error).
    """

    SETTLE_TURNS = 4  # with no queue delay: event-loop turns to let already-arrived requests join a batch

    def __init__(self, forward: AsyncForward, *, max_batch_size: int = 1024, max_queue_delay: float = 0.0,
                 max_queue: int = 4096, metrics: ServiceMetrics):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay < 0:
            raise ValueError(f"max_queue_delay must be >= 0 seconds, got {max_queue_delay}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 unit, got {max_queue}")
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_rows = 0
        self._nonempty = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._in_flight: list[_Request] = []  # the batch in the forward pass: close() must answer it too
        self._buffers: dict[str, np.ndarray] = {}
        self._last_batch_requests = 0

    # --- the caller's side ------------------------------------------------------------------------------
    def enqueue(self, rows: Rows, deadline: float | None = None) -> asyncio.Future:
        """Queue validated rows; returns the future of their Outputs. Raises RequestError when full."""
        k = rows.obs.shape[0]
        if k > self.max_queue:  # a bad request (it could never fit), not load shed: counted as INVALID_ARGUMENT
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"observations: a frame may hold at most {self.max_queue} units (the "
                               f"server's --max-queue), got {k}")
        if self._queued_rows + k > self.max_queue:
            self.metrics.shed.labels("queue_full").inc()
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"queue full: {self._queued_rows} units waiting (limit {self.max_queue}); "
                               f"retry with back-off")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(rows, future, time.perf_counter(), deadline))
        self._queued_rows += k
        self.metrics.queue_depth.set(self._queued_rows)
        self._nonempty.set()
        if self._queued_rows >= self.max_batch_size:
            self._full.set()
        return future

    async def submit(self, rows: Rows, deadline: float | None = None) -> Outputs:
        return await self.enqueue(rows, deadline)

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    # --- the loop ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="phalanx-batcher")

    def flush_now(self) -> None:
        """Stop waiting for batches to fill (used while draining)."""
        self.max_queue_delay = 0.0
        self._full.set()

    async def close(self) -> None:
        """Stop the loop; any caller still waiting gets UNAVAILABLE."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        error = RequestError(grpc.StatusCode.UNAVAILABLE, "server shutting down")
        for req in [*self._in_flight, *self._queue]:
            if not req.future.done():
                req.future.set_exception(error)
        self._in_flight = []
        self._queue.clear()
        self._queued_rows = 0
        self.metrics.queue_depth.set(0)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._nonempty.clear()
                await self._nonempty.wait()
            lone_caller = len(self._queue) == 1 and self._last_batch_requests <= 1
            if self.max_queue_delay > 0 and self._queued_rows < self.max_batch_size and not lone_caller:
                wait = self._queue[0].enqueued + self.max_queue_delay - time.perf_counter()
                if wait > 0:
                    self._full.clear()
                    timer = loop.call_later(wait, self._full.set)
                    await self._full.wait()
                    timer.cancel()
            else:
                # Requests that have already arrived may still sit in the event loop's ready callbacks:
                # give them a few loop turns (no timer: microseconds when idle) while the queue keeps growing.
                for _ in range(self.SETTLE_TURNS):
                    before = self._queued_rows
                    await asyncio.sleep(0)
                    if self._queued_rows == before or self._queued_rows >= self.max_batch_size:
                        break
            batch = self._take()
            self._last_batch_requests = len(batch)
            self.metrics.queue_depth.set(self._queued_rows)
            if not batch:
                continue
            started = time.perf_counter()
            self._in_flight = batch
            try:
                out, usable = await self._compute(batch)
            except Exception as e:  # noqa: BLE001 - every waiting caller must hear about it
                self._in_flight = []
                error = e if isinstance(e, RequestError) else RequestError(
                    grpc.StatusCode.INTERNAL, f"forward pass failed: {type(e).__name__}: {e}")
                if not isinstance(e, RequestError):
                    log.exception("forward pass failed for a batch of %d requests", len(batch))
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(error)
                continue
            self._in_flight = []
            self.metrics.compute_time.observe(time.perf_counter() - started)
            self._answer(batch, out, usable, started)

    def _take(self) -> list[_Request]:
        """Pop up to max_batch_size rows of live requests (at least one request), dropping expired ones."""
        batch: list[_Request] = []
        rows = 0
        now = time.perf_counter()
        queue = self._queue
        while queue:
            req = queue[0]
            k = req.rows.obs.shape[0]
            if batch and rows + k > self.max_batch_size:
                break
            queue.popleft()
            self._queued_rows -= k
            expired = req.deadline is not None and now > req.deadline
            if req.future.done():  # the caller went away: cancelled, or gRPC ended the call at its deadline
                self.metrics.shed.labels("deadline" if expired else "cancelled").inc()
                continue
            if expired:
                self.metrics.shed.labels("deadline").inc()
                req.future.set_exception(RequestError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"deadline: passed after {now - req.enqueued:.4f} s in the queue, before the forward pass"))
                continue
            batch.append(req)
            rows += k
        if self._queued_rows < self.max_batch_size:
            self._full.clear()
        return batch

    def _buffer(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A reused input buffer with at least shape[0] rows (grown, never shrunk)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:]:
            buf = np.empty((max(shape[0], self.max_batch_size),) + shape[1:], dtype=dtype)
            self._buffers[name] = buf
        return buf[:shape[0]]

    async def _compute(self, batch: list[_Request]) -> tuple[Outputs, np.ndarray]:
        """Stack the batch's rows into reused buffers (microseconds) and await the forward pass.
        -> the outputs, and which rows' answers may be served (`_usable`)."""
        n = sum(req.rows.obs.shape[0] for req in batch)
        first = batch[0].rows
        obs = np.concatenate([r.rows.obs for r in batch], out=self._buffer("obs", (n,) + first.obs.shape[1:], np.float32))
        mask = np.concatenate([r.rows.mask for r in batch], out=self._buffer("mask", (n,) + first.mask.shape[1:], np.bool_))
        unit = np.concatenate([r.rows.unit for r in batch], out=self._buffer("unit", (n,), np.int64))
        greedy = np.concatenate([r.rows.greedy for r in batch], out=self._buffer("greedy", (n,), np.bool_))
        out = await self.forward(obs, mask, unit, greedy)
        if out.action.shape[0] != obs.shape[0]:
            raise RuntimeError(f"forward returned {out.action.shape[0]} actions for {obs.shape[0]} rows")
        return out, _usable(out, mask)

    def _answer(self, batch: list[_Request], out: Outputs, usable: np.ndarray, started: float) -> None:
        """Give every caller its own slice of the outputs (or, if a row of it is unusable, its own error)."""
        queue_time = self.metrics.queue_time
        every_row_usable = bool(usable.all())
        rows = 0
        for req in batch:
            k = req.rows.obs.shape[0]
            queue_time.observe(started - req.enqueued)
            if not req.future.done():
                if every_row_usable or usable[rows:rows + k].all():
                    req.future.set_result(Outputs(out.version, out.action[rows:rows + k],
                                                  out.log_prob[rows:rows + k], out.prob[rows:rows + k],
                                                  out.value[rows:rows + k]))
                else:
                    req.future.set_exception(_unusable_error(req.rows, out, usable, rows))
            rows += k
        self.metrics.batch_size.observe(rows)


def _usable(out: Outputs, mask: np.ndarray) -> np.ndarray:
    """(B,) bool: rows whose answer may be served: finite log-prob and value, and a legal action.

    Validation cannot catch everything: a finite observation can still be large enough (every feature 3e38,
    say) to overflow the network, which then answers NaN or, with every legal logit far below the mask's
    fill value, an illegal action. Such a row fails its own request, never the batch."""
    return (np.isfinite(out.log_prob) & np.isfinite(out.value)
            & mask[np.arange(len(out.action)), out.action])


def _unusable_error(rows: Rows, out: Outputs, usable: np.ndarray, first: int) -> RequestError:
    """INVALID_ARGUMENT for the request whose rows start at `first` of the batch: its first unusable row."""
    r = int(np.flatnonzero(~usable[first:first + rows.obs.shape[0]])[0])
    i = first + r
    magnitude = np.abs(rows.obs[r])
    where = "observation" if rows.obs.shape[0] == 1 else f"observations: row {r}"
    answer = (f"log-prob {out.log_prob[i]}, value {out.value[i]}" if rows.mask[r, out.action[i]]
              else f"action {int(out.action[i])}, which its action mask forbids")
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"{where}: the model gives no usable answer for it ({answer}): its values are too large "
                        f"for the network (largest magnitude {magnitude.max():g}, at index {int(magnitude.argmax())}); "
                        f"send features in the ranges of the scenario's observation spec")
