"""The model holder: which policy answers, and rolling it forward without stopping the service.

It loads the newest complete version of one model from the repository (or a pinned `version`), and
every `poll_seconds` looks for a newer one. A candidate is loaded, validated (not recurrent, sizes match
its card, the same spec as the one being served, a test forward pass with sane outputs) and warmed
up in a background thread, then swapped in by replacing one reference: the batcher reads `current` once
per batch, so a swap always falls between batches. A corrupt or incompatible candidate is refused (and
counted as a reload failure) while the old version keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import grpc
import numpy as np
import torch

from service.batcher import Outputs
from service.metrics import ServiceMetrics
from service.validation import RequestError
from trainer.policy import Policy
from trainer.repository import ModelLoadError, ModelRepository, ModelUnreadable

log = logging.getLogger(__name__)


class IncompatibleModelError(Exception):
    """A model that loads but cannot be served in place of the current one."""


class BelowBarError(Exception):
    """A sound version whose card's evaluation win rate is below the service's --min-eval-win-rate."""


@dataclass(frozen=True)
class ServedModel:
    """One loaded, validated version and the spec that requests are checked against."""
    name: str
    version: int
    policy: Policy
    card: dict
    spec_name: str
    spec_hash: str
    obs_size: int
    n_actions: int
    n_agents: int
    graph: torch.jit.ScriptModule | None = None
    """The policy's serving graph (`Policy.serving_graph`); None: eager `act_graph` (tracing unavailable)."""


