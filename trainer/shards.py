"""Experience shards: the format the service logs and the offline trainer reads, in one place.

A shard is one Parquet file, one row per unit-step, that any Parquet reader opens (pyarrow, pandas, DuckDB,
Spark). Columns (O = obs_size, N = n_actions of the spec):

    game_id        string (dictionary)   the caller's game id
    episode_id     uint64                the caller's episode id
    unit_id        int32                 agent slot
    trajectory     uint64                the writer run's trajectory counter: (run_id, trajectory) names one trajectory
    step           uint32                position in that trajectory (0, 1, 2, ...)
    obs            fixed_size_list<float32>[O]
    mask           fixed_size_list<bool>[N]   legal actions
    action         int32                 the action served
    log_prob       float32               its log-probability under the serving policy's softmax
    value          float32               the serving policy's value estimate (0 for a central critic)
    greedy         bool                  the action was the argmax (the behaviour was deterministic)
    reward         float32               the reward of this step (arrived with the unit's next request)
    done           bool                  the unit's episode ended with this step
    truncated      bool                  the unit's next step is not logged (flushed at shutdown, evicted, or its
                                         request got no answer): reward 0, or the one that request carried;
                                         the row only bootstraps the value of the step before it
    model_version  uint64                the model version that answered
    spec_hash      string (dictionary)   the observation/action spec's content hash

File metadata (Arrow schema metadata, key `phalanx.experience`): JSON with format, spec_name, spec_hash, obs_size,
n_actions, run_id, rows, created. Files are written to `.tmp-*.partial` and renamed into place, so a directory never holds
half a shard under a `.parquet` name (a crash mid-write leaves a `.partial` file no `*.parquet` glob picks up). Reading never runs code (no pickle): `read_shards` checks every file's
metadata, schema and values and raises `ShardError` naming the file and the rule.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from trainer.atomic import fsync_dir, make_public

FORMAT_VERSION = 1
METADATA_KEY = b"phalanx.experience"
SUFFIX = ".parquet"
TMP_PREFIX = ".tmp-"
METADATA_FIELDS = ("format", "spec_name", "spec_hash", "obs_size", "n_actions", "run_id", "rows", "created")


class ShardError(ValueError):
    """A shard file is unreadable, of another format or spec, or holds impossible values; names the file."""


def schema(obs_size: int, n_actions: int) -> pa.Schema:
    """The Arrow schema of a shard for a spec with `obs_size` floats and `n_actions` actions."""
    return pa.schema([
        ("game_id", pa.dictionary(pa.int32(), pa.string())),
        ("episode_id", pa.uint64()),
        ("unit_id", pa.int32()),
        ("trajectory", pa.uint64()),
        ("step", pa.uint32()),
        ("obs", pa.list_(pa.float32(), obs_size)),
        ("mask", pa.list_(pa.bool_(), n_actions)),
        ("action", pa.int32()),
        ("log_prob", pa.float32()),
        ("value", pa.float32()),
        ("greedy", pa.bool_()),
        ("reward", pa.float32()),
        ("done", pa.bool_()),
        ("truncated", pa.bool_()),
        ("model_version", pa.uint64()),
        ("spec_hash", pa.dictionary(pa.int32(), pa.string())),
    ])


# --- writing ---------------------------------------------------------------------------------------------------

@dataclass
class Chunk:
    """Columns of n completed unit-steps, as numpy arrays (what the service accumulates).

    game_index (n,) int32 indexes `game_ids`; obs (n, O) float32; mask (n, N) bool; the rest (n,)."""
    game_ids: list[str]
    game_index: np.ndarray
    episode_id: np.ndarray
    unit_id: np.ndarray
    trajectory: np.ndarray
    step: np.ndarray
    obs: np.ndarray
    mask: np.ndarray
    action: np.ndarray
    log_prob: np.ndarray
    value: np.ndarray
    greedy: np.ndarray
    reward: np.ndarray
    done: np.ndarray
    truncated: np.ndarray
    model_version: np.ndarray


def chunk_table(chunk: Chunk, *, spec_name: str, spec_hash: str, run_id: str) -> pa.Table:
    """The Arrow table (with the shard metadata) of a chunk."""
    n, obs_size = chunk.obs.shape
    n_actions = chunk.mask.shape[1]
    meta = {"format": FORMAT_VERSION, "spec_name": spec_name, "spec_hash": spec_hash, "obs_size": obs_size,
            "n_actions": n_actions, "run_id": run_id, "rows": n,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    sch = schema(obs_size, n_actions).with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    columns = [
        pa.DictionaryArray.from_arrays(pa.array(chunk.game_index, pa.int32()), pa.array(chunk.game_ids, pa.string())),
        pa.array(chunk.episode_id, pa.uint64()),
        pa.array(chunk.unit_id, pa.int32()),
        pa.array(chunk.trajectory, pa.uint64()),
        pa.array(chunk.step, pa.uint32()),
        pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(chunk.obs, np.float32).reshape(-1)), obs_size),
        pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(chunk.mask, bool).reshape(-1)), n_actions),
        pa.array(chunk.action, pa.int32()),
        pa.array(chunk.log_prob, pa.float32()),
        pa.array(chunk.value, pa.float32()),
        pa.array(chunk.greedy, pa.bool_()),
        pa.array(chunk.reward, pa.float32()),
        pa.array(chunk.done, pa.bool_()),
        pa.array(chunk.truncated, pa.bool_()),
        pa.array(chunk.model_version, pa.uint64()),
        pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([spec_hash], pa.string())),
    ]
    return pa.Table.from_arrays(columns, schema=sch)


def write_shard(directory: str | os.PathLike, name: str, table: pa.Table) -> Path:
    """Write `table` to `<directory>/<name>.parquet` atomically (a `.tmp-*.partial` file, fsync, rename); returns the
    path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{name}{SUFFIX}"
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{name}-", suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            make_public(tmp)
            # page checksums: a flipped bit inside a page is refused on reading, not learned from
            pq.write_table(table, f, compression="zstd", write_page_checksum=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)
    return final


