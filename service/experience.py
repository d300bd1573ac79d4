"""The experience log: every served unit-step, assembled into per-unit trajectories and written as shards.

The server calls `record_unit` (Act, ActStream) or `record_frame` (ActBatch) once per answered request, on the
event loop. A step's reward and done arrive with the NEXT request of the same unit, so each unit - keyed by
(game_id, unit_id) - has one open step waiting for them:

    request k of unit u in game g    -> step k is served; it waits
    request k+1 (prev_reward, prev_done) -> step k is complete (reward, done) and goes into the open chunk;
                                            step k+1 is served and waits

- `prev_done` true ends the trajectory with the waiting step (done); the request's own step starts a new
  trajectory. A new `episode_id` without `prev_done` also starts a new trajectory, but how the old one ended is
  unknown: its waiting step is written `truncated`. Absent `prev_reward` / `prev_done` count as 0 / false.
- A request that gets no answer (refused, shed, expired, cancelled) logs no step, but its `prev_reward` /
  `prev_done` complete the waiting step, written `truncated` unless done: the unit's next answered step starts
  a new trajectory (it is not the waiting step's successor, and its reward is not the waiting step's). A
  byte-identical retry of that request is taken for the step it retries.
- Requests without a `game_id` are not logged (a unit's steps could not be told apart across games); they are
  counted as dropped rows with reason `no_game_id`.
- A trajectory's rows carry (game_id, episode_id, unit_id), a trajectory number unique within this run, and the
  step's position in it; shards carry the run id, so trajectories that span shards join up again when read.

Bounded memory: completed steps fill a preallocated chunk of `chunk_rows` rows, handed to a writer thread when
full (or every `flush_seconds`); at most `max_open` units wait for a reward - beyond it the stalest is evicted
(counted): its waiting step is written with reward 0 and `truncated` set. At most `max_backlog` finished chunks
(default 1) are in the writer's hands and not yet on disk: a request that could fill the open chunk while they
are waits for the writer before it is recorded (`await room(rows)`: backpressure, without blocking the event
loop), so nothing answered is dropped, and serving slows to the disk's pace only when the disk is slower than
the traffic.

Durability: shards are written to `.tmp-*` and renamed into place (trainer/shards.py). `close()` (a clean
shutdown) writes every completed step and every step still waiting for its reward (reward 0, `truncated`), so
nothing the service answered is lost. A crash loses the open chunk and the chunk being written at that moment
(if any): the open chunk cannot fill while the previous one is still unwritten, so that is at most two chunks'
rows, and only a single request larger than a chunk can add to it. Steps still waiting for their reward are
not rows yet: a crash loses those too (one per live unit, at most `max_open`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from service._gen.phalanx.v1 import inference_pb2 as pb
from service.batcher import Outputs
from service.metrics import ServiceMetrics
from service.validation import Rows
from trainer.shards import Chunk, chunk_table, write_shard

log = logging.getLogger(__name__)


class Spec(Protocol):
    """The served model's spec (service.model_holder.ServedModel)."""
    spec_name: str
    spec_hash: str


@dataclass(slots=True)
class _Waiting:
    """A unit's served step that waits for its reward, and the trajectory it belongs to."""
    game_id: str
    episode_id: int
    unit_id: int
    trajectory: int
    step: int
    obs: np.ndarray
    mask: np.ndarray
    action: int
    log_prob: float
    value: float
    greedy: bool
    version: int
    # Set when a request of this unit got no answer: (reward, done, truncated) to write this step with, and a
    # fingerprint of that request (a byte-identical retry is the same step again, not a new one).
    ended: tuple[float, bool, bool] | None = None
    ended_by: int = 0


_COLUMNS = (("episode_id", np.uint64), ("unit_id", np.int32), ("trajectory", np.uint64), ("step", np.uint32),
            ("action", np.int32), ("log_prob", np.float32), ("value", np.float32), ("greedy", bool),
            ("reward", np.float32), ("done", bool), ("truncated", bool), ("model_version", np.uint64),
            ("game_index", np.int32))


def _frame_prev(request: pb.ActBatchRequest, n: int) -> tuple[list[float], list[int]]:
    """A validated frame's prev_rewards and prev_dones, one per row (0 where the frame sends none)."""
    rewards = (np.frombuffer(request.prev_rewards.data, "<f4").tolist() if request.HasField("prev_rewards")
               else [0.0] * n)
    dones = np.frombuffer(request.prev_dones.data, np.uint8).tolist() if request.HasField("prev_dones") else [0] * n
    return rewards, dones


def _fingerprint(request: pb.ActRequest | pb.ActBatchRequest) -> int:
    """Tells a retry (the same bytes again) from the unit's next request."""
    return hash(request.SerializeToString(deterministic=True))


