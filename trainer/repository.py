"""The model repository: `<root>/<name>/<version>/` holding `weights.safetensors` and `card.json`, and from the
trainer also `optimizer.safetensors` (its Adam moments, so that a resumed run continues them; nothing serves it).

Versions are positive integers. A version is written into a temporary directory `<root>/<name>/.tmp-*`,
flushed to disk, then renamed into place, so a reader never sees half a model. Loading never runs code:
the card is JSON, the weights are safetensors, and every tensor is checked (names, shapes, dtypes, finite)
against the architecture the card describes before the policy is built. Problems raise `ModelLoadError`
naming the file and the rule that was broken.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from trainer.atomic import fsync_dir, make_public, write_synced
from trainer.config import check_name
from trainer.policy import Policy

CARD_FORMAT = 1
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
OPTIMIZER_FILE = "optimizer.safetensors"
# The highest version number ever issued under a name, so that a number is never handed out twice: an operator
# rolls back by removing a version directory, and the next save must not reuse its number for another model
# (the service remembers refused numbers, and shards name the version that acted).
LAST_ISSUED_FILE = ".last-version"
WRITER_LOCK_FILE = ".writer.lock"
TMP_PREFIX = ".tmp-"
REMOVED_PREFIX = f"{TMP_PREFIX}removed-"  # a removed version on its way out: renamed here, then deleted
_VERSION_RE = re.compile(r"^[1-9][0-9]*$")
REQUIRED_CARD_KEYS = ("format", "name", "version", "architecture", "spec", "sharing", "critic", "scenario", "step",
                      "eval_win_rate", "created")
SPEC_KEYS = ("name", "hash", "obs_size", "state_size", "n_actions", "n_agents")


class ModelLoadError(Exception):
    """A stored model is missing, incomplete or inconsistent; the message says what and where."""


class ModelUnreadable(ModelLoadError):
    """A stored model's file could not be read (an I/O error): no verdict on the model itself, so worth another
    try (a network volume's hiccup)."""


@dataclass
class LoadedModel:
    policy: Policy
    card: dict
    version: int
    path: Path

    def spec_mismatch(self, scenario) -> str | None:
        """None when this model was trained on `scenario`'s observation/action layout, else what differs."""
        spec = self.card["spec"]
        if spec["hash"] == scenario.spec_hash:
            return None
        return (f"version {self.version} of {self.card['name']!r} was trained on spec {spec['name']!r} "
                f"(hash {spec['hash']}), not on scenario {scenario.name!r} (hash {scenario.spec_hash})")


class ModelRepository:
    """Versioned models under one root directory. `ModelRepository(root)`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # --- listing --------------------------------------------------------------------------------------
    def versions(self, name: str) -> list[int]:
        """Complete versions of `name`, ascending. Temporary directories and other entries are ignored."""
        base = self.root / check_name(name)
        if not base.is_dir():
            return []
        out = []
        for entry in base.iterdir():
            if _VERSION_RE.match(entry.name) and (entry / CARD_FILE).is_file() and (entry / WEIGHTS_FILE).is_file():
                out.append(int(entry.name))
        return sorted(out)

    def models(self) -> dict[str, list[int]]:
        """Every name under the root that holds complete versions, with its versions (empty if the root cannot
        be read)."""
        try:
            entries = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        except OSError:
            return {}
        found = {}
        for name in entries:
            try:
                versions = self.versions(name)
            except (OSError, ValueError):  # not a model name (say, a hidden directory), or unreadable
                continue
            if versions:
                found[name] = versions
        return found

    def latest(self, name: str) -> int | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    # --- writing --------------------------------------------------------------------------------------
    def prepare(self, name: str) -> Path:
        """Create <root>/<name>/ and check that a version can be written there: a run calls this before it
        spends its budget, so an unusable --models fails at once rather than at the first save."""
        base = self.root / check_name(name)
        try:
            base.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=base).close()
        except OSError as e:
            raise OSError(f"cannot write model versions under {base}: {e.strerror or e}") from None
        return base

    def claim(self, name: str):
        """Hold <root>/<name>/.writer.lock (an exclusive flock) while the returned open file stays open: one run
        at a time writes a name's versions and logs. Two runs under one name would interleave unrelated versions
        (a service following the name would jump between them) and overwrite each other's log. The kernel drops
        the lock when the process ends, however it ends. Raises OSError naming the holder's pid."""
        import fcntl

        base = self.prepare(name)
        path = base / WRITER_LOCK_FILE
        try:  # 0666 less the umask, so that others sharing the directory can take it too
            handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+")
        except PermissionError:  # another user's lock file: flock needs only a reader; the pid stays theirs
            handle = open(path)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise OSError(f"another run is writing versions of {name!r} under {self.root} (pid {holder}); wait "
                          f"for it, stop it, or use another --name") from None
        except OSError as e:  # NFS emulates flock with write locks: a read-only open cannot take one there
            handle.close()
            raise OSError(f"cannot lock {path} ({e.strerror or e}): let this user write it (chmod g+w) or remove "
                          f"it") from None
        if handle.writable():
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        # No other run saves under this name now, so a temporary version directory left here is a crashed
        # writer's (a half-saved version, killed mid-write) or an unfinished removal's: delete them, they would
        # only fill the disk. Files are left alone: `.tmp-*` files are written without the claim (the issued-number
        # record of `phalanx models --remove`; shards, should an experience dir be pointed here).
        _delete_dirs(base, TMP_PREFIX)
        return handle

    def save(self, name: str, policy: Policy, *, scenario, step: int, eval_win_rate: float | None,
             extra: dict | None = None, optimizer_state: dict[str, torch.Tensor] | None = None) -> int:
        """Write a new version (the next integer) atomically and return it. `optimizer_state`: named tensors
        the trainer wants back when it resumes from this version (`load_optimizer_state`)."""
        check_name(name)
        if (policy.obs_size, policy.state_size, policy.n_actions, policy.n_agents) != (
                scenario.obs_size, scenario.state_size, scenario.n_actions, scenario.n_agents):
            raise ValueError(f"policy sizes (obs {policy.obs_size}, state {policy.state_size}, actions "
                             f"{policy.n_actions}, agents {policy.n_agents}) do not fit scenario {scenario.name!r} "
                             f"(obs {scenario.obs_size}, state {scenario.state_size}, actions {scenario.n_actions}, "
                             f"agents {scenario.n_agents})")
        if eval_win_rate is not None and not (0.0 <= float(eval_win_rate) <= 1.0):
            raise ValueError(f"eval_win_rate must lie in [0, 1] or be None, got {eval_win_rate!r}")
        base = self.root / name
        base.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in policy.state_dict().items()}
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-", dir=base))
        try:
            make_public(tmp)
            write_synced(tmp / WEIGHTS_FILE, st_save(tensors))
            if optimizer_state:
                write_synced(tmp / OPTIMIZER_FILE,
                             st_save({k: v.detach().to("cpu").contiguous() for k, v in optimizer_state.items()}))
            for _attempt in range(1000):
                taken = [int(e.name) for e in base.iterdir() if _VERSION_RE.match(e.name)]
                version = max(taken + [self._last_issued(base)], default=0) + 1
                card = {
                    "format": CARD_FORMAT, "name": name, "version": version, "architecture": policy.config,
                    "spec": {"name": scenario.name, "hash": scenario.spec_hash, "obs_size": scenario.obs_size,
                             "state_size": scenario.state_size, "n_actions": scenario.n_actions,
                             "n_agents": scenario.n_agents},
                    "sharing": policy.sharing, "critic": policy.critic, "scenario": scenario.name,
                    "step": int(step), "eval_win_rate": None if eval_win_rate is None else float(eval_win_rate),
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                for key, value in (extra or {}).items():
                    if key in card:
                        raise ValueError(f"extra card key {key!r} would overwrite a standard card key")
                    card[key] = value
                write_synced(tmp / CARD_FILE, (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())
                try:
                    os.rename(tmp, base / str(version))
                except OSError:
                    if (base / str(version)).exists():  # another writer took this number: try the next one
                        continue
                    raise
                self._record_issued(base, version)
                fsync_dir(base)
                return version
            raise RuntimeError(f"could not find a free version number under {base}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove(self, name: str, version: int) -> Path | None:
        """Delete one version. It is first renamed out of the version numbers (to a `.tmp-removed-*` name that
        readers ignore), so a service polling the name sees it whole or not at all, never half deleted; from then
        on it is gone. Returns what could not be deleted after that (None when nothing was left behind).
        Raises FileNotFoundError when the version is not there, OSError when the rename fails (nothing changed)."""
        base = self.root / check_name(name)
        if not self._record_issued(base, version):  # a repository older than the record learns it first
            raise OSError(f"cannot record version {version} as issued in {base / LAST_ISSUED_FILE}: its number "
                          f"could be handed out again, so it was not removed")
        doomed = base / f"{REMOVED_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        os.rename(base / str(version), doomed)
        fsync_dir(base)
        shutil.rmtree(doomed, ignore_errors=True)
        return doomed if doomed.exists() else None

    def sweep_removed(self, name: str) -> list[Path]:
        """Delete what earlier removals left behind (`.tmp-removed-*`); returns what still could not be deleted."""
        return _delete_dirs(self.root / check_name(name), REMOVED_PREFIX)

    def prune_plan(self, name: str, keep: int,
                   also_keep: tuple[int, ...] = ()) -> tuple[list[int], list[int], int | None]:
        """Which versions of `name` a prune keeps and which it removes. It keeps the newest `keep` (>= 1: the
        version a service following the name serves, unless it has a --min-eval-win-rate bar), the best by
        evaluation win rate (ties: the newest), `also_keep`, and every version a kept one was resumed from (a
        resumed run reads its settings and its log's start there). Returns (kept, removed, best).
        Raises ValueError when it cannot decide safely (a card it cannot read for an I/O error)."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        versions = self.versions(name)
        missing = sorted(set(also_keep) - set(versions))
        if missing:
            raise ValueError(f"model {name!r} has no version {', '.join(map(str, missing))} to keep under {self.root} "
                             f"(complete versions: {versions or 'none'})")
        cards = {}
        for v in versions:
            try:
                cards[v] = self.load_card(name, v)[0]
            except ModelUnreadable as e:  # it may well be the best: no verdict, no prune
                raise ValueError(f"{e}; nothing was removed (try again when the file can be read)") from None
            except ModelLoadError:  # corrupt for good: never servable, so age alone decides its fate
                continue
        best = best_version({v: card["eval_win_rate"] for v, card in cards.items()})
        kept = set(versions[-keep:]) | set(also_keep) | ({best} if best is not None else set())
        for v in list(kept):
            if v in cards:
                kept |= {card["version"] for card in self.lineage(name, cards[v])}
        return sorted(kept), [v for v in versions if v not in kept], best

    @staticmethod
    def _last_issued(base: Path) -> int:
        try:
            return int((base / LAST_ISSUED_FILE).read_text().strip())
        except (OSError, ValueError):  # absent (a repository from before the record) or unreadable
            return 0

    @staticmethod
    def _record_issued(base: Path, version: int) -> bool:
        """Raise the record to `version`; False when it could not be written."""
        if version <= ModelRepository._last_issued(base):
            return True
        tmp = base / f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}{LAST_ISSUED_FILE}"
        try:
            write_synced(tmp, f"{version}\n".encode())
            os.replace(tmp, base / LAST_ISSUED_FILE)
            return True
        except OSError:  # when saving: the version itself is published; only the guard against reuse is missing
            tmp.unlink(missing_ok=True)
            return False

    # --- reading --------------------------------------------------------------------------------------
    def load(self, name: str, version: int | None = None, device: str | torch.device = "cpu") -> LoadedModel:
        """Load and validate a version (default: the newest complete one). Raises ModelLoadError."""
        card, version, path = self.load_card(name, version)
        policy = policy_from_card(card, path / CARD_FILE, weights=path / WEIGHTS_FILE)
        load_weights(policy, path / WEIGHTS_FILE)
        return LoadedModel(policy.to(device).eval(), card, version, path)

    def load_optimizer_state(self, name: str, version: int) -> dict[str, torch.Tensor] | None:
        """The optimizer state saved with a version, as named tensors; None when it has none (a version from
        before such state was kept, or one written without it). Raises ModelLoadError when the file is there
        but unreadable or not safetensors; what the tensors mean is the trainer's to check."""
        return _read_safetensors(self.load_card(name, version)[2] / OPTIMIZER_FILE, "optimizer state")

    def lineage(self, name: str, card: dict) -> Iterator[dict]:
        """A version's card, then the cards of the versions it was resumed from, newest first, as far as they
        remain readable (a missing ancestor, or a loop, ends it)."""
        seen = {card["version"]}
        yield card
        while isinstance(card.get("resumed_from"), int) and card["resumed_from"] not in seen:
            try:
                card = self.load_card(name, card["resumed_from"])[0]
            except ModelLoadError:
                return
            seen.add(card["version"])
            yield card

    def load_card(self, name: str, version: int | None = None) -> tuple[dict, int, Path]:
        """A version's validated card, without touching its weights: (card, version, directory).
        Raises ModelLoadError."""
        try:
            check_name(name)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        if version is None:
            version = self.latest(name)
            if version is None:
                where = "" if self.root.is_dir() else " (a file)" if self.root.exists() else " (no such directory)"
                raise ModelLoadError(f"no complete version of model {name!r} under {self.root}{where}")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ModelLoadError(f"model version must be a positive integer, got {version!r}")
        path = self.root / name / str(version)
        if not path.is_dir():
            have = self.versions(name)
            raise ModelLoadError(f"model {name!r} has no version {version} under {self.root} "
                                 f"(complete versions: {have or 'none'})")
        card = read_card(path / CARD_FILE)
        if card["name"] != name or card["version"] != version:
            raise ModelLoadError(f"{path / CARD_FILE}: card names {card['name']!r} version {card['version']!r}, "
                                 f"but it is stored as {name!r} version {version}")
        return card, version, path


def best_version(rates: dict[int, float | None]) -> int | None:
    """The version with the highest evaluation win rate (ties: the newest); None when none has one."""
    rated = [(rate, v) for v, rate in rates.items() if rate is not None]
    return max(rated)[1] if rated else None


def _delete_dirs(base: Path, prefix: str) -> list[Path]:
    """Delete the directories in `base` whose names start with `prefix`; returns those that could not be."""
    left = []
    for path in base.glob(f"{prefix}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                left.append(path)
    return left


# --- validation helpers (also useful on their own) -----------------------------------------------------------

def read_card(path: Path) -> dict:
    """Parse and check card.json: JSON object, every required key, sane types. Raises ModelLoadError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: card file is missing") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: card is not UTF-8 text: {e}") from None
    except OSError as e:
        raise ModelUnreadable(f"{path}: cannot read card: {e}") from None
    try:
        card = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: card is not valid JSON: {e}") from None
    if not isinstance(card, dict):
        raise ModelLoadError(f"{path}: card must be a JSON object, got {type(card).__name__}")
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ModelLoadError(f"{path}: card lacks required keys: {', '.join(missing)}")
    if card["format"] != CARD_FORMAT:
        raise ModelLoadError(f"{path}: card format {card['format']!r} is not supported (expected {CARD_FORMAT})")
    if not isinstance(card["architecture"], dict):
        raise ModelLoadError(f"{path}: card 'architecture' must be a JSON object")
    spec = card["spec"]
    if not isinstance(spec, dict) or any(k not in spec for k in SPEC_KEYS):
        raise ModelLoadError(f"{path}: card 'spec' must be an object with keys {', '.join(SPEC_KEYS)}")
    if not isinstance(spec["hash"], str) or not spec["hash"]:
        raise ModelLoadError(f"{path}: card spec hash must be a non-empty string, got {spec['hash']!r}")
    if not isinstance(card["step"], int) or card["step"] < 0:
        raise ModelLoadError(f"{path}: card 'step' must be a non-negative integer, got {card['step']!r}")
    wr = card["eval_win_rate"]
    if wr is not None and (not isinstance(wr, (int, float)) or not math.isfinite(wr) or not 0 <= wr <= 1):
        raise ModelLoadError(f"{path}: card 'eval_win_rate' must be null or a number in [0, 1], got {wr!r}")
    return card


def policy_from_card(card: dict, where: Path | str = "card", *, weights: Path | None = None) -> Policy:
    """Build the policy the card describes, its weights not yet set (`load_weights` fills every one), after
    checking the card agrees with itself and, given `weights`, that the weights file holds tensors of the shapes
    it needs. The checks run on a shapes-only copy (torch's meta device), so a corrupt card asking for a huge
    network costs nothing before it is refused."""
    arch, spec = card["architecture"], card["spec"]
    try:
        with torch.device("meta"):
            shapes_only = Policy.from_config(arch, init_weights=False)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{where}: architecture is invalid: {e}") from None
    for key in ("obs_size", "state_size", "n_actions", "n_agents"):
        if spec[key] != getattr(shapes_only, key):
            raise ModelLoadError(f"{where}: spec {key} = {spec[key]!r} but the architecture has "
                                 f"{getattr(shapes_only, key)!r}")
    for key in ("sharing", "critic"):
        if card[key] != getattr(shapes_only, key):
            raise ModelLoadError(f"{where}: card {key} = {card[key]!r} but the architecture has "
                                 f"{getattr(shapes_only, key)!r}")
    if weights is not None:
        stored = _stored_shapes(weights)
        for key, want in shapes_only.state_dict().items():
            if key in stored and stored[key] != tuple(want.shape):
                raise ModelLoadError(f"{weights}: tensor {key} has shape {stored[key]}, the card's architecture "
                                     f"needs {tuple(want.shape)}")
    try:
        return Policy.from_config(arch, init_weights=False)
    except (RuntimeError, MemoryError) as e:  # a network too large for this machine
        raise ModelLoadError(f"{where}: cannot build the architecture: {e}") from None


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the data (missing or corrupt files are
    load_weights' to report, with the full check)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError):  # load_weights names the problem
        return {}


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor] | None:
    """The tensors of a safetensors file; None when there is no such file. Raises ModelUnreadable (an I/O error)
    or ModelLoadError (not safetensors)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ModelUnreadable(f"{path}: cannot read {what}: {e}") from None
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        raise ModelLoadError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from None


def load_weights(policy: Policy, path: Path) -> None:
    """Read safetensors at `path` into `policy` after checking names, shapes, dtypes and finiteness."""
    tensors = _read_safetensors(path, "weights")
    if tensors is None:
        raise ModelLoadError(f"{path}: weights file is missing")
    expected = policy.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ModelLoadError(f"{path}: missing tensors: {', '.join(missing)}")
    if unexpected:
        raise ModelLoadError(f"{path}: unexpected tensors: {', '.join(unexpected)}")
    for key, want in expected.items():
        got = tensors[key]
        if got.shape != want.shape:
            raise ModelLoadError(f"{path}: tensor {key} has shape {tuple(got.shape)}, the architecture needs "
                                 f"{tuple(want.shape)}")
        if got.dtype != want.dtype:
            raise ModelLoadError(f"{path}: tensor {key} has dtype {got.dtype}, expected {want.dtype}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise ModelLoadError(f"{path}: tensor {key} contains NaN or infinite values")
    policy.load_state_dict(tensors, strict=True)