# --- reading ---------------------------------------------------------------------------------------------------

@dataclass
class Experience:
    """Logged unit-steps ready for learning: rows sorted by trajectory, then step. R rows.

    obs (R, O) float32, mask (R, N) bool, unit (R,) int64, action (R,) int64, behaviour_log_prob (R,): the log-
    probability of the action under the behaviour (0 for greedy rows: the argmax was taken with probability 1),
    reward (R,), done (R,) bool, has_next (R,) bool: the next row is the same trajectory's next step,
    sample (R,) bool: the row is a learning sample (a trajectory's last row that did not end the episode is not:
    its reward is missing or its successor was not logged, so it only bootstraps the value of the row before it),
    model_version (R,) int64. Plus the spec and the files read."""
    obs: torch.Tensor
    mask: torch.Tensor
    unit: torch.Tensor
    action: torch.Tensor
    behaviour_log_prob: torch.Tensor
    reward: torch.Tensor
    done: torch.Tensor
    has_next: torch.Tensor
    sample: torch.Tensor
    model_version: torch.Tensor
    spec_name: str
    spec_hash: str
    obs_size: int
    n_actions: int
    files: list[str]
    trajectories: int

    @property
    def rows(self) -> int:
        return int(self.action.shape[0])

    @property
    def samples(self) -> int:
        return int(self.sample.sum())


