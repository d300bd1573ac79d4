"""Pure unit tests of the service's parts: validation, the batcher (with a stand-in forward), generated code."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service import gen_proto
from service._gen.phalanx.v1 import inference_pb2 as pb
from service.batcher import Batcher, Outputs, ThreadForward
from service.client import act_request, batch_request
from service.metrics import ServiceMetrics
from service.validation import RequestError, frame_rows, unit_rows

SPEC = SimpleNamespace(spec_name="3m", spec_hash="abc123", obs_size=5, n_actions=4, n_agents=3)
OBS = [0.1, 0.2, 0.3, 0.4, 0.5]
MASK = [False, True, True, False]


def test_generated_code_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools", reason="regenerating needs grpcio-tools (the dev extra)")
    gen_proto.generate(tmp_path)
    assert gen_proto.differences(tmp_path, gen_proto.GEN_ROOT) == []


# --- validation ---------------------------------------------------------------------------------------------

def test_unit_rows_accepts_a_good_request():
    rows = unit_rows(act_request(OBS, MASK, 2, greedy=True, spec_hash="abc123"), SPEC)
    assert rows.obs.shape == (1, 5) and rows.obs.dtype == np.float32
    assert rows.mask.tolist() == [MASK] and rows.unit.tolist() == [2] and rows.greedy.tolist() == [True]


@pytest.mark.parametrize("change, code, words", [
    (dict(obs=OBS[:4]), grpc.StatusCode.INVALID_ARGUMENT, "observation: expected 5 floats for spec 3m (hash abc123), got 4"),
    (dict(obs=OBS + [1.0]), grpc.StatusCode.INVALID_ARGUMENT, "got 6"),
    (dict(obs=OBS[:4] + [math.nan]), grpc.StatusCode.INVALID_ARGUMENT, "observation: every value must be finite, got nan at index 4"),
    (dict(obs=[math.inf] + OBS[1:]), grpc.StatusCode.INVALID_ARGUMENT, "got inf at index 0"),
    (dict(mask=MASK[:3]), grpc.StatusCode.INVALID_ARGUMENT, "action_mask: expected 4 entries"),
    (dict(mask=[False] * 4), grpc.StatusCode.INVALID_ARGUMENT, "action_mask: at least one action must be legal"),
    (dict(unit=3), grpc.StatusCode.INVALID_ARGUMENT, "unit_id: expected 0..2"),
    (dict(spec_hash="ffff"), grpc.StatusCode.FAILED_PRECONDITION, "spec_hash: the served model was trained on spec 3m"),
    (dict(prev_reward=math.nan), grpc.StatusCode.INVALID_ARGUMENT, "prev_reward: must be finite"),
])
def test_unit_rows_refuses_bad_requests(change, code, words):
    fields = dict(obs=OBS, mask=MASK, unit=1, spec_hash="")
    fields.update(change)
    extra = {"prev_reward": fields.pop("prev_reward")} if "prev_reward" in fields else {}
    req = act_request(fields["obs"], fields["mask"], fields["unit"], spec_hash=fields["spec_hash"], **extra)
    with pytest.raises(RequestError) as e:
        unit_rows(req, SPEC)
    assert e.value.code == code
    assert words in e.value.message


def _frame(n=3, **kw):
    rng = np.random.default_rng(0)
    obs = kw.pop("obs", rng.standard_normal((n, 5)).astype(np.float32))
    mask = kw.pop("mask", np.ones((n, 4), bool))
    units = kw.pop("units", np.arange(n) % 3)
    return batch_request(obs, mask, units, **kw)


def test_frame_rows_accepts_a_good_frame():
    rows = frame_rows(_frame(4, greedy=True, prev_rewards=np.zeros(4), prev_dones=np.zeros(4)), SPEC)
    assert rows.obs.shape == (4, 5) and rows.mask.shape == (4, 4) and rows.mask.dtype == bool
    assert rows.unit.tolist() == [0, 1, 2, 0] and rows.greedy.all()


def _broken(mutate):
    req = _frame(3)
    mutate(req)
    return req


@pytest.mark.parametrize("req, code, words", [
    (_broken(lambda r: r.ClearField("observations")), "INVALID_ARGUMENT", "observations: required"),
    (_broken(lambda r: setattr(r.observations, "dtype", pb.DATA_TYPE_INT32)), "INVALID_ARGUMENT",
     "observations.dtype: expected DATA_TYPE_FLOAT32, got DATA_TYPE_INT32"),
    (_broken(lambda r: r.observations.shape.__setitem__(1, 6)), "INVALID_ARGUMENT",
     "observations.shape: expected (n, 5), got [3, 6]"),
    (_broken(lambda r: setattr(r.observations, "data", r.observations.data[:-4])), "INVALID_ARGUMENT",
     "observations.data: shape [3, 5] of DATA_TYPE_FLOAT32 needs 60 bytes, got 56"),
    (_frame(3, obs=np.array([[0, 0, 0, 0, 0], [0, 0, np.nan, 0, 0], [0] * 5], np.float32)), "INVALID_ARGUMENT",
     "observations: every value must be finite, got nan at row 1, column 2"),
    (_frame(2, mask=np.array([[1, 0, 0, 0], [0, 0, 0, 0]], bool)), "INVALID_ARGUMENT",
     "action_masks: every row needs at least one legal action, row 1 has none"),
    (_broken(lambda r: r.action_masks.shape.__setitem__(0, 2)), "INVALID_ARGUMENT", "action_masks.shape: expected (3, 4)"),
    (_frame(2, units=np.array([0, 3])), "INVALID_ARGUMENT", "unit_ids: expected 0..2 (agent slots of spec 3m (hash abc123)), got 3 at row 1"),
    (_frame(2, units=np.array([-1, 0])), "INVALID_ARGUMENT", "got -1 at row 0"),
    (_frame(2, spec_hash="nope"), "FAILED_PRECONDITION", "spec_hash"),
    (_frame(3, units=np.array([1, 0, 1]), game_id="g"), "INVALID_ARGUMENT",
     "unit_ids: a frame of a game (game_id set) lists each unit once, got unit 1 at rows 0 and 2"),
    # a row count whose element count (rows x 5) wraps around to 3 in 64-bit arithmetic, with 3 floats of data
    (_broken(lambda r: (r.observations.shape.__setitem__(0, 3 * pow(5, -1, 2**64) % 2**64),
                        setattr(r.observations, "data", bytes(12)))), "INVALID_ARGUMENT", "observations.data: shape"),
    (_frame(0, obs=np.zeros((0, 5), np.float32), mask=np.zeros((0, 4), bool), units=np.zeros(0)), "INVALID_ARGUMENT",
     "at least one unit"),
    (_frame(2, prev_rewards=np.array([0.0, np.inf])), "INVALID_ARGUMENT", "prev_rewards: every value must be finite"),
    (_frame(2, prev_dones=np.zeros(3)), "INVALID_ARGUMENT", "prev_dones.shape: expected (2,), got [3]"),
])
def test_frame_rows_refuses_bad_frames(req, code, words):
    with pytest.raises(RequestError) as e:
        frame_rows(req, SPEC)
    assert e.value.code.name == code
    assert words in e.value.message


# --- batcher (stand-in forward: action = row's unit id, value = the row's first observation) -----------------

def _rows(value: float, unit: int = 0, k: int = 1):
    from service.validation import Rows
    return Rows(np.full((k, 5), value, np.float32), np.ones((k, 4), bool), np.full(k, unit, np.int64),
                np.zeros(k, bool))


class _Recorder:
    def __init__(self, fail: bool = False):
        self.batches: list[int] = []
        self.fail = fail

    def __call__(self, obs, mask, unit, greedy) -> Outputs:
        self.batches.append(obs.shape[0])
        if self.fail:
            raise RuntimeError("boom")
        n = obs.shape[0]
        return Outputs(7, unit.copy(), np.zeros(n, np.float32), np.ones(n, np.float32), obs[:, 0].copy())


def _batcher(forward, **kw) -> Batcher:
    return Batcher(ThreadForward(forward), metrics=ServiceMetrics(CollectorRegistry()), **kw)


def test_batcher_answers_every_caller_with_its_own_rows():
    async def main():
        fwd = _Recorder()
        b = _batcher(fwd, max_batch_size=8)
        futures = [b.enqueue(_rows(float(i), unit=i % 3)) for i in range(20)]
        frame = b.enqueue(_rows(99.0, unit=1, k=5))
        b.start()
        outs = await asyncio.gather(*futures, frame)
        await b.close()
        return fwd, outs

    fwd, outs = asyncio.run(main())
    for i, out in enumerate(outs[:20]):
        assert out.value.tolist() == [float(i)] and out.action.tolist() == [i % 3] and out.version == 7
    assert outs[20].value.tolist() == [99.0] * 5
    assert sum(fwd.batches) == 25 and max(fwd.batches) <= 8  # the 5-row frame stayed whole


def test_batcher_runs_an_oversized_frame_alone():
    async def main():
        fwd = _Recorder()
        b = _batcher(fwd, max_batch_size=4)
        futures = [b.enqueue(_rows(1.0)), b.enqueue(_rows(2.0, k=10)), b.enqueue(_rows(3.0))]
        b.start()
        await asyncio.gather(*futures)
        await b.close()
        return fwd.batches

    assert asyncio.run(main()) == [1, 10, 1]


def test_batcher_fans_a_forward_error_out_to_every_caller():
    async def main():
        b = _batcher(_Recorder(fail=True), max_batch_size=64)
        futures = [b.enqueue(_rows(float(i))) for i in range(5)]
        b.start()
        results = await asyncio.gather(*futures, return_exceptions=True)
        await b.close()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, RequestError) and r.code == grpc.StatusCode.INTERNAL and "boom" in r.message
               for r in results)


def test_batcher_fails_only_the_requests_whose_rows_have_no_usable_answer():
    from service.validation import Rows

    def forward(obs, mask, unit, greedy) -> Outputs:  # overflows on huge rows: NaN, as a real network does
        n = obs.shape[0]
        log_prob = np.where(obs[:, 0] > 1e30, np.nan, 0.0).astype(np.float32)
        return Outputs(7, unit.copy(), log_prob, np.exp(log_prob), np.zeros(n, np.float32))

    forbidden = Rows(np.zeros((1, 5), np.float32), np.array([[False, True, True, True]]), np.zeros(1, np.int64),
                     np.zeros(1, bool))  # the stand-in answers action 0 = unit 0, which this mask forbids
    frame = _rows(1.0, unit=1, k=3)
    frame.obs[1] = 3e38

    async def main():
        b = _batcher(forward, max_batch_size=64)
        futures = [b.enqueue(_rows(1.0)), b.enqueue(_rows(3e38, unit=2)), b.enqueue(forbidden), b.enqueue(frame),
                   b.enqueue(_rows(2.0, unit=1))]
        b.start()
        results = await asyncio.gather(*futures, return_exceptions=True)
        await b.close()
        return results

    good, huge, illegal, bad_frame, also_good = asyncio.run(main())
    assert good.action.tolist() == [0] and also_good.action.tolist() == [1]
    for error in (huge, illegal, bad_frame):
        assert isinstance(error, RequestError) and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert huge.message.startswith("observation: ") and "log-prob nan" in huge.message and "3e+38" in huge.message
    assert "action 0, which its action mask forbids" in illegal.message
    assert bad_frame.message.startswith("observations: row 1: ")


def test_batcher_sheds_when_full_and_drops_expired_requests():
    async def main():
        fwd = _Recorder()
        b = _batcher(fwd, max_batch_size=4, max_queue=3)
        kept = [b.enqueue(_rows(1.0)), b.enqueue(_rows(2.0), deadline=0.0)]  # the second expired long ago
        with pytest.raises(RequestError) as full:
            b.enqueue(_rows(3.0, k=2))
        with pytest.raises(RequestError) as huge:
            b.enqueue(_rows(3.0, k=4))
        b.start()
        results = await asyncio.gather(*kept, return_exceptions=True)
        await b.close()
        return fwd, full.value, huge.value, results, b

    fwd, full, huge, results, b = asyncio.run(main())
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 3" in full.message
    assert huge.code == grpc.StatusCode.INVALID_ARGUMENT
    assert results[0].value.tolist() == [1.0]
    assert isinstance(results[1], RequestError) and results[1].code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert fwd.batches == [1]
    assert b.metrics.shed.labels("deadline")._value.get() == 1
    assert b.metrics.shed.labels("queue_full")._value.get() == 1  # the frame too big for any queue is no shed


def test_batcher_waits_for_a_batch_to_fill_up_to_the_delay():
    async def main():
        fwd = _Recorder()
        b = _batcher(fwd, max_batch_size=4, max_queue_delay=30.0)  # would wait 30 s for a 4th row...
        b.start()
        futures = [b.enqueue(_rows(float(i))) for i in range(3)]
        await asyncio.sleep(0)
        futures.append(b.enqueue(_rows(3.0)))  # ...but the 4th fills the batch at once
        await asyncio.gather(*futures)
        await b.close()
        return fwd.batches

    assert asyncio.run(main()) == [4]


def test_batcher_close_fails_waiting_callers_with_unavailable():
    async def main():
        b = _batcher(_Recorder(), max_batch_size=4, max_queue_delay=30.0)
        b.start()
        futures = [b.enqueue(_rows(1.0)), b.enqueue(_rows(2.0))]  # two callers: the batcher waits to fill up
        await asyncio.sleep(0)
        await b.close()
        return await asyncio.gather(*futures, return_exceptions=True)

    errors = asyncio.run(main())
    assert all(isinstance(e, RequestError) and e.code == grpc.StatusCode.UNAVAILABLE for e in errors)


def test_batcher_close_fails_the_batch_in_the_forward_pass_too():
    entered = asyncio.Event()

    async def stuck(obs, mask, unit, greedy):
        entered.set()
        await asyncio.sleep(60)

    async def main():
        b = Batcher(stuck, max_batch_size=1, metrics=ServiceMetrics(CollectorRegistry()))
        b.start()
        computing = b.enqueue(_rows(1.0))
        await asyncio.wait_for(entered.wait(), 10)  # now inside the forward pass
        waiting = b.enqueue(_rows(2.0))
        await b.close()
        return await asyncio.wait_for(asyncio.gather(computing, waiting, return_exceptions=True), 10)

    errors = asyncio.run(main())  # the batch in the forward pass used to wait forever
    assert all(isinstance(e, RequestError) and e.code == grpc.StatusCode.UNAVAILABLE for e in errors)


def test_a_stream_that_starts_while_draining_ends_at_once():
    """A stream whose handler starts after the drain began (a call gRPC queued before the stop), or whose reader
    had not run yet when the drain came, used to wait for the grace period to run out."""
    from service.server import InferenceServicer

    class Context:
        def time_remaining(self):
            return None

    async def silent_client():  # sends nothing, never closes
        await asyncio.sleep(3600)
        yield None

    async def main():
        draining = InferenceServicer(None, None, ServiceMetrics(CollectorRegistry()))
        draining.end_streams()
        late = draining.ActStream(silent_client(), Context())
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(late.__anext__(), 10)
        servicer = InferenceServicer(None, None, ServiceMetrics(CollectorRegistry()))
        stream = servicer.ActStream(silent_client(), Context())
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the handler waits for answers; its reader has not taken a step yet
        servicer.end_streams()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(first, 10)

    asyncio.run(main())


def test_a_lone_caller_does_not_wait_for_the_delay():
    async def main():
        fwd = _Recorder()
        b = _batcher(fwd, max_batch_size=4, max_queue_delay=30.0)
        b.start()
        first = await b.submit(_rows(1.0))  # would hang for 30 s if a lone caller waited
        second = await b.submit(_rows(2.0))
        await b.close()
        return first, second, fwd.batches

    first, second, batches = asyncio.run(main())
    assert first.value.tolist() == [1.0] and second.value.tolist() == [2.0] and batches == [1, 1]


def test_batcher_refuses_bad_settings():
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        _batcher(_Recorder(), max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue_delay must be >= 0 seconds"):
        _batcher(_Recorder(), max_queue_delay=-1)


def test_model_holder_serves_through_the_traced_graph_or_falls_back_to_eager(service_repo, monkeypatch, caplog):
    import torch

    from service.model_holder import ModelHolder
    from trainer.policy import Policy
    from trainer.repository import ModelRepository

    root, scenario, policy = service_repo
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((9, scenario.obs_size)).astype(np.float32)
    mask = np.ones((9, scenario.n_actions), dtype=bool)
    unit = np.arange(9, dtype=np.int64) % scenario.n_agents
    greedy = np.ones(9, dtype=bool)
    want = policy.act(torch.from_numpy(obs), torch.from_numpy(mask), torch.from_numpy(unit), torch.from_numpy(greedy))

    def served(holder):
        assert holder.load_initial()
        return holder.current.graph, holder.forward(obs, mask, unit, greedy)

    graph, out = served(ModelHolder(ModelRepository(root), "m", poll_seconds=0, metrics=ServiceMetrics(CollectorRegistry())))
    assert graph is not None
    assert out.action.tolist() == want.action.tolist() and np.allclose(out.value, want.value.numpy(), atol=1e-4)

    def no_tracing(self, example_rows=8):
        raise RuntimeError("tracing is not available")

    monkeypatch.setattr(Policy, "serving_graph", no_tracing)
    graph, out = served(ModelHolder(ModelRepository(root), "m", poll_seconds=0, metrics=ServiceMetrics(CollectorRegistry())))
    assert graph is None and "serving the eager policy" in caplog.text
    assert out.action.tolist() == want.action.tolist() and np.allclose(out.value, want.value.numpy(), atol=1e-4)


def test_the_image_serves_grpc_and_metrics_on_every_interface():
    # Inside a container 127.0.0.1 is reachable from nowhere else: a published port needs 0.0.0.0.
    import json
    from pathlib import Path

    from service.cli import build_parser

    dockerfile = (Path(__file__).resolve().parents[1] / "Dockerfile").read_text()
    cmd = json.loads(next(line for line in dockerfile.splitlines() if line.startswith("CMD "))[4:])
    args = build_parser().parse_args(cmd)
    assert (args.command, args.host, args.metrics_host, args.metrics_port) == ("serve", "0.0.0.0", "0.0.0.0", 9100)


# --- the commands' one-line messages ------------------------------------------------------------------------

@pytest.mark.parametrize("code, details, line", [
    (grpc.StatusCode.CANCELLED, "CANCELLED", "CANCELLED: the call was cancelled (the server shutting down, or the "
                                             "connection dropped)"),
    (grpc.StatusCode.CANCELLED, "", "CANCELLED: the call was cancelled"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", "DEADLINE_EXCEEDED: no answer within the call's deadline"),
    (grpc.StatusCode.INTERNAL, "Internal error from Core", "INTERNAL: gRPC failed the call without a reason"),
    (grpc.StatusCode.DATA_LOSS, None, "DATA_LOSS: gRPC gave no details"),
    (grpc.StatusCode.UNAVAILABLE, "no model loaded yet", "UNAVAILABLE: no model loaded yet"),  # a reason: kept
])
def test_rpc_errors_without_a_reason_say_what_their_code_likely_means(code, details, line):
    from service.client import rpc_error_text

    assert rpc_error_text(code, details).startswith(line)


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "localhost:1", "[::1]:50051", "dns:///svc.local:50051",
                                    "dns://8.8.8.8/svc:443", "unix:/tmp/phalanx.sock", "unix-abstract:phalanx",
                                    "ipv4:10.0.0.1:50051,10.0.0.2:50051", "ipv6:[::1]:50051", "xds:///phalanx"])
def test_server_addresses_with_a_port_are_accepted(target):
    from service.client import check_target

    check_target(target)


@pytest.mark.parametrize("target, words", [
    ("127.0.0.1", "must be HOST:PORT"), ("localhost:", "must be HOST:PORT"), (":50051", "must be HOST:PORT"),
    ("::1", "must be HOST:PORT"), ("[::1]", "must be HOST:PORT"), ("host:port", "must be HOST:PORT"),
    ("unix:", "must be HOST:PORT"), ("dns:///svc.local", "must be HOST:PORT"),
    ("127.0.0.1:0", "port must lie in 1..65535"), ("127.0.0.1:70000", "port must lie in 1..65535"),
    ("ipv4:10.0.0.1", "must be HOST:PORT"),
])
def test_server_addresses_without_a_port_are_refused(target, words):
    """gRPC would dial port 443 for a bare HOST: the commands refuse it rather than wait on the wrong port."""
    from service.client import check_target

    with pytest.raises(ValueError, match=f"{words}.*got {target!r}".replace("[", r"\[").replace("]", r"\]")):
        check_target(target)


def test_the_client_library_refuses_what_would_go_wrong_on_the_wire():
    """Without these checks a bare HOST quietly dialled port 443, a 2-D observation failed inside protobuf
    ("must be real number, not list") and a negative unit id as "Value out of range: -1", naming nothing."""
    from service.client import AsyncClient, Client

    for make in (Client, AsyncClient):
        with pytest.raises(ValueError, match="client target must be HOST:PORT"):
            make("127.0.0.1")
    with pytest.raises(ValueError, match=r"obs must be one unit's 1-D array, got shape \(1, 30\)"):
        act_request(np.zeros((1, 30)), MASK, 0)
    with pytest.raises(ValueError, match=r"mask must be one unit's 1-D array"):
        act_request(OBS, np.ones((2, len(MASK)), bool), 0)
    with pytest.raises(ValueError, match="unit_id must be a slot number >= 0, got -1"):
        act_request(OBS, MASK, -1)
    assert act_request(list(OBS), list(MASK), 2).unit_id == 2  # plain sequences still go in


def test_phalanx_version_prints_the_installed_version(capsys, monkeypatch):
    import importlib.metadata

    from service.cli import build_parser, main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"phalanx {importlib.metadata.version('phalanx')}"

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.strip() == "phalanx unknown"


@pytest.mark.parametrize("command", ["serve", "health", "play"])
def test_every_service_flag_with_a_default_says_it_in_its_help(command):
    import argparse

    from service.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    silent = [action.option_strings[0] for action in sub.choices[command]._actions
              if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS)
              and "default" not in (action.help or "")]
    assert silent == []
