"""Training throughput: unit (agent) steps per second on 8m, the PPO update included.

    python bench/train_throughput.py                          # 8m, default config, 60 s
    python bench/train_throughput.py --seconds 10 --envs 256,512,1024

Runs `train` for a fixed wall-clock budget with evaluation off (one final evaluation is not counted) and
reports agent-steps/s = environment steps x agents / seconds, for each --envs value. Ends with one JSON line.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trainer.ppo import TrainConfig, train  # noqa: E402
from trainer.sim import load_scenario  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="8m")
    ap.add_argument("--seconds", type=float, default=60.0, help="budget per configuration")
    ap.add_argument("--envs", default="512", help="comma-separated numbers of games")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    sc = load_scenario(args.scenario)
    models = tempfile.mkdtemp(prefix="phalanx-throughput-")
    rows = []
    for envs in [int(e) for e in args.envs.split(",")]:
        cfg = TrainConfig(models=models, name=f"tp-{envs}", scenario=args.scenario, envs=envs,
                          minutes=args.seconds / 60, eval_every=10 ** 12, eval_episodes=1, threads=args.threads,
                          device=args.device, progress=False)
        t = time.perf_counter()
        s = train(cfg).summary
        row = {"envs": envs, "agent_steps_per_s": s["agent_steps_per_s"],
               "env_steps_per_s": round(s["agent_steps_per_s"] / sc.n_agents, 1), "steps": s["steps"],
               "seconds": round(time.perf_counter() - t, 1)}
        rows.append(row)
        print(f"{args.scenario} envs={envs}: {row['agent_steps_per_s']:,.0f} agent-steps/s "
              f"({row['env_steps_per_s']:,.0f} env-steps/s) over {row['steps']:,} steps", flush=True)
    best = max(rows, key=lambda r: r["agent_steps_per_s"])
    print(json.dumps({"bench": "train_throughput", "scenario": args.scenario, "threads": args.threads,
                      "device": args.device, "agent_steps_per_s": best["agent_steps_per_s"], "rows": rows}))


if __name__ == "__main__":
    main()
