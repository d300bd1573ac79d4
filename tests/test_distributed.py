"""Scale-out: two gloo ranks on this machine train one policy; their parameters stay identical."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
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
    import trainer.ppo

    class FirstActions(trainer.ppo.BattleSim):  # records the actions of the first step of this rank's games
        def step(self, actions):
            first = os.path.join(tmp, f"actions{rank}.safetensors")
            if not os.path.exists(first):  # the training games step first; evaluation's come later
                save_file({"actions": actions.clone()}, first)
            return super().step(actions)

    trainer.ppo.BattleSim = FirstActions
    cfg = TrainConfig(models=os.path.join(tmp, "models"), name="ddp", scenario="2s3z", sharing=sharing,
                      envs=16, rollout=8, hidden=16, epochs=2, minibatches=2, steps=16 * 8 * 2 * 3,
                      eval_every=16 * 8 * 2 * 3, eval_episodes=8, progress=False, seed=0)
    result = train(cfg)
    state = {k: v.contiguous() for k, v in result.policy.state_dict().items()}
    save_file(state, os.path.join(tmp, f"rank{rank}.safetensors"))
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(result.summary, f)
    # and a resumed run: every rank continues the stored Adam, or none does (per-type: rank 1 cannot read it),
    # or the ranks' parameters would part
    if sharing == "per-type" and rank == 1:
        trainer.ppo.ModelRepository.load_optimizer_state = lambda *a, **k: None
    resumed = train(dataclasses.replace(cfg, steps=16 * 8 * 2, resume="latest"))
    state = {k: v.contiguous() for k, v in resumed.policy.state_dict().items()}
    save_file(state, os.path.join(tmp, f"rank{rank}-resumed.safetensors"))
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
    assert repo.versions("ddp") == [1, 2]  # and the resumed run's
    card = repo.load("ddp", 1).card
    assert card["step"] == 16 * 8 * 2 * 3  # steps count both ranks' games
    torch.manual_seed(0)  # the init every rank started from
    init = Policy.from_config(card["architecture"])
    assert not torch.equal(a["actor_in.weight"], init.actor_in.weight.detach())
    assert json.loads((tmp_path / "rank1.json").read_text()) == {}  # rank 1 reports nothing
    # each rank samples its own actions: with one seed for both, rank 1 chose as rank 0 did in nearly every slot
    first = [load_file(tmp_path / f"actions{r}.safetensors")["actions"] for r in (0, 1)]
    assert (first[0] == first[1]).float().mean() < 0.6
    assert json.loads((tmp_path / "rank0.json").read_text())["world_size"] == 2
    a, b = (load_file(tmp_path / f"rank{r}-resumed.safetensors") for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a), "the ranks parted after a resume"
    adam_steps = {float(v) for k, v in repo.load_optimizer_state("ddp", 2).items() if k.endswith(".step")}
    # 3 iterations, then 1 more, of 2 epochs x 2 minibatches; per-type: every rank started afresh
    assert adam_steps == ({(3 + 1) * 2 * 2} if sharing == "shared" else {1 * 2 * 2})


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


def _torchrun_train(tmp_path, *flags: str) -> tuple[int, str]:
    """`phalanx train` on 3m under torchrun with two ranks, expected to stop at once: (exit code, stderr). Fails
    the test if the ranks are still running after 120 s (one waiting in a collective the other never joins)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "service.cli", "train", "--scenario", "3m", "--models", str(tmp_path / "models"), "--name", "x",
           "--envs", "16", "--hidden", "16", "--steps", "256", "--no-progress", "--threads", "1", *flags]
    # its own process group, so that a hang (the bug) leaves no rank behind when the test gives up
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("a rank kept waiting for another after it failed to start")
    return proc.returncode, stderr


