"""The model repository: atomic versions, round trips, and a clear ModelLoadError for every kind of bad file."""

import json
import os
import shutil
import stat

import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file

from trainer.policy import Policy
from trainer.repository import ModelLoadError, ModelRepository
from trainer.shards import write_shard
from trainer.sim import load_scenario


@pytest.fixture
def sc():
    return load_scenario("3m")


@pytest.fixture
def repo(tmp_path):
    return ModelRepository(tmp_path / "models")


def make(sc, **kw):
    torch.manual_seed(0)
    return Policy.for_scenario(sc, hidden=16, **kw)


def test_save_load_round_trip(repo, sc):
    policy = make(sc, sharing="independent", critic="local", agent_id=True)
    policy.value_norm.update(torch.tensor([3.0, 5.0]))
    assert repo.versions("m") == [] and repo.latest("m") is None
    v1 = repo.save("m", policy, scenario=sc, step=100, eval_win_rate=0.5, extra={"note": "hi"})
    v2 = repo.save("m", policy, scenario=sc, step=200, eval_win_rate=None)
    assert (v1, v2) == (1, 2) and repo.versions("m") == [1, 2] and repo.latest("m") == 2
    loaded = repo.load("m", 1)
    assert loaded.version == 1 and loaded.path == repo.root / "m" / "1"
    card = loaded.card
    assert card["spec"] == {"name": "3m", "hash": sc.spec_hash, "obs_size": sc.obs_size,
                            "state_size": sc.state_size, "n_actions": sc.n_actions, "n_agents": sc.n_agents}
    assert (card["format"], card["name"], card["version"], card["step"], card["eval_win_rate"]) == (1, "m", 1, 100, 0.5)
    assert (card["sharing"], card["critic"], card["scenario"], card["note"]) == ("independent", "local", "3m", "hi")
    assert card["created"].endswith("+00:00")
    assert card["architecture"] == policy.config
    for k, v in policy.state_dict().items():
        assert torch.equal(loaded.policy.state_dict()[k], v), k
    assert repo.load("m").version == 2
    # the same actions come out of the loaded copy
    obs = torch.randn(6, sc.obs_size)
    mask = torch.ones(6, sc.n_actions, dtype=torch.bool)
    unit, greedy = torch.arange(6) % 3, torch.ones(6, dtype=torch.bool)
    a, b = policy.act(obs, mask, unit, greedy), loaded.policy.act(obs, mask, unit, greedy)
    assert torch.equal(a.action, b.action) and torch.allclose(a.value, b.value)


def test_versions_ignore_temp_dirs_and_junk(repo, sc):
    repo.save("m", make(sc), scenario=sc, step=1, eval_win_rate=None)
    base = repo.root / "m"
    (base / ".tmp-abc").mkdir()
    (base / ".tmp-abc" / "card.json").write_text("{}")
    (base / "notes").mkdir()
    (base / "7").mkdir()  # incomplete: no files
    (base / "05").mkdir()
    assert repo.versions("m") == [1]
    assert repo.save("m", make(sc), scenario=sc, step=2, eval_win_rate=None) == 8  # never reuses a taken number
    assert not any(p.name.startswith(".tmp-") and p.name != ".tmp-abc" for p in base.iterdir())


def test_published_versions_and_shards_are_readable_by_other_users(repo, sc, tmp_path):
    # The service (the Dockerfile's `phalanx` user) reads versions a trainer running as another user wrote,
    # and an offline trainer reads the service's shards: both get the modes an ordinary mkdir/open would give.
    old = os.umask(0o022)
    try:
        version = repo.save("m", make(sc), scenario=sc, step=1, eval_win_rate=None)
        table = pa.table({"x": pa.array([1, 2], pa.int32())})
        shard = write_shard(tmp_path / "exp", "chunk-0", table)
    finally:
        os.umask(old)
    path = repo.root / "m" / str(version)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {
        "card.json": 0o644, "weights.safetensors": 0o644}
    assert stat.S_IMODE(shard.stat().st_mode) == 0o644


