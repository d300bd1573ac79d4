"""The gRPC inference server: the servicer, its wiring, and `serve()`.

One request's path: `Act` below validates it against the served model's spec (service/validation.py),
hands its rows to the dynamic batcher (service/batcher.py), which runs one forward pass for many requests
off the event loop: in the forward worker process (service/forward_process.py) holding the version that the
model holder (service/model_holder.py) serves, or in a thread through the holder itself; the caller's future
comes back with its slice of the outputs. Metrics (service/metrics.py) are counted on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from service._gen.phalanx.v1 import inference_pb2 as pb
from service._gen.phalanx.v1 import inference_pb2_grpc as pb_grpc
from service.batcher import Batcher, Outputs, ThreadForward
from service.experience import ExperienceLog
from service.forward_process import ProcessForward
from service.metrics import ServiceMetrics, start_metrics_server
from service.model_holder import ModelHolder
from service.validation import RequestError, Rows, frame_rows, unit_rows
from trainer.repository import ModelRepository

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "phalanx.v1.Inference"
OK = grpc.StatusCode.OK
FORWARD_WORKERS = ("process", "thread")


@dataclass
class ServeConfig:
    """Everything `phalanx serve` can be told; parsed once at the edge (service/commands.py)."""
    models: Path
    """Model repository root: <models>/<name>/<version>/."""
    name: str
    """Model name in the repository."""
    version: int | None = None
    """Serve exactly this version (no rolling forward); None = the newest complete version."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 / [::] for every interface)."""
    port: int = 50051
    """gRPC port; 0 = an ephemeral port (the bound one is logged and returned)."""
    max_batch_size: int = 1024
    """Most unit rows per forward pass (1 = batching off)."""
    max_queue_delay_ms: float = 2.0
    """Longest a request waits for its batch to fill (a lone caller never waits); 0 = take what is waiting."""
    max_queue: int = 8192
    """Most unit rows waiting; beyond it requests get RESOURCE_EXHAUSTED at once."""
    poll_seconds: float = 5.0
    """How often to look for a new model version (0 = never)."""
    min_eval_win_rate: float | None = None
    """Serve only versions whose card records an evaluation win rate at or above this (None = any)."""
    metrics_port: int | None = None
    """Serve Prometheus /metrics on this port (None = off)."""
    metrics_host: str = "127.0.0.1"
    """Interface of the /metrics endpoint."""
    tls_cert: Path | None = None
    """PEM certificate chain; with tls_key turns TLS on."""
    tls_key: Path | None = None
    """PEM private key."""
    auth_token_file: Path | None = None
    """File holding a bearer token that every call (but health checks) must present."""
    grace_seconds: float = 10.0
    """On SIGTERM/SIGINT: how long in-flight calls may take to finish."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest request or response message (ActBatch frames are the big ones)."""
    stream_window: int = 1024
    """Most requests of one ActStream in flight at once (reading pauses beyond it)."""
    torch_threads: int = 1
    """Intra-op threads of the forward pass (1 suits small policies: no thread hand-offs; 0: torch's default)."""
    forward_worker: str = "process"
    """Where the forward pass runs, off the event loop: `process` (a child process with its own GIL: the
    fast choice under load) or `thread` (a worker thread in this process: no extra process)."""
    seed: int = 0
    """Seed of the sampling generator (sampled, non-greedy actions)."""
    experience_dir: Path | None = None
    """Log every served unit-step as trajectories in Parquet shards here (None = off); service/experience.py."""
    experience_chunk_rows: int = 65536
    """Rows per experience shard: a chunk is written when it holds this many completed steps."""
    experience_max_open: int = 50000
    """Most units waiting for their step's reward; beyond it the stalest is evicted (written as truncated)."""
    experience_flush_seconds: float = 60.0
    """Also write the open chunk this often, so a quiet service's steps reach disk (0 = only when full)."""


def _deadline(context) -> float | None:
    """The call's deadline on the time.perf_counter() clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.perf_counter() + remaining


DEADLINE_SLACK = 0.05  # seconds; see _why_cancelled
MIN_MESSAGE_BYTES = 1 << 20  # a frame of 4,096 units (the default --max-queue) of 8m needs 1.3 MB
MAX_PENDING_CALLS = 65536  # calls gRPC holds for the handlers, all connections together (see _start's options)


def _why_cancelled(context) -> grpc.StatusCode:
    """Why gRPC cancelled a call's handler: DEADLINE_EXCEEDED when its deadline has passed, else CANCELLED (the
    client went away). The client gives up at its own copy of the deadline, which runs ahead of the server's
    (that one starts when the call arrives), so a cancellation within DEADLINE_SLACK of it is the deadline."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= DEADLINE_SLACK \
        else grpc.StatusCode.CANCELLED


