"""End-to-end: served games play out exactly like local ones, and the real `phalanx serve` / `phalanx play`
commands run as subprocesses (startup, play, SIGTERM with calls in flight)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service.client import AsyncClient, Client
from service.play import play_games
from service.server import ServeConfig, start_server
from trainer.sim import BattleSim

ROOT = Path(__file__).resolve().parent.parent


def play_locally(policy, scenario, games: int, seed: int):
    """What `phalanx eval` does: every agent of every game through policy.act, greedy; first episodes counted.
    Returns (actions per step with -1 for games already finished, wins, returns)."""
    A = scenario.n_agents
    sim = BattleSim(scenario, games, seed=seed)
    out = sim.reset()
    counting = np.ones(games, dtype=bool)
    steps, wins, returns = [], 0, []
    while counting.any():
        act = policy.act(out.obs.reshape(-1, scenario.obs_size), out.avail.reshape(-1, scenario.n_actions),
                         torch.arange(A).repeat(games), torch.ones(games * A, dtype=torch.bool))
        actions = act.action.reshape(games, A)
        steps.append(np.where(counting[:, None], actions.numpy(), -1))
        out = sim.step(actions)
        done = out.done.numpy() & counting
        wins += int((out.won.numpy() & done).sum())
        returns += out.episode_return.numpy()[done].tolist()
        counting &= ~done
    return steps, wins, returns


@pytest.mark.parametrize("rpc", ["unary", "stream", "batch"])
def test_served_games_match_local_play_action_for_action(service_repo, rpc):
    root, scenario, policy = service_repo
    games, seed = 3, 11
    want_steps, want_wins, want_returns = play_locally(policy, scenario, games, seed)

    async def main():
        config = ServeConfig(models=root, name="m", port=0, poll_seconds=0)
        running = await start_server(config, CollectorRegistry())
        try:
            async with AsyncClient(running.address) as client:
                return await play_games(client, scenario, games=games, seed=seed, rpc=rpc, greedy=True,
                                        record_actions=True)
        finally:
            await running.stop(grace=0)

    result = asyncio.run(main())
    assert len(result.actions) == len(want_steps)
    for t, (got, want) in enumerate(zip(result.actions, want_steps)):
        assert np.array_equal(got, want), f"step {t}: served {got.tolist()} != local {want.tolist()}"
    assert result.episodes == games and result.wins == want_wins
    assert sorted(result.returns) == pytest.approx(sorted(want_returns))
    assert result.versions == {1}


def _start_serve(root: Path, *extra: str) -> tuple[subprocess.Popen, dict]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--models", str(root), "--name", "m",
                             "--port", "0", "--poll-seconds", "0", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"serve did not start: {proc.stderr.read()}")
    return proc, json.loads(line)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def test_serve_and_play_commands(service_repo):
    root, scenario, policy = service_repo
    _, want_wins, want_returns = play_locally(policy, scenario, 4, 3)
    proc, ready = _start_serve(root)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    workers = children.read_text().split() if children.exists() else None  # the forward worker (Linux only)
    try:
        assert ready["event"] == "listening" and ready["version"] == 1 and ready["address"].startswith("127.0.0.1:")
        play = subprocess.run([sys.executable, "-m", "service", "play", "--server", ready["address"], "--scenario", "3m",
                               "--games", "4", "--seed", "3", "--greedy", "--rpc", "batch"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert play.returncode == 0, play.stderr
        summary = json.loads(play.stdout.strip().splitlines()[-1])
    finally:
        proc.send_signal(signal.SIGTERM)
        code, out, err = _finish(proc)
    assert summary["episodes"] == 4 and summary["win_rate"] == want_wins / 4
    assert summary["mean_return"] == pytest.approx(float(np.mean(want_returns)))
    from trainer.ppo import evaluate  # what `phalanx eval` runs
    local = evaluate(policy, scenario, 4, 3, greedy=True)
    assert (summary["win_rate"], summary["episodes"]) == (local["win_rate"], local["episodes"])
    assert summary["mean_return"] == pytest.approx(local["mean_return"], abs=1e-5)
    assert summary["requests"] > 0 and summary["units_per_s"] > 0 and summary["p99_ms"] >= summary["p50_ms"] > 0
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["event"] == "stopped"
    assert "listening on 127.0.0.1:" in err and "serving m version 1" in err
    if workers is not None:
        assert len(workers) == 1, workers
        assert not Path(f"/proc/{workers[0]}").exists(), "the forward worker process outlived the server"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the forward worker through /proc (Linux)")
def test_sigterm_while_starting_stops_the_start_and_its_worker(service_repo):
    """`docker stop` while the service loads its model: the start used to go on (as a container's PID 1, which
    gets no default action for SIGTERM, it then served anyway), or the process died at once and left its
    forward worker behind. Now the start is stopped, cleaned up, and the command says so."""
    root, _, _ = service_repo
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--models", str(root), "--name", "m",
                             "--port", "0", "--poll-seconds", "0"], cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    workers: list[str] = []
    for _ in range(600):  # the worker is spawned once the signal handlers are in place (bounded: 60 s)
        workers = children.read_text().split() if children.exists() else []
        if workers or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert workers, "serve never started its forward worker"
    proc.send_signal(signal.SIGTERM)  # the worker is still importing torch: the start is far from done
    code, out, err = _finish(proc)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["event"] == "stopped" and summary["stopped_while_starting"], out
    for _ in range(100):  # the worker is reaped by the server's cleanup (bounded: 10 s)
        if not Path(f"/proc/{workers[0]}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{workers[0]}").exists(), "the forward worker outlived the stopped start"


def test_sigterm_finishes_calls_in_flight(service_repo):
    root, scenario, _ = service_repo
    sim = BattleSim(scenario, 1, seed=0)
    out = sim.reset()
    obs, mask = out.obs[0].numpy(), out.avail[0].numpy()
    # Concurrent callers wait up to 60 s for their batch to fill (a lone caller is answered at once), so
    # once two calls overlap they stay queued until the drain flushes them.
    proc, ready = _start_serve(root, "--max-queue-delay-ms", "60000", "--metrics-port", "0", "--grace-seconds", "30")
    answers, errors, threads = [], [], []

    def call(unit):
        try:
            with Client(ready["address"], timeout=60, retries=0) as c:
                answers.append(c.act(obs[unit], mask[unit], unit))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    def queue_depth() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{ready['metrics_port']}/metrics", timeout=10).read().decode()
        return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "phalanx_queue_depth_units")

    try:
        depth = 0.0
        for _ in range(20):  # bounded: rounds of 4 simultaneous callers until some are held in the queue
            new = [threading.Thread(target=call, args=(u % 3,)) for u in range(4)]
            threads += new
            for t in new:
                t.start()
            for _ in range(20):
                depth = queue_depth()
                if depth >= 2:
                    break
                time.sleep(0.05)
            if depth >= 2:
                break
        assert depth >= 2
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
    finally:
        code, stdout, stderr = _finish(proc)
    assert not errors and len(answers) == len(threads) and all(a.model_version == 1 for a in answers)
    assert code == 0, stderr
    assert "draining" in stderr or "finishing those in flight" in stderr
    assert json.loads(stdout.strip().splitlines()[-1])["event"] == "stopped"