def test_a_removed_versions_number_is_not_issued_again(repo, sc):
    for _ in range(3):
        repo.save("m", make(sc), scenario=sc, step=1, eval_win_rate=None)
    for v in (3, 2):  # an operator rolls back twice
        shutil.rmtree(repo.root / "m" / str(v))
    assert repo.versions("m") == [1]
    assert repo.save("m", make(sc), scenario=sc, step=2, eval_win_rate=None) == 4
    assert repo.versions("m") == [1, 4]


def test_bad_names_and_versions(repo, sc):
    with pytest.raises(ValueError, match="model name"):
        repo.save("../evil", make(sc), scenario=sc, step=0, eval_win_rate=None)
    with pytest.raises(ModelLoadError, match=r"no complete version of model 'nothing' under \S* \(no such dir"):
        repo.load("nothing")  # a typo'd --models, say
    repo.save("m", make(sc), scenario=sc, step=0, eval_win_rate=None)
    with pytest.raises(ModelLoadError, match=r"no complete version of model 'nothing' under \S*models$"):
        repo.load("nothing")
    with pytest.raises(ModelLoadError, match="no version 9"):
        repo.load("m", 9)
    with pytest.raises(ValueError, match="do not fit scenario"):
        repo.save("m", make(sc), scenario=load_scenario("8m"), step=0, eval_win_rate=None)


def _corrupt(path, how, policy):
    weights, card_path = path / "weights.safetensors", path / "card.json"
    card = json.loads(card_path.read_text())
    tensors = {k: v.clone() for k, v in policy.state_dict().items()}
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif how == "missing-weights":
        os.remove(weights)
    elif how == "missing-tensor":
        tensors.pop("actor_head.bias")
        save_file(tensors, weights)
    elif how == "wrong-shape":
        tensors["actor_head.bias"] = torch.zeros(1, 3)
        save_file(tensors, weights)
    elif how == "wrong-dtype":
        tensors["actor_head.bias"] = tensors["actor_head.bias"].double()
        save_file(tensors, weights)
    elif how == "nan":
        tensors["actor_in.weight"][0, 0, 0] = float("nan")
        save_file(tensors, weights)
    elif how == "bad-json":
        card_path.write_text("{not json")
    elif how == "missing-key":
        del card["spec"]
        card_path.write_text(json.dumps(card))
    elif how == "spec-mismatch":
        card["spec"]["obs_size"] += 1
        card_path.write_text(json.dumps(card))
    elif how == "bad-architecture":
        card["architecture"]["sharing"] = "nope"
        card_path.write_text(json.dumps(card))
    elif how == "sharing-mismatch":
        card["sharing"] = "independent"
        card_path.write_text(json.dumps(card))
    elif how == "huge-architecture":  # building it first would take the machine's memory, or minutes
        card["architecture"]["hidden"] = 10_000_000
        card_path.write_text(json.dumps(card))
    elif how == "huge-groups":  # one network per type: a loader built 10^6 of them before any shape check
        card["architecture"]["sharing"] = card["sharing"] = "per-type"
        card["architecture"]["agent_type_ids"] = [0] * (card["architecture"]["n_agents"] - 1) + [1_000_000]
        card_path.write_text(json.dumps(card))
    elif how == "huge-army":  # independent with 10^9 slots: the type list alone would take the memory
        card["architecture"].update(n_agents=1_000_000_000, agent_type_ids=None, sharing="independent")
        card["spec"]["n_agents"], card["sharing"] = 1_000_000_000, "independent"
        card_path.write_text(json.dumps(card))
    elif how == "pickle":
        torch.save(tensors, weights)  # a pickle file posing as weights must be refused, not unpickled
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how,message", [
    ("truncated", "truncated or corrupt"), ("garbage", "truncated or corrupt"), ("pickle", "truncated or corrupt"),
    ("missing-weights", "weights file is missing"), ("missing-tensor", "missing tensors: actor_head.bias"),
    ("wrong-shape", "actor_head.bias has shape"), ("wrong-dtype", "dtype"), ("nan", "NaN"),
    ("bad-json", "not valid JSON"), ("missing-key", "lacks required keys: spec"),
    ("spec-mismatch", "spec obs_size"), ("bad-architecture", "architecture is invalid"),
    ("sharing-mismatch", "card sharing"),
    ("huge-architecture", r"actor_in.weight has shape \(1, \d+, 16\), the card's architecture needs"),
    ("huge-groups", r"agent_type_ids must list one type index per agent \(3\), each in 0..2"),
    ("huge-army", "n_agents must be at most 1024"),
])
def test_corrupt_models_raise_model_load_error(repo, sc, how, message):
    policy = make(sc)
    v = repo.save("m", policy, scenario=sc, step=0, eval_win_rate=None)
    _corrupt(repo.root / "m" / str(v), how, policy)
    with pytest.raises(ModelLoadError, match=message) as info:
        repo.load("m", v)
    if how != "missing-weights":
        assert str(repo.root / "m" / str(v)) in str(info.value)