def shard_files(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """A directory's `*.parquet` files (sorted; `.tmp-*` ignored), or the given file(s); each file once, however
    many of the sources name it."""
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            try:
                files += sorted(f for f in p.iterdir() if f.suffix == SUFFIX and not f.name.startswith(TMP_PREFIX)
                                and f.is_file())
            except OSError as e:
                raise ShardError(f"{p}: cannot list the directory: {e.strerror or e}") from None
        elif p.is_file():
            files.append(p)
        else:
            raise ShardError(f"{p}: no such shard file or directory")
    seen: set[Path] = set()
    files = [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]  # each at its first naming
    if not files:
        raise ShardError(f"no shard files (*{SUFFIX}) in {', '.join(str(s) for s in sources)} (a service logging "
                         f"there writes one when a chunk fills, every --experience-flush-seconds (60 s by default), "
                         f"and when it stops)")
    return files


def read_metadata(path: Path, arrow_schema: pa.Schema) -> dict:
    """The shard metadata of one file, checked against its schema."""
    raw = (arrow_schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ShardError(f"{path}: not a phalanx experience shard (no '{METADATA_KEY.decode()}' metadata)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: shard metadata is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or any(k not in meta for k in METADATA_FIELDS):
        raise ShardError(f"{path}: shard metadata must be an object with keys {', '.join(METADATA_FIELDS)}")
    if meta["format"] != FORMAT_VERSION:
        raise ShardError(f"{path}: shard format {meta['format']!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("spec_name", "spec_hash", "run_id"):
        if not isinstance(meta[key], str):
            raise ShardError(f"{path}: metadata {key} must be a string, got {meta[key]!r}")
    for key in ("obs_size", "n_actions"):
        if not isinstance(meta[key], int) or meta[key] < 1:
            raise ShardError(f"{path}: metadata {key} must be a positive integer, got {meta[key]!r}")
    want = schema(meta["obs_size"], meta["n_actions"])
    for field in want:
        if field.name not in arrow_schema.names:
            raise ShardError(f"{path}: column {field.name!r} is missing")
        got = arrow_schema.field(field.name).type
        if got != field.type and not (pa.types.is_dictionary(field.type) and pa.types.is_string(got)):
            raise ShardError(f"{path}: column {field.name!r} must be {field.type}, got {got}")
    return meta


def _read_one(path: Path, spec_hash: str | None) -> tuple[dict, pa.Table]:
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise ShardError(f"{path}: not a readable Parquet shard (truncated or corrupt?): {e}") from None
    meta = read_metadata(path, table.schema)
    if spec_hash is not None and meta["spec_hash"] != spec_hash:
        raise ShardError(f"{path}: logged under spec {meta['spec_name']!r} (hash {meta['spec_hash']}), expected "
                         f"spec hash {spec_hash}")
    if table.num_rows != meta["rows"]:
        raise ShardError(f"{path}: metadata says {meta['rows']} rows, the file holds {table.num_rows}")
    for name in table.column_names:
        if table.column(name).null_count:
            raise ShardError(f"{path}: column {name!r} holds nulls")
    return meta, table


def _column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    if isinstance(col, pa.FixedSizeListArray):
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    return col.to_numpy(zero_copy_only=False)


def read_shards(source: str | os.PathLike | Iterable[str | os.PathLike], *, spec_hash: str | None = None) -> Experience:
    """Read and validate shard files (a directory, a file, or a list), all of one spec.

    spec_hash: refuse files logged under another spec (None: they must merely agree with each other).
    Raises ShardError naming the file: unreadable (truncated, corrupt, not Parquet), not a shard, another format
    version, a wrong schema, another spec, or impossible values (non-finite floats, an illegal action)."""
    files = shard_files(source)
    first: dict | None = None
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("unit_id", "step", "obs", "mask", "action", "log_prob",
                                                          "greedy", "reward", "done", "truncated",
                                                          "model_version", "traj", "file")}
    runs: dict[str, int] = {}
    for path in files:
        meta, table = _read_one(path, spec_hash)
        if first is None:
            first = meta
        elif (meta["spec_hash"], meta["obs_size"], meta["n_actions"]) != (
                first["spec_hash"], first["obs_size"], first["n_actions"]):
            raise ShardError(f"{path}: spec {meta['spec_name']!r} (hash {meta['spec_hash']}, obs {meta['obs_size']}, "
                             f"actions {meta['n_actions']}) differs from {files[0]}'s spec {first['spec_name']!r} "
                             f"(hash {first['spec_hash']}, obs {first['obs_size']}, actions {first['n_actions']})")
        cols = {name: _column(table, name) for name in ("unit_id", "trajectory", "step", "obs", "mask", "action",
                                                         "log_prob", "value", "greedy", "reward", "done", "truncated",
                                                         "model_version")}
        for name in ("obs", "log_prob", "value", "reward"):
            bad = ~np.isfinite(cols[name])
            if bad.any():
                row = int(np.flatnonzero(bad.reshape(len(bad), -1).any(1))[0])
                raise ShardError(f"{path}: column {name!r} must be finite, row {row} is not")
        action = cols["action"].astype(np.int64)
        if ((action < 0) | (action >= meta["n_actions"])).any():
            row = int(np.flatnonzero((action < 0) | (action >= meta["n_actions"]))[0])
            raise ShardError(f"{path}: action must lie in 0..{meta['n_actions'] - 1}, row {row} has {action[row]}")
        if not cols["mask"][np.arange(len(action)), action].all():
            row = int(np.flatnonzero(~cols["mask"][np.arange(len(action)), action])[0])
            raise ShardError(f"{path}: the action of row {row} ({action[row]}) is not legal under its mask")
        if (cols["unit_id"] < 0).any():
            raise ShardError(f"{path}: unit_id must be >= 0")
        run = runs.setdefault(meta["run_id"], len(runs))
        parts["traj"].append((np.int64(run) << 40) + cols["trajectory"].astype(np.int64))
        parts["file"].append(np.full(len(action), len(parts["file"]), np.int64))
        for name in parts:
            if name not in ("traj", "file"):
                parts[name].append(cols[name])
    assert first is not None
    p = {k: np.concatenate(v) for k, v in parts.items()}

    # --- trajectories: sort by (trajectory, step); a row continues into the next one only when it is the same
    # trajectory's next step and the episode went on
    order = np.lexsort((p["step"].astype(np.int64), p["traj"]))
    p = {k: v[order] for k, v in p.items()}
    same_next = np.zeros(len(order), dtype=bool)
    if len(order) > 1:
        same_next[:-1] = (p["traj"][1:] == p["traj"][:-1]) & (p["step"][1:].astype(np.int64) ==
                                                              p["step"][:-1].astype(np.int64) + 1)
        twice = np.flatnonzero((p["traj"][1:] == p["traj"][:-1]) & (p["step"][1:] == p["step"][:-1]))
        if len(twice):  # the same experience read twice would count its samples twice and cut its traces
            a, b = (files[int(p["file"][i])] for i in (twice[0], twice[0] + 1))
            where = f"{a} and {b} both hold" if a != b else f"{a} holds twice"
            raise ShardError(f"{where} step {int(p['step'][twice[0]])} of one trajectory (run "
                             f"{list(runs)[int(p['traj'][twice[0]]) >> 40]}): a shard copied under another name?")
    done = p["done"] & ~p["truncated"]
    has_next = same_next & ~done & ~p["truncated"]
    sample = ~p["truncated"] & (done | has_next)
    behaviour = np.where(p["greedy"], 0.0, p["log_prob"]).astype(np.float32)
    return Experience(
        obs=torch.from_numpy(np.ascontiguousarray(p["obs"], np.float32)),
        mask=torch.from_numpy(np.ascontiguousarray(p["mask"], bool)),
        unit=torch.from_numpy(p["unit_id"].astype(np.int64)), action=torch.from_numpy(p["action"].astype(np.int64)),
        behaviour_log_prob=torch.from_numpy(behaviour), reward=torch.from_numpy(p["reward"].astype(np.float32)),
        done=torch.from_numpy(done), has_next=torch.from_numpy(has_next), sample=torch.from_numpy(sample),
        model_version=torch.from_numpy(p["model_version"].astype(np.int64)),
        spec_name=str(first["spec_name"]), spec_hash=str(first["spec_hash"]), obs_size=int(first["obs_size"]),
        n_actions=int(first["n_actions"]), files=[str(f) for f in files], trajectories=len(np.unique(p["traj"])))