def _tensor(array, dtype: int) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=array.shape, data=array.tobytes())


class InferenceServicer(pb_grpc.InferenceServicer):
    """The four RPCs of phalanx.v1.Inference."""

    def __init__(self, holder: ModelHolder, batcher: Batcher, metrics: ServiceMetrics, *, stream_window: int = 1024,
                 experience: ExperienceLog | None = None):
        self.holder = holder
        self.batcher = batcher
        self.metrics = metrics
        self.experience = experience
        self.stream_window = stream_window
        self.draining = False
        self._stream_readers: set[asyncio.Task] = set()

    def end_streams(self) -> None:
        """Draining: every open ActStream stops reading, answers what it has read, and ends with OK."""
        self.draining = True
        for reader in self._stream_readers:
            reader.cancel()

    def _unanswered(self, request: pb.ActRequest | pb.ActBatchRequest, rows: Rows | None = None) -> None:
        """A request that gets no answer logs no step, and ends its units' waiting steps (experience log)."""
        if self.experience is None:
            return
        if isinstance(request, pb.ActBatchRequest):
            self.experience.unanswered_frame(request, rows)
        else:
            self.experience.unanswered_unit(request)

    async def Act(self, request: pb.ActRequest, context) -> pb.ActResponse:
        start = time.perf_counter()
        try:
            rows = unit_rows(request, self.holder.require())
            out = await self.batcher.submit(rows, _deadline(context))
            if self.experience is not None:
                await self.experience.room()  # a disk behind holds the answer back (nothing awaited after it)
        except RequestError as e:
            self.metrics.answered("Act", e.code, time.perf_counter() - start)
            self._unanswered(request)
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:  # the deadline passed or the client went away: gRPC ended the call
            self.metrics.answered("Act", _why_cancelled(context), time.perf_counter() - start)
            self._unanswered(request)
            raise
        self.metrics.answered("Act", OK, time.perf_counter() - start, 1)
        if self.experience is not None:
            self.experience.record_unit(request, rows, out)
        return _unit_response(out, request.request_id)

    async def ActStream(self, request_iterator, context):
        """Reads requests as they come and answers them in order; up to stream_window can be in flight at once."""
        pending: asyncio.Queue = asyncio.Queue()  # (request, rows, start, future | RequestError), then None: the end
        window = asyncio.Semaphore(self.stream_window)  # taken before a read, given back when its answer is taken up
        deadline = _deadline(context)

        async def read() -> None:
            # Cancelled (a drain, or the call ended) only while it waits for room or for the next message, never
            # while it holds one: whatever it has read is queued, with no await in between.
            messages = aiter(request_iterator)
            while True:
                await window.acquire()
                try:
                    request = await anext(messages)
                except StopAsyncIteration:
                    return
                start, rows = time.perf_counter(), None
                try:
                    rows = unit_rows(request, self.holder.require())
                    item = self.batcher.enqueue(rows, deadline)
                except RequestError as e:
                    item = e
                pending.put_nowait((request, rows, start, item))

        reader = asyncio.create_task(read())
        # the end of the requests, however the reader ends: even cancelled before it ever ran (a drain under way)
        reader.add_done_callback(lambda _: pending.put_nowait(None))
        self._stream_readers.add(reader)
        if self.draining:
            reader.cancel()
        current = None  # the entry being answered, until its answer is counted
        gone = False  # gRPC ended the call: its deadline passed, or the client went away
        try:
            while (entry := await pending.get()) is not None:
                window.release()
                current = entry
                request, rows, start, item = entry
                request_id = request.request_id
                try:
                    if isinstance(item, RequestError):
                        raise item
                    out = await item
                    if self.experience is not None:
                        await self.experience.room()  # a disk behind holds the answer back (nothing awaited after)
                except RequestError as e:
                    current = None
                    self.metrics.answered("ActStream", e.code, time.perf_counter() - start)
                    self._unanswered(request)
                    yield pb.ActResponse(request_id=request_id, error=pb.Error(code=e.code.value[0], message=e.message))
                    continue
                current = None
                self.metrics.answered("ActStream", OK, time.perf_counter() - start, 1)
                if self.experience is not None:
                    self.experience.record_unit(request, rows, out)
                yield _unit_response(out, request_id)
            if not reader.cancelled():
                await reader  # surfaces an error of the request stream itself
        except (asyncio.CancelledError, GeneratorExit):  # cancelled at an await, or closed at a yield
            gone = True
            raise
        finally:
            self._stream_readers.discard(reader)
            reader.cancel()
            unanswered = [] if current is None else [current]
            while not pending.empty():  # nobody waits for these answers any more
                entry = pending.get_nowait()
                if entry is not None:
                    unanswered.append(entry)
                    if isinstance(entry[3], asyncio.Future):
                        entry[3].cancel()
            if gone:  # every message read but not answered ends with the call
                code, now = _why_cancelled(context), time.perf_counter()
                for entry in unanswered:
                    self.metrics.answered("ActStream", code, now - entry[2])
                    self._unanswered(entry[0])

    async def ActBatch(self, request: pb.ActBatchRequest, context) -> pb.ActBatchResponse:
        start, rows = time.perf_counter(), None
        try:
            rows = frame_rows(request, self.holder.require())
            out = await self.batcher.submit(rows, _deadline(context))
            if self.experience is not None:
                await self.experience.room(len(rows.unit))  # a disk behind holds the answer back (nothing awaited after)
        except RequestError as e:
            self.metrics.answered("ActBatch", e.code, time.perf_counter() - start)
            self._unanswered(request, rows)
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            self.metrics.answered("ActBatch", _why_cancelled(context), time.perf_counter() - start)
            self._unanswered(request, rows)
            raise
        response = pb.ActBatchResponse(
            actions=_tensor(out.action.astype("<i4"), pb.DATA_TYPE_INT32),
            log_probs=_tensor(out.log_prob.astype("<f4", copy=False), pb.DATA_TYPE_FLOAT32),
            probabilities=_tensor(out.prob.astype("<f4", copy=False), pb.DATA_TYPE_FLOAT32),
            values=_tensor(out.value.astype("<f4", copy=False), pb.DATA_TYPE_FLOAT32),
            model_version=out.version, request_id=request.request_id)
        self.metrics.answered("ActBatch", OK, time.perf_counter() - start, len(out.action))
        if self.experience is not None:
            self.experience.record_frame(request, rows, out)
        return response

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        start = time.perf_counter()
        try:
            model = self.holder.require()
        except RequestError as e:
            self.metrics.answered("GetModelInfo", e.code, time.perf_counter() - start)
            await context.abort(e.code, e.message)
        card = model.card
        self.metrics.answered("GetModelInfo", OK, time.perf_counter() - start)
        return pb.ModelInfo(name=model.name, version=model.version, spec_name=model.spec_name,
                            spec_hash=model.spec_hash, obs_size=model.obs_size, n_actions=model.n_actions,
                            n_agents=model.n_agents, sharing=str(card.get("sharing", "")),
                            scenario=str(card.get("scenario", "")), step=int(card.get("step") or 0),
                            created=str(card.get("created", "")))


