"""In-process gRPC tests of the inference service on 127.0.0.1 (ephemeral ports), with a real Policy.

Each test runs its own event loop (asyncio.run) holding both the server and its clients. Waits are bounded
in count and time; nothing asserts on how long something took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service._gen.phalanx.v1 import inference_pb2 as pb
from service._gen.phalanx.v1 import inference_pb2_grpc as pb_grpc
from service.client import AsyncClient, Client, StreamError, act_request, batch_request
from service.server import ServeConfig, start_server
from trainer.policy import Policy
from trainer.repository import ModelRepository
from trainer.sim import BattleSim, load_scenario


@contextlib.asynccontextmanager
async def serving(root, **overrides):
    settings = dict(models=root, name="m", port=0, poll_seconds=0.0, grace_seconds=5.0)
    settings.update(overrides)
    running = await start_server(ServeConfig(**settings), CollectorRegistry())
    child = None if running.process is None else running.process.proc
    try:
        yield running
    finally:
        await running.stop(grace=0)
        assert child is None or child.poll() is not None, "the forward worker process outlived the server"


async def wait_until(predicate, what: str, tries: int = 500, step: float = 0.01):
    """Poll `predicate` at most `tries` times (bounded: tries * step seconds)."""
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"gave up waiting for {what}")


def sim_inputs(scenario, games=4, seed=0, steps=3):
    """Real observations and masks from a few steps of the simulator: (obs (R, O), mask (R, N), unit (R,))."""
    sim = BattleSim(scenario, games, seed=seed)
    out = sim.reset()
    rows = []
    for _ in range(steps):
        rows.append((out.obs.reshape(-1, scenario.obs_size), out.avail.reshape(-1, scenario.n_actions),
                     torch.arange(scenario.n_agents).repeat(games)))
        out = sim.step(out.avail.float().argmax(2))
    obs, mask, unit = (torch.cat(x) for x in zip(*rows))
    return obs.numpy(), mask.numpy(), unit.numpy()


def local_greedy(policy, obs, mask, unit):
    out = policy.act(torch.from_numpy(obs), torch.from_numpy(mask), torch.from_numpy(unit).long(),
                     torch.ones(len(obs), dtype=torch.bool))
    return out.action.numpy(), out.log_prob.numpy(), out.value.numpy()


class Gate:
    """Wraps the batcher's forward so a test can hold a batch inside the forward pass."""

    def __init__(self, forward):
        self.forward = forward
        self.open = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []  # rows of each batch that entered the forward pass

    async def __call__(self, obs, mask, unit, greedy):
        self.batches.append(obs.shape[0])
        self.entered.set()
        await asyncio.to_thread(self.open.wait, 30)
        return await self.forward(obs, mask, unit, greedy)


def metric_samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# --- the three RPC styles, answers matched to requests ------------------------------------------------------

@pytest.mark.parametrize("worker", ("process", "thread"))
def test_act_actstream_actbatch_and_model_info_answer_like_the_local_policy(service_repo, worker):
    root, scenario, policy = service_repo
    obs, mask, unit = sim_inputs(scenario)
    want_action, want_logp, want_value = local_greedy(policy, obs, mask, unit)

    async def main():
        async with serving(root, forward_worker=worker) as running, AsyncClient(running.address) as client:
            info = await client.model_info()
            unary = [await client.act(obs[i], mask[i], int(unit[i]), greedy=True, request_id=i + 1)
                     for i in range(len(obs))]
            async with client.stream() as stream:
                streamed = await stream.act_many([act_request(obs[i], mask[i], int(unit[i]), greedy=True,
                                                              spec_hash=scenario.spec_hash, request_id=100 + i)
                                                  for i in range(len(obs))])
            frame = await client.act_batch(obs, mask, unit, greedy=True, spec_hash=scenario.spec_hash, request_id=7)
            return info, unary, streamed, frame

    info, unary, streamed, frame = asyncio.run(main())
    assert (info.name, info.version, info.spec_name, info.spec_hash) == ("m", 1, "3m", scenario.spec_hash)
    assert (info.obs_size, info.n_actions, info.n_agents, info.sharing) == (scenario.obs_size, scenario.n_actions,
                                                                             scenario.n_agents, "shared")
    assert [r.action for r in unary] == want_action.tolist()
    assert [r.request_id for r in unary] == list(range(1, len(obs) + 1))
    assert np.allclose([r.log_prob for r in unary], want_logp, atol=1e-5)
    assert np.allclose([r.probability for r in unary], np.exp(want_logp), atol=1e-5)
    assert np.allclose([r.value for r in unary], want_value, atol=1e-4)
    assert all(r.model_version == 1 for r in unary + streamed)
    assert [r.request_id for r in streamed] == [100 + i for i in range(len(obs))]
    assert [r.action for r in streamed] == want_action.tolist()
    assert frame.action.tolist() == want_action.tolist() and frame.model_version == 1 and frame.request_id == 7
    assert np.allclose(frame.log_prob, want_logp, atol=1e-5) and np.allclose(frame.value, want_value, atol=1e-4)


def test_many_concurrent_clients_each_get_their_own_answers(service_repo):
    root, scenario, policy = service_repo
    obs, mask, unit = sim_inputs(scenario, games=8, steps=4)
    want = local_greedy(policy, obs, mask, unit)[0]
    n = len(obs)

    async def unary_client(client, offset):
        got = {}
        for j in range(n):
            i = (j + offset) % n
            r = await client.act(obs[i], mask[i], int(unit[i]), greedy=True, request_id=i + 1)
            got[r.request_id - 1] = r.action
        return got

    async def stream_client(client, offset):
        order = [(j + offset) % n for j in range(n)]
        async with client.stream() as s:
            answers = await s.act_many([act_request(obs[i], mask[i], int(unit[i]), greedy=True, request_id=i + 1)
                                        for i in order])
        assert [a.request_id - 1 for a in answers] == order  # in the order of that stream's requests
        return {a.request_id - 1: a.action for a in answers}

    async def batch_client(client, offset):
        idx = np.roll(np.arange(n), offset)[:20]
        r = await client.act_batch(obs[idx], mask[idx], unit[idx], greedy=True)
        return dict(zip(idx.tolist(), r.action.tolist()))

    async def main():
        async with serving(root, max_batch_size=32) as running, AsyncClient(running.address) as client:
            jobs = [unary_client(client, k * 7) for k in range(8)] + [stream_client(client, k * 5) for k in range(8)]
            jobs += [batch_client(client, k * 3) for k in range(8)]
            results = await asyncio.gather(*jobs)
            sizes = running.metrics.batch_size.collect()[0].samples
            return results, sizes

    results, sizes = asyncio.run(main())
    for got in results:
        assert got == {i: int(want[i]) for i in got}
    count = next(s.value for s in sizes if s.name.endswith("_count"))
    total = next(s.value for s in sizes if s.name.endswith("_sum"))
    assert total == 16 * n + 8 * 20  # every unit went through exactly one forward pass
    assert count < 16 * n + 8  # and requests shared forward passes


def test_a_burst_of_unary_calls_is_answered_not_cancelled(service_repo):
    """`phalanx play --rpc unary --games 1024` sends 3,000 Act calls at once on one connection. gRPC's server keeps
    calls it has not handed to the handlers in a queue that, by default, cancels some beyond 1,000 and all beyond
    3,000: the client saw CANCELLED (not retried, blamed on the server going away) from a healthy server."""
    root, scenario, _ = service_repo
    obs, mask, unit = sim_inputs(scenario, games=1, steps=1)
    calls = 3000

    async def main():
        async with serving(root) as running, AsyncClient(running.address, retries=0) as client:
            answers = await asyncio.gather(*(client.act(obs[0], mask[0], int(unit[0])) for _ in range(calls)),
                                           return_exceptions=True)
            return [a for a in answers if isinstance(a, BaseException)]

    failed = asyncio.run(main())
    assert not failed, f"{len(failed)} of {calls} calls failed, the first: {failed[0]!r}"


