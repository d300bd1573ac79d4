"""The forward worker process (service/forward_process.py): same answers as the policy, versions, a dying worker."""

from __future__ import annotations

import asyncio
import os
import signal
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch

from service.forward_process import ProcessForward, _Child
from service.validation import RequestError
from trainer.policy import Policy
from trainer.sim import load_scenario


@pytest.fixture(scope="module")
def sc():
    return load_scenario("3m")


def _model(sc, version: int, seed: int):
    torch.manual_seed(seed)
    return SimpleNamespace(version=version, policy=Policy.for_scenario(sc, critic="local", hidden=16).eval())


def _rows(sc, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, sc.obs_size)).astype(np.float32)
    mask = rng.random((n, sc.n_actions)) < 0.5
    mask[:, 1] = True
    return obs, mask, np.arange(n, dtype=np.int64) % sc.n_agents


def _load_into(child: _Child, version: int, policy: Policy) -> None:
    """LOAD then POLL until the child has built it (bounded: 10 s)."""
    import json
    import struct
    import time

    from safetensors.torch import save as st_save

    config = json.dumps(policy.config).encode()
    assert child.load(version, struct.pack("<I", len(config)) + config + st_save(dict(policy.state_dict())))[:4] \
        == b"OKAY"
    deadline = time.monotonic() + 10
    while (answer := child.poll(version)[:4]) == b"WAIT" and time.monotonic() < deadline:
        time.sleep(0.002)
    assert answer == b"OKAY"


def _local(model, obs, mask, unit):
    out = model.policy.act(torch.from_numpy(obs), torch.from_numpy(mask), torch.from_numpy(unit), True)
    return out.action.numpy(), out.log_prob.numpy(), out.value.numpy()


def test_the_worker_answers_like_the_policy_follows_versions_and_replaces_itself_when_it_dies(sc):
    # version numbers are unbounded integers (say a timestamp-named directory), not 32-bit
    v1, v2 = _model(sc, 1, seed=1), _model(sc, 20250101120000, seed=2)
    obs, mask, unit = _rows(sc, 40)
    greedy = np.ones(40, dtype=bool)

    async def main():
        pf = ProcessForward()
        await pf.start()
        try:
            await pf.load(v1)
            first = await pf(v1, obs, mask, unit, greedy)
            second = await pf(v2, obs, mask, unit, greedy)  # never preloaded: loaded on first use
            again = await pf(v1, obs, mask, unit, greedy)  # both versions stay loaded across a swap
            sampled = await pf(v1, obs, mask, unit, np.zeros(40, dtype=bool))

            # the worker dies with a batch in flight: that batch fails UNAVAILABLE, the next gets a new worker
            pid = pf.proc.pid
            os.kill(pid, signal.SIGSTOP)
            in_flight = asyncio.create_task(pf(v1, obs, mask, unit, greedy))
            await asyncio.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(RequestError) as died:
                await in_flight
            after = await pf(v1, obs, mask, unit, greedy)
            return first, second, again, sampled, died.value, after, pf.restarts, pf.proc.pid != pid
        finally:
            await pf.close()
            assert pf.proc is None

    first, second, again, sampled, died, after, restarts, new_pid = asyncio.run(main())
    for out, model in ((first, v1), (second, v2), (again, v1), (after, v1)):
        action, log_prob, value = _local(model, obs, mask, unit)
        assert out.version == model.version
        assert out.action.tolist() == action.tolist()
        assert np.allclose(out.log_prob, log_prob, atol=1e-5) and np.allclose(out.value, value, atol=1e-4)
        assert np.allclose(out.prob, np.exp(log_prob), atol=1e-5)
    assert first.action.tolist() != second.action.tolist()  # two different networks really answered
    assert mask[np.arange(40), sampled.action].all()
    assert died.code == grpc.StatusCode.UNAVAILABLE and "died" in died.message
    assert restarts == 1 and new_pid


def test_a_worker_that_stops_answering_is_replaced_and_its_batch_fails_unavailable(sc):
    """A child alive but stuck (here: stopped) used to hold every batch after it for good, while health said
    SERVING; now it gets reply_timeout, then is killed and the next batch starts a new one."""
    v1 = _model(sc, 1, seed=1)
    obs, mask, unit = _rows(sc, 8)
    greedy = np.ones(8, dtype=bool)

    async def main():
        pf = ProcessForward(reply_timeout=1.0)
        await pf.start()
        try:
            await pf.load(v1)
            pid = pf.proc.pid
            os.kill(pid, signal.SIGSTOP)
            with pytest.raises(RequestError) as stuck:
                await asyncio.wait_for(pf(v1, obs, mask, unit, greedy), 30)
            pf.reply_timeout = 30.0  # the new worker's start on a loaded machine is no hang
            after = await pf(v1, obs, mask, unit, greedy)
            return stuck.value, after, pf.restarts, pf.proc.pid != pid, _exited(pid)
        finally:
            await pf.close()

    stuck, after, restarts, new_pid, old_gone = asyncio.run(main())
    assert stuck.code == grpc.StatusCode.UNAVAILABLE and "did not answer within 1 s" in stuck.message
    assert after.action.tolist() == _local(v1, obs, mask, unit)[0].tolist()
    assert restarts == 1 and new_pid and old_gone


def test_a_load_that_loses_the_race_with_close_starts_no_new_worker(sc):
    """close() can take the worker between a load's first check and its first message (the model holder loads
    from its own thread while the server stops): the load found no worker and started a new one, which
    outlived the server."""
    v1 = _model(sc, 1, seed=1)

    async def main():
        pf = ProcessForward()
        await pf.start()
        loading = asyncio.create_task(pf.load(v1))
        closing = asyncio.create_task(pf.close())  # runs before the load's first exchange takes the lock
        await closing
        with pytest.raises(RuntimeError, match="shut down"):
            await loading
        return pf.proc

    assert asyncio.run(main()) is None