def _unit_response(out: Outputs, request_id: int) -> pb.ActResponse:
    return pb.ActResponse(action=int(out.action[0]), log_prob=float(out.log_prob[0]), probability=float(out.prob[0]),
                          value=float(out.value[0]), model_version=out.version, request_id=request_id)


def _read_flag_file(flag: str, path: Path) -> bytes:
    """A file named by a flag, or an OSError that names the flag (not a bare "[Errno 2] No such file")."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise OSError(f"{flag} {path}: {e.strerror or e}") from None


def _check_tls_pair(cert: Path, key: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Refuse a certificate or key that TLS cannot use, naming the file. gRPC finds out only as it binds the
    port, and then reports nothing but a failed bind (which reads as "the port is in use")."""
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise ValueError(f"--tls-cert {cert}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)")
    if b"PRIVATE KEY-----" not in key_pem:
        raise ValueError(f"--tls-key {key}: no PEM private key in it (expected -----BEGIN PRIVATE KEY-----)")

    def no_password():  # else OpenSSL would prompt on the terminal for an encrypted key's passphrase
        raise ValueError("encrypted")

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=no_password)
    except (ssl.SSLError, ValueError) as e:
        reason = getattr(e, "reason", None)
        why = ("the key is encrypted; gRPC needs an unencrypted key" if str(e) == "encrypted" else
               "the key does not belong to the certificate" if reason == "KEY_VALUES_MISMATCH" else
               f"the key does not fit the certificate, or a PEM block is corrupt ({reason or e})")
        raise ValueError(f"--tls-cert {cert} and --tls-key {key} are not a usable certificate and private key: "
                         f"{why}") from None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Calls must carry `authorization: Bearer <token>`; health checks stay open for probes."""

    OPEN = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str, metrics: ServiceMetrics | None = None):
        if not token:
            raise ValueError("auth token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self.OPEN):
            return handler
        given = next((v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"), "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return handler
        if self.metrics is not None and method.startswith(f"/{SERVICE_NAME}/"):
            self.metrics.requests.labels(method.rsplit("/", 1)[1], grpc.StatusCode.UNAUTHENTICATED.name).inc()
        message = ("authorization: expected metadata 'authorization: Bearer <token>' with the server's token, "
                   + ("got a different token" if given else "got none"))

        async def deny(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


class RunningServer:
    """A started service: the gRPC server and its parts. Build with `await start_server(config)`."""

    def __init__(self, config: ServeConfig, registry: CollectorRegistry | None):
        self.config = config
        if config.forward_worker not in FORWARD_WORKERS:
            raise ValueError(f"forward_worker must be one of {', '.join(FORWARD_WORKERS)}, got {config.forward_worker!r}")
        for flag, port in (("--port", config.port), ("--metrics-port", config.metrics_port)):
            if port is not None and not 0 <= port <= 65535:  # grpc would quietly bind port % 65536
                raise ValueError(f"{flag} must lie in 0..65535 (0: any free port), got {port}")
        if config.version is not None and config.version < 1:
            raise ValueError(f"--version must be a positive integer (versions count from 1), got {config.version}")
        if config.torch_threads < 0:  # as the trainer's --threads
            raise ValueError(f"--torch-threads must be >= 0 (0: torch's default), got {config.torch_threads}")
        if not config.grace_seconds >= 0:
            raise ValueError(f"--grace-seconds must be >= 0, got {config.grace_seconds}")
        if not MIN_MESSAGE_BYTES <= config.max_message_bytes < 2 ** 31:  # gRPC's limit is a 32-bit count
            raise ValueError(f"max_message_bytes must lie in {MIN_MESSAGE_BYTES}..{2 ** 31 - 1} (--max-message-mb "
                             f"1..2047), got {config.max_message_bytes}")
        if Path(config.models).exists() and not Path(config.models).is_dir():  # a missing one may yet appear
            raise ValueError(f"--models {config.models} is a file, not a model repository (a directory)")
        self.metrics = ServiceMetrics(registry)
        self.process = (ProcessForward(threads=config.torch_threads, seed=config.seed)
                        if config.forward_worker == "process" else None)
        self.holder = ModelHolder(ModelRepository(config.models), config.name, version=config.version,
                                  poll_seconds=config.poll_seconds, min_eval_win_rate=config.min_eval_win_rate,
                                  warmup_batch_sizes=(1, min(64, config.max_batch_size), config.max_batch_size),
                                  seed=config.seed, metrics=self.metrics,
                                  before_swap=None if self.process is None else self.process.preload)
        self.forward = ThreadForward(self.holder.forward) if self.process is None else self._forward_in_process
        self.batcher = Batcher(self.forward, max_batch_size=config.max_batch_size,
                               max_queue_delay=config.max_queue_delay_ms / 1000.0, max_queue=config.max_queue,
                               metrics=self.metrics)
        try:
            self.experience = None if config.experience_dir is None else ExperienceLog(
                config.experience_dir, spec_source=lambda: self.holder.current, metrics=self.metrics,
                chunk_rows=config.experience_chunk_rows, max_open=config.experience_max_open,
                flush_seconds=config.experience_flush_seconds)
        except OSError as e:  # it creates the directory
            raise OSError(f"--experience-dir {config.experience_dir}: cannot create it: {e.strerror or e}") from None
        self.health = health.aio.HealthServicer()
        self.port: int = 0
        self.draining = False
        self._poller: asyncio.Task | None = None
        self._metrics_server = None
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.so_reuseport", 0),
                   # gRPC queues the calls it has not handed to a handler yet, and by default cancels some of them
                   # beyond 1,000 and all beyond 3,000: a burst of Act calls from a healthy client (one unit per
                   # call, 1,024 games of 3m) got CANCELLED, which no client retries. With room for far more, the
                   # calls reach the handlers, and the batcher's own queue (--max-queue) sheds what is too much with
                   # RESOURCE_EXHAUSTED. (A per-connection stream limit would not do: a new connection's first
                   # burst, sent before the client learns the limit, is refused.)
                   ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                   ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS)]
        interceptors = []
        if config.auth_token_file is not None:
            try:
                token = _read_flag_file("--auth-token-file", config.auth_token_file).decode().strip()
            except UnicodeDecodeError:
                raise ValueError(f"--auth-token-file {config.auth_token_file}: not a text file (the token must be "
                                 "UTF-8 text)") from None
            if not token:
                raise ValueError(f"--auth-token-file {config.auth_token_file} is empty: it must hold the token")
            interceptors.append(BearerTokenInterceptor(token, self.metrics))
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        self.servicer = InferenceServicer(self.holder, self.batcher, self.metrics, stream_window=config.stream_window,
                                          experience=self.experience)
        pb_grpc.add_InferenceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)

    async def _forward_in_process(self, obs, mask, unit, greedy) -> Outputs:
        return await self.process(self.holder.require(), obs, mask, unit, greedy)

    @property
    def metrics_port(self) -> int | None:
        """The bound /metrics port (useful with metrics_port=0), or None."""
        return None if self._metrics_server is None else self._metrics_server[0].server_port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def _start(self) -> None:
        c = self.config
        if c.torch_threads:  # 0: torch's default
            torch.set_num_threads(c.torch_threads)
        await self._update_health()
        address = f"{c.host}:{c.port}"
        if c.tls_cert is not None or c.tls_key is not None:
            if c.tls_cert is None or c.tls_key is None:
                raise ValueError("TLS needs both --tls-cert and --tls-key")
            key, cert = _read_flag_file("--tls-key", c.tls_key), _read_flag_file("--tls-cert", c.tls_cert)
            _check_tls_pair(c.tls_cert, c.tls_key, cert, key)
            creds = grpc.ssl_server_credentials([(key, cert)])
        try:
            if c.tls_cert is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, creds)
        except RuntimeError:  # grpcio raises where older versions returned 0
            self.port = 0
        if self.port == 0:
            raise OSError(f"could not listen on {address}: the port is in use, or the host is not an address of "
                          "this machine")
        if c.metrics_port is not None:
            try:
                self._metrics_server = start_metrics_server(c.metrics_port, c.metrics_host, self.metrics.registry)
            except OSError as e:
                raise OSError(f"could not serve /metrics on {c.metrics_host}:{c.metrics_port} (--metrics-host, "
                              f"--metrics-port): {e.strerror or e}") from None
        if self.process is not None:
            await self.process.start()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.holder.load_initial)  # blocking file reads off the loop
        self.batcher.start()
        if self.experience is not None:
            self.experience.start()
        await self.server.start()
        await self._update_health()
        self._poller = asyncio.create_task(self.holder.poll(self._update_health))
        model = self.holder.current
        log.info("listening on %s (%s, auth %s); %s", self.address, "TLS" if c.tls_cert else "plaintext",
                 "on" if c.auth_token_file else "off",
                 f"serving {c.name} version {model.version}" if model else "no model loaded")
        if model is None:
            log.warning("%s", self._nothing_served())

    def _nothing_served(self) -> str:
        """Why no model is served, for the log: a server waiting on a mistyped --models or --name looks just like
        one waiting for a trainer's first version, so say which it is."""
        c = self.config
        root = Path(c.models)
        wanted = f"version {c.version} of {c.name!r}" if c.version is not None else f"a version of {c.name!r}"
        refused = sorted(self.holder.refused)
        if refused:
            why = (f"no version of {c.name!r} in {root} can be served (refused: {', '.join(map(str, refused))}; "
                   "see above)")
        elif not root.is_dir():
            why = f"the models directory {root} {'is not a directory' if root.exists() else 'does not exist'} " \
                  "(check --models)"
        else:
            names = ModelRepository(root).models()
            if c.name in names and c.version is not None:
                why = (f"version {c.version} of {c.name!r} is not in {root} (it holds versions "
                       f"{', '.join(map(str, names[c.name]))})")
            elif c.name in names:  # versions there, none refused: reading them failed
                why = f"no version of {c.name!r} in {root} could be read (see above)"
            elif names:
                why = f"no version of {c.name!r} in {root} (models holds: {', '.join(names)}; check --name)"
            else:
                why = f"no version of {c.name!r} in {root} (it holds no models yet)"
        if not c.poll_seconds:
            return f"{why}; no polling (poll_seconds 0): UNAVAILABLE"
        return (f"{why}: serving nothing (UNAVAILABLE) until {wanted} appears; a trainer may still publish one "
                f"(looking every {c.poll_seconds:g} s)")

    async def _update_health(self) -> None:
        serving = self.holder.current is not None and not self.draining
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new calls, let in-flight ones finish within `grace` seconds."""
        if self.draining:
            return
        grace = self.config.grace_seconds if grace is None else grace
        self.draining = True
        self.holder.closed = True
        await self.health.enter_graceful_shutdown()
        self.batcher.flush_now()
        self.servicer.end_streams()
        if self._poller is not None:
            self._poller.cancel()
        await self.server.stop(grace)
        await self.batcher.close()
        if self.process is not None:
            await self.process.close()
        else:
            await self.forward.close()
        if self.experience is not None:  # every answered step reaches a shard, waiting ones as truncated
            await self.experience.close()
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            server.shutdown()
            server.server_close()
            self._metrics_server = None


async def start_server(config: ServeConfig, registry: CollectorRegistry | None = None) -> RunningServer:
    """Build, bind and start the service; returns once it listens (and the initial model, if any, is warm)."""
    running = RunningServer(config, registry)
    try:
        await running._start()
    except BaseException:
        # nothing left behind: no orphaned forward worker, no /metrics port held, no writer thread
        try:
            await running.stop(grace=0)
        except Exception:  # noqa: BLE001 - the start's own error is the one to report
            log.exception("cleaning up after a failed start")
        raise
    return running


async def serve(config: ServeConfig, on_listening: Callable[[RunningServer], None] | None = None,
                registry: CollectorRegistry | None = None) -> dict:
    """Run the service until SIGTERM or SIGINT, then shut down gracefully; returns a summary.
    Raises ValueError when nothing could ever be served (no servable version, and no polling)."""
    # Handlers first: a signal during the start (loading and warming a model can take seconds) must end it. As a
    # container's PID 1 the process would otherwise ignore it, since PID 1 gets no default action for SIGTERM.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(start_server(config, registry))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # serve() itself cancelled (embedded in a larger program): take the start with it
        starting.cancel()
        stopped.cancel()
        raise
    if not starting.done():
        log.info("signal received while starting: stopping")
        starting.cancel()  # start_server cleans up what it had started
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return {"event": "stopped", "address": None, "model": config.name, "version": None,
                "stopped_while_starting": True}
    stopped.cancel()
    running = starting.result()
    if running.holder.current is None and config.poll_seconds == 0:
        # It would answer UNAVAILABLE forever: only a poll could bring a version in.
        await running.stop(grace=0)
        refused = running.holder.refused
        why = f" (refused: {', '.join(map(str, sorted(refused)))}; see the log)" if refused else ""
        what = (f"version {config.version} of {config.name!r} in {config.models} cannot be served"
                if config.version is not None else f"no version of {config.name!r} in {config.models} can be served")
        raise ValueError(f"{what}{why}, and --poll-seconds 0 never looks again: publish a version first, or poll "
                         "(--poll-seconds > 0)")
    if on_listening is not None:
        on_listening(running)
    await stop.wait()
    log.info("signal received: refusing new calls, finishing those in flight (grace %.1f s)", config.grace_seconds)
    await running.stop()
    log.info("stopped")
    model = running.holder.current
    return {"event": "stopped", "address": running.address, "model": config.name,
            "version": model.version if model else None, "reloads": running.holder.reloads,
            "refused_versions": sorted(running.holder.refused),
            **({} if running.experience is None else
               {"experience_rows": running.experience.rows_written,
                "experience_shards": running.experience.shards_written})}