def test_one_run_at_a_time_claims_a_name(repo):
    """Two runs under one name would interleave unrelated versions and overwrite each other's log."""
    import os

    first = repo.claim("m")
    with pytest.raises(OSError, match=rf"another run is writing versions of 'm' .*\(pid {os.getpid()}\)"):
        repo.claim("m")
    other = repo.claim("other")  # another name is free
    first.close()
    repo.claim("m").close()  # released with the file
    other.close()


def test_the_run_that_claims_a_name_clears_what_a_killed_writer_left(repo, sc):
    """A trainer killed mid-save (SIGKILL, the OOM killer, a power cut) leaves a half-written version in a `.tmp-`
    directory; nothing else would ever delete it. The next run that claims the name does, and only then: while a
    run holds the name its temporaries are its own."""
    _versions(repo, sc, "m", [0.5])
    base = repo.root / "m"
    crashed = base / ".tmp-0123abcd-xyz"
    crashed.mkdir()
    (crashed / "weights.safetensors").write_bytes(b"\0" * 1000)
    other_writer = base / ".tmp-0123abcd.last-version"  # `phalanx models --remove` writes it without the claim
    other_writer.write_text("7\n")
    handle = repo.claim("m")
    assert sorted(p.name for p in base.iterdir()) == [".last-version", other_writer.name, ".writer.lock", "1"]
    mine = base / ".tmp-feedbeef-abc"  # a save in progress under the claim
    mine.mkdir()
    with pytest.raises(OSError):
        repo.claim("m")
    assert mine.is_dir() and repo.versions("m") == [1]
    handle.close()


