"""How long a hot reload holds up requests: Act latency while a trainer publishes new versions.

    python bench/reload_stall.py                        # both forward workers, two models (about 2 minutes)
    python bench/reload_stall.py --workers process --models big --publishes 3

For each forward worker (`process`, the default, and `thread`) and each model (`small`: a 3m policy with the
trainer's defaults; `big`: 27m_vs_30m, one width-256 network per unit, local critics), `phalanx serve` runs in
its own process polling the repository every 0.2 s, and one client sends unary Acts, one at a time, for the
whole run while this script publishes --publishes new versions, --gap seconds apart. A request is "during a
reload" when it started within 1 s after a version was published (the poll, the load, the validation, the
swap). Prints a table of p50 / p99 / max latency outside and during reloads, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.client import AsyncClient  # noqa: E402

MODELS = {"small": ("3m", dict(agent_id=True)),
          "big": ("27m_vs_30m", dict(sharing="independent", critic="local", hidden=256, agent_id=True))}


def publish(root: Path, model: str, seed: int) -> None:
    import torch

    from trainer.policy import Policy
    from trainer.repository import ModelRepository
    from trainer.sim import load_scenario

    scenario_name, arch = MODELS[model]
    sc = load_scenario(scenario_name)
    torch.manual_seed(seed)
    ModelRepository(root).save(model, Policy.for_scenario(sc, **arch), scenario=sc, step=seed, eval_win_rate=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(root: Path, model: str, worker: str, publishes: int, gap: float) -> dict:
    from trainer.sim import load_scenario

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "service", "serve", "--models", str(root), "--name", model,
                               "--port", str(port), "--host", "127.0.0.1", "--poll-seconds", "0.2",
                               "--forward-worker", worker, "--log-level", "WARNING"], cwd=ROOT)
    try:
        sc = load_scenario(MODELS[model][0])
        obs, mask = np.zeros(sc.obs_size, np.float32), np.ones(sc.n_actions, bool)
        async with AsyncClient(f"127.0.0.1:{port}", timeout=10, retries=8) as client:
            for _ in range(600):  # up to 60 s for the server to come up and load the first version
                try:
                    if (await client.model_info()).version:
                        break
                except Exception:  # noqa: BLE001 - not up yet
                    await asyncio.sleep(0.1)
            samples: list[tuple[float, float]] = []  # (start, latency)
            published: list[float] = []
            loop = asyncio.get_running_loop()

            async def publisher():
                for k in range(publishes):
                    await asyncio.sleep(gap)
                    await loop.run_in_executor(None, publish, root, model, 100 + k)
                    published.append(time.perf_counter())
                await asyncio.sleep(min(gap, 2.0))

            task = asyncio.create_task(publisher())
            started = time.perf_counter()
            while not task.done() and time.perf_counter() - started < publishes * gap + 30:
                t = time.perf_counter()
                await client.act(obs, mask, 0, greedy=True)
                samples.append((t, time.perf_counter() - t))
            await task
            version = (await client.model_info()).version
    finally:
        server.terminate()
        server.wait(30)
    during = np.array([lat for t, lat in samples if any(0 <= t - p < 1.0 for p in published)]) * 1e3
    outside = np.array([lat for t, lat in samples if not any(0 <= t - p < 1.0 for p in published)]) * 1e3

    def stats(x: np.ndarray) -> dict:
        return {"n": int(x.size), "p50_ms": round(float(np.percentile(x, 50)), 2),
                "p99_ms": round(float(np.percentile(x, 99)), 2), "max_ms": round(float(x.max()), 2)}

    return {"model": model, "worker": worker, "final_version": version, "outside": stats(outside),
            "during": stats(during)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--workers", default="process,thread", help="forward workers to measure (default both)")
    p.add_argument("--models", default="small,big", help=f"models to publish: {', '.join(MODELS)}")
    p.add_argument("--publishes", type=int, default=5, help="new versions published per run (default 5)")
    p.add_argument("--gap", type=float, default=2.5, help="seconds between publishes (default 2.5)")
    args = p.parse_args()
    workers, models = args.workers.split(","), args.models.split(",")
    for m in models:
        if m not in MODELS:
            p.error(f"--models: unknown model {m!r} (choose from {', '.join(MODELS)})")
    if args.publishes < 1 or args.gap < 1.0:
        p.error("--publishes must be >= 1 and --gap >= 1.0 s (a reload window is 1 s)")
    rows = []
    for model in models:
        for worker in workers:
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp) / "models"
                publish(root, model, 0)
                row = asyncio.run(measure(root, model, worker, args.publishes, args.gap))
            rows.append(row)
            o, d = row["outside"], row["during"]
            print(f"{model:5s} {worker:7s}  outside p50 {o['p50_ms']:6.2f}  p99 {o['p99_ms']:6.2f}  max "
                  f"{o['max_ms']:7.2f} ms | during reloads p50 {d['p50_ms']:6.2f}  p99 {d['p99_ms']:6.2f}  max "
                  f"{d['max_ms']:7.2f} ms  (served version {row['final_version']})", flush=True)
    print(json.dumps({"reload_stall": rows}))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
