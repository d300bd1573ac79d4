"""Load test of the inference service: units/s and p50/p99 latency per RPC style and client count.

    python bench/serve_load.py                                   # full run (about 4 minutes)
    python bench/serve_load.py --duration 1 --clients 1,64 --rpcs unary,batch   # a short check

Four servers run one after another (each alone on the machine, in its own process):
  batched    `phalanx serve` with its defaults: batching, the forward pass in a worker process
  thread     the same with --forward-worker thread (the forward pass in a thread of the server process)
  unbatched  the same as batched with --max-batch-size 1
  echo       a bare grpc.aio server that answers the same messages with a canned reply: no validation,
             no batching, no model (the ceiling that gRPC in Python allows)
For each server, RPC style (unary Act, one ActStream per client, ActBatch with --frame-units-unit frames)
and client count, load-generator processes (multiprocessing) run closed-loop clients as asyncio tasks
for --duration seconds after a short warm-up. A unit is one unit's action (a frame counts its units).

Prints a table, then ONE JSON line: act_vs_echo and act_vs_unbatched (unary Act units/s ratios at the
--ratio-clients count, 64 by default), the same for stream, batch_units_per_s / batch_p99_ms (the best
ActBatch cell of the batched server with p99 under 10 ms, else the best overall), and the batched
server's average batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service._gen.phalanx.v1 import inference_pb2 as pb  # noqa: E402
from service._gen.phalanx.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402
from service.client import act_request, batch_request  # noqa: E402


# --- the echo server ------------------------------------------------------------------------------------------

class EchoServicer(pb_grpc.InferenceServicer):
    """Answers every request with a canned response of the real shape (request_id echoed)."""

    def __init__(self, frame_units: int):
        self.frame = pb.ActBatchResponse(
            actions=pb.Tensor(dtype=pb.DATA_TYPE_INT32, shape=[frame_units], data=bytes(4 * frame_units)),
            log_probs=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[frame_units], data=bytes(4 * frame_units)),
            probabilities=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[frame_units], data=bytes(4 * frame_units)),
            values=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[frame_units], data=bytes(4 * frame_units)),
            model_version=1)

    async def Act(self, request, context):
        return pb.ActResponse(action=1, log_prob=-0.5, probability=0.6, value=0.25, model_version=1,
                              request_id=request.request_id)

    async def ActStream(self, request_iterator, context):
        async for request in request_iterator:
            yield pb.ActResponse(action=1, log_prob=-0.5, probability=0.6, value=0.25, model_version=1,
                                 request_id=request.request_id)

    async def ActBatch(self, request, context):
        return self.frame

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(name="echo", version=1)


async def run_echo_server(port: int, frame_units: int) -> None:
    import grpc
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.so_reuseport", 0)])
    pb_grpc.add_InferenceServicer_to_server(EchoServicer(frame_units), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(json.dumps({"event": "listening", "port": bound}), flush=True)
    await server.wait_for_termination()


# --- the load generator ------------------------------------------------------------------------------------------

def _requests(obs_size: int, n_actions: int, n_agents: int, frame_units: int, count: int = 64):
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((max(count, frame_units), obs_size)).astype(np.float32)
    mask = rng.random((max(count, frame_units), n_actions)) < 0.7
    mask[:, 1] = True
    units = np.arange(len(obs)) % n_agents
    singles = [act_request(obs[i], mask[i], int(units[i]), greedy=True) for i in range(count)]
    frame = batch_request(obs[:frame_units], mask[:frame_units], units[:frame_units], greedy=True)
    return singles, frame


async def _client_loop(stub, rpc: str, singles, frame, frame_units: int, warm_until: float, stop_at: float,
                       latencies: list, counter: list) -> None:
    import grpc
    i = 0
    if rpc == "stream":
        call = stub.ActStream()
        while True:
            req = singles[i % len(singles)]
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            await call.write(req)
            resp = await call.read()
            t1 = time.perf_counter()
            if resp is grpc.aio.EOF or resp.HasField("error"):
                raise RuntimeError(f"stream failed: {resp}")
            if t0 >= warm_until:
                latencies.append(t1 - t0)
                counter[0] += 1
            i += 1
        await call.done_writing()
        return
    method = stub.Act if rpc == "unary" else stub.ActBatch
    units = 1 if rpc == "unary" else frame_units
    while True:
        req = singles[i % len(singles)] if rpc == "unary" else frame
        t0 = time.perf_counter()
        if t0 >= stop_at:
            break
        try:
            await method(req, timeout=30)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            counter[1] += 1  # shed by the server: back off a little and go on
            await asyncio.sleep(0.001)
            continue
        t1 = time.perf_counter()
        if t0 >= warm_until:
            latencies.append(t1 - t0)
            counter[0] += units
        i += 1


def _load_process(args: tuple) -> tuple[int, list, int]:
    target, rpc, clients, spec, frame_units, warmup, duration, start_at = args

    async def main():
        import grpc
        singles, frame = _requests(*spec, frame_units)
        async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 16 << 20)]) as ch:
            await ch.channel_ready()
            stub = pb_grpc.InferenceStub(ch)
            await asyncio.sleep(max(0.0, start_at - time.time()))  # all processes start together
            now = time.perf_counter()
            latencies: list = []
            counter = [0, 0]  # units answered, requests shed
            await asyncio.gather(*(_client_loop(stub, rpc, singles, frame, frame_units, now + warmup,
                                                now + warmup + duration, latencies, counter)
                                   for _ in range(clients)))
            return counter[0], latencies, counter[1]

    return asyncio.run(main())


def measure(pool, target: str, rpc: str, clients: int, procs: int, spec, frame_units: int, warmup: float,
            duration: float) -> dict:
    procs = max(1, min(procs, clients))
    shares = [clients // procs + (1 if p < clients % procs else 0) for p in range(procs)]
    start_at = time.time() + 1.0
    results = pool.map(_load_process, [(target, rpc, n, spec, frame_units, warmup, duration, start_at)
                                       for n in shares])
    units = sum(r[0] for r in results)
    lat = np.concatenate([np.asarray(r[1]) for r in results]) * 1000.0 if units else np.zeros(1)
    return {"units_per_s": units / duration, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "calls": int(lat.size), "shed": sum(r[2] for r in results)}


# --- servers -----------------------------------------------------------------------------------------------------

def _start(cmd: list[str]) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit(f"server did not start: {' '.join(cmd)}")
    return proc, json.loads(line)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and its live children (the forward worker) so far (Linux
    /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, IndexError, ValueError):
        return None
    return total + sum(_cpu_seconds(int(child)) or 0.0 for child in children)


def _batch_stats(metrics_port: int | None) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    if metrics_port is None:
        return 0.0, 0.0
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name.startswith("phalanx_batch_size_units")}
    return values.get("phalanx_batch_size_units_sum", 0.0), values.get("phalanx_batch_size_units_count", 0.0)


def make_model(root: Path, scenario_name: str):
    import torch

    from trainer.policy import Policy
    from trainer.repository import ModelRepository
    from trainer.sim import load_scenario

    torch.manual_seed(0)
    sc = load_scenario(scenario_name)
    ModelRepository(root).save("bench", Policy.for_scenario(sc, critic="local"), scenario=sc, step=0,
                               eval_win_rate=None)
    return sc.obs_size, sc.n_actions, sc.n_agents


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Inference service load test (see the module docstring).")
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per cell (default 4)")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each cell (default 0.5)")
    p.add_argument("--clients", default="1,16,64,256", help="concurrent client counts (default 1,16,64,256)")
    p.add_argument("--rpcs", default="unary,stream,batch", help="RPC styles (default unary,stream,batch)")
    p.add_argument("--servers", default="batched,thread,unbatched,echo",
                   help="servers (default batched,thread,unbatched,echo)")
    p.add_argument("--procs", type=int, default=2, help="load-generator processes (default 2)")
    p.add_argument("--frame-units", type=int, default=64, help="units per ActBatch frame (default 64)")
    p.add_argument("--scenario", default="3m", help="scenario of the random model served (default 3m)")
    p.add_argument("--ratio-clients", type=int, default=64, help="client count of the ratios (default 64)")
    p.add_argument("--server-args", default="", help="extra flags for the batched server, e.g. '--max-queue-delay-ms 1'")
    p.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.echo_server is not None:
        asyncio.run(run_echo_server(args.echo_server, args.frame_units))
        return 0

    clients = [int(c) for c in args.clients.split(",")]
    rpcs = args.rpcs.split(",")
    servers = args.servers.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_model(Path(tmp), args.scenario)
        # the queue holds every outstanding unit, so the figures measure capacity, not shedding
        max_queue = max(8192, max(clients) * args.frame_units)
        serve = [sys.executable, "-m", "service", "serve", "--models", tmp, "--name", "bench", "--port", "0",
                 "--poll-seconds", "0", "--metrics-port", "0", "--log-level", "WARNING", "--max-queue", str(max_queue)]
        commands = {"batched": serve + args.server_args.split(),
                    "thread": serve + args.server_args.split() + ["--forward-worker", "thread"],
                    "unbatched": serve + ["--max-batch-size", "1"],
                    "echo": [sys.executable, str(Path(__file__).resolve()), "--echo-server", "0",
                             "--frame-units", str(args.frame_units)]}
        ctx = mp.get_context("spawn")
        with ctx.Pool(max(1, args.procs)) as pool:
            for server in servers:
                proc, ready = _start(commands[server])
                target = f"127.0.0.1:{ready['port']}"
                try:
                    for rpc in rpcs:
                        for n in clients:
                            before = _batch_stats(ready.get("metrics_port"))
                            cpu_before = _cpu_seconds(proc.pid)
                            cell = measure(pool, target, rpc, n, args.procs, spec, args.frame_units, args.warmup,
                                           args.duration)
                            cpu_after = _cpu_seconds(proc.pid)
                            after = _batch_stats(ready.get("metrics_port"))
                            batches = after[1] - before[1]
                            # server CPU per unit: robust to other load on the machine (covers warm-up too)
                            units_total = cell["units_per_s"] * (args.duration + args.warmup)
                            cpu_us = (1e6 * (cpu_after - cpu_before) / units_total
                                      if cpu_before is not None and cpu_after is not None and units_total else None)
                            cell.update(server=server, rpc=rpc, clients=n, server_cpu_us_per_unit=cpu_us,
                                        avg_batch=(after[0] - before[0]) / batches if batches else None)
                            rows.append(cell)
                            print(f"{server:9s} {rpc:6s} {n:4d} clients  {cell['units_per_s']:11,.0f} units/s  "
                                  f"p50 {cell['p50_ms']:7.2f} ms  p99 {cell['p99_ms']:7.2f} ms  server cpu "
                                  + (f"{cell['server_cpu_us_per_unit']:.1f} us/unit" if cpu_us else "-") + "  avg batch "
                                  + (f"{cell['avg_batch']:.1f}" if cell["avg_batch"] else "-")
                                  + (f"  shed {cell['shed']}" if cell["shed"] else ""), flush=True)
                finally:
                    _stop(proc)

    def cell(server, rpc, n):
        return next((r for r in rows if (r["server"], r["rpc"], r["clients"]) == (server, rpc, n)), None)

    def ratio(rpc, other, n=args.ratio_clients):
        a, b = cell("batched", rpc, n), cell(other, rpc, n)
        return round(a["units_per_s"] / b["units_per_s"], 3) if a and b and b["units_per_s"] else None

    batch_cells = [r for r in rows if r["server"] == "batched" and r["rpc"] == "batch"]
    good = [r for r in batch_cells if r["p99_ms"] < 10.0] or batch_cells
    best = max(good, key=lambda r: r["units_per_s"]) if good else None
    batched = [r for r in rows if r["server"] == "batched" and r["avg_batch"]]
    summary = {
        "act_vs_echo": ratio("unary", "echo"), "act_vs_unbatched": ratio("unary", "unbatched"),
        "act_process_vs_thread": ratio("unary", "thread"),
        "stream_vs_echo": ratio("stream", "echo"), "stream_vs_unbatched": ratio("stream", "unbatched"),
        "ratio_clients": args.ratio_clients,
        "batch_units_per_s": round(best["units_per_s"]) if best else None,
        "batch_p99_ms": round(best["p99_ms"], 3) if best else None,
        "batch_clients": best["clients"] if best else None, "frame_units": args.frame_units,
        "avg_batch_size": round(float(np.mean([r["avg_batch"] for r in batched])), 2) if batched else None,
        "duration_s": args.duration, "cpus": os.cpu_count(),
        "cells": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }
    print("\nserver     rpc     clients      units/s    p50 ms    p99 ms  cpu us/unit  avg batch")
    for r in rows:
        cpu = r["server_cpu_us_per_unit"]
        print(f"{r['server']:10s} {r['rpc']:6s} {r['clients']:8d} {r['units_per_s']:12,.0f} {r['p50_ms']:9.2f} "
              f"{r['p99_ms']:9.2f}  " + (f"{cpu:11.1f}" if cpu else "          -")
              + (f"  {r['avg_batch']:9.1f}" if r["avg_batch"] else "          -"))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