def test_a_lock_file_another_user_left_read_only_still_works(repo):
    """On a shared, group-writable repository the lock file may belong to another user (0644 under their umask):
    a run that cannot write it can still take the lock through a read-only open."""
    import os
    import stat

    repo.claim("m").close()
    lock = repo.root / "m" / ".writer.lock"
    os.chmod(lock, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    real_open = os.open

    def as_another_user(path, flags, *args):  # root ignores file modes: refuse writing as the kernel would
        if str(path) == str(lock) and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    os.open = as_another_user
    try:
        first = repo.claim("m")
        with pytest.raises(OSError, match="another run is writing versions of 'm'"):
            repo.claim("m")
        first.close()
    finally:
        os.open = real_open


# --- `phalanx models`: list and prune ----------------------------------------------------------------------------

def _versions(repo, sc, name, rates):
    policy = make(sc)
    return [repo.save(name, policy, scenario=sc, step=100 * (i + 1), eval_win_rate=r) for i, r in enumerate(rates)]


def test_models_lists_every_model_and_one_models_versions(repo, sc, capsys):
    from service.cli import main

    _versions(repo, sc, "a", [0.2, 0.9, 0.5])
    _versions(repo, sc, "b", [None])
    (repo.root / "a" / "2" / "card.json").write_text("{not json")  # the best one, unreadable now
    assert main(["models", "--models", str(repo.root), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["versions"], r["latest"], r["best"], r["unreadable"]) for r in rows] == [
        ("a", 3, 3, 3, 1), ("b", 1, 1, None, 0)]
    assert rows[0]["scenario"] == "3m" and rows[0]["best_eval_win_rate"] == 0.5
    assert main(["models", "--models", str(repo.root), "--name", "a"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["version", "step", "eval_win_rate", "created", "from"]
    assert table[1].split()[:3] == ["1", "100", "0.200"] and "unreadable:" in table[2]
    assert main(["models", "--models", str(repo.root), "--name", "b", "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["version"], row["eval_win_rate"], row["origin"]) == (1, None, "simulation")


def test_prune_keeps_the_newest_the_best_and_the_named_versions(repo, sc, capsys):
    from service.cli import main

    _versions(repo, sc, "a", [0.3, 0.95, 0.4, 0.5, 0.6, 0.7, 0.6])
    base = ["models", "--models", str(repo.root), "--name", "a", "--prune", "--keep", "2"]
    assert main(base + ["--keep-version", "4", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == [1, 3, 5] and repo.versions("a") == [1, 2, 3, 4, 5, 6, 7]
    assert main(base + ["--keep-version", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "a", "removed": [1, 3, 5], "kept": [2, 4, 6, 7], "best": 2,
                                                   "dry_run": False}
    assert repo.versions("a") == [2, 4, 6, 7] and sorted(p.name for p in (repo.root / "a").iterdir()) == [
        ".last-version", "2", "4", "6", "7"]
    assert repo.load("a", 2).card["eval_win_rate"] == 0.95


def test_a_removed_version_vanishes_whole_and_its_number_is_never_reused(repo, sc, monkeypatch):
    """A service polls the name while versions go: by the time any file of a version is deleted, the version is no
    longer listed (it was renamed away first). The number is not issued again, even in a repository that predates
    the last-issued record."""
    import trainer.repository

    _versions(repo, sc, "a", [0.1, 0.2, 0.3])
    (repo.root / "a" / ".last-version").unlink()
    listed_while_deleting = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        listed_while_deleting.append(repo.versions("a"))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(trainer.repository.shutil, "rmtree", rmtree)
    repo.remove("a", 3)
    assert listed_while_deleting == [[1, 2]] and repo.versions("a") == [1, 2]
    assert _versions(repo, sc, "a", [0.4]) == [4]


def test_models_refuses_what_does_not_fit(repo, sc, capsys, tmp_path):
    from service.cli import main

    _versions(repo, sc, "a", [0.1, 0.2])
    root = str(repo.root)
    (tmp_path / "afile").write_text("")
    for args, message in (
            (["--models", str(tmp_path / "nowhere")], "no such directory"),
            (["--models", str(tmp_path / "afile")], "afile: a file, not a model repository"),
            (["--models", root, "--name", "zz"], "no model 'zz' with complete versions under"),
            (["--models", root, "--name", "a", "--keep", "1"], "--keep and --keep-version go with --prune"),
            (["--models", root, "--name", "a", "--dry-run"], "--dry-run goes with --prune or --remove"),
            (["--models", root, "--name", "a", "--remove", "3"], "model 'a' has no version 3 to remove"),
            (["--models", root, "--remove", "1"], "--remove needs --name"),
            (["--models", root, "--name", "a", "--remove", "1", "--prune", "--keep", "1"], "use one at a time"),
            (["--models", root, "--name", "a", "--prune"], "--prune needs --name (the model to prune) and --keep N"),
            (["--models", root, "--prune", "--keep", "1"], "--prune needs --name"),
            (["--models", root, "--name", "a", "--prune", "--keep", "0"], "keep must be >= 1, got 0"),
            (["--models", root, "--name", "a", "--prune", "--keep", "1", "--keep-version", "9"],
             "model 'a' has no version 9 to keep")):
        assert main(["models", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert repo.versions("a") == [1, 2]  # nothing removed by any of them


def test_remove_rolls_a_model_back_to_the_newest_version_left(repo, sc, capsys):
    from service.cli import main

    _versions(repo, sc, "a", [0.5, 0.6, 0.1])
    base = ["models", "--models", str(repo.root), "--name", "a", "--remove", "3"]
    assert main(base + ["--dry-run"]) == 0 and repo.versions("a") == [1, 2, 3]
    capsys.readouterr()
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "a", "removed": [3], "kept": [1, 2], "dry_run": False}
    assert repo.latest("a") == 2
    assert main(base[:-1] + ["1", "--remove", "2"]) == 2  # not the last one: a restarted service would serve nothing
    assert "would remove every version of 'a'" in capsys.readouterr().err and repo.versions("a") == [1, 2]


def test_prune_keeps_what_resumed_runs_came_from_and_breaks_ties_toward_the_newest(repo, sc, capsys):
    from service.cli import main

    policy = make(sc)
    for rate in (0.4, 0.8, 0.8):  # a first run: 2 and 3 tie for best
        repo.save("a", policy, scenario=sc, step=1, eval_win_rate=rate)
    for _ in range(3):  # a run resumed from version 2: its settings and its log's start are read there
        repo.save("a", policy, scenario=sc, step=2, eval_win_rate=None, extra={"resumed_from": 2})
    assert repo.prune_plan("a", keep=1) == ([2, 3, 6], [1, 4, 5], 3)
    assert main(["models", "--models", str(repo.root), "--name", "a", "--prune", "--keep", "1"]) == 0
    assert repo.versions("a") == [2, 3, 6]
    _versions(repo, sc, "unrated", [None, None, None])
    assert repo.prune_plan("unrated", keep=2) == ([2, 3], [1], None)


def test_prune_removes_nothing_while_a_card_cannot_be_read(repo, sc, monkeypatch, capsys):
    """An I/O error is no verdict on the version: it might be the best one."""
    from service.cli import main
    from trainer.repository import ModelUnreadable

    _versions(repo, sc, "a", [0.2, 0.9, 0.3, 0.4])
    real = ModelRepository.load_card

    def flaky(self, name, version=None):
        if version == 2:
            raise ModelUnreadable(f"{self.root / name / '2' / 'card.json'}: cannot read: Input/output error")
        return real(self, name, version)

    monkeypatch.setattr(ModelRepository, "load_card", flaky)
    assert main(["models", "--models", str(repo.root), "--name", "a", "--prune", "--keep", "1"]) == 2
    assert "Input/output error; nothing was removed" in capsys.readouterr().err
    assert repo.versions("a") == [1, 2, 3, 4]


def test_a_removal_that_cannot_delete_everything_still_removes_the_version_and_is_swept_later(repo, sc, monkeypatch,
                                                                                             capsys):
    from service.cli import main
    import trainer.repository

    _versions(repo, sc, "a", [0.1, 0.2, 0.3])
    monkeypatch.setattr(trainer.repository.shutil, "rmtree", lambda path, ignore_errors=False: None)  # a stuck disk
    assert main(["models", "--models", str(repo.root), "--name", "a", "--remove", "1"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["removed"] == [1] and "could not delete all of" in err and repo.versions("a") == [2, 3]
    (leftover,) = (repo.root / "a").glob(".tmp-removed-1-*")
    monkeypatch.undo()
    assert main(["models", "--models", str(repo.root), "--name", "a", "--remove", "2"]) == 0
    assert not leftover.exists() and repo.versions("a") == [3]
