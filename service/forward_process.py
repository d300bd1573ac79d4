"""The forward pass in a child process, so that it never competes with the event loop for the GIL.

Why a process and not a thread: under load the server's event loop holds the GIL nearly all the time.
A forward thread in the same process has to win the GIL back at every step of its Python and torch work,
and those hand-offs cost far more than the forward pass itself (measured with 64 clients: the server
spent 170 us of CPU per answered unit with a forward thread, 120 us computing on the loop, and the same
number of units/s as a bare echo server with this process; see bench/RESULTS.md). A child process has
its own GIL: the loop writes one message, goes on serving, and reads one reply.

The child holds the policies (weights sent as safetensors bytes with their JSON config: no pickle, and no
access to the model repository needed) and the sampling generator. One socket, length-prefixed messages,
strictly one request -> one reply at a time:

    header = kind (4 bytes), a (uint32), b (uint32), payload length (uint64); little-endian
    LOAD   a = version; payload = config length (uint32) + config JSON + safetensors
           -> OKAY (the child builds it in a thread meanwhile) | FAIL
    POLL   a = version   -> WAIT (still building) | OKAY (loaded: RUNs may name it) | FAIL
    RUN    a = rows, b = version; payload = obs (rows x O f32) + mask (rows x N u8) + unit (rows i64)
           + greedy (rows u8)   -> OUT_ a = rows; payload = action (i64) + log_prob (f32) + value (f32) | FAIL
    FAIL   payload = UTF-8 message

Versions are loaded ahead of the swap (the model holder calls `preload` while it prepares a version, off
the request path) and every RUN names the version that must answer it. Building a network and its serving
graph takes the child tens of milliseconds (more for large independent armies), so it builds in a thread and
the server polls for it between batches: forward passes of the serving version go on meanwhile. Both sides
keep the two versions loaded (the moment POLL says OKAY) or used most recently (the same rule applied to the same sequence of messages, so they agree on
what the child holds): the one serving and the one about to replace it, whatever their numbers, since a
rollback swaps in an older version.
If the child dies, the batch in flight fails with UNAVAILABLE and the next batch starts a new child.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import struct
import subprocess
import signal
import sys
import threading

import grpc
import numpy as np

from service.batcher import Outputs
from service.validation import RequestError

log = logging.getLogger(__name__)

HEADER = struct.Struct("<4sQQQ")  # kind, two numbers (rows, version: unbounded integers), payload length
KEEP_VERSIONS = 2  # the one serving and the one about to replace it
LOAD_POLL_SECONDS = 0.005  # how often the server asks whether a version being built is ready


def _keep_recent(models: dict, version: int, value) -> None:
    """Mark `version` as the most recently loaded or used (dicts keep insertion order: oldest first) and
    forget the least recently used beyond KEEP_VERSIONS. By recency, not number: a rollback to an old
    version must not evict the very version it just loaded."""
    models.pop(version, None)
    models[version] = value
    while len(models) > KEEP_VERSIONS:
        del models[next(iter(models))]


def _pack(kind: bytes, a: int = 0, b: int = 0, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, a, b, len(payload)) + payload


# --- the child --------------------------------------------------------------------------------------------------

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("the server closed the forward socket")
        got += k
    return bytes(buf)


class _Child:
    """The child's state: loaded versions (policy, serving graph) and the sampling generator."""

    def __init__(self, threads: int, seed: int):
        import torch

        if threads:  # 0: torch's default
            torch.set_num_threads(threads)
        self.torch = torch
        self.generator = torch.Generator().manual_seed(seed)
        self.models: dict[int, tuple] = {}
        self.loading: dict[int, tuple[threading.Thread, list]] = {}  # version -> (builder, [its result])

    def load(self, version: int, payload: bytes) -> bytes:
        """Start building `version` in a thread: RUNs of the versions already here go on meanwhile."""
        result: list = []
        builder = threading.Thread(target=self._build, args=(payload, result), name=f"load-{version}", daemon=True)
        self.loading[version] = (builder, result)
        builder.start()
        return _pack(b"OKAY")

    def _build(self, payload: bytes, result: list) -> None:
        from safetensors.torch import load as st_load

        from trainer.policy import Policy

        try:
            (n,) = struct.unpack_from("<I", payload)
            policy = Policy.from_config(json.loads(payload[4:4 + n]), init_weights=False)  # all of them come next
            policy.load_state_dict(st_load(payload[4 + n:]))
            policy.eval()
            try:  # made and checked here as in the holder (a graph does not cross the socket)
                graph = policy.serving_graph()
            except Exception:  # noqa: BLE001 - the eager graph gives the same answers, only slower
                graph = None
            result.append((policy, graph))
        except Exception as e:  # noqa: BLE001 - the server hears about it at its next POLL
            result.append(e)

    def poll(self, version: int) -> bytes:
        if version not in self.loading:
            raise KeyError(f"version {version} is not being loaded here")
        builder, result = self.loading[version]
        if builder.is_alive():
            return _pack(b"WAIT")
        del self.loading[version]
        if isinstance(result[0], Exception):
            raise result[0]
        _keep_recent(self.models, version, result[0])
        return _pack(b"OKAY")

    def run(self, rows: int, version: int, payload: bytes) -> bytes:
        if version not in self.models:
            raise KeyError(f"version {version} is not loaded here (loaded: {sorted(self.models)})")
        policy, graph = self.models[version]
        _keep_recent(self.models, version, (policy, graph))  # as the server marks it when it sends this RUN
        O, N = policy.obs_size, policy.n_actions
        expected = rows * (O * 4 + N + 8 + 1)
        if len(payload) != expected:
            raise ValueError(f"RUN of {rows} rows needs {expected} bytes, got {len(payload)}")
        buf = bytearray(payload)  # writable, so torch.from_numpy shares it without a warning
        obs = np.frombuffer(buf, np.float32, rows * O, 0).reshape(rows, O)
        at = rows * O * 4
        mask = np.frombuffer(buf, np.bool_, rows * N, at).reshape(rows, N)
        at += rows * N
        unit = np.frombuffer(buf, np.int64, rows, at)
        greedy = np.frombuffer(buf, np.bool_, rows, at + rows * 8)
        torch = self.torch
        with torch.inference_mode():
            out = policy.act(torch.from_numpy(obs), torch.from_numpy(mask), torch.from_numpy(unit),
                             True if greedy.all() else torch.from_numpy(greedy), generator=self.generator,
                             graph=graph, checked=True)
        return _pack(b"OUT_", rows, version, out.action.numpy().astype("<i8").tobytes()
                     + out.log_prob.numpy().astype("<f4").tobytes() + out.value.numpy().astype("<f4").tobytes())