class ExperienceLog:
    """Assembles trajectories from served requests and writes them as Parquet shards under `directory`.

    spec_source() returns the served model's spec (for the shard metadata). Call `start()` on the event loop,
    `record_*` from it, and `await close()` once no more requests come."""

    def __init__(self, directory: str | Path, *, spec_source: Callable[[], Spec | None], metrics: ServiceMetrics,
                 chunk_rows: int = 65536, max_open: int = 50000, flush_seconds: float = 60.0, max_backlog: int = 1):
        for name, value, low in (("chunk_rows", chunk_rows, 1), ("max_open", max_open, 1),
                                 ("max_backlog", max_backlog, 1)):
            if not isinstance(value, int) or value < low:
                flag = "max_backlog" if name == "max_backlog" else f"--experience-{name.replace('_', '-')}"
                raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")
        if not flush_seconds >= 0:
            raise ValueError(f"--experience-flush-seconds must be >= 0 (0 = only when a chunk is full), "
                             f"got {flush_seconds!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.spec_source = spec_source
        self.metrics = metrics
        self.chunk_rows, self.max_open, self.flush_seconds = chunk_rows, max_open, flush_seconds
        self.run_id = uuid.uuid4().hex[:12]
        self._waiting: collections.OrderedDict[tuple[str, int], _Waiting] = collections.OrderedDict()
        self._next_trajectory = 0
        self._shard_seq = 0
        self._buf: dict[str, np.ndarray] | None = None  # the open chunk's columns (allocated at its first row)
        self._games: dict[str, int] = {}  # the open chunk's game ids -> index
        self._n = 0  # rows in the open chunk
        self.max_backlog = max_backlog
        self._queue: queue.Queue = queue.Queue()  # bounded by room(): at most max_backlog chunks, bar one request's
        self._unwritten = 0  # finished chunks handed to the writer and not yet written (or failed)
        self._unwritten_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="phalanx-experience-writer", daemon=True)
        self._flusher: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._room: asyncio.Event | None = None
        self._warned_no_game = False
        self.closed = False
        self.rows_written = 0
        self.shards_written = 0

    # --- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._room = asyncio.Event()  # set (from the writer thread) whenever it takes a chunk off the queue
        except RuntimeError:  # started outside an event loop (a script, a test): room() never waits then
            pass
        self._writer.start()
        if self.flush_seconds > 0:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_every(), name="phalanx-experience")

    async def close(self) -> None:
        """Write everything: completed steps, and waiting steps as truncated; then stop the writer."""
        if self.closed:
            return
        self.closed = True
        if self._flusher is not None:
            self._flusher.cancel()
        while self._waiting:
            _, waiting = self._waiting.popitem(last=False)
            self._complete_unfinished(waiting)
        self._hand_off()
        self.metrics.experience_open.set(0)
        if self._writer.ident is None:  # closed before start(): write what there is all the same
            self._writer.start()
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            await self.room(self.chunk_rows)
            self._hand_off()

    async def room(self, rows: int = 1) -> None:
        """Return once a request of `rows` unit-steps can be recorded without handing the writer more than
        `max_backlog` unwritten chunks. The server awaits this right before each `record_*` (nothing awaited in
        between, so the room is still there). It waits only while the writer has `max_backlog` chunks in hand
        and this request could fill the open chunk: then serving slows to the disk's pace instead of dropping
        what it answered, or letting unwritten rows pile up for a crash to lose. The wait is counted in
        phalanx_experience_wait_seconds_total."""
        if self._room is None or not self._full(rows):
            return
        started = time.perf_counter()
        try:
            while self._full(rows):
                # Woken by the writer, not by polling: a thousand waiting requests polling would keep the GIL
                # from the very thread they wait for.
                self._room.clear()
                if self._full(rows):
                    await self._room.wait()
        finally:
            self.metrics.experience_wait.inc(time.perf_counter() - started)

    def _full(self, rows: int) -> bool:
        """Whether recording `rows` unit-steps now could hand the writer one chunk too many. Each step completes
        at most its unit's waiting step, plus one evicted step once `max_open` units wait."""
        if self._unwritten < self.max_backlog:
            return False
        completes = rows + min(rows, max(0, len(self._waiting) + rows - self.max_open))
        return self._n + completes >= self.chunk_rows

    # --- recording (event loop) ---------------------------------------------------------------------------
    def record_unit(self, request: pb.ActRequest, rows: Rows, out: Outputs) -> None:
        """One answered Act / ActStream request."""
        if self._skip(request.game_id, 1):
            return
        self._step(request.game_id, request.episode_id, request.unit_id, rows.obs[0], rows.mask[0],
                   int(out.action[0]), float(out.log_prob[0]), float(out.value[0]), bool(rows.greedy[0]),
                   out.version, request.prev_reward if request.HasField("prev_reward") else 0.0,
                   request.HasField("prev_done") and request.prev_done, functools.cache(lambda: _fingerprint(request)))

    def record_frame(self, request: pb.ActBatchRequest, rows: Rows, out: Outputs) -> None:
        """One answered ActBatch frame (already validated: the prev_* tensors have one entry per row)."""
        n = rows.obs.shape[0]
        if self._skip(request.game_id, n):
            return
        rewards, dones = _frame_prev(request, n)
        units, actions = rows.unit.tolist(), out.action.tolist()
        log_probs, values, greedy = out.log_prob.tolist(), out.value.tolist(), rows.greedy.tolist()
        fingerprint = functools.cache(lambda: _fingerprint(request))  # computed only if a unit's step was ended
        for i in range(n):
            self._step(request.game_id, request.episode_id, units[i], rows.obs[i], rows.mask[i], actions[i], log_probs[i],
                       values[i], greedy[i], out.version, rewards[i], bool(dones[i]), fingerprint)

    # A request that got no answer (refused, shed, expired, cancelled) logs no step. The reward it carried still
    # belongs to its units' waiting steps, and those steps have no successor: they end there, so the next answered
    # step starts a new trajectory instead of taking the next reward and being bootstrapped as their next state.
    # The ended step stays where it waits and is written when the unit's next answered request comes (which
    # waited for room() as every recorded request does), or when it is evicted or the log closes: writing it here
    # would fill chunks past the backpressure. A byte-identical retry of that request (the client retries
    # UNAVAILABLE) is the same step after all: it undoes the end.
    def unanswered_unit(self, request: pb.ActRequest) -> None:
        """An Act / ActStream request that got no answer."""
        if self.closed or not request.game_id:
            return
        reward = request.prev_reward if request.HasField("prev_reward") else 0.0
        self._end(request.game_id, request.unit_id, reward, request.HasField("prev_done") and request.prev_done,
                  _fingerprint(request))

    def unanswered_frame(self, request: pb.ActBatchRequest, rows: Rows | None) -> None:
        """An ActBatch frame that got no answer; `rows` None: it failed validation, so its units are unknown."""
        if self.closed or not request.game_id or rows is None:
            return
        rewards, dones = _frame_prev(request, rows.unit.shape[0])
        fingerprint = _fingerprint(request)
        for unit, reward, done in zip(rows.unit.tolist(), rewards, dones):
            self._end(request.game_id, unit, reward, bool(done), fingerprint)

    def _end(self, game_id: str, unit_id: int, reward: float, done: bool, fingerprint: int) -> None:
        waiting = self._waiting.get((game_id, unit_id))
        if waiting is None or waiting.ended is not None:  # a later failure carries a reward no logged step earned
            return
        if not math.isfinite(reward):  # the request was refused for it: no reward is known
            reward, done = 0.0, False
        waiting.ended, waiting.ended_by = (reward, done, not done), fingerprint  # done: a whole step, a sample

    def _skip(self, game_id: str, n: int) -> bool:
        if self.closed:
            return True
        if game_id:
            return False
        self.metrics.experience_dropped.labels("no_game_id").inc(n)
        if not self._warned_no_game:
            self._warned_no_game = True
            log.warning("experience log: requests without a game_id are not logged (a unit's steps cannot be "
                        "told apart across games); set ActRequest.game_id / ActBatchRequest.game_id")
        return True

    def _step(self, game_id: str, episode_id: int, unit_id: int, obs: np.ndarray, mask: np.ndarray, action: int,
              log_prob: float, value: float, greedy: bool, version: int, prev_reward: float, prev_done: bool,
              fingerprint: Callable[[], int]) -> None:
        key = (game_id, unit_id)
        waiting = self._waiting.pop(key, None)
        trajectory, step = None, 0
        if waiting is not None and waiting.ended is not None and waiting.ended_by != fingerprint():
            self._complete_unfinished(waiting)  # a request in between got no answer (and this is not its retry)
        elif waiting is not None:  # this request completes the unit's waiting step
            if prev_done or waiting.episode_id == episode_id:
                self._complete(waiting, prev_reward, prev_done, truncated=False)
                if not prev_done:
                    trajectory, step = waiting.trajectory, waiting.step + 1
            else:  # a new episode without prev_done: how the old one ended is unknown
                self._complete(waiting, prev_reward, False, truncated=True)
        if trajectory is None:
            trajectory = self._next_trajectory
            self._next_trajectory += 1
        # the step's own copies: a view would keep the whole request (or frame) alive while the unit waits
        self._waiting[key] = _Waiting(game_id, episode_id, unit_id, trajectory, step, np.array(obs, np.float32),
                                      np.array(mask, bool), action, log_prob, value, greedy, version)
        if len(self._waiting) > self.max_open:
            _, stalest = self._waiting.popitem(last=False)
            self.metrics.experience_evictions.inc()
            self._complete_unfinished(stalest)
        self.metrics.experience_open.set(len(self._waiting))

    def _complete_unfinished(self, w: _Waiting) -> None:
        """A waiting step no answered request will complete: as its unanswered request ended it, if one did,
        else truncated with reward 0."""
        reward, done, truncated = w.ended or (0.0, False, True)
        self._complete(w, reward, done, truncated=truncated)

    def _complete(self, w: _Waiting, reward: float, done: bool, *, truncated: bool) -> None:
        """Put a finished step into the open chunk (handing the chunk to the writer when it is full)."""
        if self._buf is None:
            self._buf = {name: np.empty(self.chunk_rows, dtype) for name, dtype in _COLUMNS}
            self._buf["obs"] = np.empty((self.chunk_rows, w.obs.shape[0]), np.float32)
            self._buf["mask"] = np.empty((self.chunk_rows, w.mask.shape[0]), bool)
        b, i = self._buf, self._n
        if w.obs.shape[0] != b["obs"].shape[1] or w.mask.shape[0] != b["mask"].shape[1]:
            self._hand_off()  # a different spec (cannot happen within one run): start a new chunk
            return self._complete(w, reward, done, truncated=truncated)
        game = self._games.setdefault(w.game_id, len(self._games))
        b["obs"][i], b["mask"][i] = w.obs, w.mask
        b["episode_id"][i], b["unit_id"][i], b["trajectory"][i], b["step"][i] = (w.episode_id, w.unit_id,
                                                                                 w.trajectory, w.step)
        b["action"][i], b["log_prob"][i], b["value"][i], b["greedy"][i] = w.action, w.log_prob, w.value, w.greedy
        b["reward"][i], b["done"][i], b["truncated"][i] = reward, done, truncated
        b["model_version"][i], b["game_index"][i] = w.version, game
        self._n += 1
        if truncated:
            self.metrics.experience_truncated.inc()
        if self._n == self.chunk_rows:
            self._hand_off()

    def _hand_off(self) -> None:
        """Give the open chunk to the writer thread."""
        if self._n == 0 or self._buf is None:
            return
        b, n = self._buf, self._n
        chunk = Chunk(game_ids=list(self._games), game_index=b["game_index"][:n], episode_id=b["episode_id"][:n],
                      unit_id=b["unit_id"][:n], trajectory=b["trajectory"][:n], step=b["step"][:n], obs=b["obs"][:n],
                      mask=b["mask"][:n], action=b["action"][:n], log_prob=b["log_prob"][:n], value=b["value"][:n],
                      greedy=b["greedy"][:n], reward=b["reward"][:n], done=b["done"][:n],
                      truncated=b["truncated"][:n], model_version=b["model_version"][:n])
        self._buf, self._games, self._n = None, {}, 0
        spec = self.spec_source()
        spec_name, spec_hash = (spec.spec_name, spec.spec_hash) if spec is not None else ("", "")
        self._shard_seq += 1
        name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{self.run_id}-{self._shard_seq:06d}"
        with self._unwritten_lock:
            self._unwritten += 1
        # Never blocks: room() has kept the writer's backlog at max_backlog (a request larger than a chunk, or
        # the final flush at close, can go past it; their rows are in memory already).
        self._queue.put_nowait((chunk, spec_name, spec_hash, name))

    # --- writing (writer thread) ----------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._write(*item)
            finally:
                with self._unwritten_lock:
                    self._unwritten -= 1
                if self._room is not None:  # wake the requests waiting in room()
                    with contextlib.suppress(RuntimeError):  # the loop is gone (the process is ending)
                        self._loop.call_soon_threadsafe(self._room.set)

    def _write(self, chunk: Chunk, spec_name: str, spec_hash: str, name: str) -> None:
        n = chunk.action.shape[0]
        try:
            table = chunk_table(chunk, spec_name=spec_name, spec_hash=spec_hash, run_id=self.run_id)
            path = write_shard(self.directory, name, table)
        except Exception:  # noqa: BLE001 - a full disk must not stop the service
            self.metrics.experience_dropped.labels("write_failed").inc(n)
            log.exception("experience log: writing shard %s (%d rows) to %s failed", name, n, self.directory)
            return
        self.rows_written += n
        self.shards_written += 1
        self.metrics.experience_rows.inc(n)
        self.metrics.experience_shards.inc()
        log.debug("experience log: wrote %s (%d rows)", path, n)
