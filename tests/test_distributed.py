"""Scale-out: two gloo ranks on this machine train one policy; their parameters stay identical."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from trainer.policy import Policy
from trainer.ppo import TrainConfig, leave_process_group, train
from trainer.repository import ModelRepository

REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp: str, sharing: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = TrainConfig(models=os.path.join(tmp, "models"), name="ddp", scenario="2s3z", sharing=sharing,
                      envs=16, rollout=8, hidden=16, epochs=2, minibatches=2, steps=16 * 8 * 2 * 3,
                      eval_every=16 * 8 * 2 * 3, eval_episodes=8, progress=False, seed=0)
    result = train(cfg)
    state = {k: v.contiguous() for k, v in result.policy.state_dict().items()}
    save_file(state, os.path.join(tmp, f"rank{rank}.safetensors"))
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(result.summary, f)
    leave_process_group(0)  # as `phalanx train` does: rank 0 may still be evaluating; leave together


@pytest.mark.slow
@pytest.mark.parametrize("sharing", ["shared", "per-type"])
def test_two_gloo_ranks_keep_identical_parameters(tmp_path, sharing):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), sharing), nprocs=2, join=True,
                       start_method="spawn")
    a = load_file(tmp_path / "rank0.safetensors")
    b = load_file(tmp_path / "rank1.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between ranks"
    # the run really learned something (parameters left their initial values), and only rank 0 wrote
    repo = ModelRepository(tmp_path / "models")
    assert repo.versions("ddp") == [1]
    card = repo.load("ddp").card
    assert card["step"] == 16 * 8 * 2 * 3  # steps count both ranks' games
    torch.manual_seed(0)  # the init every rank started from
    init = Policy.from_config(card["architecture"])
    assert not torch.equal(a["actor_in.weight"], init.actor_in.weight.detach())
    assert json.loads((tmp_path / "rank1.json").read_text()) == {}  # rank 1 reports nothing
    assert json.loads((tmp_path / "rank0.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_phalanx_train_under_torchrun(tmp_path):
    """The README's scale-out command: both ranks exit 0, rank 0 alone prints the summary and writes versions."""
    models = tmp_path / "models"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "service.cli", "train", "--scenario", "3m", "--models", str(models), "--name", "ddp",
           "--envs", "16", "--rollout", "8", "--hidden", "16", "--epochs", "2", "--eval-episodes", "8",
           "--steps", str(16 * 8 * 2 * 2), "--eval-every", str(16 * 8 * 2), "--no-progress", "--threads", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    summaries = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, run.stdout
    assert summaries[0]["world_size"] == 2 and summaries[0]["steps"] == 16 * 8 * 2 * 2
    assert ModelRepository(models).versions("ddp") == [1, 2]