def child_main(fd: int, threads: int, seed: int) -> int:
    # Ctrl-C reaches the whole process group; the server drains on it and still needs us meanwhile.
    # We end when the server closes the socket (or exits: the kernel closes it then).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # While a version builds in a thread, a RUN waits for the GIL at each step: hand it over sooner than
    # Python's default 5 ms.
    sys.setswitchinterval(0.0005)
    sock = socket.socket(fileno=fd)
    child = _Child(threads, seed)
    try:
        sock.sendall(_pack(b"OKAY"))  # ready: torch is imported
    except ConnectionError:
        return 0  # the server stopped while we started (a SIGTERM during its own start)
    while True:
        try:
            kind, a, b, length = HEADER.unpack(_recv_exact(sock, HEADER.size))
            payload = _recv_exact(sock, length)
        except (EOFError, ConnectionError):
            return 0  # the server went away or closed us: nothing left to answer
        try:
            if kind == b"LOAD":
                answer = child.load(a, payload)
            elif kind == b"RUN ":
                answer = child.run(a, b, payload)
            elif kind == b"POLL":
                answer = child.poll(a)
            else:
                raise ValueError(f"unknown message kind {kind!r}")
        except Exception as e:  # noqa: BLE001 - the server hears about every failure
            answer = _pack(b"FAIL", payload=f"{type(e).__name__}: {e}".encode())
        try:
            sock.sendall(answer)
        except (BrokenPipeError, ConnectionError):
            return 0  # the server closed the socket while we computed (shutdown): nobody waits for this


# --- the server's side ------------------------------------------------------------------------------------------

class WorkerStartError(RuntimeError):
    """The forward worker process did not come up (or did not say it was ready)."""


class WorkerHung(ConnectionError):
    """The forward worker process did not answer in time (stopped, deadlocked, swapped out): it was killed."""


