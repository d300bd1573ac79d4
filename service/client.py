"""Python client library for the Phalanx inference service: sync (`Client`) and asyncio (`AsyncClient`).

    with Client("127.0.0.1:50051") as c:
        r = c.act(obs, mask, unit_id=2, greedy=True)           # one unit  -> ActResponse
        actions = c.act_batch(obs_matrix, masks, unit_ids)     # one frame -> FrameResult (numpy arrays)
        with c.stream() as s:                                  # one long-lived ActStream
            responses = s.act_many(requests)                   # answers in request order

Unary calls (act, act_batch, model_info) retry UNAVAILABLE with exponential back-off and jitter, within
the call's deadline (`timeout` seconds, per attempt). Streams are not retried: reopen one.
TLS: `tls_ca` (PEM file of the CA that signed the server's certificate); auth: `token` (bearer).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._gen.phalanx.v1 import inference_pb2 as pb
from service._gen.phalanx.v1 import inference_pb2_grpc as pb_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
_MAX_MESSAGE = 64 * 1024 * 1024


@dataclass
class FrameResult:
    """ActBatch's answer as numpy arrays, in the frame's row order."""
    action: np.ndarray  # (n,) int32
    log_prob: np.ndarray  # (n,) float32
    probability: np.ndarray  # (n,) float32
    value: np.ndarray  # (n,) float32
    model_version: int
    request_id: int


class StreamError(Exception):
    """One request on an ActStream failed, or the stream itself did; `.code` is the grpc.StatusCode.

    `.request_id`: the failed request's id when the server answered that one request with an error (the stream
    goes on: the next `recv()` is the next request's answer); None when the stream itself ended (test with `is
    None`; reopen one). A stream that gRPC ends with a status (UNAUTHENTICATED, the stream's deadline, ...)
    raises grpc.RpcError instead. `.answers`: set by `act_many`, each request's outcome in order as far as they
    were read (an ActResponse, or the StreamError that request got): one bad request does not spoil the others."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: int | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.answers: list | None = None


def _answer_error(resp: pb.ActResponse) -> StreamError:
    return StreamError(status_code(resp.error.code), resp.error.message, resp.request_id)


def _record_failure(outcomes: list, failure: StreamError) -> None:
    """act_many's bookkeeping for an answer that raised: a refused request is one outcome among the others and
    reading goes on; a stream that ended takes the outcomes read so far with it, raised (nothing more will come)."""
    if failure.request_id is None:
        failure.answers = outcomes
        raise failure
    outcomes.append(failure)


def _all_answers(outcomes: list) -> list[pb.ActResponse]:
    """act_many's result: the answers, or the first request's error carrying every outcome."""
    failed = next((o for o in outcomes if isinstance(o, StreamError)), None)
    if failed is not None:
        failed.answers = outcomes
        raise failed
    return outcomes


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


# gRPC often gives no reason: empty details, the code's name again ("CANCELLED: CANCELLED"), or C-core's
# "Internal error from Core" (seen when a draining server ends an ActStream mid-write). These say what such a
# bare code most likely means to a client of this service.
_LIKELY_MEANING = {
    grpc.StatusCode.CANCELLED: "the call was cancelled (the server shutting down, or the connection dropped)",
    grpc.StatusCode.UNAVAILABLE: "the server cannot be reached (not running, shutting down, or the connection "
                                 "dropped)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "no answer within the call's deadline (the server busy or unreachable)",
    grpc.StatusCode.INTERNAL: "gRPC failed the call without a reason (often the server closing the connection "
                              "mid-call)",
    grpc.StatusCode.UNKNOWN: "the server failed the call without a reason",
}
_BARE_DETAILS = {"", "internal error from core"}


def rpc_error_text(code: grpc.StatusCode, details: str | None) -> str:
    """`CODE: details` for one line of output; where gRPC's details say nothing (empty, or just the code's
    name again) they are replaced by what the code likely means."""
    said = (details or "").strip()
    if said.lower() in _BARE_DETAILS or said.lower().replace(" ", "_") == code.name.lower():
        said = _LIKELY_MEANING.get(code, "gRPC gave no details")
    return f"{code.name}: {said}"


def check_target(target: str) -> None:
    """Refuse a server address without a port: gRPC would quietly dial port 443 for a bare HOST.
    Accepted: HOST:PORT, [IPv6]:PORT, gRPC's dns:[//AUTHORITY/]HOST:PORT, ipv4:ADDR:PORT, ipv6:[ADDR]:PORT,
    and the schemes whose addresses are not host and port (unix:PATH, unix-abstract:NAME, vsock:, xds:)."""
    if target.startswith(("unix:", "unix-abstract:", "vsock:", "xds:")) and target.split(":", 1)[1]:
        return
    address = target
    if address.startswith(("ipv4:", "ipv6:")):  # gRPC's resolver-free forms (a comma list: check the first)
        address = address[5:].split(",")[0]
    if address.startswith("dns:"):
        address = address[4:]
        if address.startswith("//"):  # dns://AUTHORITY/HOST:PORT; the authority (the DNS server) may be empty
            address = address[2:].partition("/")[2]
    if address.startswith("["):
        host, _, port = address[1:].partition("]:")
        ok_host = bool(host) and "]" not in host
    else:
        host, _, port = address.rpartition(":")
        ok_host = bool(host) and ":" not in host  # a bare IPv6 address needs brackets: [::1]:50051
    if not (ok_host and port.isdigit()):
        raise ValueError(f"must be HOST:PORT (or [IPv6]:PORT, unix:PATH), got {target!r}")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port must lie in 1..65535, got {target!r}")


# --- messages ---------------------------------------------------------------------------------------------

def _check_client_target(target: str) -> None:
    try:
        check_target(target)
    except ValueError as e:
        raise ValueError(f"client target {e}") from None


def act_request(obs, mask, unit_id: int, *, greedy: bool = False, game_id: str = "", episode_id: int = 0,
                spec_hash: str = "", prev_reward: float | None = None, prev_done: bool | None = None,
                request_id: int = 0) -> pb.ActRequest:
    """One unit's ActRequest; obs and mask are sequences or 1-D arrays. Raises ValueError naming the argument
    that cannot go in the message (the server checks sizes and values against the model)."""
    for what, array in (("obs", obs), ("mask", mask)):
        if isinstance(array, np.ndarray) and array.ndim != 1:
            raise ValueError(f"act_request: {what} must be one unit's 1-D array, got shape {array.shape} (several "
                             f"units: one act_request each, or act_batch)")
    if not 0 <= unit_id < 2 ** 32:
        raise ValueError(f"act_request: unit_id must be a slot number >= 0, got {unit_id}")
    req = pb.ActRequest(game_id=game_id, episode_id=episode_id, unit_id=unit_id,
                        observation=np.asarray(obs, dtype=np.float32).tolist() if isinstance(obs, np.ndarray) else obs,
                        action_mask=np.asarray(mask, dtype=bool).tolist() if isinstance(mask, np.ndarray) else mask,
                        spec_hash=spec_hash, greedy=greedy, request_id=request_id)
    if prev_reward is not None:
        req.prev_reward = prev_reward
    if prev_done is not None:
        req.prev_done = prev_done
    return req


def tensor(array: np.ndarray, dtype: int) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=array.shape, data=array.tobytes())


def batch_request(obs: np.ndarray, mask: np.ndarray, unit_ids: np.ndarray, *, greedy: bool = False,
                  game_id: str = "", episode_id: int = 0, spec_hash: str = "",
                  prev_rewards: np.ndarray | None = None, prev_dones: np.ndarray | None = None,
                  request_id: int = 0) -> pb.ActBatchRequest:
    """One frame: obs (n, obs_size), mask (n, n_actions) bool, unit_ids (n,) -> ActBatchRequest."""
    req = pb.ActBatchRequest(
        game_id=game_id, episode_id=episode_id, spec_hash=spec_hash, greedy=greedy, request_id=request_id,
        observations=tensor(np.ascontiguousarray(obs, dtype="<f4"), pb.DATA_TYPE_FLOAT32),
        action_masks=tensor(np.ascontiguousarray(mask, dtype=np.uint8), pb.DATA_TYPE_UINT8),
        unit_ids=tensor(np.ascontiguousarray(unit_ids, dtype="<i4"), pb.DATA_TYPE_INT32))
    if prev_rewards is not None:
        req.prev_rewards.CopyFrom(tensor(np.ascontiguousarray(prev_rewards, dtype="<f4"), pb.DATA_TYPE_FLOAT32))
    if prev_dones is not None:
        req.prev_dones.CopyFrom(tensor(np.ascontiguousarray(prev_dones, dtype=np.uint8), pb.DATA_TYPE_UINT8))
    return req


def frame_result(resp: pb.ActBatchResponse) -> FrameResult:
    return FrameResult(np.frombuffer(resp.actions.data, dtype="<i4"), np.frombuffer(resp.log_probs.data, dtype="<f4"),
                       np.frombuffer(resp.probabilities.data, dtype="<f4"), np.frombuffer(resp.values.data, dtype="<f4"),
                       resp.model_version, resp.request_id)


# --- channels ---------------------------------------------------------------------------------------------

def _credentials(tls_ca: str | Path | None, tls: bool):
    if tls_ca is None and not tls:
        return None
    return grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes() if tls_ca else None)


def _options(server_name: str | None) -> list:
    options = [("grpc.max_receive_message_length", _MAX_MESSAGE), ("grpc.max_send_message_length", _MAX_MESSAGE)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def _metadata(token: str | None):
    return (("authorization", f"Bearer {token}"),) if token else None


def read_token(path: str | Path | None) -> str | None:
    return None if path is None else Path(path).read_text().strip()


class _Backoff:
    """Exponential back-off with full jitter: 0.05 s, 0.1 s, ... up to max_delay."""

    def __init__(self, retries: int, base: float = 0.05, max_delay: float = 2.0):
        self.retries, self.base, self.max_delay = retries, base, max_delay

    def delays(self):
        for attempt in range(self.retries):
            yield random.uniform(0, min(self.max_delay, self.base * 2 ** attempt))


class Client:
    """Blocking client. `target` is "host:port"."""

    def __init__(self, target: str, *, tls_ca: str | Path | None = None, tls: bool = False, token: str | None = None,
                 server_name: str | None = None, timeout: float | None = 10.0, retries: int = 5):
        _check_client_target(target)
        creds = _credentials(tls_ca, tls)
        options = _options(server_name)
        self.channel = (grpc.secure_channel(target, creds, options) if creds is not None
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.metadata = _metadata(token)
        self.timeout = timeout
        self.backoff = _Backoff(retries)

    def _call(self, method, request, timeout):
        delays = self.backoff.delays()
        while True:
            try:
                return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                delay = next(delays, None) if e.code() in RETRYABLE else None
                if delay is None:
                    raise
                time.sleep(delay)

    def act(self, obs, mask, unit_id: int, *, timeout: float | None = None, **fields) -> pb.ActResponse:
        """One unit's action. fields: greedy, game_id, episode_id, spec_hash, prev_reward, prev_done, request_id."""
        return self._call(self.stub.Act, act_request(obs, mask, unit_id, **fields), timeout)

    def act_request(self, request: pb.ActRequest, *, timeout: float | None = None) -> pb.ActResponse:
        return self._call(self.stub.Act, request, timeout)

    def act_batch(self, obs: np.ndarray, mask: np.ndarray, unit_ids: np.ndarray, *, timeout: float | None = None,
                  **fields) -> FrameResult:
        """All units of one frame in one call."""
        return frame_result(self._call(self.stub.ActBatch, batch_request(obs, mask, unit_ids, **fields), timeout))

    def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)

    def health(self, *, timeout: float | None = None) -> str:
        """The service's grpc.health.v1 status: "SERVING" once a model is warm, "NOT_SERVING" before that and
        while draining (health checks need no token)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = self._call(stub.Check, health_pb2.HealthCheckRequest(), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def stream(self, *, timeout: float | None = None, answer_timeout: float | None = None) -> "ActStream":
        """Open one long-lived ActStream. `timeout`: deadline of the whole stream; `answer_timeout`: longest one
        `recv()` waits for its answer (then the stream is cancelled: StreamError DEADLINE_EXCEEDED). None: no
        limit (the defaults)."""
        return ActStream(self.stub, self.metadata, timeout, answer_timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_END = object()


class ActStream:
    """A blocking ActStream: `send(request)` then `recv()` answers in order; `act_many` does both."""

    def __init__(self, stub: pb_grpc.InferenceStub, metadata, timeout: float | None,
                 answer_timeout: float | None = None):
        if answer_timeout is not None and not answer_timeout > 0:
            raise ValueError(f"answer_timeout must be > 0 seconds (None: no limit), got {answer_timeout}")
        self._outbox: queue.Queue = queue.Queue()
        self._responses = stub.ActStream(iter(self._outbox.get, _END), timeout=timeout, metadata=metadata)
        self.answer_timeout = answer_timeout
        self._next_id = 0
        self._lock = threading.Lock()
        self._inbox: queue.Queue | None = None
        self._closed = False
        if answer_timeout is not None:
            # gRPC's blocking iterator has no timeout of its own: one thread per stream reads the answers, and
            # recv() waits on them for at most answer_timeout
            self._inbox = queue.Queue()
            threading.Thread(target=self._read_all, name="phalanx-stream-reader", daemon=True).start()

    def _read_all(self) -> None:
        try:
            for resp in self._responses:
                self._inbox.put(resp)
            self._inbox.put(None)
        except grpc.RpcError as e:
            self._inbox.put(e)

    def send(self, request: pb.ActRequest) -> int:
        """Queue one request; returns its request_id (assigned here when the request has none)."""
        with self._lock:
            if not request.request_id:
                self._next_id += 1
                request.request_id = self._next_id
            self._outbox.put(request)
            return request.request_id

    def recv(self) -> pb.ActResponse:
        """The next answer (in request order); an errored one raises StreamError."""
        if self._inbox is None:
            resp = next(self._responses, None)
        else:
            try:
                resp = self._inbox.get(timeout=self.answer_timeout)
            except queue.Empty:
                # A late answer would be taken for the next request's: the stream cannot go on.
                self._abandon()
                raise StreamError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {self.answer_timeout} s "
                                                                     "(answer_timeout); the stream is cancelled") from None
            if isinstance(resp, grpc.RpcError):
                self._inbox.put(resp)  # the stream is over: every later recv() says so too
                raise resp
        if resp is None:
            if self._inbox is not None:
                self._inbox.put(None)
            raise StreamError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream (draining?): reopen one")
        if resp.HasField("error"):
            raise _answer_error(resp)
        return resp

    def act_many(self, requests: Iterable[pb.ActRequest]) -> list[pb.ActResponse]:
        """Send all, then read as many answers: pipelined on the one stream. Every answer is read even when one
        request fails (StreamError with `.answers`), so the stream stays in step for the next call."""
        n = 0
        for req in requests:
            self.send(req)
            n += 1
        outcomes = []
        for _ in range(n):
            try:
                outcomes.append(self.recv())
            except StreamError as e:
                _record_failure(outcomes, e)
        return _all_answers(outcomes)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._outbox.put(_END)
        if self._inbox is not None:  # the reader thread drains; wait for the end it sees
            while not isinstance(self._inbox.get(), (type(None), grpc.RpcError)):
                pass
            return
        for _ in self._responses:  # drain until the server closes its side
            pass

    def _abandon(self) -> None:
        """Cancel the call, and end the request iterator too: gRPC's thread that sends the requests would
        otherwise wait on it for good (a thread lost per abandoned stream)."""
        if not self._closed:
            self._closed = True
            self._outbox.put(_END)
        self._responses.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._abandon()


class AsyncClient:
    """asyncio client (grpc.aio); same methods as Client, awaited. Use `async with AsyncClient(...)`."""

    def __init__(self, target: str, *, tls_ca: str | Path | None = None, tls: bool = False, token: str | None = None,
                 server_name: str | None = None, timeout: float | None = 10.0, retries: int = 5):
        _check_client_target(target)
        creds = _credentials(tls_ca, tls)
        options = _options(server_name)
        self.channel = (grpc.aio.secure_channel(target, creds, options) if creds is not None
                        else grpc.aio.insecure_channel(target, options))
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.metadata = _metadata(token)
        self.timeout = timeout
        self.backoff = _Backoff(retries)

    async def _call(self, method, request, timeout):
        delays = self.backoff.delays()
        while True:
            try:
                return await method(request, timeout=self.timeout if timeout is None else timeout,
                                    metadata=self.metadata)
            except grpc.aio.AioRpcError as e:
                delay = next(delays, None) if e.code() in RETRYABLE else None
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    async def act(self, obs, mask, unit_id: int, *, timeout: float | None = None, **fields) -> pb.ActResponse:
        return await self._call(self.stub.Act, act_request(obs, mask, unit_id, **fields), timeout)

    async def act_request(self, request: pb.ActRequest, *, timeout: float | None = None) -> pb.ActResponse:
        return await self._call(self.stub.Act, request, timeout)

    async def act_batch(self, obs: np.ndarray, mask: np.ndarray, unit_ids: np.ndarray, *,
                        timeout: float | None = None, **fields) -> FrameResult:
        return frame_result(await self._call(self.stub.ActBatch, batch_request(obs, mask, unit_ids, **fields),
                                             timeout))

    async def act_batch_request(self, request: pb.ActBatchRequest, *, timeout: float | None = None) -> FrameResult:
        return frame_result(await self._call(self.stub.ActBatch, request, timeout))

    async def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return await self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)

    def stream(self, *, timeout: float | None = None, answer_timeout: float | None = None) -> "AsyncActStream":
        """Open one long-lived ActStream. `timeout`: deadline of the whole stream; `answer_timeout`: longest one
        `recv()` waits for its answer (then the stream is cancelled: StreamError DEADLINE_EXCEEDED). None: no
        limit (the defaults)."""
        return AsyncActStream(self.stub.ActStream(timeout=timeout, metadata=self.metadata), answer_timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


class AsyncActStream:
    """An asyncio ActStream: `await send(req)`, `await recv()`; answers come in request order."""

    def __init__(self, call, answer_timeout: float | None = None):
        self.call = call
        self.answer_timeout = answer_timeout
        self._next_id = 0

    async def send(self, request: pb.ActRequest) -> int:
        if not request.request_id:
            self._next_id += 1
            request.request_id = self._next_id
        await self.call.write(request)
        return request.request_id

    async def recv(self) -> pb.ActResponse:
        try:
            async with asyncio.timeout(self.answer_timeout):
                resp = await self.call.read()
        except TimeoutError:
            # A late answer would be taken for the next request's: the stream cannot go on.
            self.call.cancel()
            raise StreamError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {self.answer_timeout} s "
                                                                 "(answer_timeout); the stream is cancelled") from None
        if resp is grpc.aio.EOF:
            raise StreamError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream (draining?): reopen one")
        if resp.HasField("error"):
            raise _answer_error(resp)
        return resp

    async def act_many(self, requests: Sequence[pb.ActRequest]) -> list[pb.ActResponse]:
        """Write the requests while reading as many answers (pipelined; answers in request order). Every answer
        is read even when one request fails (StreamError with `.answers`), so the stream stays in step."""
        async def write_all():
            for req in requests:
                await self.send(req)

        writer = asyncio.create_task(write_all())
        outcomes = []
        try:
            for _ in range(len(requests)):
                try:
                    outcomes.append(await self.recv())
                except StreamError as e:
                    _record_failure(outcomes, e)
        except BaseException:
            writer.cancel()  # a stream being abandoned takes no more writes (and no task is left behind)
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                await writer
            raise
        await writer  # every answer came, so every write went out (an answer may come before its write returns)
        return _all_answers(outcomes)

    async def close(self) -> None:
        await self.call.done_writing()
        while await self.call.read() is not grpc.aio.EOF:
            pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        if exc[0] is None:
            await self.close()
        else:
            self.call.cancel()