def test_act_many_reads_every_answer_past_a_bad_request_so_the_stream_stays_in_step(service_repo):
    """act_many used to raise at the first bad answer and leave the rest unread: the next recv() handed back an
    answer meant for an earlier request (one unit's action given to another), with no error."""
    root, scenario, _ = service_repo
    obs, mask, unit = sim_inputs(scenario, games=1, steps=1)
    o, m = obs[0], mask[0]

    def three():  # good, bad (a short observation), good
        return [act_request(o, m, 0, greedy=True), act_request(o[:-1], m, 1), act_request(o, m, 2, greedy=True)]

    def outcome(e):
        return [(type(a).__name__, a.request_id) for a in e.answers]

    def sync_use(address):
        with Client(address) as c:
            for answer_timeout in (None, 10):  # read on this thread, or by the reader thread
                with c.stream(answer_timeout=answer_timeout) as s:
                    with pytest.raises(StreamError) as e:
                        s.act_many(three())
                    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.request_id == 2
                    assert outcome(e.value) == [("ActResponse", 1), ("StreamError", 2), ("ActResponse", 3)]
                    rid = s.send(act_request(o, m, 0, greedy=True))
                    assert s.recv().request_id == rid == 4

    async def main():
        async with serving(root) as running, AsyncClient(running.address) as client:
            async with client.stream() as s:
                with pytest.raises(StreamError) as e:
                    await s.act_many(three())
                assert e.value.request_id == 2
                assert outcome(e.value) == [("ActResponse", 1), ("StreamError", 2), ("ActResponse", 3)]
                rid = await s.send(act_request(o, m, 0, greedy=True))
                assert (await s.recv()).request_id == rid == 4
                assert [a.request_id for a in await s.act_many(three()[::2])] == [5, 6]
            await asyncio.to_thread(sync_use, running.address)

    asyncio.run(main())


def test_sync_client_in_a_thread(service_repo):
    root, scenario, policy = service_repo
    obs, mask, unit = sim_inputs(scenario, games=2, steps=1)

    def use(address):
        with Client(address) as c:
            one = c.act(obs[0], mask[0], int(unit[0]), greedy=True)
            frame = c.act_batch(obs, mask, unit, greedy=True)
            with c.stream() as s:
                streamed = s.act_many(act_request(obs[i], mask[i], int(unit[i]), greedy=True) for i in range(len(obs)))
            with c.stream(answer_timeout=10) as s:  # the same through the reader thread that bounds each wait
                bounded = s.act_many(act_request(obs[i], mask[i], int(unit[i]), greedy=True) for i in range(len(obs)))
                s.close()  # and closed twice (here, then on leaving the block) without hanging
            assert [r.action for r in bounded] == [r.action for r in streamed]
            with pytest.raises(ValueError, match="answer_timeout must be > 0"):
                c.stream(answer_timeout=0)
            return one, frame, streamed, c.model_info()

    async def main():
        async with serving(root) as running:
            return await asyncio.to_thread(use, running.address)

    one, frame, streamed, info = asyncio.run(main())
    want = local_greedy(policy, obs, mask, unit)[0]
    assert one.action == want[0] and frame.action.tolist() == want.tolist()
    assert [r.action for r in streamed] == want.tolist() and [r.request_id for r in streamed] == list(range(1, len(obs) + 1))
    assert info.version == 1


# --- bad input -----------------------------------------------------------------------------------------------

BAD_ACTS = {
    "short observation": (lambda o, m: (o[:-1], m, 0, ""), grpc.StatusCode.INVALID_ARGUMENT, "observation: expected"),
    "nan": (lambda o, m: (np.r_[o[:-1], np.nan], m, 0, ""), grpc.StatusCode.INVALID_ARGUMENT, "finite, got nan"),
    "inf": (lambda o, m: (np.r_[np.inf, o[1:]], m, 0, ""), grpc.StatusCode.INVALID_ARGUMENT, "finite, got inf"),
    "no legal action": (lambda o, m: (o, np.zeros_like(m), 0, ""), grpc.StatusCode.INVALID_ARGUMENT, "action_mask"),
    "long mask": (lambda o, m: (o, np.r_[m, True], 0, ""), grpc.StatusCode.INVALID_ARGUMENT, "action_mask: expected"),
    "unit out of range": (lambda o, m: (o, m, 3, ""), grpc.StatusCode.INVALID_ARGUMENT, "unit_id: expected 0..2"),
    "spec mismatch": (lambda o, m: (o, m, 0, "0123456789abcdef"), grpc.StatusCode.FAILED_PRECONDITION, "spec_hash"),
}


def test_every_bad_input_is_refused_with_its_field_and_one_bad_request_fails_nothing_else(service_repo):
    root, scenario, policy = service_repo
    obs, mask, unit = sim_inputs(scenario, games=1, steps=1)
    o, m = obs[0], mask[0]

    async def main():
        async with serving(root) as running, AsyncClient(running.address) as client:
            unary = {}
            for name, (make, _, _) in BAD_ACTS.items():
                bo, bm, bu, bh = make(o, m)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await client.act(bo, bm, bu, spec_hash=bh)
                unary[name] = (e.value.code(), e.value.details())
            # a stream keeps going past bad requests: good, bad..., good, each answered in order
            requests = [act_request(o, m, 0, greedy=True)]
            requests += [act_request(*make(o, m)[:3], spec_hash=make(o, m)[3]) for make, _, _ in BAD_ACTS.values()]
            requests += [act_request(o, m, 1, greedy=True)]
            async with client.stream() as s:
                for r in requests:
                    await s.send(r)
                streamed = []
                for _ in requests:
                    try:
                        streamed.append(await s.recv())
                    except StreamError as e:
                        streamed.append(e)
            bad_frame = batch_request(obs, mask, np.array([0, 1, 5]))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.act_batch_request(bad_frame)
            frame_error = (e.value.code(), e.value.details())
            counts = running.metrics.requests
            return unary, streamed, frame_error, counts

    unary, streamed, frame_error, counts = asyncio.run(main())
    for name, (_, code, words) in BAD_ACTS.items():
        assert unary[name][0] == code and words in unary[name][1], name
    assert isinstance(streamed[0], pb.ActResponse) and isinstance(streamed[-1], pb.ActResponse)
    for got, (_, code, words) in zip(streamed[1:-1], BAD_ACTS.values()):
        assert isinstance(got, StreamError) and got.code == code and words in got.message
    assert frame_error[0] == grpc.StatusCode.INVALID_ARGUMENT and "unit_ids" in frame_error[1] and "row 2" in frame_error[1]
    assert counts.labels("Act", "INVALID_ARGUMENT")._value.get() == 6
    assert counts.labels("Act", "FAILED_PRECONDITION")._value.get() == 1
    assert counts.labels("ActStream", "OK")._value.get() == 2


