"""`phalanx train` / `phalanx eval` end to end, bad input, and the training metrics (endpoint and Pushgateway)."""

import csv
import json
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.cli import main
from trainer.ppo import TrainConfig, train
from trainer.repository import ModelRepository
from trainer.train_metrics import TrainMetrics

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["--envs", "32", "--rollout", "8", "--hidden", "16", "--epochs", "2", "--eval-episodes", "16", "--no-progress"]


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_then_eval_end_to_end(tmp_path):
    """The real command in a subprocess: versions, card, CSV, PNG, final JSON; eval reproduces the training eval."""
    models = tmp_path / "models"
    cmd = [sys.executable, "-m", "service.cli", "train", "--scenario", "3m", "--models", str(models), "--name", "e2e",
           "--steps", "1024", "--eval-every", "512", *TINY]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    summary = last_json(run.stdout)
    for key in ("scenario", "steps", "minutes", "final_eval_win_rate", "best_eval_win_rate", "version",
                "agent_steps_per_s"):
        assert key in summary
    assert summary["scenario"] == "3m" and summary["steps"] == 1024 and summary["version"] == 2
    repo = ModelRepository(models)
    assert repo.versions("e2e") == [1, 2]
    card = repo.load("e2e").card
    assert card["step"] == 1024 and card["eval_win_rate"] == summary["final_eval_win_rate"]
    assert (card["training"]["steps"], card["training"]["eval_every"], card["training"]["scenario"]) == (1024, 512, "3m")
    rows = list(csv.DictReader(open(summary["csv"])))
    assert [int(r["steps"]) for r in rows] == [512, 1024]
    assert {"minutes", "samples", "win_rate", "return", "pg_loss", "v_loss", "entropy", "approx_kl"} <= set(rows[0])
    # the default entropy bonus anneals 0.1 -> 0.02: the 2nd and 4th of four iterations use 1/4 and 3/4 of the way
    assert [float(r["ent_coef"]) for r in rows] == pytest.approx([0.08, 0.04])
    assert Path(summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ev = subprocess.run([sys.executable, "-m", "service.cli", "eval", "--models", str(models), "--name", "e2e",
                         "--scenario", "3m", "--episodes", "16", "--seed", "0"],
                        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert ev.returncode == 0, ev.stderr
    result = last_json(ev.stdout)
    assert result["win_rate"] == summary["final_eval_win_rate"] and result["episodes"] == 16
    assert {"mean_return", "mean_length", "version"} <= set(result) and result["version"] == 2


def test_eval_baseline_needs_no_model(capsys):
    assert main(["eval", "--scenario", "3m", "--episodes", "32", "--policy", "focus-fire"]) == 0
    out = last_json(capsys.readouterr().out)
    assert out["policy"] == "focus-fire" and out["episodes"] == 32 and 0 <= out["win_rate"] <= 1
    # the random baseline is clearly worse than focus fire on the same games
    assert main(["eval", "--scenario", "3m", "--episodes", "32", "--policy", "random"]) == 0
    assert last_json(capsys.readouterr().out)["mean_return"] < out["mean_return"]


@pytest.mark.parametrize("argv,message", [
    (["train", "--scenario", "nope", "--models", "M", "--name", "x"], "nope"),
    (["train", "--scenario", "3m", "--models", "M", "--name", "x", "--envs", "0"], "--envs must be >= 1"),
    (["train", "--scenario", "3m", "--models", "M", "--name", "x", "--target-win-rate", "2"], "--target-win-rate"),
    (["train", "--scenario", "3m", "--models", "M", "--name", "x", "--resume", "soon"], "--resume"),
    (["train", "--scenario", "3m", "--models", "M", "--name", "x", "--iterations", "3"],
     "--iterations applies to --from-shards"),
    (["train", "--scenario", "3m", "--models", "M", "--name", "x", "--target-window", "3"],
     "--target-window needs --target-win-rate"),
    (["train", "--scenario", "3m", "--models", "M", "--name", "x", "--metrics-host", "0.0.0.0"],
     "--metrics-host needs --metrics-port"),
    (["train", "--scenario", "3m", "--models", "M", "--name", "x", "--metrics-addr", "0.0.0.0"],
     "--metrics-host needs --metrics-port"),  # the flag's earlier name still works
    (["eval", "--scenario", "3m"], "give --models and --name"),
    (["eval", "--scenario", "3m", "--policy", "random", "--episodes", "0"], "--episodes must be >= 1"),
    (["eval", "--scenario", "nope", "--policy", "random"], "nope"),
])
def test_bad_input_exits_2_with_a_message(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_unusable_models_directory_is_refused_before_training(capsys, tmp_path):
    (tmp_path / "afile").write_text("")  # --models names a file: no version could ever be written there
    argv = ["train", "--scenario", "3m", "--models", str(tmp_path / "afile"), "--name", "x", "--steps", "200000",
            "--eval-every", "1000000", "--log-dir", str(tmp_path / "logs"), *TINY]
    assert main(argv) == 2
    assert "cannot write model versions under" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()  # refused before anything ran


def test_a_name_keeps_its_spec_a_fresh_run_on_another_scenario_is_refused(capsys, tmp_path):
    """A fresh 8m run under a name holding 3m versions used to add an 8m version: a restarted service following
    the name then served it to 3m games (every request refused). Now it is refused before training, the name is
    left free, and the same scenario (a new run from scratch) is still welcome."""
    models = str(tmp_path / "m")
    run = ["train", "--models", models, "--name", "a", "--steps", "256", "--eval-every", "256", *TINY]
    assert main([*run, "--scenario", "3m"]) == 0
    capsys.readouterr()
    assert main([*run, "--scenario", "8m"]) == 2
    err = capsys.readouterr().err
    assert "holds versions trained on spec '3m'" in err and "scenario '8m'" in err and "another --name" in err
    assert ModelRepository(models).versions("a") == [1]
    assert main([*run, "--scenario", "3m"]) == 0  # the refused run let go of the name
    assert ModelRepository(models).versions("a") == [1, 2]


def test_eval_refuses_other_specs_and_corrupt_models(capsys, tmp_path):
    models = str(tmp_path / "m")
    assert main(["train", "--scenario", "3m", "--models", models, "--name", "a", "--steps", "256",
                 "--eval-every", "256", *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", "--models", models, "--name", "a", "--scenario", "8m", "--episodes", "4"]) == 2
    err = capsys.readouterr().err
    assert "spec" in err and "8m" in err
    (tmp_path / "m" / "a" / "1" / "weights.safetensors").write_bytes(b"not a model")
    assert main(["eval", "--models", models, "--name", "a", "--scenario", "3m", "--episodes", "4"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert main(["train", "--scenario", "3m", "--models", models, "--name", "a", "--resume", "1", *TINY]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("phalanx_train_"):
            name_labels, value = line.rsplit(" ", 1)
            values[name_labels.split("{")[0]] = float(value)
    return values


class _Gateway(BaseHTTPRequestHandler):
    bodies: list = []

    def do_PUT(self):
        self.bodies.append((self.path, self.rfile.read(int(self.headers["Content-Length"])).decode()))
        self.send_response(200)
        self.end_headers()

    do_POST = do_PUT

    def log_message(self, *args):
        pass


def test_metrics_endpoint_and_pushgateway_report_the_run(tmp_path):
    gateway = HTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    _Gateway.bodies = []
    metrics = TrainMetrics(scenario="3m", model="mx", registry=CollectorRegistry(),
                           pushgateway=f"http://127.0.0.1:{gateway.server_port}")
    port = metrics.serve(0)
    try:
        cfg = TrainConfig(models=str(tmp_path / "models"), name="mx", envs=32, rollout=8, hidden=16, epochs=2,
                          steps=768, eval_every=512, eval_episodes=16, progress=False)
        summary = train(cfg, metrics=metrics).summary
        got = _scrape(port)
        assert got["phalanx_train_steps"] == summary["steps"] == 768
        assert got["phalanx_train_model_version"] == summary["version"] == 2
        assert got["phalanx_train_eval_win_rate"] == summary["final_eval_win_rate"]
        assert got["phalanx_train_agent_steps_per_second"] > 0 and got["phalanx_train_entropy"] > 0
        for name in ("samples", "policy_loss", "value_loss", "approx_kl", "learning_rate", "train_episode_return"):
            assert f"phalanx_train_{name}" in got
        assert len(_Gateway.bodies) == 2  # one push per evaluation
        path, body = _Gateway.bodies[-1]
        assert path.startswith("/metrics/job/phalanx_train") and "phalanx_train_model_version" in body
    finally:
        metrics.close()
        gateway.shutdown()


def test_a_dead_pushgateway_never_stops_training(tmp_path):
    metrics = TrainMetrics(scenario="3m", model="my", registry=CollectorRegistry(),
                           pushgateway="http://127.0.0.1:9")  # nothing listens on the discard port
    cfg = TrainConfig(models=str(tmp_path / "models"), name="my", envs=16, rollout=8, hidden=16, epochs=1,
                      steps=256, eval_every=128, eval_episodes=4, progress=False)
    summary = train(cfg, metrics=metrics).summary
    assert summary["version"] == 2 and metrics.push_failures == 2


def test_local_critic_defaults_to_whole_game_rollouts():
    """`--critic local` plays fewer games for whole-game rollouts with lambda 1.0 (its bootstrapped values
    mislead); anything given explicitly wins, and the central critic keeps its own defaults."""
    from service.cli import build_parser
    from trainer.commands import train_config_from_args
    from trainer.config import LOCAL_CRITIC_DEFAULTS

    def cfg(*extra):
        return train_config_from_args(build_parser().parse_args(["train", "--models", "m", "--name", "x", *extra]))

    local = cfg("--critic", "local")
    assert (local.envs, local.rollout, local.gae_lambda) == (64, 128, 1.0) == tuple(LOCAL_CRITIC_DEFAULTS.values())
    mixed = cfg("--critic", "local", "--rollout", "16", "--gae-lambda", "0.9")
    assert (mixed.envs, mixed.rollout, mixed.gae_lambda) == (64, 16, 0.9)
    central = cfg()
    assert (central.envs, central.rollout, central.gae_lambda) == (TrainConfig.envs, TrainConfig.rollout,
                                                                   TrainConfig.gae_lambda) == (512, 8, 0.95)


def test_resume_takes_the_stored_architecture_and_refuses_flags_that_contradict_it(tmp_path, capsys):
    """A version trained with a local critic (say offline) resumes as one, with the local critic's rollout
    defaults, not as the default central-critic network the flags would otherwise describe."""
    from service.cli import build_parser
    from trainer.commands import train_config_from_args
    from trainer.policy import Policy
    from trainer.config import TrainError
    from trainer.sim import load_scenario

    sc = load_scenario("3m")
    policy = Policy.for_scenario(sc, sharing="independent", critic="local", hidden=16, agent_id=False)
    ModelRepository(tmp_path).save("x", policy, scenario=sc, step=100, eval_win_rate=None)

    def cfg(*extra):
        argv = ["train", "--models", str(tmp_path), "--name", "x", "--scenario", "3m", *extra]
        return train_config_from_args(build_parser().parse_args(argv))

    resumed = cfg("--resume", "latest")
    assert (resumed.sharing, resumed.critic, resumed.hidden, resumed.agent_id, resumed.unit_type,
            resumed.recurrent) == ("independent", "local", 16, False, False, False)
    assert (resumed.envs, resumed.rollout, resumed.gae_lambda) == (64, 128, 1.0)
    assert cfg("--resume", "1", "--critic", "local", "--hidden", "16").hidden == 16  # repeating it is fine
    fresh = cfg()
    assert (fresh.sharing, fresh.critic, fresh.hidden, fresh.agent_id) == ("shared", "central", 64, True)

    rc = main(["train", "--models", str(tmp_path), "--name", "x", "--scenario", "3m", "--resume", "latest",
               "--sharing", "shared", "--hidden", "32", "--steps", "64", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "keeps its architecture" in err and "--sharing shared (stored: independent)" in err
    assert "--hidden 32 (stored: 16)" in err and ModelRepository(tmp_path).versions("x") == [1]
    assert main(["train", "--models", str(tmp_path), "--name", "x", "--resume", "7", "--steps", "64"]) == 2
    assert "no version 7" in capsys.readouterr().err
    with pytest.raises(TrainError, match="keeps its architecture"):  # the library checks too
        train(TrainConfig(models=str(tmp_path), name="x", scenario="3m", resume="latest", steps=64, progress=False))


def test_resume_continues_with_the_stored_runs_settings_unless_told_otherwise(tmp_path, capsys):
    """A resumed run learns as the stored one did (its scenario, learning rate, discount, bonus, games per
    rollout); an explicit flag wins; the budget is the new run's own."""
    from service.cli import build_parser
    from trainer.commands import train_config_from_args

    models = str(tmp_path / "m")
    assert main(["train", "--scenario", "2s3z", "--models", models, "--name", "a", "--steps", "256", "--lr", "1e-4",
                 "--gamma", "0.95", "--ent-coef", "0.03", "--ent-coef-final", "0.03", "--no-anneal-lr", "--seed", "7",
                 *TINY]) == 0
    capsys.readouterr()

    def cfg(*extra):
        return train_config_from_args(build_parser().parse_args(
            ["train", "--models", models, "--name", "a", "--resume", "latest", *extra]))

    resumed = cfg("--steps", "512")
    assert (resumed.scenario, resumed.lr, resumed.gamma, resumed.ent_coef, resumed.ent_coef_final, resumed.anneal_lr,
            resumed.seed, resumed.envs, resumed.epochs, resumed.eval_episodes) == (
        "2s3z", 1e-4, 0.95, 0.03, 0.03, False, 7, 32, 2, 16)
    assert resumed.steps == 512 and resumed.hidden == 16
    told = cfg("--lr", "3e-4", "--anneal-lr", "--envs", "64")
    assert (told.lr, told.anneal_lr, told.envs, told.gamma) == (3e-4, True, 64, 0.95)
    assert (cfg().steps, cfg().minutes) == (None, None)  # no budget carried over: the default 10 minutes apply


def _start_training(tmp_path, name: str, *settings: str) -> tuple[subprocess.Popen, Path]:
    """A `phalanx train` with a budget it will not finish, once it is inside its training run (bounded: 60 s)."""
    import time

    models = tmp_path / "models"
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "train", "--scenario", "3m", "--models",
                             str(models), "--name", name, "--steps", "100000000", "--eval-every", "100000000",
                             *TINY, *settings], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT)
    deadline = time.monotonic() + 60
    while not (models / name / "logs").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    return proc, models


@pytest.mark.slow
def test_sigterm_ends_training_with_a_last_evaluated_version(tmp_path):
    """`docker stop` or a scheduler sends SIGTERM: the run finishes its iteration, evaluates, saves a version, writes
    its log and plot, prints the summary, and exits 143 (it used to die silently, with nothing saved since the
    last evaluation)."""
    import signal

    proc, models = _start_training(tmp_path, "stopped")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    summary = last_json(out)
    assert summary["stop_reason"] == "SIGTERM" and summary["version"] == 1 and summary["steps"] > 0
    assert "SIGTERM: stopping after this iteration" in err
    card = ModelRepository(models).load("stopped").card
    assert card["step"] == summary["steps"] and card["eval_win_rate"] == summary["final_eval_win_rate"]
    assert Path(summary["csv"]).is_file() and Path(summary["plot"]).is_file()


@pytest.mark.slow
def test_a_second_ctrl_c_quits_training_at_once(tmp_path):
    import signal

    import time

    proc, models = _start_training(tmp_path, "quit", "--envs", "512", "--rollout", "256")  # iterations of seconds
    proc.send_signal(signal.SIGINT)
    said = [proc.stderr.readline() for _ in range(2)]  # a blank line (past a progress bar), then the message
    assert "SIGINT: stopping after this iteration" in said[1], said
    time.sleep(1.2)  # sooner would be the same stop delivered twice (GracefulStop.repeat_after)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().endswith("interrupted"), err
    assert out == ""  # no summary: it did not finish the stop (an iteration may have ended and saved meanwhile)


@pytest.mark.slow
def test_a_second_run_under_a_name_in_use_is_refused(tmp_path, capsys):
    import signal

    proc, models = _start_training(tmp_path, "busy")
    try:
        code = main(["train", "--scenario", "3m", "--models", str(models), "--name", "busy", "--steps", "256", *TINY])
        err = capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    assert code == 2 and f"another run is writing versions of 'busy' under {models} (pid {proc.pid})" in err, err


def test_eval_and_replay_play_the_scenario_the_model_was_trained_on(tmp_path, capsys):
    """Without --scenario a model is played on the scenario its card records; a scripted policy needs one; a
    scenario from a file the command was not given is named, with the flag that brings it."""
    from trainer.policy import Policy
    from trainer.sim import load_scenario

    models = tmp_path / "models"
    repo = ModelRepository(models)
    sc = load_scenario("2s3z")
    repo.save("m", Policy.for_scenario(sc, hidden=16), scenario=sc, step=0, eval_win_rate=None)
    assert main(["eval", "--models", str(models), "--name", "m", "--episodes", "4"]) == 0
    assert last_json(capsys.readouterr().out)["scenario"] == "2s3z"
    gif = tmp_path / "r.gif"
    assert main(["replay", "--policy", "model", "--models", str(models), "--name", "m", "--out", str(gif)]) == 0
    assert last_json(capsys.readouterr().out)["scenario"] == "2s3z" and gif.is_file()

    assert main(["eval", "--policy", "random", "--episodes", "4"]) == 2
    assert "--scenario is needed to play a scripted policy" in capsys.readouterr().err

    toml = tmp_path / "mine.toml"
    toml.write_text('[scenarios.mine]\nmap = [32, 32]\nepisode_limit = 60\nagents = [{ unit = "marine", count = 2 }]\n'
                    'enemies = [{ unit = "marine", count = 2 }]\nagent_spawn = [9, 16]\nenemy_spawn = [23, 16]\n')
    custom = load_scenario("mine", files=[toml])
    repo.save("c", Policy.for_scenario(custom, hidden=16), scenario=custom, step=0, eval_win_rate=None)
    assert main(["eval", "--models", str(models), "--name", "c", "--episodes", "4"]) == 2
    assert "trained on scenario 'mine', which is not built in: pass the --scenario-file" in capsys.readouterr().err
    assert main(["eval", "--models", str(models), "--name", "c", "--episodes", "4", "--scenario-file", str(toml)]) == 0
    assert last_json(capsys.readouterr().out)["scenario"] == "mine"


def test_eval_in_the_real_game_says_what_is_missing(capsys, tmp_path, monkeypatch):
    """`--env sc2` where StarCraft II is not installed (SC2PATH points at nothing): one line saying what to
    install, exit 2. Its flags are refused without it."""
    monkeypatch.setenv("SC2PATH", str(tmp_path / "no-game"))
    assert main(["eval", "--policy", "focus-fire", "--scenario", "3m", "--env", "sc2", "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "phalanx eval: --env sc2: cannot start StarCraft II for scenario 3m" in err and "SMAC_Maps" in err
    assert main(["eval", "--policy", "focus-fire", "--scenario", "3m", "--sc2-map", "3m"]) == 2
    assert "--sc2-map and --sc2-difficulty apply to --env sc2" in capsys.readouterr().err
    assert main(["eval", "--policy", "focus-fire", "--scenario", "3m", "--env", "sc2", "--device", "cuda"]) == 2
    assert "--env sc2 plays one game at a time on the CPU" in capsys.readouterr().err


def test_eval_in_the_real_game_lets_each_episode_be_a_new_game_unless_seeded(capsys, monkeypatch):
    """pysc2 re-applies a fixed seed to every episode's game: a default --seed 0 would make N greedy episodes one
    game N times. Without --seed the game gets none; --seed S is passed on as asked."""
    import trainer.sc2.battle as battle

    seen = []

    class NoGame:
        def __init__(self, scenario, **kwargs):
            seen.append(kwargs)
            raise RuntimeError("no game here")

    monkeypatch.setattr(battle, "SC2Battle", NoGame)
    for extra, seed in (([], None), (["--seed", "5"], 5)):
        argv = ["eval", "--policy", "focus-fire", "--scenario", "3m", "--env", "sc2", "--episodes", "2", *extra]
        assert main(argv) == 2
        assert "--env sc2: no game here" in capsys.readouterr().err
        assert seen[-1]["seed"] == seed