class ModelHolder:
    """Holds the served model. `current` is None until a version has loaded (requests get UNAVAILABLE)."""

    def __init__(self, repository: ModelRepository, name: str, *, version: int | None = None,
                 poll_seconds: float = 5.0, warmup_batch_sizes: tuple[int, ...] = (1, 64), seed: int = 0,
                 metrics: ServiceMetrics, before_swap: Callable[[ServedModel], None] | None = None,
                 min_eval_win_rate: float | None = None):
        if poll_seconds < 0:
            raise ValueError(f"poll_seconds must be >= 0 (0 = never poll), got {poll_seconds}")
        if min_eval_win_rate is not None and not 0 <= min_eval_win_rate <= 1:
            raise ValueError(f"--min-eval-win-rate must lie in [0, 1], got {min_eval_win_rate}")
        self.repository = repository
        self.name = name
        self.pinned = version
        self.poll_seconds = poll_seconds
        self.warmup_batch_sizes = warmup_batch_sizes
        self.metrics = metrics
        self.current: ServedModel | None = None
        self.reloads = 0  # versions swapped in after the first
        self.refused: dict[int, str] = {}  # version -> why it was refused
        # The files a refusal judged: a version is tried again only once they change (an operator fixing it in
        # place, or finishing a copy that was not atomic); a published version never changes, so polls skip it.
        self._refused_files: dict[int, tuple | None] = {}
        # Versions whose files could not be read: tried again after a delay that doubles up to 5 minutes (a
        # network volume's hiccup passes; a file this process may never read should not page someone every poll)
        self._unreadable: dict[int, tuple[float, float]] = {}  # version -> (next try, delay)
        # Called in the loading thread with a validated version before it is swapped in (the forward worker
        # process loads it then); raising keeps the old version serving, and the version is tried again later.
        self.before_swap = before_swap
        # A trainer publishes a version at every evaluation, and a greedy policy can swing by tens of points
        # between checkpoints: with a bar, only versions whose card shows an evaluation at or above it serve.
        self.min_eval_win_rate = min_eval_win_rate
        self._generator = torch.Generator().manual_seed(seed)  # sampling in `forward` (the in-process worker)
        self._lock = threading.Lock()  # one load at a time
        self._removed_warned: int | None = None  # the removed version already logged (polls repeat)
        # Set when the server stops: a load under way in the loading thread (which a stop cannot interrupt)
        # finishes the version in hand and tries no other, or a stop would wait for every version on disk.
        self.closed = False

    # --- the request path -------------------------------------------------------------------------------
    def require(self) -> ServedModel:
        model = self.current
        if model is None:
            bar = "" if self.min_eval_win_rate is None else \
                f" with an evaluation win rate >= {self.min_eval_win_rate}"
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"no model loaded yet: waiting for a complete version of {self.name!r}{bar} in "
                               f"{self.repository.root}")
        return model

    def forward(self, obs: np.ndarray, mask: np.ndarray, unit: np.ndarray, greedy: np.ndarray) -> Outputs:
        """One batched forward pass on the current model (called by the batcher's worker thread)."""
        model = self.require()
        with torch.inference_mode():
            # Every row was validated when its request arrived (service/validation.py). An all-greedy batch
            # (the usual case) is one call into the graph: each further torch op would drop and retake the
            # GIL that the event loop is using, and under load those hand-offs cost more than the maths.
            out = model.policy.act(torch.from_numpy(obs), torch.from_numpy(mask), torch.from_numpy(unit),
                                   True if greedy.all() else torch.from_numpy(greedy), generator=self._generator,
                                   graph=model.graph, checked=True)
        log_prob = out.log_prob.numpy()
        return Outputs(model.version, out.action.numpy(), log_prob, np.exp(log_prob), out.value.numpy())

    # --- loading ----------------------------------------------------------------------------------------
    def load_initial(self) -> bool:
        """Load the pinned version, or the newest one that passes validation. Blocking; False if none."""
        with self._lock:
            if self.pinned is not None:
                candidates = [self.pinned] if self.pinned in self.repository.versions(self.name) else []
            else:
                candidates = sorted(self.repository.versions(self.name), reverse=True)
            for version in candidates:
                if self._still_refused(version):
                    continue
                if self._try(version):
                    return True
            return False

    def check_for_update(self) -> bool:
        """Swap in a newer version if there is one and it passes validation; roll back to the newest remaining
        one if the served version was taken out of the repository. Blocking; True if swapped."""
        if self.current is None:
            return self.load_initial()
        if self.pinned is not None:
            return False
        with self._lock:
            served = self.current.version
            versions = self.repository.versions(self.name)
            newer = [v for v in versions if v > served]
            # newest first; an older one still gets its turn when the newest is refused (say, below the bar)
            if any(self._try(v) for v in sorted(newer, reverse=True) if not self._still_refused(v)):
                return True
            if served in versions:
                return False
            # The operator removed the served version (how a bad one is rolled back): serve the newest that is
            # left. If none passes, the removed one keeps serving from memory rather than nothing at all.
            older = [v for v in versions if v < served and not self._still_refused(v)]
            if self._removed_warned != served:
                self._removed_warned = served
                log.warning("model %s: version %d was removed from the repository; rolling back to the newest "
                            "remaining version that passes (%s)", self.name, served, sorted(older) or "none left")
            return any(self._try(v) for v in sorted(older, reverse=True))

    def _try(self, version: int) -> bool:
        if self.closed:
            return False
        files = self._files(version)
        try:
            model = self._prepare(version)
        except BelowBarError as e:  # not a fault: counted apart from the reload failures that page someone
            self._refuse(version, str(e), files)
            self.metrics.versions_below_bar.inc()
            log.info("model %s version %d not served: %s", self.name, version, e)
            return False
        except ModelUnreadable as e:  # the disk, not the version: tried again later
            first = version not in self._unreadable
            _, delay = self._unreadable.get(version, (0.0, 0.0))
            delay = min(max(2 * delay, self.poll_seconds, 1.0), 300.0)
            self._unreadable[version] = (time.monotonic() + delay, delay)
            if first:  # the first failure pages; the retries are logged quietly
                self.metrics.reload_failures.inc()
                log.error("model %s version %d could not be read (%s); will retry: %s", self.name, version,
                          self._where(), e)
            else:
                log.info("model %s version %d still cannot be read; next try in %.0f s: %s", self.name, version,
                         delay, e)
            return False
        except (ModelLoadError, IncompatibleModelError, ValueError, RuntimeError) as e:
            self._refuse(version, str(e), files)
            self.metrics.reload_failures.inc()
            log.error("model %s version %d refused (%s): %s", self.name, version, self._where(), e)
            return False
        finally:
            if version in self._unreadable and self._unreadable[version][0] <= time.monotonic():
                del self._unreadable[version]  # read this time (served or refused on its merits)
        if self.before_swap is not None:
            try:
                self.before_swap(model)
            except Exception as e:  # noqa: BLE001 - not the version's fault: try it again at the next poll
                self.metrics.reload_failures.inc()
                log.error("model %s version %d: the forward worker could not take it (%s: %s); will retry",
                          self.name, version, type(e).__name__, e)
                return False
        previous = self.current
        self.current = model  # the swap: the batcher picks it up at its next batch
        self.metrics.model_version.set(model.version)
        if previous is not None:
            self.reloads += 1
            self.metrics.reloads.inc()
            log.info("model %s: now serving version %d (was %d)", self.name, model.version, previous.version)
        else:
            log.info("model %s: serving version %d (spec %s, hash %s)", self.name, model.version,
                     model.spec_name, model.spec_hash)
        return True

    def _where(self) -> str:
        return f"still serving version {self.current.version}" if self.current is not None else "no model served yet"

    def _files(self, version: int) -> tuple | None:
        """(name, size, mtime) of each file of a stored version; None when the directory cannot be listed."""
        try:
            with os.scandir(self.repository.root / self.name / str(version)) as entries:
                return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries))
        except OSError:
            return None

    def _refuse(self, version: int, why: str, files: tuple | None) -> None:
        self.refused[version] = why
        self._refused_files[version] = files

    def _still_refused(self, version: int) -> bool:
        """Whether `version` was refused and its files are as they were then, or could not be read lately."""
        if version in self._unreadable and time.monotonic() < self._unreadable[version][0]:
            return True
        if version not in self.refused:
            return False
        files = self._files(version)
        if files is not None and files == self._refused_files.get(version):
            return True
        log.info("model %s version %d changed on disk since it was refused; trying it again", self.name, version)
        del self.refused[version], self._refused_files[version]
        return False

    def _prepare(self, version: int) -> ServedModel:
        """Load, validate and warm one version off the request path."""
        bar = self.min_eval_win_rate
        if bar is not None:  # the card alone decides: a version below the bar is never loaded
            win = self.repository.load_card(self.name, version)[0]["eval_win_rate"]
            if win is None or win < bar:
                shown = "no evaluation" if win is None else f"evaluation win rate {win:.3f}"
                raise BelowBarError(f"its card shows {shown}, below --min-eval-win-rate {bar}")
        loaded = self.repository.load(self.name, version)
        policy, card = loaded.policy, loaded.card
        spec = card["spec"]
        model = ServedModel(self.name, loaded.version, policy, card, str(spec["name"]), str(spec["hash"]),
                            int(spec["obs_size"]), int(spec["n_actions"]), int(spec["n_agents"]))
        if policy.recurrent:
            raise IncompatibleModelError(f"version {version} is recurrent (GRU core); the stateless service "
                                         "serves feed-forward policies only")
        sizes = (policy.obs_size, policy.n_actions, policy.n_agents)
        if sizes != (model.obs_size, model.n_actions, model.n_agents):
            raise IncompatibleModelError(f"version {version}: network sizes (obs, actions, agents) {sizes} differ "
                                         f"from its card's spec {(model.obs_size, model.n_actions, model.n_agents)}")
        old = self.current
        if old is not None:
            mine = (model.spec_hash, model.obs_size, model.n_actions, model.n_agents)
            theirs = (old.spec_hash, old.obs_size, old.n_actions, old.n_agents)
            if mine != theirs:
                raise IncompatibleModelError(
                    f"version {version} was trained on spec {model.spec_name} (hash {model.spec_hash}, obs "
                    f"{model.obs_size}, actions {model.n_actions}, agents {model.n_agents}) but version "
                    f"{old.version} serves spec {old.spec_name} (hash {old.spec_hash}, obs {old.obs_size}, "
                    f"actions {old.n_actions}, agents {old.n_agents}); restart the service to change spec")
        model = dataclasses.replace(model, graph=self._trace(model))
        self._test_forward(model)
        return model

    def _trace(self, model: ServedModel) -> torch.jit.ScriptModule | None:
        """The policy's serving graph (checked against the eager policy as it is made), or None (eager)."""
        try:
            return model.policy.serving_graph()
        except Exception as e:  # noqa: BLE001 - tracing is a speed-up; the eager graph gives the same answers
            log.warning("version %d: no serving graph (%s: %s); serving the eager policy", model.version,
                        type(e).__name__, e)
            return None

    def _test_forward(self, model: ServedModel) -> None:
        """A forward pass on every agent slot (and the warm-up sizes) must give legal, finite answers."""
        gen = torch.Generator().manual_seed(0)
        for rows in (model.n_agents,) + tuple(self.warmup_batch_sizes):
            obs, mask, unit = model.policy.test_rows(rows, gen)
            greedy = torch.arange(rows) % 2 == 0
            out = model.policy.act(obs, mask, unit, greedy, generator=gen, graph=model.graph)
            if out.action.shape != (rows,) or out.log_prob.shape != (rows,) or out.value.shape != (rows,):
                raise IncompatibleModelError(f"version {model.version}: test forward on {rows} rows returned shapes "
                                             f"{tuple(out.action.shape)}, {tuple(out.log_prob.shape)}, "
                                             f"{tuple(out.value.shape)}; expected ({rows},) each")
            if not bool(mask.gather(1, out.action[:, None]).all()):
                raise IncompatibleModelError(f"version {model.version}: test forward chose a masked action")
            if not bool(torch.isfinite(out.log_prob).all() & torch.isfinite(out.value).all()):
                raise IncompatibleModelError(f"version {model.version}: test forward gave non-finite "
                                             "log-probabilities or values")

    async def poll(self, on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        """Forever: every poll_seconds, look for a new version in a background thread; after a swap,
        await `on_change()`."""
        if self.poll_seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                changed = await loop.run_in_executor(None, self.check_for_update)
            except Exception:  # noqa: BLE001 - a broken repository must not stop the service
                log.exception("looking for a new version of %s failed", self.name)
                continue
            if changed and on_change is not None:
                await on_change()