class ProcessForward:
    """The batcher's forward pass, run by a child process: `await forward(model, obs, mask, unit, greedy)`.

    Start on the event loop (`await start()`); `preload(model)` is for the model holder's loading thread.
    """

    def __init__(self, *, threads: int = 1, seed: int = 0, start_timeout: float = 120.0, reply_timeout: float = 30.0):
        # reply_timeout: every reply comes at once (a forward pass takes milliseconds; a LOAD builds in a thread
        # after its OKAY), so a child silent that long is stuck, and every caller would wait with it
        self.threads, self.seed, self.start_timeout, self.reply_timeout = threads, seed, start_timeout, reply_timeout
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None  # one request -> reply exchange at a time
        self._loaded: dict[int, object] = {}  # version -> the ServedModel the child holds
        self._closed = False

    @property
    def loaded_versions(self) -> list[int]:
        """Versions the child holds now (the served one, and the next one once preloaded)."""
        return sorted(self._loaded)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        async with self._lock:
            await self._spawn()

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        try:
            self.proc = subprocess.Popen(self._command(theirs.fileno()), pass_fds=(theirs.fileno(),), env=env,
                                         stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours, limit=1 << 20)
        self._loaded = {}
        try:
            kind, _, _, _ = await asyncio.wait_for(self._read_reply(), self.start_timeout)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
            await self._kill()
            raise WorkerStartError(f"the forward worker process did not start ({type(e).__name__})") from None
        if kind != b"OKAY":
            await self._kill()
            raise WorkerStartError(f"the forward worker process did not start (said {kind!r})")
        log.info("forward worker process %d ready", self.proc.pid)

    def _command(self, fd: int) -> list[str]:
        return [sys.executable, "-m", "service.forward_process", "--fd", str(fd), "--threads", str(self.threads),
                "--seed", str(self.seed)]

    async def _read_reply(self) -> tuple[bytes, int, int, bytes]:
        kind, a, b, length = HEADER.unpack(await self._reader.readexactly(HEADER.size))
        return kind, a, b, await self._reader.readexactly(length)

    async def _exchange(self, message: bytes) -> tuple[bytes, int, int, bytes]:
        """Send one message and read its reply (caller holds the lock); a child that does not reply within
        reply_timeout is killed, and the next exchange starts a new one."""
        self._writer.write(message)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that arrives as the
            # reply does (the batcher's close() then waited for its cancelled task for good)
            async with asyncio.timeout(self.reply_timeout):
                return await self._read_reply()
        except TimeoutError:
            pid = None if self.proc is None else self.proc.pid
            log.error("forward worker process %s did not answer within %g s; killing it", pid, self.reply_timeout)
            await self._kill()
            raise WorkerHung(f"the forward worker process did not answer within {self.reply_timeout:g} s and was "
                             "replaced") from None

    async def _start_load(self, model) -> None:
        """Send one version to the child, which starts building it (caller holds the lock)."""
        from safetensors.torch import save as st_save

        config = json.dumps(model.policy.config).encode()
        weights = st_save({k: v.detach().contiguous() for k, v in model.policy.state_dict().items()})
        kind, _, _, payload = await self._exchange(
            _pack(b"LOAD", model.version, 0, struct.pack("<I", len(config)) + config + weights))
        if kind != b"OKAY":
            raise RuntimeError(f"the forward worker could not load version {model.version}: "
                               f"{payload.decode(errors='replace')}")

    async def _loaded_yet(self, model) -> bool:
        """Ask whether the child has finished building `model` (caller holds the lock)."""
        kind, _, _, payload = await self._exchange(_pack(b"POLL", model.version))
        if kind == b"WAIT":
            return False
        if kind != b"OKAY":
            raise RuntimeError(f"the forward worker could not load version {model.version}: "
                               f"{payload.decode(errors='replace')}")
        _keep_recent(self._loaded, model.version, model)
        return True

    async def load(self, model) -> None:
        """Load `model` into the child; batches of the serving version go on between the polls."""
        if self._closed:
            raise RuntimeError("the forward worker is shut down")

        async def start() -> None:
            async with self._lock:
                if self._closed:  # close() took the lock first: no new worker after it
                    raise RuntimeError("the forward worker is shut down")
                if self._dead():
                    await self._respawn()
                await self._start_load(model)

        async def poll() -> bool:
            async with self._lock:
                if self._closed:
                    raise RuntimeError("the forward worker is shut down")
                if self._dead():
                    raise RuntimeError(f"the forward worker exited while loading version {model.version}")
                return await self._loaded_yet(model)

        # Shielded: cancelling this load (preload gave up waiting) between a message and its reply would leave
        # the reply for the next exchange to read as its own.
        await asyncio.shield(start())
        while True:
            await asyncio.sleep(LOAD_POLL_SECONDS)
            if await asyncio.shield(poll()):
                return

    def preload(self, model) -> None:
        """Blocking: load `model` into the child before it is swapped in. For the holder's loading thread
        (never the event loop's own thread, which this call would deadlock)."""
        if self._loop is None:
            raise RuntimeError("ProcessForward.start() has not run")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise RuntimeError("preload() blocks; call it from a thread, or await load() on the loop")
        loading = asyncio.run_coroutine_threadsafe(self.load(model), self._loop)
        try:
            loading.result(self.start_timeout)
        except TimeoutError:
            loading.cancel()  # no late poll may take the child's answer from the retry that comes next
            raise

    def _dead(self) -> bool:
        return self.proc is None or self.proc.poll() is not None or self._writer is None \
            or self._writer.is_closing()

    async def _respawn(self) -> None:
        code = None if self.proc is None else self.proc.poll()
        log.error("forward worker process exited (code %s); starting a new one", code)
        await self._kill()
        self.restarts += 1
        await self._spawn()

    async def __call__(self, model, obs: np.ndarray, mask: np.ndarray, unit: np.ndarray,
                       greedy: np.ndarray) -> Outputs:
        if self._closed:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server shutting down")
        rows = obs.shape[0]
        message = _pack(b"RUN ", rows, model.version, b"".join((
            np.ascontiguousarray(obs, "<f4").tobytes(), np.ascontiguousarray(mask, np.bool_).tobytes(),
            np.ascontiguousarray(unit, "<i8").tobytes(), np.ascontiguousarray(greedy, np.bool_).tobytes())))
        async with self._lock:
            if self._closed:  # close() took the lock first: no new worker after it
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "server shutting down")
            try:
                if self._dead():
                    await self._respawn()
                if model.version in self._loaded:
                    _keep_recent(self._loaded, model.version, model)  # as the child marks it on this RUN
                else:  # a model that did not come through preload (a new worker after a crash): wait for it
                    await self._start_load(model)
                    while not await self._loaded_yet(model):
                        await asyncio.sleep(LOAD_POLL_SECONDS)
                kind, a, _, payload = await self._exchange(message)
            except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
                await self._kill()  # the next batch starts a new worker
                why = str(e) if isinstance(e, WorkerHung) else f"the forward worker process died ({type(e).__name__})"
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{why}; retry") from None
            except WorkerStartError as e:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{e}; retry") from None
        if kind != b"OUT_" or a != rows:
            raise RuntimeError(f"forward worker: {payload.decode(errors='replace') if kind == b'FAIL' else kind}")
        action = np.frombuffer(payload, "<i8", rows, 0)
        log_prob = np.frombuffer(payload, "<f4", rows, 8 * rows)
        value = np.frombuffer(payload, "<f4", rows, 12 * rows)
        return Outputs(model.version, action, log_prob, np.exp(log_prob), value)

    async def _kill(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, proc.wait)

    async def close(self, timeout: float = 10.0) -> None:
        """Close the socket (the child exits on EOF); kill it if it has not exited within `timeout`."""
        self._closed = True
        if self._lock is None:
            return
        async with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            proc, self.proc = self.proc, None
            if proc is None:
                return
            wait = asyncio.get_running_loop().run_in_executor(None, proc.wait)
            try:
                await asyncio.wait_for(wait, timeout)
            except asyncio.TimeoutError:
                log.warning("forward worker process %d did not exit in %.0f s; killing it", proc.pid, timeout)
                proc.kill()
                await asyncio.get_running_loop().run_in_executor(None, proc.wait)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Phalanx's forward-pass worker. `phalanx serve` starts it with one end "
                                            "of a socket pair; it is not meant to be run by hand.")
    p.add_argument("--fd", type=int, required=True, help="file descriptor of the socket to the server")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    args = p.parse_args(argv)
    return child_main(args.fd, args.threads, args.seed)


if __name__ == "__main__":
    sys.exit(main())
