"""Scale-out: two gloo ranks on this machine train one policy; their parameters stay identical."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from trainer.policy import Policy
from trainer.ppo import TrainConfig, train
from trainer.repository import ModelRepository


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp: str, sharing: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = TrainConfig(models=os.path.join(tmp, "models"), name="ddp", scenario="2s3z", sharing=sharing,
                          envs=16, rollout=8, hidden=16, epochs=2, minibatches=2, steps=16 * 8 * 2 * 3,
                          eval_every=16 * 8 * 2 * 3, eval_episodes=8, progress=False, seed=0)
        result = train(cfg)
        state = {k: v.contiguous() for k, v in result.policy.state_dict().items()}
        save_file(state, os.path.join(tmp, f"rank{rank}.safetensors"))
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(result.summary, f)
    finally:
        dist.barrier()  # as `phalanx train` does: rank 0 may still be evaluating; leave together
        dist.destroy_process_group()


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
