"""`phalanx play`: drive built-in-simulator games with actions asked from a running service.

N games run at once in one BattleSim(scenario, N, seed) (game i plays with seed + i), exactly as
`phalanx eval` runs them; each game's first episode is counted. Every step, every live unit of a game
whose first episode is still running is sent to the service (dead units play no-op locally; games that
already finished keep stepping with a local legal action so the batch stays in lock-step, and are not
counted). With the same model, seeds and greedy actions the games play out as `phalanx eval` plays them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

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
        for req in requests:
            await stream.send(req)
            sent[req.request_id] = time.perf_counter()

    writer = asyncio.create_task(write_all())
    actions = []
    for req in requests:
        resp = await stream.recv()
        if resp.request_id != req.request_id:
            raise RuntimeError(f"stream answered request {resp.request_id} where {req.request_id} was due")
        result.latencies.append(time.perf_counter() - sent.get(req.request_id, t0))
        result.versions.add(resp.model_version)
        actions.append(resp.action)
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
                     greedy: bool = True, record_actions: bool = False) -> PlayResult:
    """Play `games` games' first episodes against the service; returns the counts, latencies (and actions)."""
    if rpc not in RPC_STYLES:
        raise ValueError(f"rpc must be one of {', '.join(RPC_STYLES)}, got {rpc!r}")
    sc = scenario
    A = sc.n_agents
    sim = BattleSim(sc, games, seed=seed)
    out = sim.reset()
    result = PlayResult(sc.name, games, seed, rpc, greedy)
    counting = np.ones(games, dtype=bool)  # game still in its first episode
    prev_reward = np.zeros(games, dtype=np.float32)
    started = np.zeros(games, dtype=bool)  # a previous step exists (prev_reward/done are meaningful)
    stream = client.stream() if rpc == "stream" else None
    next_id = 0
    try:
        while counting.any():
            obs, avail, alive = out.obs.numpy(), out.avail.numpy(), out.alive.numpy()
            actions = avail.argmax(2).astype(np.int64)  # local legal action: no-op for the dead, filler for done games
            ask = alive & counting[:, None]
            g_idx, a_idx = np.nonzero(ask)
            if g_idx.size:
                t0 = time.perf_counter()
                if rpc == "batch":
                    frames, games_asked = [], []
                    for g in np.unique(g_idx):
                        units = np.flatnonzero(ask[g])
                        next_id += 1
                        frames.append(batch_request(
                            obs[g, units], avail[g, units], units, greedy=greedy, game_id=f"game-{seed + g}",
                            spec_hash=sc.spec_hash, request_id=next_id,
                            prev_rewards=np.full(len(units), prev_reward[g], np.float32) if started[g] else None,
                            prev_dones=np.zeros(len(units), np.uint8) if started[g] else None))
                        games_asked.append((g, units))
                    answers = await _ask_batch(client, frames, result)
                    for (g, units), acts in zip(games_asked, answers):
                        actions[g, units] = acts
                    result.requests += len(frames)
                else:
                    requests = []
                    for g, a in zip(g_idx.tolist(), a_idx.tolist()):
                        next_id += 1
                        fields = dict(prev_reward=float(prev_reward[g]), prev_done=False) if started[g] else {}
                        requests.append(act_request(obs[g, a], avail[g, a], a, greedy=greedy, game_id=f"game-{seed + g}",
                                                    spec_hash=sc.spec_hash, request_id=next_id, **fields))
                    if rpc == "unary":
                        answers = await _ask_unary(client, requests, result)
                    else:
                        answers = await _ask_stream(stream, requests, result)
                    actions[g_idx, a_idx] = answers
                    result.requests += len(requests)
                result.service_seconds += time.perf_counter() - t0
                result.units += int(g_idx.size)
            if record_actions:
                result.actions.append(np.where(counting[:, None], actions, -1))
            out = sim.step(actions)
            done = out.done.numpy() & counting
            prev_reward = out.reward.numpy().copy()
            started[:] = True
            for g in np.flatnonzero(done):
                result.episodes += 1
                result.wins += int(out.won[g])
                result.returns.append(float(out.episode_return[g]))
            counting &= ~done
    finally:
        if stream is not None:
            if counting.any():  # stopped by an error: abandon the stream
                stream.call.cancel()
            else:
                await stream.close()
    return result