@pytest.mark.parametrize("worker", ("process", "thread"))
def test_an_observation_too_large_for_the_network_fails_alone_in_its_batch(service_repo, tmp_path, worker):
    # Finite, so validation lets it through, but the network overflows on it (NaN log-probs): sampling it used
    # to raise in torch.multinomial and fail every request of the batch with INTERNAL.
    import pyarrow.parquet as pq

    root, scenario, _ = service_repo
    obs, mask, unit = sim_inputs(scenario, games=1, steps=1)
    huge = np.full_like(obs[0], 3e38)
    experience = tmp_path / "exp"

    async def main():
        async with serving(root, forward_worker=worker, experience_dir=experience) as running, \
                AsyncClient(running.address, retries=0) as client:
            gate = Gate(running.batcher.forward)  # hold one batch so that the next four meet in one
            running.batcher.forward = gate
            held = asyncio.create_task(client.act(obs[0], mask[0], 0, greedy=True, game_id="g"))
            await asyncio.to_thread(gate.entered.wait, 10)
            calls = [client.act(obs[1], mask[1], 1, greedy=False, game_id="g"),
                     client.act(huge, mask[2], 2, greedy=False, game_id="g"),
                     client.act(huge, mask[0], 0, greedy=True, game_id="h"),
                     client.act_batch(np.stack([obs[2], huge]), mask[[2, 0]], np.array([2, 0]), game_id="f")]
            answers = asyncio.gather(*calls, return_exceptions=True)
            await wait_until(lambda: running.batcher.queued_rows == 5, "the four calls to queue")
            gate.open.set()
            answers = await answers
            await held
            return answers, gate.batches

    answers, batches = asyncio.run(main())
    assert batches == [1, 5]  # the good and the bad rows shared one forward pass
    good, *bad = answers
    assert isinstance(good, pb.ActResponse) and mask[1][good.action] and np.isfinite(good.log_prob)
    for error, where in zip(bad, ("observation:", "observation:", "observations: row 1")):
        assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert where in error.details() and "too large for the network" in error.details(), error.details()
    rows = pq.read_table(sorted(experience.glob("*.parquet"))).to_pylist()  # only the two good unit-steps
    assert sorted(r["unit_id"] for r in rows) == [0, 1] and {r["game_id"] for r in rows} == {"g"}
    assert all(np.isfinite(r["log_prob"]) and np.isfinite(r["value"]) and np.isfinite(r["obs"]).all() for r in rows)


# --- back-pressure and deadlines --------------------------------------------------------------------------------

def test_full_queue_sheds_at_once_and_the_queued_calls_still_finish(service_repo):
    root, scenario, _ = service_repo
    obs, mask, unit = sim_inputs(scenario, games=2, steps=1)

    async def main():
        async with serving(root, max_batch_size=2, max_queue=4) as running, \
                AsyncClient(running.address, retries=0) as client:
            gate = Gate(running.batcher.forward)
            running.batcher.forward = gate
            first = asyncio.create_task(client.act(obs[0], mask[0], 0))
            await asyncio.to_thread(gate.entered.wait, 10)  # the first call is inside the forward pass
            queued = [asyncio.create_task(client.act(obs[i], mask[i], int(unit[i]))) for i in range(4)]
            await wait_until(lambda: running.batcher.queued_rows == 4, "4 queued units")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.act(obs[0], mask[0], 0)
            gate.open.set()
            answers = await asyncio.gather(first, *queued)
            return e.value, answers, running.metrics.shed.labels("queue_full")._value.get()

    shed, answers, shed_count = asyncio.run(main())
    assert shed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in shed.details()
    assert len(answers) == 5 and all(a.model_version == 1 for a in answers)
    assert shed_count == 1


def test_requests_past_their_deadline_are_dropped_before_the_forward_pass(service_repo):
    root, scenario, _ = service_repo
    obs, mask, _ = sim_inputs(scenario, games=1, steps=1)

    async def main():
        async with serving(root) as running, AsyncClient(running.address, retries=0) as client:
            gate = Gate(running.batcher.forward)
            running.batcher.forward = gate
            first = asyncio.create_task(client.act(obs[0], mask[0], 0))
            await asyncio.to_thread(gate.entered.wait, 10)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.act(obs[1], mask[1], 1, timeout=0.2)
            gate.open.set()
            await first
            shed = running.metrics.shed.labels("deadline")
            await wait_until(lambda: shed._value.get() == 1, "the expired request to be dropped")
            return e.value.code(), gate.batches

    code, batches = asyncio.run(main())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert batches == [1]  # only the first request reached the model


def test_calls_ended_by_their_deadline_or_by_the_client_are_counted(service_repo):
    root, scenario, _ = service_repo
    obs, mask, unit = sim_inputs(scenario, games=1, steps=1)

    async def main():
        async with serving(root) as running, AsyncClient(running.address, retries=0) as client:
            gate = Gate(running.batcher.forward)
            running.batcher.forward = gate
            # one call whose batch is in the forward pass when its deadline passes, and, queued behind it:
            computing = asyncio.create_task(client.act(obs[0], mask[0], 0, timeout=2.0))
            await asyncio.to_thread(gate.entered.wait, 10)
            queued = [asyncio.create_task(client.act(obs[1], mask[1], 1, timeout=2.0)),
                      asyncio.create_task(client.act_batch(obs[:2], mask[:2], unit[:2], timeout=2.0))]
            abandoned = asyncio.create_task(client.act(obs[2], mask[2], 2, timeout=60.0))
            stream = client.stream(timeout=2.0)
            await stream.send(act_request(obs[0], mask[0], 0))
            await wait_until(lambda: running.batcher.queued_rows == 5, "four calls to queue")
            abandoned.cancel()  # the client goes away long before its deadline
            ended = await asyncio.gather(computing, *queued, abandoned, stream.recv(), return_exceptions=True)
            gate.open.set()
            requests = running.metrics.requests
            counted = lambda: sum(requests.labels(rpc, code)._value.get() for rpc in ("Act", "ActBatch", "ActStream")
                                  for code in ("DEADLINE_EXCEEDED", "CANCELLED"))
            # (a loaded 2-core machine took over 5 s once: the wait is bounded, but generously)
            await wait_until(lambda: counted() == 5, "every ended call to be counted", tries=3000)
            return ended, metric_samples(generate_latest(running.metrics.registry).decode())

    ended, samples = asyncio.run(main())
    assert [e.code() for e in ended[:3]] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
    assert isinstance(ended[3], asyncio.CancelledError) and ended[4].code() == grpc.StatusCode.DEADLINE_EXCEEDED
    counts = {(dict(labels)["rpc"], dict(labels)["code"]): value for (name, labels), value in samples.items()
              if name == "phalanx_requests_total" and value}
    assert counts == {("Act", "DEADLINE_EXCEEDED"): 2, ("Act", "CANCELLED"): 1, ("ActBatch", "DEADLINE_EXCEEDED"): 1,
                      ("ActStream", "DEADLINE_EXCEEDED"): 1}
    latencies = {dict(labels)["rpc"]: value for (name, labels), value in samples.items()
                 if name == "phalanx_request_latency_seconds_count"}
    assert (latencies["Act"], latencies["ActBatch"], latencies["ActStream"]) == (3, 1, 1)


# --- model holder: hot reload, refusals, no model ------------------------------------------------------------------

def test_hot_reload_picks_up_a_new_version_and_refuses_corrupt_and_incompatible_ones(service_repo):
    root, scenario, _ = service_repo
    repo = ModelRepository(root)
    obs, mask, _ = sim_inputs(scenario, games=1, steps=1)

    async def version_answering(client):
        return (await client.act(obs[0], mask[0], 0)).model_version

    async def main():
        async with serving(root, poll_seconds=0.02) as running, AsyncClient(running.address) as client:
            seen = [await version_answering(client)]
            torch.manual_seed(5)
            repo.save("m", Policy.for_scenario(scenario, critic="local"), scenario=scenario, step=10, eval_win_rate=0.5)
            await wait_until(lambda: running.holder.current.version == 2, "version 2 to be served")
            preloaded = running.process.loaded_versions  # loaded into the worker before the swap, off the request path
            seen.append(await version_answering(client))
            # version 3: weights file garbage; version 4: a model for another scenario
            bad = root / "m" / "3"
            bad.mkdir()
            (bad / "card.json").write_text((root / "m" / "2" / "card.json").read_text().replace('"version": 2', '"version": 3'))
            (bad / "weights.safetensors").write_bytes(b"not a safetensors file")
            await wait_until(lambda: 3 in running.holder.refused, "version 3 to be refused")
            other = load_scenario("8m")
            repo.save("m", Policy.for_scenario(other), scenario=other, step=0, eval_win_rate=None)
            await wait_until(lambda: 4 in running.holder.refused, "version 4 to be refused")
            seen.append(await version_answering(client))
            m = running.metrics
            return (seen, dict(running.holder.refused), m.reloads._value.get(), m.reload_failures._value.get(),
                    m.model_version._value.get(), (await client.model_info()).version, preloaded)

    seen, refused, reloads, failures, gauge, info_version, preloaded = asyncio.run(main())
    assert seen == [1, 2, 2] and preloaded == [1, 2]
    assert "weights" in refused[3] or "safetensors" in refused[3]
    assert "spec 8m" in refused[4] and "restart the service" in refused[4]
    assert (reloads, failures, gauge, info_version) == (1, 2, 2, 2)


