"""`phalanx play`: drive built-in-simulator games (or real StarCraft II ones) with actions asked from a running
service.

N games run at once in one BattleSim(scenario, N, seed) (game i plays with seed + i), exactly as
`phalanx eval` runs them; each game's first episode is counted. Every step, every live unit of a game
whose first episode is still running is sent to the service (dead units play no-op locally; games that
already finished keep stepping with a local legal action so the batch stays in lock-step, and are not
counted). With the same model, seeds and greedy actions the games play out as `phalanx eval` plays them.

`play_in_game` does the same in real StarCraft II (trainer/sc2's SC2Battle: one game, its episodes one after
another), which is how experience from the real game reaches the service's log and the offline trainer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field

import grpc
import numpy as np

from service._gen.phalanx.v1 import inference_pb2 as pb
from service.client import AsyncClient, act_request, batch_request
from trainer.sim import BattleSim, Scenario

RPC_STYLES = ("unary", "stream", "batch")


@dataclass
class PlayResult:
    scenario: str
    games: int
    seed: int
    rpc: str
    greedy: bool
    wins: int = 0
    episodes: int = 0
    returns: list = field(default_factory=list)
    requests: int = 0  # RPC messages sent (unit messages for unary/stream, frames for batch)
    units: int = 0  # unit actions asked for
    latencies: list = field(default_factory=list)  # seconds per request message
    service_seconds: float = 0.0  # wall time spent waiting for the service
    versions: set = field(default_factory=set)
    actions: list = field(default_factory=list)  # per step (games, agents) int64 when recorded

    def add(self, other: "PlayResult") -> None:
        """Fold in another run's counts (one more episode of a real game)."""
        self.wins += other.wins
        self.episodes += other.episodes
        self.returns += other.returns
        self.requests += other.requests
        self.units += other.units
        self.latencies += other.latencies
        self.service_seconds += other.service_seconds
        self.versions |= other.versions
        self.actions += other.actions

    def summary(self) -> dict:
        lat = np.asarray(self.latencies) * 1000.0
        return {
            "scenario": self.scenario, "games": self.games, "seed": self.seed, "rpc": self.rpc, "greedy": self.greedy,
            "episodes": self.episodes, "win_rate": self.wins / max(self.episodes, 1),
            "mean_return": float(np.mean(self.returns)) if self.returns else 0.0,
            "requests": self.requests, "units": self.units,
            "units_per_s": self.units / self.service_seconds if self.service_seconds else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else 0.0,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else 0.0,
            "model_versions": sorted(self.versions),
        }


async def _ask_unary(client: AsyncClient, requests: list[pb.ActRequest], result: PlayResult) -> list[int]:
    async def one(req):
        t0 = time.perf_counter()
        resp = await client.act_request(req)
        result.latencies.append(time.perf_counter() - t0)
        result.versions.add(resp.model_version)
        return resp.action

    return list(await asyncio.gather(*(one(r) for r in requests)))


async def _ask_stream(stream, requests: list[pb.ActRequest], result: PlayResult) -> list[int]:
    t0 = time.perf_counter()
    sent = {}

    async def write_all():
        try:
            for req in requests:
                await stream.send(req)
                sent[req.request_id] = time.perf_counter()
        except grpc.aio.AioRpcError:
            pass  # the call has ended (a draining server, an error): the reads below say how, and stop

    writer = asyncio.create_task(write_all())
    actions = []
    try:
        for req in requests:
            resp = await stream.recv()
            if resp.request_id != req.request_id:
                raise RuntimeError(f"stream answered request {resp.request_id} where {req.request_id} was due")
            result.latencies.append(time.perf_counter() - sent.get(req.request_id, t0))
            result.versions.add(resp.model_version)
            actions.append(resp.action)
    except BaseException:
        # an answer failed: stop writing to a stream that is being abandoned (and leave no task unawaited)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        raise
    # Every answer is in, but the writer may not have resumed after its last send yet (an answer can arrive
    # first): wait for it rather than cancel it.
    await writer
    return actions


async def _ask_batch(client: AsyncClient, frames: list[pb.ActBatchRequest], result: PlayResult) -> list[np.ndarray]:
    async def one(frame):
        t0 = time.perf_counter()
        res = await client.act_batch_request(frame)
        result.latencies.append(time.perf_counter() - t0)
        result.versions.add(res.model_version)
        return res.action

    return list(await asyncio.gather(*(one(f) for f in frames)))


