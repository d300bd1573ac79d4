"""Scripted baseline policies, to keep learning honest: a learned policy should beat all three.

Each baseline maps the simulator's current state to legal actions (E, A): `actions = BASELINES[name](sim)`.
They read the simulator's ground truth (positions, health), which is fine for scripts: they are yardsticks.
"""

from __future__ import annotations

from typing import Callable

import torch

from .engine import BattleSim
from .scenario import N_NON_ATTACK_ACTIONS


def random_policy(sim: BattleSim, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform over the legal actions."""
    noise = torch.rand(sim.avail.shape, generator=generator, device=sim.device)
    return noise.masked_fill(~sim.avail, -1.0).argmax(2)


def _approach(sim: BattleSim) -> torch.Tensor:
    """For each agent, the move (2..5) that best closes on the nearest living enemy; stop (1) if none."""
    A = sim.n_agents
    d = sim.dist[:, :A, A:].masked_fill(~sim.alive[:, None, A:], float("inf"))
    nearest = d.argmin(2)
    dx = sim.dx[:, :A, A:].gather(2, nearest[..., None]).squeeze(2)
    dy = sim.dy[:, :A, A:].gather(2, nearest[..., None]).squeeze(2)
    vertical = torch.where(dy >= 0, 2, 3)
    horizontal = torch.where(dx >= 0, 4, 5)
    move = torch.where(dx.abs() >= dy.abs(), horizontal, vertical)
    legal = sim.avail.gather(2, move[..., None]).squeeze(2)
    return torch.where(legal & torch.isfinite(d.min(2).values), move, 1)


def _script(sim: BattleSim, enemy_score: torch.Tensor) -> torch.Tensor:
    """Attack the legal enemy with the lowest score; healers heal the most hurt ally in reach; else approach."""
    attack_ok = sim.avail[:, :, N_NON_ATTACK_ACTIONS:]
    pick = enemy_score.masked_fill(~attack_ok, float("inf"))
    best = pick.argmin(2)
    any_ok = attack_ok.any(2)
    act = torch.where(any_ok, best + N_NON_ATTACK_ACTIONS, _approach(sim))
    if bool(sim.healer[:sim.n_agents].any()):
        n_slots = attack_ok.shape[2]
        slots = min(sim.n_agents, n_slots)
        hurt = torch.ones_like(pick)
        hurt[..., :slots] = (sim.hp / sim.max_hp)[:, None, :slots].expand(-1, sim.n_agents, -1)
        heal_pick = hurt.masked_fill(~attack_ok, float("inf"))
        worth = heal_pick.min(2).values < 1.0
        heal = torch.where(worth, heal_pick.argmin(2) + N_NON_ATTACK_ACTIONS, _approach(sim))
        act = torch.where(sim.healer[None, :sim.n_agents], heal, act)
    return torch.where(sim.alive[:, :sim.n_agents], act, 0)


def attack_nearest(sim: BattleSim, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each unit attacks the nearest enemy it may attack, else walks towards the nearest enemy."""
    A = sim.n_agents
    return _script(sim, sim.dist[:, :A, A:])


def focus_fire(sim: BattleSim, generator: torch.Generator | None = None) -> torch.Tensor:
    """Every unit attacks the weakest (health + shield) enemy in reach, so the army kills one unit at a time."""
    A = sim.n_agents
    life = (sim.hp + sim.sh)[:, None, A:].expand(-1, A, -1)
    return _script(sim, life)


BASELINES: dict[str, Callable[..., torch.Tensor]] = {
    "random": random_policy,
    "attack-nearest": attack_nearest,
    "focus-fire": focus_fire,
}
