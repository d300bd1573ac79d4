"""Simulator throughput: agent-steps per second with random legal actions, at several batch sizes.

    python bench/sim_throughput.py --scenario 8m
    python bench/sim_throughput.py --scenario 27m_vs_30m --envs 64,256,1024

An agent-step is one agent acting for one step (a step of E games with A agents is E*A agent-steps).
The random actions are drawn as a tensor (argmax of noise over the mask), so the figure is the
simulator's, not a Python loop's. Ends with one JSON line; `agent_steps_per_s` is the best batch size's.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trainer.sim import BattleSim, load_scenario  # noqa: E402


def measure(scenario, n_envs: int, seconds: float, seed: int) -> dict:
    sim = BattleSim(scenario, n_envs, seed=seed, check_actions=False)
    g = torch.Generator().manual_seed(seed)
    out = sim.reset()
    for _ in range(3):  # warm-up
        out = sim.step(torch.rand(out.avail.shape, generator=g).masked_fill(~out.avail, -1).argmax(2))
    steps, episodes = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        actions = torch.rand(out.avail.shape, generator=g).masked_fill(~out.avail, -1).argmax(2)
        out = sim.step(actions)
        steps += 1
        episodes += int(out.done.sum())
    elapsed = time.perf_counter() - start
    return {"envs": n_envs, "steps": steps, "episodes": episodes, "seconds": round(elapsed, 3),
            "agent_steps_per_s": round(steps * n_envs * scenario.n_agents / elapsed),
            "ms_per_step": round(1000 * elapsed / steps, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="8m")
    p.add_argument("--envs", default="256,1024,4096,8192", help="comma-separated batch sizes (games per call)")
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time per batch size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sc = load_scenario(args.scenario)
    rows = []
    print(f"{sc.name}: {sc.n_agents} agents vs {sc.n_enemies}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'envs':>6} {'ms/step':>9} {'agent-steps/s':>14} {'episodes':>9}")
    for n in (int(x) for x in args.envs.split(",")):
        r = measure(sc, n, args.seconds, args.seed)
        rows.append(r)
        print(f"{r['envs']:>6} {r['ms_per_step']:>9} {r['agent_steps_per_s']:>14,} {r['episodes']:>9}")
    best = max(rows, key=lambda r: r["agent_steps_per_s"])
    print(json.dumps({"bench": "sim_throughput", "scenario": sc.name, "agent_steps_per_s": best["agent_steps_per_s"],
                      "best_envs": best["envs"], "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