async def play_games(client: AsyncClient, scenario: Scenario, *, games: int, seed: int = 0, rpc: str = "stream",
                     greedy: bool = True, record_actions: bool = False, sim=None) -> PlayResult:
    """Play `games` games' first episodes against the service; returns the counts, latencies (and actions).

    Rewards follow the service's experience protocol: a unit's step gets its reward (the team's reward of that
    step) and done on that unit's next request (`prev_reward`, `prev_done`). A unit's trajectory ends when it
    dies or its game ends; when a game ends, each of its units sends one more request, the next episode's first
    observation (episode_id 1, after the simulator's auto-reset), carrying its last step's reward with
    prev_done, and its answer is not played. Game ids are unique per call, so runs never share trajectories.
    `sim`: the games to play instead of a new BattleSim(scenario, games, seed) - anything with its API and
    `games` games (an SC2Battle: one)."""
    if rpc not in RPC_STYLES:
        raise ValueError(f"rpc must be one of {', '.join(RPC_STYLES)}, got {rpc!r}")
    sc = scenario
    A = sc.n_agents
    if sim is None:
        sim = BattleSim(sc, games, seed=seed)
    elif sim.n_envs != games:
        raise ValueError(f"sim plays {sim.n_envs} game(s) at once, but games={games}")
    out = sim.reset()
    result = PlayResult(sc.name, games, seed, rpc, greedy)
    counting = np.ones(games, dtype=bool)  # game still in its first episode
    last_reward = np.zeros((games, A), dtype=np.float32)  # reward of each unit's last served step
    waiting = np.zeros((games, A), dtype=bool)  # the unit's last served step still waits for its reward
    run = uuid.uuid4().hex[:8]
    game_ids = [f"play-{run}-{seed + g}" for g in range(games)]
    # the client's per-call deadline bounds each answer's wait on the stream (a stream has no per-call deadline)
    stream = client.stream(answer_timeout=client.timeout) if rpc == "stream" else None
    next_id = 0

    async def ask(g_idx: np.ndarray, a_idx: np.ndarray, obs: np.ndarray, avail: np.ndarray, *, episode_id: int,
                  prev_done: bool) -> np.ndarray:
        """Actions for units (g_idx[i], a_idx[i]); each one's previous step gets its reward and `prev_done`."""
        nonlocal next_id
        actions = np.empty(g_idx.size, dtype=np.int64)
        if rpc == "batch":
            frames, rows = [], []
            for g in np.unique(g_idx):
                sel = np.flatnonzero(g_idx == g)
                units = a_idx[sel]
                prev = waiting[g, units].any()
                next_id += 1
                frames.append(batch_request(
                    obs[g, units], avail[g, units], units, greedy=greedy, game_id=game_ids[g], episode_id=episode_id,
                    spec_hash=sc.spec_hash, request_id=next_id,
                    prev_rewards=last_reward[g, units] if prev else None,
                    prev_dones=np.full(len(units), prev_done, np.uint8) if prev else None))
                rows.append(sel)
            for sel, acts in zip(rows, await _ask_batch(client, frames, result)):
                actions[sel] = acts
            result.requests += len(frames)
        else:
            requests = []
            for g, a in zip(g_idx.tolist(), a_idx.tolist()):
                next_id += 1
                fields = dict(prev_reward=float(last_reward[g, a]), prev_done=prev_done) if waiting[g, a] else {}
                requests.append(act_request(obs[g, a], avail[g, a], a, greedy=greedy, game_id=game_ids[g],
                                            episode_id=episode_id, spec_hash=sc.spec_hash, request_id=next_id,
                                            **fields))
            if rpc == "unary":
                actions[:] = await _ask_unary(client, requests, result)
            else:
                actions[:] = await _ask_stream(stream, requests, result)
            result.requests += len(requests)
        waiting[g_idx, a_idx] = True
        return actions

    try:
        while counting.any():
            obs, avail, alive = out.obs.numpy(), out.avail.numpy(), out.alive.numpy()
            actions = avail.argmax(2).astype(np.int64)  # local legal action: no-op for the dead, filler for done games
            asked = alive & counting[:, None]
            g_idx, a_idx = np.nonzero(asked)
            if g_idx.size:
                t0 = time.perf_counter()
                actions[g_idx, a_idx] = await ask(g_idx, a_idx, obs, avail, episode_id=0, prev_done=False)
                result.service_seconds += time.perf_counter() - t0
                result.units += int(g_idx.size)
            if record_actions:
                result.actions.append(np.where(counting[:, None], actions, -1))
            out = sim.step(actions)
            last_reward[asked] = np.broadcast_to(out.reward.numpy()[:, None], asked.shape)[asked]
            done = out.done.numpy() & counting
            for g in np.flatnonzero(done):
                result.episodes += 1
                result.wins += int(out.won[g])
                result.returns.append(float(out.episode_return[g]))
            counting &= ~done
            closing = done[:, None] & waiting  # every unit of a finished game: its trajectory ended
            if closing.any():
                t0 = time.perf_counter()
                g_idx, a_idx = np.nonzero(closing)
                await ask(g_idx, a_idx, out.obs.numpy(), out.avail.numpy(), episode_id=1, prev_done=True)
                result.service_seconds += time.perf_counter() - t0
    finally:
        if stream is not None:
            if counting.any():  # stopped by an error: abandon the stream
                stream.call.cancel()
            else:
                await stream.close()
    return result


async def play_in_game(client: AsyncClient, scenario: Scenario, battle, *, episodes: int, seed: int = 0,
                       rpc: str = "stream", greedy: bool = True) -> PlayResult:
    """Play `episodes` episodes of one real game (an SC2Battle, auto-resetting), one after another, each as
    `play_games` plays one game: the service answers every live unit, and its experience log (if on) gets the
    game's trajectories. The summary's `games` counts the episodes."""
    total = PlayResult(scenario.name, episodes, seed, rpc, greedy)
    for episode in range(episodes):
        total.add(await play_games(client, scenario, games=1, seed=seed + episode, rpc=rpc, greedy=greedy,
                                   sim=battle))
    return total
