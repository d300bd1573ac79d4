"""Turn one request into input rows for the batcher, or refuse it with the rule it broke.

Every request is checked here, before it joins a batch, so one bad request never fails a batch.
The checks run against the model being served (its spec). Pure functions: no network, no model.

Rows are numpy arrays, k rows per request (k = 1 for Act/ActStream, the frame's units for ActBatch):
    obs (k, obs_size) float32, mask (k, n_actions) bool, unit (k,) int64, greedy (k,) bool
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import grpc
import numpy as np

from service._gen.phalanx.v1 import inference_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

# Wire dtype of each raw tensor field of ActBatchRequest / ActBatchResponse (always little-endian).
NUMPY_DTYPES = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_UINT8: np.dtype("u1"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
}


class RequestError(Exception):
    """A request refused with a gRPC status code and a message that names the field and the value."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Spec(Protocol):
    """What validation needs to know about the served model (see model_holder.ServedModel)."""
    spec_name: str
    spec_hash: str
    obs_size: int
    n_actions: int
    n_agents: int


class Rows(NamedTuple):
    obs: np.ndarray  # (k, obs_size) float32
    mask: np.ndarray  # (k, n_actions) bool
    unit: np.ndarray  # (k,) int64
    greedy: np.ndarray  # (k,) bool


def _spec_text(spec: Spec) -> str:
    return f"spec {spec.spec_name} (hash {spec.spec_hash})"


def check_spec_hash(given: str, spec: Spec) -> None:
    if given and given != spec.spec_hash:
        raise RequestError(PRECONDITION, f"spec_hash: the served model was trained on {_spec_text(spec)}, "
                                         f"the request was built for hash {given!r}")


def unit_rows(req: pb.ActRequest, spec: Spec) -> Rows:
    """One unit's request (Act, ActStream) as one row."""
    check_spec_hash(req.spec_hash, spec)
    if req.unit_id >= spec.n_agents:
        raise RequestError(INVALID, f"unit_id: expected 0..{spec.n_agents - 1} (agent slots of "
                                    f"{_spec_text(spec)}), got {req.unit_id}")
    n = len(req.observation)
    if n != spec.obs_size:
        raise RequestError(INVALID, f"observation: expected {spec.obs_size} floats for {_spec_text(spec)}, got {n}")
    obs = np.fromiter(req.observation, dtype=np.float32, count=n)
    if not np.isfinite(obs).all():
        i = int(np.flatnonzero(~np.isfinite(obs))[0])
        raise RequestError(INVALID, f"observation: every value must be finite, got {obs[i]} at index {i}")
    n = len(req.action_mask)
    if n != spec.n_actions:
        raise RequestError(INVALID, f"action_mask: expected {spec.n_actions} entries for {_spec_text(spec)}, "
                                    f"got {n}")
    mask = np.fromiter(req.action_mask, dtype=bool, count=n)
    if not mask.any():
        raise RequestError(INVALID, "action_mask: at least one action must be legal, got none")
    if req.HasField("prev_reward") and not np.isfinite(req.prev_reward):
        raise RequestError(INVALID, f"prev_reward: must be finite, got {req.prev_reward}")
    return Rows(obs[None], mask[None], np.array([req.unit_id], dtype=np.int64),
                np.array([req.greedy], dtype=bool))


def tensor_array(t: pb.Tensor, field: str, dtypes: tuple[int, ...], shape: tuple[int | None, ...]) -> np.ndarray:
    """A raw tensor as a read-only numpy view; `shape` entries of None match any size."""
    if t.dtype not in dtypes:
        names = " or ".join(pb.DataType.Name(d) for d in dtypes)
        got = pb.DataType.Name(t.dtype) if t.dtype in pb.DataType.values() else str(t.dtype)
        raise RequestError(INVALID, f"{field}.dtype: expected {names}, got {got}")
    got = tuple(t.shape)
    if len(got) != len(shape) or any(want is not None and want != g for want, g in zip(shape, got)) \
            or any(g < 0 for g in got):
        want = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise RequestError(INVALID, f"{field}.shape: expected {want}, got {list(got)}")
    dtype = NUMPY_DTYPES[t.dtype]
    expected = math.prod(got) * dtype.itemsize  # Python ints: a crafted shape cannot wrap around
    if len(t.data) != expected:
        raise RequestError(INVALID, f"{field}.data: shape {list(got)} of {pb.DataType.Name(t.dtype)} needs "
                                    f"{expected} bytes, got {len(t.data)}")
    return np.frombuffer(t.data, dtype=dtype).reshape(got)


def frame_rows(req: pb.ActBatchRequest, spec: Spec) -> Rows:
    """All units of one frame (ActBatch) as n rows."""
    check_spec_hash(req.spec_hash, spec)
    if not req.HasField("observations"):
        raise RequestError(INVALID, "observations: required, got nothing")
    obs = tensor_array(req.observations, "observations", (pb.DATA_TYPE_FLOAT32,), (None, spec.obs_size))
    n = obs.shape[0]
    if n == 0:
        raise RequestError(INVALID, "observations: a frame needs at least one unit, got 0 rows")
    mask = tensor_array(req.action_masks, "action_masks", (pb.DATA_TYPE_UINT8,), (n, spec.n_actions))
    units = tensor_array(req.unit_ids, "unit_ids", (pb.DATA_TYPE_INT32, pb.DATA_TYPE_INT64), (n,))
    if not np.isfinite(obs).all():
        r, c = (int(x[0]) for x in np.nonzero(~np.isfinite(obs)))
        raise RequestError(INVALID, f"observations: every value must be finite, got {obs[r, c]} at row {r}, "
                                    f"column {c}")
    legal = mask.any(axis=1)
    if not legal.all():
        r = int(np.flatnonzero(~legal)[0])
        raise RequestError(INVALID, f"action_masks: every row needs at least one legal action, row {r} has none")
    if n and (units.min() < 0 or units.max() >= spec.n_agents):
        r = int(np.flatnonzero((units < 0) | (units >= spec.n_agents))[0])
        raise RequestError(INVALID, f"unit_ids: expected 0..{spec.n_agents - 1} (agent slots of "
                                    f"{_spec_text(spec)}), got {int(units[r])} at row {r}")
    if req.game_id:  # its rows are logged as these units' steps of that game: one step per unit
        counts = np.bincount(units, minlength=spec.n_agents)
        if (counts > 1).any():
            u = int(np.flatnonzero(counts > 1)[0])
            r0, r1 = (int(r) for r in np.flatnonzero(units == u)[:2])
            raise RequestError(INVALID, f"unit_ids: a frame of a game (game_id set) lists each unit once, got unit "
                                        f"{u} at rows {r0} and {r1}")
    if req.HasField("prev_rewards"):
        rewards = tensor_array(req.prev_rewards, "prev_rewards", (pb.DATA_TYPE_FLOAT32,), (n,))
        if not np.isfinite(rewards).all():
            raise RequestError(INVALID, "prev_rewards: every value must be finite")
    if req.HasField("prev_dones"):
        tensor_array(req.prev_dones, "prev_dones", (pb.DATA_TYPE_UINT8,), (n,))
    return Rows(obs, mask != 0, units.astype(np.int64), np.full(n, req.greedy, dtype=bool))