def test_a_rank_that_cannot_start_stops_every_rank_at_once(tmp_path):
    """Rank 0 alone binds --metrics-port; when that fails, the other rank must not wait in its first collective
    (gloo's timeout is 30 minutes): both exit 2 within seconds and rank 0 names the cause."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = _torchrun_train(tmp_path, "--metrics-port", str(port))
    assert code != 0
    assert f"--metrics-port {port}: cannot listen" in stderr
    assert "rank 1 stops: another rank could not start" in stderr
    assert not (tmp_path / "models" / "x").exists()


def test_a_gpu_process_group_also_carries_the_cpu_tensors_the_ranks_agree_on(tmp_path):
    """On GPU the group is nccl for the gradients, and nccl alone refuses CPU tensors: the start-up check and the
    lr/stop decision would fail at the first collective. The GPU backend string must name a CPU backend as well.
    No nccl here: a one-rank group with nccl swapped for gloo runs what a GPU run's CPU collectives run."""
    from trainer.ppo import all_ranks_ready, process_group_backend

    backend = process_group_backend("cuda:0")
    assert "cpu:gloo" in backend.split(",") and "cuda:nccl" in backend.split(",")
    assert process_group_backend("cpu") == "gloo"
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(backend.replace("cuda:nccl", "cuda:gloo"), store=store, rank=0, world_size=1)
    try:
        assert all_ranks_ready(True) and not all_ranks_ready(False)
        control = torch.tensor([0.5, 1.0, 15.0], dtype=torch.float64)  # the loop's stop decision
        dist.all_reduce(control, op=dist.ReduceOp.MAX)
        assert control.tolist() == [0.5, 1.0, 15.0]
        dist.barrier()  # leave_process_group's
    finally:
        dist.destroy_process_group()
    # what nccl alone would do with them (a CUDA-only group; gloo standing in for nccl)
    dist.init_process_group("cuda:gloo", store=dist.FileStore(str(tmp_path / "store2"), 1), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError):
            all_ranks_ready(True)
    finally:
        dist.destroy_process_group()


def test_a_name_in_use_stops_every_rank_at_once(tmp_path):
    """Rank 0 alone claims the model name; when another run holds it, rank 1 must not wait for rank 0 in the
    training loop's first collective."""
    claim = ModelRepository(tmp_path / "models").claim("x")  # another run, writing versions of x
    try:
        code, stderr = _torchrun_train(tmp_path)
    finally:
        claim.close()
    assert code != 0
    assert "another run is writing versions of 'x'" in stderr
    assert "rank 1 stops: rank 0 could not start" in stderr
    assert ModelRepository(tmp_path / "models").versions("x") == []


def _failing_save_worker(rank: int, world: int, port: int, tmp: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    import trainer.ppo as ppo
    from trainer.config import TrainError

    def disk_full(*args, **kw):
        raise TrainError("saving failed: No space left on device")

    ppo._save = disk_full  # only rank 0 saves: only rank 0 meets it
    cfg = TrainConfig(models=os.path.join(tmp, "models"), name="full", scenario="3m", envs=16, rollout=8,
                      hidden=16, epochs=1, minibatches=1, steps=16 * 8 * 2 * 20, eval_every=16 * 8 * 2 * 2,
                      eval_episodes=4, progress=False, seed=0)
    try:
        train(cfg)
        outcome = "finished"
    except TrainError as e:
        outcome = f"failed: {e}"
    Path(tmp, f"rank{rank}.txt").write_text(outcome)
    leave_process_group(0)


@pytest.mark.slow
def test_a_failure_on_rank_0_alone_ends_every_rank(tmp_path):
    """Rank 0 alone evaluates and saves; when that fails, the other rank must not wait for it in the next
    collective (it used to, until gloo's timeout): rank 0 reports the error, rank 1 ends with it."""
    import time

    started = time.monotonic()
    mp.start_processes(_failing_save_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    assert time.monotonic() - started < 50  # well inside the 60 s collective timeout set above
    assert (tmp_path / "rank0.txt").read_text() == "failed: saving failed: No space left on device"
    assert (tmp_path / "rank1.txt").read_text() == "finished"