def _exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_child_refuses_malformed_runs_and_unknown_versions(sc):
    child = _Child(threads=1, seed=0)
    model = _model(sc, 3, seed=3)
    _load_into(child, 3, model.policy)
    obs, mask, unit = _rows(sc, 2)
    good = obs.tobytes() + mask.tobytes() + unit.tobytes() + np.ones(2, dtype=bool).tobytes()
    assert child.run(2, 3, good)[:4] == b"OUT_"
    with pytest.raises(ValueError, match="needs"):
        child.run(2, 3, good[:-1])
    with pytest.raises(KeyError, match="version 4 is not loaded"):
        child.run(2, 4, good)


def test_a_worker_that_cannot_start_is_a_clear_error_and_requests_get_unavailable(sc, monkeypatch):
    import sys

    from service.forward_process import WorkerStartError

    monkeypatch.setattr(ProcessForward, "_command", lambda self, fd: [sys.executable, "-c", "raise SystemExit(3)"])
    obs, mask, unit = _rows(sc, 2)

    async def main():
        pf = ProcessForward(start_timeout=30)
        with pytest.raises(WorkerStartError, match="did not start"):
            await pf.start()
        with pytest.raises(RequestError) as e:  # every batch tries a fresh worker, and says why it failed
            await pf(_model(sc, 1, seed=1), obs, mask, unit, np.ones(2, dtype=bool))
        await pf.close()
        return e.value

    error = asyncio.run(main())
    assert error.code == grpc.StatusCode.UNAVAILABLE and "did not start" in error.message


def test_a_rollback_to_an_older_version_keeps_it_loaded_on_both_sides(sc):
    # Serving 3, the operator removes 3 then 2: the holder preloads 2, then 1. The version just loaded must stay,
    # whatever its number, in the child and in the server's record of the child.
    models = {v: _model(sc, v, seed=v) for v in (1, 2, 3)}
    obs, mask, unit = _rows(sc, 6)
    greedy = np.ones(6, dtype=bool)

    async def main():
        pf = ProcessForward()
        await pf.start()
        try:
            for v in (1, 2, 3):
                await pf.load(models[v])
            answers, held = [], []
            for v in (3, 2, 1):  # serve 3, then roll back to 2, then to 1
                await pf.load(models[v])
                answers.append(await pf(models[v], obs, mask, unit, greedy))
                held.append(pf.loaded_versions)
            return answers, held, pf.restarts
        finally:
            await pf.close()

    answers, held, restarts = asyncio.run(main())
    assert [a.version for a in answers] == [3, 2, 1]
    for out, v in zip(answers, (3, 2, 1)):
        assert out.action.tolist() == _local(models[v], obs, mask, unit)[0].tolist()
    assert held == [[2, 3], [2, 3], [1, 2]] and restarts == 0


def test_the_child_keeps_the_most_recently_loaded_or_used_versions(sc):
    child = _Child(threads=1, seed=0)

    def load(version):
        _load_into(child, version, _model(sc, version, seed=version).policy)

    obs, mask, unit = _rows(sc, 1)
    run = obs.tobytes() + mask.tobytes() + unit.tobytes() + np.ones(1, dtype=bool).tobytes()
    for v in (1, 2, 3):
        load(v)
    load(1)  # a rollback: the oldest number is the newest load
    assert list(child.models) == [3, 1]
    child.run(1, 3, run)  # a use counts as recent too: 1 goes next
    load(2)
    assert list(child.models) == [3, 2]


def test_the_child_answers_runs_while_it_builds_the_next_version(sc, monkeypatch):
    """Building a version (its network, its serving graph) happens in a thread of the child: RUNs of the serving
    version are answered meanwhile (a hot reload used to stall every batch for the whole build: 0.24-0.31 s
    for a large independent army), POLL says WAIT until the build is done, and a failed build is reported."""
    import json
    import struct
    import threading

    from safetensors.torch import save as st_save

    child = _Child(threads=1, seed=0)
    _load_into(child, 1, _model(sc, 1, seed=1).policy)
    gate, real_graph = threading.Event(), Policy.serving_graph

    def slow_graph(self, *args, **kw):
        assert gate.wait(10)
        return real_graph(self, *args, **kw)

    monkeypatch.setattr(Policy, "serving_graph", slow_graph)
    policy = _model(sc, 2, seed=2).policy
    config = json.dumps(policy.config).encode()
    assert child.load(2, struct.pack("<I", len(config)) + config + st_save(dict(policy.state_dict())))[:4] == b"OKAY"
    obs, mask, unit = _rows(sc, 3)
    run = obs.tobytes() + mask.tobytes() + unit.tobytes() + np.ones(3, dtype=bool).tobytes()
    for _ in range(3):
        assert child.run(3, 1, run)[:4] == b"OUT_"
        assert child.poll(2)[:4] == b"WAIT"
    with pytest.raises(KeyError, match="version 2 is not loaded"):
        child.run(3, 2, run)
    gate.set()
    child.loading[2][0].join(10)
    assert child.poll(2)[:4] == b"OKAY" and list(child.models) == [1, 2]
    assert child.run(3, 2, run)[:4] == b"OUT_"

    bad = struct.pack("<I", len(config)) + config + b"not safetensors"
    child.load(3, bad)
    child.loading[3][0].join(10)
    with pytest.raises(Exception, match="(?i)safetensor|header|deserializ"):
        child.poll(3)
    assert 3 not in child.models and 3 not in child.loading
