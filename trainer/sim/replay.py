"""Play one episode and draw it: units as coloured circles with health (and shield) bars, attacks as lines.

`record_episode` returns the frames as RGB arrays; `save_replay` writes an animated GIF (`--out x.gif`)
or a directory of PNG frames (any other `--out`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .baselines import BASELINES
from .engine import BattleSim
from .scenario import load_scenario

AGENT, ENEMY = (52, 120, 246), (230, 70, 60)
BACKGROUND, GRID, TEXT = (24, 26, 30), (40, 43, 50), (230, 230, 230)
CANVAS = 560  # pixels along the map's longer side


class ReplayError(ValueError):
    """The replay cannot be made as asked (bad policy name, missing model, bad output path)."""


def _model_actor(models: str | None, name: str | None, version: int | None, scenario):
    if not models or not name:
        raise ReplayError("--policy model needs --models DIR and --name NAME")
    from trainer.repository import ModelLoadError, ModelRepository

    try:
        loaded = ModelRepository(models).load(name, version)
    except ModelLoadError as e:
        raise ReplayError(str(e)) from None
    mismatch = loaded.spec_mismatch(scenario)
    if mismatch:
        raise ReplayError(mismatch)
    policy = loaded.policy
    h = None  # a recurrent actor's hidden state, carried through the one episode a replay records

    def act(sim: BattleSim, generator=None) -> torch.Tensor:
        nonlocal h
        E, A = sim.n_envs, sim.n_agents
        unit = torch.arange(A).repeat(E)
        obs, mask = sim.obs.reshape(E * A, -1), sim.avail.reshape(E * A, -1)
        if policy.recurrent:
            with torch.no_grad():
                logits, h = policy.actor_step(obs, mask, unit, h)
            return logits.argmax(1).reshape(E, A)
        out = policy.act(obs, mask, unit, torch.ones(E * A, dtype=torch.bool))
        return out.action.reshape(E, A)

    return act


def record_episode(scenario_name: str, policy: str, seed: int = 0, files=(), models=None, name=None,
                   version=None) -> tuple[list[np.ndarray], dict]:
    scenario = load_scenario(scenario_name, files)
    if policy == "model":
        actor = _model_actor(models, name, version, scenario)
    elif policy in BASELINES:
        actor = BASELINES[policy]
    else:
        raise ReplayError(f"unknown policy {policy!r}: use one of {', '.join(BASELINES)}, or 'model'")
    sim = BattleSim(scenario, 1, seed=seed, auto_reset=False)
    sim.reset()  # as `phalanx eval` does: the replay of --seed S is the game eval plays with --seed S
    generator = torch.Generator().manual_seed(seed)
    frames = [_draw(sim, 0, 0.0)]
    episode_return = 0.0
    for t in range(scenario.episode_limit):
        before = _snapshot(sim)
        out = sim.step(actor(sim, generator))
        episode_return += float(out.reward[0])
        frames[-1] = _draw_from(before, sim, t, episode_return, attacks=True)
        frames.append(_draw(sim, t + 1, episode_return))
        if bool(out.done[0]):
            result = {"won": bool(out.won[0]), "episode_return": round(float(out.episode_return[0]), 4),
                      "episode_length": int(out.episode_length[0]), "allies_left": int(out.allies_left[0]),
                      "enemies_left": int(out.enemies_left[0])}
            return frames, result
    raise AssertionError("the simulator did not end the episode at its limit")


def _snapshot(sim: BattleSim) -> dict:
    return {"pos": sim.pos[0].clone(), "hp": sim.hp[0].clone(), "sh": sim.sh[0].clone(),
            "alive": sim.alive[0].clone()}


def _draw(sim: BattleSim, t: int, ret: float) -> np.ndarray:
    return _draw_from(_snapshot(sim), sim, t, ret, attacks=False)


def _draw_from(snap: dict, sim: BattleSim, t: int, ret: float, attacks: bool) -> np.ndarray:
    sc = sim.scenario
    W, H = sc.map_size
    scale = CANVAS / max(W, H)
    img = Image.new("RGB", (int(W * scale), int(H * scale) + 24), BACKGROUND)
    d = ImageDraw.Draw(img)
    for gx in range(0, int(W) + 1, 4):
        d.line([(gx * scale, 24), (gx * scale, 24 + H * scale)], fill=GRID)
    for gy in range(0, int(H) + 1, 4):
        d.line([(0, 24 + gy * scale), (W * scale, 24 + gy * scale)], fill=GRID)

    def xy(p):  # map y grows north; the image's y grows down
        return float(p[0]) * scale, 24 + (H - float(p[1])) * scale

    pos, alive = snap["pos"], snap["alive"]
    if attacks:
        for u in range(sim.n_units):
            target = int(sim.last_target[0, u])
            if target < 0 or not bool(alive[u]):
                continue
            if bool(sim.last_fire[0, u]):
                colour = (255, 230, 120) if u < sim.n_agents else (255, 150, 120)
            elif bool(sim.last_heal[0, u]):
                colour = (120, 255, 140)
            else:
                continue
            d.line([xy(pos[u]), xy(pos[target])], fill=colour, width=2)
    for u in range(sim.n_units):
        if not bool(alive[u]):
            continue
        x, y = xy(pos[u])
        r = max(4.0, float(sim.radius[u]) * scale)
        d.ellipse([x - r, y - r, x + r, y + r], fill=AGENT if u < sim.n_agents else ENEMY, outline=(0, 0, 0))
        bar_w = max(2 * r, 14.0)
        frac = float(snap["hp"][u] / sim.max_hp[u])
        d.rectangle([x - bar_w / 2, y - r - 6, x + bar_w / 2, y - r - 3], fill=(60, 60, 60))
        d.rectangle([x - bar_w / 2, y - r - 6, x - bar_w / 2 + bar_w * frac, y - r - 3], fill=(80, 220, 90))
        if float(sim.max_sh[u]) > 0:
            sfrac = float(snap["sh"][u] / sim.max_sh[u])
            d.rectangle([x - bar_w / 2, y - r - 10, x - bar_w / 2 + bar_w * sfrac, y - r - 7], fill=(90, 200, 250))
    allies = int(alive[:sim.n_agents].sum())
    enemies = int(alive[sim.n_agents:].sum())
    d.text((6, 5), f"{sc.name}  step {t}/{sc.episode_limit}  agents {allies}  enemies {enemies}  return {ret:.2f}",
           fill=TEXT)
    return np.asarray(img)


def save_replay(frames: list[np.ndarray], out: str | Path, fps: float = 6.0) -> str:
    """Write an animated GIF when `out` ends in .gif, else PNG frames into the directory `out`."""
    out = Path(out)
    if fps <= 0:
        raise ReplayError(f"--fps must be > 0, got {fps}")
    if out.suffix.lower() == ".gif":
        if not out.parent.exists():
            raise ReplayError(f"{out.parent}: directory does not exist")
        images = [Image.fromarray(f) for f in frames]
        images[0].save(out, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return str(out)
    if out.suffix:
        raise ReplayError(f"--out {out}: use a .gif file or a directory for PNG frames")
    out.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(out / f"frame_{i:04d}.png")
    return str(out)