def test_a_refused_version_is_tried_again_once_fixed_and_a_read_error_refuses_nothing(service_repo, monkeypatch):
    """Version 2 arrives with garbage weights (a copy that was not atomic) and is refused; once its files are
    fixed in place it is served without a restart. Version 3 first meets an I/O error (a network volume's
    hiccup): that is no verdict on the version, which is served at a later poll."""
    from trainer.repository import ModelUnreadable

    root, scenario, _ = service_repo
    repo = ModelRepository(root)
    obs, mask, _ = sim_inputs(scenario, games=1, steps=1)
    real_load, hiccups = ModelRepository.load, []

    def load(self, name, version=None):
        if version == 3 and not hiccups:
            hiccups.append(version)
            raise ModelUnreadable(f"{self.root}/{name}/3/weights.safetensors: cannot read weights: [Errno 5] "
                                  "Input/output error")
        return real_load(self, name, version)

    monkeypatch.setattr(ModelRepository, "load", load)

    async def main():
        async with serving(root, poll_seconds=0.02) as running, AsyncClient(running.address) as client:
            # an operator copies version 2 in by hand, not atomically: the service sees half the weights
            good = (root / "m" / "1" / "weights.safetensors").read_bytes()
            (root / "m" / "2").mkdir()
            weights = root / "m" / "2" / "weights.safetensors"
            weights.write_bytes(good[: len(good) // 2])
            (root / "m" / "2" / "card.json").write_text(
                (root / "m" / "1" / "card.json").read_text().replace('"version": 1', '"version": 2'))
            await wait_until(lambda: 2 in running.holder.refused, "version 2 to be refused")
            failures = running.metrics.reload_failures._value.get()
            await asyncio.sleep(0.1)  # polls skip it while its files are unchanged
            assert running.holder.current.version == 1 and running.metrics.reload_failures._value.get() == failures
            weights.write_bytes(good)
            await wait_until(lambda: running.holder.current.version == 2, "fixed version 2 to be served")
            repo.save("m", Policy.for_scenario(scenario, critic="local"), scenario=scenario, step=20,
                      eval_win_rate=0.5)
            await wait_until(lambda: running.holder.current.version == 3, "version 3 to be served after a hiccup")
            return (await client.act(obs[0], mask[0], 0)).model_version, dict(running.holder.refused)

    served, refused = asyncio.run(main())
    assert served == 3 and hiccups == [3] and refused == {}


def test_a_version_that_stays_unreadable_is_retried_ever_more_slowly(service_repo, monkeypatch):
    """A version this process cannot read (another user's 0600 file) is no verdict on it, but retrying it at every
    poll would log an error and count a reload failure every few seconds for ever: one failure is counted, and
    the retries back off (1 s, 2 s, 4 s, ... up to 5 minutes)."""
    import time as time_module

    from trainer.repository import ModelUnreadable

    root, scenario, _ = service_repo
    real_load, attempts = ModelRepository.load, []

    def load(self, name, version=None):
        if version == 2:
            attempts.append(time_module.monotonic())
            raise ModelUnreadable(f"{self.root}/{name}/2/weights.safetensors: cannot read weights: Permission denied")
        return real_load(self, name, version)

    monkeypatch.setattr(ModelRepository, "load", load)

    async def main():
        async with serving(root, poll_seconds=0.02) as running:
            torch.manual_seed(5)
            ModelRepository(root).save("m", Policy.for_scenario(scenario, critic="local"), scenario=scenario, step=1,
                                       eval_win_rate=None)
            await asyncio.sleep(3.5)
            return running.holder.current.version, running.metrics.reload_failures._value.get(), dict(
                running.holder.refused)

    served, failures, refused = asyncio.run(main())
    assert served == 1 and failures == 1 and refused == {}
    assert 2 <= len(attempts) <= 3, attempts  # at 0 s, 1 s, 3 s: not 175 polls' worth


def test_a_win_rate_bar_serves_only_versions_whose_evaluation_reached_it(service_repo):
    root, scenario, _ = service_repo  # version 1: no evaluation on its card
    repo = ModelRepository(root)
    obs, mask, _ = sim_inputs(scenario, games=1, steps=1)

    def publish(win_rate):
        return repo.save("m", Policy.for_scenario(scenario, critic="local"), scenario=scenario, step=1,
                         eval_win_rate=win_rate)

    async def main():
        # poll_seconds=0: no background polls, so each check below sees exactly the versions written before it
        async with serving(root, poll_seconds=0, min_eval_win_rate=0.6) as running, \
                AsyncClient(running.address, retries=0) as client:
            holder, served = running.holder, []
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.act(obs[0], mask[0], 0)
            waiting = (e.value.code(), e.value.details())
            publish(0.9), publish(0.3)  # 2 and 3 land between two checks: the newest is weak, 2 must win
            assert await asyncio.to_thread(holder.check_for_update)
            served.append((await client.act(obs[0], mask[0], 0)).model_version)
            publish(0.95), publish(0.2)  # the same while serving: 4 replaces 2
            assert await asyncio.to_thread(holder.check_for_update)
            served.append((await client.act(obs[0], mask[0], 0)).model_version)
            weak = publish(0.5)  # and its weights are never read: the card alone refuses it
            (Path(root) / "m" / str(weak) / "weights.safetensors").write_bytes(b"never read")
            assert not await asyncio.to_thread(holder.check_for_update)
            served.append((await client.act(obs[0], mask[0], 0)).model_version)
            m = running.metrics
            return waiting, served, dict(holder.refused), m.versions_below_bar._value.get(), m.reload_failures._value.get()

    waiting, served, refused, below, failures = asyncio.run(main())
    assert waiting[0] == grpc.StatusCode.UNAVAILABLE and "evaluation win rate >= 0.6" in waiting[1]
    assert served == [2, 4, 4]
    assert sorted(refused) == [1, 3, 5, 6] and "no evaluation" in refused[1] and "0.300" in refused[3]
    assert "0.500" in refused[6]
    assert (below, failures) == (4, 0)  # weak checkpoints are not reload failures
    with pytest.raises(ValueError, match="--min-eval-win-rate"):
        asyncio.run(start_server(ServeConfig(models=root, name="m", port=0, min_eval_win_rate=1.5), CollectorRegistry()))


def test_removing_the_served_version_rolls_back_and_its_number_is_never_reused(service_repo, capsys):
    from service.cli import main as phalanx

    root, scenario, _ = service_repo  # version 1
    repo = ModelRepository(root)
    obs, mask, _ = sim_inputs(scenario, games=1, steps=1)

    def publish():
        return repo.save("m", Policy.for_scenario(scenario, critic="local"), scenario=scenario, step=1,
                         eval_win_rate=0.5)

    async def main():
        async with serving(root, poll_seconds=0) as running, AsyncClient(running.address) as client:
            holder, served = running.holder, []
            bad = publish()
            assert await asyncio.to_thread(holder.check_for_update)
            served.append((await client.act(obs[0], mask[0], 0)).model_version)
            # the operator takes the bad version out, as the README says
            assert phalanx(["models", "--models", str(root), "--name", "m", "--remove", str(bad)]) == 0
            assert await asyncio.to_thread(holder.check_for_update)
            served.append((await client.act(obs[0], mask[0], 0)).model_version)
            assert not await asyncio.to_thread(holder.check_for_update)  # settled: nothing more to do
            fixed = publish()
            assert await asyncio.to_thread(holder.check_for_update)
            served.append((await client.act(obs[0], mask[0], 0)).model_version)
            return bad, fixed, served, running.metrics.reloads._value.get()

    bad, fixed, served, reloads = asyncio.run(main())
    assert (bad, fixed) == (2, 3)  # 2 was issued once; the next model gets a new number
    assert served == [2, 1, 3] and reloads == 3


@pytest.mark.parametrize("worker", ("process", "thread"))
def test_rolling_back_across_three_versions_still_answers(service_repo, worker):
    root, scenario, _ = service_repo  # version 1
    repo = ModelRepository(root)
    obs, mask, _ = sim_inputs(scenario, games=1, steps=1)
    for step in (1, 2):  # versions 2 and 3
        repo.save("m", Policy.for_scenario(scenario, critic="local"), scenario=scenario, step=step, eval_win_rate=None)

    async def main():
        async with serving(root, forward_worker=worker) as running, \
                AsyncClient(running.address, retries=0) as client:
            served = [(await client.act(obs[0], mask[0], 0)).model_version]
            for bad in (3, 2):  # the worker held 2 and 3; rolling back to 1 must not evict 1 as it loads
                shutil.rmtree(Path(root) / "m" / str(bad))
                assert await asyncio.to_thread(running.holder.check_for_update)
                served.append((await client.act(obs[0], mask[0], 0)).model_version)
            return served

    assert asyncio.run(main()) == [3, 2, 1]


def test_serve_refuses_a_taken_port_and_impossible_numbers_with_clear_errors(service_repo):
    root, _, _ = service_repo
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"could not listen on 127.0.0.1:{port}: the port is in use"):
            asyncio.run(start_server(ServeConfig(models=root, name="m", port=port), CollectorRegistry()))
    for fields, words in ((dict(port=99999), "--port must lie in 0..65535"),
                          (dict(port=0, metrics_port=70000), "--metrics-port must lie in 0..65535"),
                          (dict(port=0, version=0), "--version must be a positive integer")):
        with pytest.raises(ValueError, match=words):
            asyncio.run(start_server(ServeConfig(models=root, name="m", **fields), CollectorRegistry()))


def test_serve_and_play_refuse_bad_settings_in_one_line(service_repo, tmp_path, capsys):
    from service.cli import build_parser, main
    from service.server import serve

    root, scenario, _ = service_repo
    # no polling and nothing servable at start: it would answer UNAVAILABLE forever
    for fields in (dict(models=tmp_path / "empty"), dict(models=root, version=7)):
        with pytest.raises(ValueError, match=r"be served, and --poll-seconds 0 never looks again"):
            asyncio.run(serve(ServeConfig(name="m", port=0, poll_seconds=0, **fields), registry=CollectorRegistry()))
    # the commands print one line and exit 2
    assert main(["serve", "--models", str(root), "--name", "m", "--port", "0", "--torch-threads", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "phalanx serve: --torch-threads must be >= 0 (0: torch's default), got -1"
    for flag, value, message in (("--grace-seconds", "-1", "--grace-seconds must be >= 0, got -1.0"),
                                 ("--max-message-mb", "0", "--max-message-mb must lie in 1..2047, got 0"),
                                 ("--max-message-mb", "nan", "--max-message-mb must lie in 1..2047, got nan")):
        # a server that cannot answer a message, or drains for no time at all, was started all the same
        assert main(["serve", "--models", str(root), "--name", "m", "--port", "0", flag, value]) == 2
        assert capsys.readouterr().err.strip() == f"phalanx serve: {message}"
    (tmp_path / "afile").write_text("")  # a file can never hold versions: refused rather than waited on
    assert main(["serve", "--models", str(tmp_path / "afile"), "--name", "m", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == (f"phalanx serve: --models {tmp_path / 'afile'} is a file, not a model "
                                               "repository (a directory)")
    assert main(["play", "--server", "127.0.0.1:1", "--scenario", "3m", "--timeout", "0"]) == 2
    assert capsys.readouterr().err.strip() == "phalanx play: --timeout must be > 0 seconds, got 0.0"
    serve_flags = ["serve", "--models", str(root), "--name", "m", "--log-level"]
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(serve_flags + ["verbose"])
    assert e.value.code == 2 and "--log-level: invalid choice: 'VERBOSE'" in capsys.readouterr().err
    assert build_parser().parse_args(serve_flags + ["debug"]).log_level == "DEBUG"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"could not serve /metrics on 127.0.0.1:{port} .*: Address already in use"):
            asyncio.run(start_server(ServeConfig(models=root, name="m", port=0, metrics_port=port),
                                     CollectorRegistry()))
    # --torch-threads 0 means torch's default, as the trainer's --threads 0 does
    obs, mask, _ = sim_inputs(scenario, games=1, steps=1)

    async def answer_with_default_threads():
        async with serving(root, torch_threads=0) as running, AsyncClient(running.address, retries=0) as client:
            return (await client.act(obs[0], mask[0], 0)).model_version

    assert asyncio.run(answer_with_default_threads()) == 1


def test_pinned_version_is_served_even_when_newer_ones_exist(service_repo):
    root, scenario, _ = service_repo
    ModelRepository(root).save("m", Policy.for_scenario(scenario), scenario=scenario, step=1, eval_win_rate=None)

    async def main():
        async with serving(root, version=1, poll_seconds=0.02) as running, AsyncClient(running.address) as client:
            await asyncio.sleep(0.1)  # a few polls happen; none may move a pinned service
            return (await client.model_info()).version

    assert asyncio.run(main()) == 1


def test_health_follows_the_model_and_draining(service_repo, tmp_path):
    root, scenario, policy = service_repo
    empty = tmp_path / "empty"
    obs, mask, _ = sim_inputs(scenario, games=1, steps=1)

    async def main():
        statuses = []
        async with serving(empty, poll_seconds=0.02, grace_seconds=5.0) as running:
            channel = grpc.aio.insecure_channel(running.address)
            health = health_pb2_grpc.HealthStub(channel)
            check = lambda: health.Check(health_pb2.HealthCheckRequest(service="phalanx.v1.Inference"))  # noqa: E731
            statuses.append((await check()).status)
            async with AsyncClient(running.address, retries=0) as client:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await client.act(obs[0], mask[0], 0)
                unavailable = (e.value.code(), e.value.details())
                ModelRepository(empty).save("m", policy, scenario=scenario, step=0, eval_win_rate=None)
                await wait_until(lambda: running.holder.current is not None, "the first model")
                statuses.append((await check()).status)
                watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
                statuses.append((await watch.read()).status)
                gate = Gate(running.batcher.forward)
                running.batcher.forward = gate
                in_flight = asyncio.create_task(client.act(obs[0], mask[0], 0))
                await asyncio.to_thread(gate.entered.wait, 10)
                stopping = asyncio.create_task(running.stop(grace=10))
                statuses.append((await watch.read()).status)  # drained: NOT_SERVING pushed to watchers
                watch.cancel()  # an open Watch would hold the shutdown for the whole grace period
                gate.open.set()
                answer = await in_flight  # the call in flight finished during the grace period
                await stopping
            await channel.close()
        return statuses, unavailable, answer

    statuses, unavailable, answer = asyncio.run(main())
    S, N = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert statuses == [N, S, S, N]
    assert unavailable[0] == grpc.StatusCode.UNAVAILABLE and "no model loaded" in unavailable[1]
    assert answer.model_version == 1


def test_phalanx_health_exits_0_only_while_a_model_serves(service_repo, tmp_path, capsys):
    """The container's HEALTHCHECK: `phalanx health` is 0 with a warm model, 1 before one loads or with no
    server there, and prints the status as JSON."""
    from service.cli import main

    root, scenario, policy = service_repo
    empty = tmp_path / "empty"

    async def probe(address):
        code = await asyncio.to_thread(main, ["health", "--server", address, "--timeout", "2"])
        return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    async def run():
        async with serving(empty, poll_seconds=0.02) as running:
            before = await probe(running.address)
            ModelRepository(empty).save("m", policy, scenario=scenario, step=0, eval_win_rate=None)
            await wait_until(lambda: running.holder.current is not None, "the first model")
            for _ in range(50):  # health turns SERVING right after the swap, in the poll task
                after = await probe(running.address)
                if after[0] == 0:
                    break
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            closed = f"127.0.0.1:{s.getsockname()[1]}"
        return before, after, await probe(closed)

    before, after, nobody = asyncio.run(run())
    assert before == (1, {"server": before[1]["server"], "status": "NOT_SERVING"})
    assert after[0] == 0 and after[1]["status"] == "SERVING"
    assert nobody[0] == 1 and nobody[1]["status"] == "UNREACHABLE" and nobody[1]["code"] == "UNAVAILABLE"


@contextlib.contextmanager
def stand_in_server(servicer):
    """A plain gRPC server on 127.0.0.1 for a stand-in servicer; yields its port. On the way out it lets a held
    handler go (`servicer.release`, if any) and waits for every handler thread to end."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(4)
    server = grpc.server(pool)
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        if hasattr(servicer, "release"):
            servicer.release.set()
        server.stop(0).wait(10)
        pool.shutdown(wait=True)  # no handler thread outlives the test


class _MisbehavingStreams(pb_grpc.InferenceServicer):
    """A stand-in server for `phalanx play`: the right model info, then an ActStream that never answers,
    refuses every message, or ends unanswered (as a draining server ends it) once it has read the first step."""

    def __init__(self, scenario, mode: str):
        self.scenario, self.mode = scenario, mode
        self.release = threading.Event()  # lets a silent stream's handler thread go at the end of the test

    def GetModelInfo(self, request, context):
        sc = self.scenario
        return pb.ModelInfo(name="m", version=1, spec_name=sc.name, spec_hash=sc.spec_hash, obs_size=sc.obs_size,
                            n_actions=sc.n_actions, n_agents=sc.n_agents)

    def ActStream(self, request_iterator, context):
        if self.mode == "silent":
            self.release.wait(20)
        elif self.mode == "full":
            for request in request_iterator:
                yield pb.ActResponse(request_id=request.request_id, error=pb.Error(
                    code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="queue full: retry with back-off"))
        else:  # every unit's request of the first step read (so that no write races the stream's end), then end
            for _ in range(self.scenario.n_agents):
                next(request_iterator)


@pytest.mark.parametrize("mode, words", [
    ("silent", "DEADLINE_EXCEEDED: no answer within 0.5 s"),
    ("full", "RESOURCE_EXHAUSTED: queue full"),
    ("ends", "UNAVAILABLE: the server ended the stream"),
])
def test_play_over_a_stream_ends_with_one_line_when_the_server_fails_it(capsys, mode, words):
    from service.cli import main

    with stand_in_server(_MisbehavingStreams(load_scenario("3m"), mode)) as port:
        code = main(["play", "--server", f"127.0.0.1:{port}", "--scenario", "3m", "--games", "1", "--rpc", "stream",
                     "--timeout", "0.5"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"phalanx play: 127.0.0.1:{port}: {words}"), err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback


def test_streams_the_sync_client_abandons_leave_no_thread_behind(service_repo):
    """A stream left by an exception (or an answer_timeout) is cancelled; gRPC's thread that sends its requests
    used to wait for more of them for good, one thread lost per abandoned stream."""
    root, scenario, _ = service_repo
    obs, mask, _ = sim_inputs(scenario, games=1, steps=1)

    def abandon_streams(address: str) -> tuple[int, int]:
        with Client(address, retries=0) as client:
            with client.stream() as stream:  # one clean stream first: whatever gRPC starts once is running
                stream.act_many([act_request(obs[0], mask[0], 0)])
            before = threading.active_count()
            for _ in range(5):
                with contextlib.suppress(KeyError), client.stream() as stream:
                    stream.act_many([act_request(obs[0], mask[0], 0)])
                    raise KeyError("the caller's own error, inside the with block")
            for _ in range(100):  # a cancelled call's threads end within moments (bounded: 5 s)
                if threading.active_count() <= before:
                    break
                time.sleep(0.05)
            return before, threading.active_count()

    async def main():
        async with serving(root) as running:
            return await asyncio.to_thread(abandon_streams, running.address)

    before, after = asyncio.run(main())
    assert after <= before, f"{after - before} threads left by 5 abandoned streams"


def test_the_sync_client_stream_gives_up_on_an_answer_after_answer_timeout():
    """A stream whose server never answers: recv() raises DEADLINE_EXCEEDED after answer_timeout instead of
    blocking the game loop forever, and the stream is cancelled (a late answer would be taken for the next)."""
    scenario = load_scenario("3m")
    with stand_in_server(_MisbehavingStreams(scenario, "silent")) as port:
        with Client(f"127.0.0.1:{port}", retries=0) as client:
            stream = client.stream(answer_timeout=0.3)
            stream.send(act_request(np.zeros(scenario.obs_size, np.float32), np.ones(scenario.n_actions, bool), 0))
            started = time.perf_counter()
            with pytest.raises(StreamError) as raised:
                stream.recv()
            waited = time.perf_counter() - started
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "answer_timeout" in str(raised.value)
    assert 0.3 <= waited < 5


def test_phalanx_health_and_scenarios_do_not_load_torch():
    """The probe runs every few seconds beside the service: importing torch cost it over a second of CPU each
    time (1.6 s of 2.8 s wall here). It only needs grpc; the CLI must not pull in the trainer's heavy parts."""
    import sys

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"

    def fresh_cli(argv: list[str]) -> tuple[list[str], str]:
        """Run the CLI in a new interpreter: its output lines, and whether it loaded torch, with its exit code."""
        code = (f"import sys; from service.cli import main; rc = main({argv!r}); "
                "print('torch loaded' if 'torch' in sys.modules else 'no torch', rc)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        lines = out.stdout.strip().splitlines()
        return lines[:-1], (lines[-1] if lines else out.stderr)

    printed, verdict = fresh_cli(["health", "--server", closed, "--timeout", "2"])
    assert verdict == "no torch 1", (printed, verdict)
    assert json.loads(printed[0])["status"] == "UNREACHABLE"
    printed, verdict = fresh_cli(["scenarios", "--json"])  # nor does listing the scenarios
    assert verdict == "no torch 0", (printed, verdict)
    assert json.loads(printed[0])["name"]
    _, verdict = fresh_cli(["train", "--models", "m", "--name", "x", "--envs", "0"])  # nor refusing a bad flag
    assert verdict == "no torch 2", verdict


def test_graceful_shutdown_finishes_calls_in_flight_and_refuses_new_ones(service_repo):
    root, scenario, _ = service_repo
    obs, mask, unit = sim_inputs(scenario, games=2, steps=1)

    async def main():
        async with serving(root) as running, AsyncClient(running.address, retries=0, timeout=20) as client:
            stream = client.stream()
            streamed = await stream.act_many([act_request(obs[0], mask[0], 0)])  # an idle stream stays open
            gate = Gate(running.batcher.forward)
            running.batcher.forward = gate
            calls = [asyncio.create_task(client.act(obs[i], mask[i], int(unit[i]), greedy=True)) for i in range(6)]
            frame = asyncio.create_task(client.act_batch(obs, mask, unit, greedy=True))
            await asyncio.to_thread(gate.entered.wait, 10)
            await wait_until(lambda: running.batcher.queued_rows + sum(gate.batches) == 6 + len(obs),
                             "every call to be queued or in the forward pass")
            stopping = asyncio.create_task(running.stop(grace=20))
            await wait_until(lambda: running.draining, "draining")
            await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.act(obs[0], mask[0], 0)
            with pytest.raises(StreamError) as ended:  # draining ends open streams (after their answers)
                await stream.recv()
            gate.open.set()
            results = await asyncio.gather(*calls, frame)
            await stopping
            return results + streamed, e.value.code(), ended.value.code

    results, refused, stream_end = asyncio.run(main())
    assert all(r.model_version == 1 for r in results)
    assert refused == grpc.StatusCode.UNAVAILABLE and stream_end == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("half_closed", [False, True])
def test_a_draining_stream_answers_every_request_it_read_and_ends_ok_at_once(service_repo, half_closed):
    """A stream with a full window when the drain comes: its reader used to be cancelled while it held a request
    already in the forward pass (computed, never answered, never counted), or while queueing the end of a
    half-closed stream (which then hung until the grace period ran out and ended UNAVAILABLE)."""
    root, scenario, _ = service_repo
    obs, mask, _ = sim_inputs(scenario, games=1, steps=1)

    async def main():
        async with serving(root, stream_window=2) as running, AsyncClient(running.address) as client:
            gate = Gate(running.batcher.forward)
            running.batcher.forward = gate
            call = client.stub.ActStream(timeout=60)
            for i in range(1, 6):
                await call.write(act_request(obs[0], mask[0], 0, greedy=True, request_id=i))
            if half_closed:
                await call.done_writing()
            await asyncio.to_thread(gate.entered.wait, 10)
            await wait_until(lambda: running.batcher.queued_rows + sum(gate.batches) >= 3, "a full window")
            await asyncio.sleep(0.2)  # time to read on, had the window room for more
            start = time.perf_counter()
            stopping = asyncio.create_task(running.stop(grace=30))
            await wait_until(lambda: running.draining, "draining")
            gate.open.set()
            answered = []
            while (answer := await asyncio.wait_for(call.read(), 30)) is not grpc.aio.EOF:
                answered.append(answer.request_id)
            code = await call.code()
            await stopping
            counted = metric_samples(generate_latest(running.metrics.registry).decode())
            return answered, code, time.perf_counter() - start, sum(gate.batches), counted

    answered, code, seconds, computed, counted = asyncio.run(main())
    assert answered == [1, 2, 3] and computed == 3  # one in the forward pass, the window's two: all answered
    assert code == grpc.StatusCode.OK and seconds < 20  # not held until the 30 s grace ran out
    assert counted[("phalanx_requests_total", (("code", "OK"), ("rpc", "ActStream")))] == 3


# --- security -----------------------------------------------------------------------------------------------------

def _self_signed(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("the TLS test makes its self-signed certificate with the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_tls_with_a_self_signed_certificate(service_repo, tmp_path):
    root, scenario, _ = service_repo
    cert, key = _self_signed(tmp_path)
    obs, mask, _ = sim_inputs(scenario, games=1, steps=1)

    async def main():
        async with serving(root, tls_cert=cert, tls_key=key) as running:
            async with AsyncClient(running.address, tls_ca=cert) as client:
                good = await client.act(obs[0], mask[0], 0)
            async with AsyncClient(running.address, retries=0, timeout=5) as plain:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await plain.act(obs[0], mask[0], 0)
            return good, e.value.code()

    good, plain_code = asyncio.run(main())
    assert good.model_version == 1
    assert plain_code == grpc.StatusCode.UNAVAILABLE


def test_unusable_tls_files_are_named_not_reported_as_a_busy_port(service_repo, tmp_path):
    root, _, _ = service_repo
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    pairs = [(junk, junk, f"--tls-cert {junk}: no PEM certificate")]
    if shutil.which("openssl") is not None:
        (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
        (cert, key), (_, other_key) = _self_signed(tmp_path / "a"), _self_signed(tmp_path / "b")
        pairs += [(cert, junk, f"--tls-key {junk}: no PEM private key"),
                  (cert, other_key, "the key does not belong to the certificate")]
    for cert, key, words in pairs:  # a ValueError: `phalanx serve` prints it as one line and exits 2
        with pytest.raises(ValueError, match=words):
            asyncio.run(start_server(ServeConfig(models=root, name="m", port=0, tls_cert=cert, tls_key=key),
                                     CollectorRegistry()))


def test_bearer_token_auth(service_repo, tmp_path):
    root, scenario, _ = service_repo
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    obs, mask, unit = sim_inputs(scenario, games=1, steps=1)

    async def main():
        async with serving(root, auth_token_file=token_file) as running:
            codes = {}
            for name, token in (("none", None), ("wrong", "guess")):
                async with AsyncClient(running.address, token=token, retries=0) as client:
                    for rpc, call in (("Act", client.act(obs[0], mask[0], 0)),
                                      ("ActBatch", client.act_batch(obs, mask, unit)),
                                      ("GetModelInfo", client.model_info())):
                        with pytest.raises(grpc.aio.AioRpcError) as e:
                            await call
                        codes[(name, rpc)] = (e.value.code(), e.value.details())
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        async with client.stream() as s:
                            await s.act_many([act_request(obs[0], mask[0], 0)])
                    codes[(name, "ActStream")] = (e.value.code(), e.value.details())
            async with AsyncClient(running.address, token="s3cret-token") as client:
                ok = await client.act(obs[0], mask[0], 0)
                async with client.stream() as s:
                    ok_stream = await s.act_many([act_request(obs[0], mask[0], 0)])
            async with grpc.aio.insecure_channel(running.address) as channel:  # health stays open for probes
                status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            return codes, ok, ok_stream, status.status

    codes, ok, ok_stream, status = asyncio.run(main())
    assert len(codes) == 8
    for (name, rpc), (code, details) in codes.items():
        assert code == grpc.StatusCode.UNAUTHENTICATED, (name, rpc)
        assert "authorization" in details
    assert ok.model_version == 1 and ok_stream[0].model_version == 1
    assert status == health_pb2.HealthCheckResponse.SERVING


# --- metrics ---------------------------------------------------------------------------------------------------

def test_a_start_that_fails_gives_back_the_metrics_port(service_repo, monkeypatch):
    """A start that fails after /metrics listens (here: loading the model) used to leave that port held by an
    HTTP server nobody would stop, for as long as the process (an embedding program, a test run) lived."""
    root, _, _ = service_repo
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def broken_load(self):
        raise RuntimeError("the disk went away")

    monkeypatch.setattr("service.model_holder.ModelHolder.load_initial", broken_load)
    with pytest.raises(RuntimeError, match="disk went away"):
        asyncio.run(start_server(ServeConfig(models=root, name="m", port=0, metrics_port=port), CollectorRegistry()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again


def test_a_start_stopped_while_loading_tries_no_other_version(tmp_path, monkeypatch):
    """The loading thread cannot be interrupted: stopped in the middle of a start, it went on to prepare every
    older version (each refused by the closed worker, 'will retry'), and the process could not exit until then."""
    import service.model_holder as model_holder

    sc = load_scenario("3m")
    repo = ModelRepository(tmp_path / "models")
    policy = Policy.for_scenario(sc, hidden=8).eval()
    for _ in range(4):
        repo.save("m", policy, scenario=sc, step=0, eval_win_rate=None)
    prepared, real_prepare = [], model_holder.ModelHolder._prepare

    def slow_prepare(self, version):
        prepared.append(version)
        time.sleep(0.3)
        return real_prepare(self, version)

    monkeypatch.setattr(model_holder.ModelHolder, "_prepare", slow_prepare)

    async def main():
        starting = asyncio.create_task(start_server(ServeConfig(models=tmp_path / "models", name="m", port=0,
                                                                poll_seconds=0), CollectorRegistry()))
        await wait_until(lambda: prepared, "the first version to be prepared", tries=3000)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting

    asyncio.run(main())  # returns once the loading thread is done
    assert prepared == [4]


def test_metrics_are_served_on_the_metrics_port(service_repo):
    root, scenario, _ = service_repo
    obs, mask, unit = sim_inputs(scenario, games=2, steps=1)

    async def main():
        async with serving(root, metrics_port=0) as running, AsyncClient(running.address) as client:
            for i in range(5):
                await client.act(obs[i], mask[i], int(unit[i]))
            await client.act_batch(obs, mask, unit)
            with pytest.raises(grpc.aio.AioRpcError):
                await client.act(obs[0][:3], mask[0], 0)
            url = f"http://127.0.0.1:{running.metrics_port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())

    samples = metric_samples(asyncio.run(main()))
    get = lambda name, **labels: samples[(name, tuple(sorted(labels.items())))]  # noqa: E731
    assert get("phalanx_requests_total", rpc="Act", code="OK") == 5
    assert get("phalanx_requests_total", rpc="Act", code="INVALID_ARGUMENT") == 1
    assert get("phalanx_requests_total", rpc="ActBatch", code="OK") == 1
    assert get("phalanx_units_total", rpc="ActBatch") == len(obs)
    assert get("phalanx_request_latency_seconds_count", rpc="Act") == 6
    assert ("phalanx_request_latency_seconds_bucket", (("le", "0.0001"), ("rpc", "Act"))) in samples
    assert get("phalanx_batch_size_units_sum") == 5 + len(obs)
    assert get("phalanx_queue_time_seconds_count") == 6
    assert get("phalanx_compute_time_seconds_count") >= 1
    assert get("phalanx_model_version") == 1
    assert get("phalanx_model_reloads_total") == 0 and get("phalanx_model_reload_failures_total") == 0
    assert get("phalanx_queue_depth_units") == 0
    assert get("phalanx_shed_requests_total", reason="queue_full") == 0  # there from the start, for rate()
    assert get("phalanx_requests_total", rpc="ActStream", code="UNAVAILABLE") == 0
    label_names = {label for _name, labels in samples for label, _value in labels}
    assert label_names <= {"rpc", "code", "reason", "le"}, label_names  # never a unit, game or episode


# --- rough edges of the commands: each refused or explained in one line -----------------------------------------

def test_serve_warns_when_it_waits_on_a_models_directory_or_name_that_holds_nothing(service_repo, tmp_path, caplog):
    """A mistyped --models or --name would look like a server waiting for a trainer's first version: it still
    waits (a trainer may publish later), but warns and says what the repository holds."""
    root, _, _ = service_repo

    async def start(models, name):
        caplog.clear()
        with caplog.at_level("INFO", logger="service.server"):
            async with serving(models, name=name, poll_seconds=30.0, forward_worker="thread") as running:
                assert running.holder.current is None
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    missing = asyncio.run(start(tmp_path / "nope", "m"))
    assert len(missing) == 1 and f"the models directory {tmp_path / 'nope'} does not exist" in missing[0]
    assert "until a version of 'm' appears" in missing[0]
    wrong_name = asyncio.run(start(root, "M"))
    assert len(wrong_name) == 1 and "no version of 'M'" in wrong_name[0] and "models holds: m;" in wrong_name[0]
    (tmp_path / "bare").mkdir()
    assert "it holds no models yet" in asyncio.run(start(tmp_path / "bare", "m"))[0]


def test_client_commands_refuse_bad_flags_before_dialing(service_repo, tmp_path, capfd):
    """Exit 2 and one line naming the flag: no dialing port 443 for a --server without a port, no gRPC C-core
    log lines for a --tls-ca that is not PEM, no traceback for a missing token file."""
    from service.cli import main

    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    empty = tmp_path / "token"
    empty.write_text("\n")
    play = ["play", "--scenario", "3m", "--server"]
    for argv, line in (
        (play + ["127.0.0.1"], "phalanx play: --server must be HOST:PORT (or [IPv6]:PORT, unix:PATH), got '127.0.0.1'"),
        (["health", "--server", "127.0.0.1"], "phalanx health: --server must be HOST:PORT (or [IPv6]:PORT, unix:PATH), "
                                              "got '127.0.0.1'"),
        (["health", "--timeout", "0"], "phalanx health: --timeout must be > 0 seconds, got 0.0"),
        (play + ["127.0.0.1:1", "--tls-ca", str(not_pem)],
         f"phalanx play: --tls-ca {not_pem}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)"),
        (["health", "--tls-ca", str(tmp_path / "missing.pem")],
         f"phalanx health: --tls-ca {tmp_path / 'missing.pem'}: No such file or directory"),
        (play + ["127.0.0.1:1", "--auth-token-file", str(tmp_path / "missing")],
         f"phalanx play: --auth-token-file {tmp_path / 'missing'}: No such file or directory"),
        (play + ["127.0.0.1:1", "--auth-token-file", str(empty)], f"phalanx play: --auth-token-file {empty} is empty"),
    ):
        assert main(argv) == 2, argv
        out, err = capfd.readouterr()  # capfd: gRPC's C core writes its log lines straight to file descriptor 2
        assert (out, err.strip()) == ("", line)


def test_serve_names_the_flag_of_a_file_or_directory_it_cannot_use(service_repo, tmp_path, capsys, monkeypatch):
    import service.metrics
    from service.cli import main

    root, _, _ = service_repo
    a_file = tmp_path / "file"
    a_file.write_text("x")
    serve = ["serve", "--models", str(root), "--name", "m", "--port", "0", "--forward-worker", "thread"]
    for flags, line in (
        (["--auth-token-file", str(tmp_path / "missing")],
         f"--auth-token-file {tmp_path / 'missing'}: No such file or directory"),
        (["--experience-dir", str(a_file / "shards")],
         f"--experience-dir {a_file / 'shards'}: cannot create it: Not a directory"),
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(a_file)],
         f"--tls-cert {tmp_path / 'missing.pem'}: No such file or directory"),
    ):
        monkeypatch.setattr(service.metrics, "REGISTRY", CollectorRegistry())  # each run registers its metrics
        assert main(serve + flags) == 2, flags
        assert capsys.readouterr().err.strip() == f"phalanx serve: {line}"


class _CancellingServer(pb_grpc.InferenceServicer):
    """A stand-in server for `phalanx play --rpc unary` that cancels every Act call, as a server shutting down
    cancels the calls still in it (the client reads CANCELLED, with no reason)."""

    def __init__(self, scenario):
        self.scenario = scenario

    def GetModelInfo(self, request, context):
        sc = self.scenario
        return pb.ModelInfo(name="m", version=1, spec_name=sc.name, spec_hash=sc.spec_hash, obs_size=sc.obs_size,
                            n_actions=sc.n_actions, n_agents=sc.n_agents)

    def Act(self, request, context):
        context.cancel()


def test_play_says_what_a_call_cancelled_by_the_server_likely_means(capsys):
    """gRPC reports a call cut off by a stopping server as "CANCELLED" with details "CANCELLED" (or none): play
    says what that likely means instead of the code twice."""
    from service.cli import main

    with stand_in_server(_CancellingServer(load_scenario("3m"))) as port:
        code = main(["play", "--server", f"127.0.0.1:{port}", "--scenario", "3m", "--games", "1", "--rpc", "unary"])
    err = capsys.readouterr().err
    assert code == 1 and err.strip() == (f"phalanx play: 127.0.0.1:{port}: CANCELLED: the call was cancelled (the "
                                         "server shutting down, or the connection dropped)"), err


def test_server_reflection_describes_the_api(service_repo):
    """grpcurl / grpcui / Postman discover the API through server reflection: the services are listed and
    Act's request and response types resolve to the .proto's messages."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    root, _, _ = service_repo

    async def main():
        async with serving(root) as running:
            def look(address):
                with grpc.insecure_channel(address) as channel:
                    database = ProtoReflectionDescriptorDatabase(channel)
                    services = set(database.get_services())
                    act = DescriptorPool(database).FindServiceByName("phalanx.v1.Inference").FindMethodByName("Act")
                    return services, act.input_type.full_name, act.output_type.full_name, sorted(
                        f.name for f in act.input_type.fields)
            return await asyncio.to_thread(look, running.address)

    services, request, response, fields = asyncio.run(main())
    assert {"phalanx.v1.Inference", "grpc.health.v1.Health"} <= services
    assert (request, response) == ("phalanx.v1.ActRequest", "phalanx.v1.ActResponse")
    assert {"observation", "action_mask", "unit_id", "game_id", "spec_hash", "prev_reward", "prev_done"} <= set(fields)
