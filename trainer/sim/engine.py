"""The batched combat simulator: E games of one scenario stepped together as tensors.

Units 0..A-1 of every game are the agents (controlled by the caller), units A..A+M-1 the enemies
(controlled by the built-in AI). One `step` is one agent step of 8 game loops:

1. orders: each agent's action; each enemy attack-moves onto the agents (the AI below)
2. attacks: units in weapon range with their weapon ready fire; hits (and splash) land on targets
3. heals, deaths, then movement: move orders, and units ordered to attack close in to weapon range
4. timers and regeneration; reward, win/loss/timeout; finished games restart at once (auto-reset)

All of it is elementwise or a reduction along one game's own units, so game i's result never
depends on the other games in the batch: stepping E games together equals stepping each alone.

Simplifications (documented, deliberate): ground units push apart by one relaxation pass per step rather
than pathing around each other; hits landing on one unit within the
same step are pooled before shields and armor apply (exact for one hit; for several hits armor still
applies per hit); a weapon fires at most once per step (every unit's cooldown exceeds 8 loops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scenario import LOOPS_PER_SECOND, LOOPS_PER_STEP, N_NON_ATTACK_ACTIONS, SECONDS_PER_STEP, Scenario

RANGE_SLACK = 1e-3  # a unit that closed in to exactly its weapon range counts as in range despite rounding
_MOVES = torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [-1.0, 0.0]])  # north, south, east, west


@dataclass
class StepOutput:
    """What the simulator returns. Shapes: E games, A agents, O obs, S state, N actions.

    `obs`, `state`, `avail`, `alive` describe the state the next actions act on: for a game that just
    finished they already belong to its next episode. `reward` and `done` (E,) belong to the step just
    taken; the episode statistics (`won`, `timeout`, `episode_return`, `episode_length`, `allies_left`,
    `enemies_left`) are meaningful where `done` is true.
    """

    obs: torch.Tensor  # (E, A, O) float32, zeros for dead agents
    state: torch.Tensor  # (E, S) float32, the global state for a centralized critic
    avail: torch.Tensor  # (E, A, N) bool action mask
    alive: torch.Tensor  # (E, A) bool
    reward: torch.Tensor  # (E,) float32, SMAC's shaped team reward
    done: torch.Tensor  # (E,) bool
    won: torch.Tensor  # (E,) bool
    timeout: torch.Tensor  # (E,) bool
    episode_return: torch.Tensor  # (E,) float32
    episode_length: torch.Tensor  # (E,) int64
    allies_left: torch.Tensor  # (E,) int64
    enemies_left: torch.Tensor  # (E,) int64


class IllegalActionError(ValueError):
    """An action was given that the action mask forbids."""


def _pairwise(v: torch.Tensor) -> torch.Tensor:
    """(E, U) -> (E, U, U) with [e, i, j] = v[e, j] - v[e, i]."""
    return v[:, None, :] - v[:, :, None]


def _hash_uniform(seed: torch.Tensor, episode: torch.Tensor, n: int) -> torch.Tensor:
    """(E, n) floats in [0, 1) from (seed, episode, position): the same for a game wherever it sits in a batch."""
    x = (seed[:, None] * 1_000_003 + episode[:, None] * 7_919
         + torch.arange(n, device=seed.device)[None, :] * 104_729) & 0x7FFFFFFF
    for _ in range(4):
        x = (x * 1_103_515_245 + 12_345) & 0x7FFFFFFF
        x = x ^ (x >> 13)
    return x.to(torch.float32) / float(2 ** 31)


class BattleSim:
    """E games of one scenario at once. Game i plays with seed `seed + i`.

    `sim = BattleSim(load_scenario("3m"), n_envs=1024, seed=0)`; `out = sim.reset()`;
    `out = sim.step(actions)` with `actions` (E, A) int64, legal under `out.avail`.
    Finished games restart at once unless `auto_reset=False`; `check_actions=False` skips the mask check.
    """

    def __init__(self, scenario: Scenario, n_envs: int, seed: int = 0, device: str | torch.device = "cpu",
                 check_actions: bool = True, auto_reset: bool = True):
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        self.scenario = sc = scenario
        self.n_envs = E = n_envs
        self.device = dev = torch.device(device)
        self.check_actions = check_actions
        self.auto_reset = auto_reset  # False keeps a finished game's final state (for replays)
        self.n_agents = A = sc.n_agents
        self.n_enemies = M = sc.n_enemies
        self.n_units = U = A + M
        self.n_actions = sc.n_actions
        units = sc.agents + sc.enemies

        def per_unit(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=dev)

        # --- static per-unit tables (U,) ---------------------------------------------------------------
        self.team = per_unit([0] * A + [1] * M, torch.int64)
        self.max_hp = per_unit([u.health for u in units])
        self.max_sh = per_unit([u.shield for u in units])
        self.armor = per_unit([u.armor for u in units])
        self.hits = per_unit([float(u.attacks) for u in units])
        self.cd_loops = per_unit([u.cooldown * LOOPS_PER_SECOND for u in units])
        self.cd_norm = per_unit([u.cooldown_norm for u in units])
        self.wrange = per_unit([u.range for u in units])
        self.step_len = per_unit([u.speed * SECONDS_PER_STEP for u in units])
        self.radius = per_unit([u.radius for u in units])
        self.splash_r = per_unit([u.splash_radius for u in units])
        self.splash_self = per_unit([u.splash_center == "self" for u in units], torch.bool)
        self.suicide = per_unit([u.suicide for u in units], torch.bool)
        self.healer = per_unit([u.is_healer for u in units], torch.bool)
        self.heal_step = per_unit([u.heal_rate * SECONDS_PER_STEP for u in units])
        self.heal_cost = per_unit([u.heal_energy_cost for u in units])
        self.energy_max = per_unit([u.energy_max for u in units])
        self.energy_start = per_unit([u.energy_start for u in units])
        self.energy_regen = per_unit([u.energy_regen * SECONDS_PER_STEP for u in units])
        self.hp_regen = per_unit([u.regen * SECONDS_PER_STEP for u in units])
        self.sh_regen = per_unit([u.shield_regen * SECONDS_PER_STEP for u in units])
        self.sh_delay = per_unit([u.shield_regen_delay * LOOPS_PER_SECOND for u in units])
        self.type_id = per_unit([sc.unit_types.index(u.name) for u in units], torch.int64)
        # raw damage of one attack (all its hits) of unit a on unit v, bonuses included; 0 within a team
        raw = [[(a.damage + (a.bonus_damage if a.bonus_vs in v.attributes else 0.0)) * a.attacks
                if ia < A <= iv or iv < A <= ia else 0.0 for iv, v in enumerate(units)]
               for ia, a in enumerate(units)]
        self.raw_damage = torch.tensor(raw, dtype=torch.float32, device=dev)  # (U, U)
        self.opposing = self.team[:, None] != self.team[None, :]  # (U, U)
        self.type_onehot = torch.eye(max(sc.type_bits, 1), device=dev)[self.type_id][:, :sc.type_bits]
        self.map_size = torch.tensor(sc.map_size, device=dev)
        self.attack_point = torch.tensor(sc.attack_point, device=dev)
        self.moves = _MOVES.to(dev)
        # for ally features: agent a's i-th other ally
        self.others = torch.tensor([[j for j in range(A) if j != a] for a in range(A)], dtype=torch.int64,
                                   device=dev).reshape(A, A - 1)
        # medivac-style healers act on ally slots k < n_actions - 6; others on enemy slots
        self.max_reward = sc.max_reward
        self.reward_scale = sc.max_reward / 20.0
        self.spawn = self._formation()  # (U, 2)
        # collisions: which pairs of ground units push each other, and which share of the push each takes
        ground = per_unit([not u.flying for u in units], torch.bool)
        mobile = per_unit([float(u.speed > 0) for u in units])
        self.collides = ground[:, None] & ground[None, :] & ~torch.eye(U, dtype=torch.bool, device=dev)
        self.push_share = mobile[:, None] / (mobile[:, None] + mobile[None, :]).clamp(min=1e-9)
        order = torch.arange(U, device=dev)
        self.tie_break = torch.sign(order[None, :] - order[:, None]).float()  # units on one spot part along x

        # --- dynamic state ---------------------------------------------------------------------------
        self.seeds = seed + torch.arange(E, dtype=torch.int64, device=dev)
        self.episode = torch.zeros(E, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(E, U, 2, device=dev)
        self.hp = torch.zeros(E, U, device=dev)
        self.sh = torch.zeros(E, U, device=dev)
        self.energy = torch.zeros(E, U, device=dev)
        self.cooldown = torch.zeros(E, U, device=dev)  # loops until the weapon is ready
        self.since_hit = torch.zeros(E, U, device=dev)  # loops since last damaged
        self.alive = torch.zeros(E, U, dtype=torch.bool, device=dev)
        self.ai_target = torch.full((E, U), -1, dtype=torch.int64, device=dev)
        self.t = torch.zeros(E, dtype=torch.int64, device=dev)
        self.ep_return = torch.zeros(E, device=dev)
        self.last_actions = torch.zeros(E, A, dtype=torch.int64, device=dev)
        self._reset_games(torch.ones(E, dtype=torch.bool, device=dev))
        self._observe()

    # --- setup ------------------------------------------------------------------------------------------
    def _formation(self) -> torch.Tensor:
        """Each team in columns of `columns` units, `spacing` apart, facing the other team along x."""
        sc = self.scenario
        out = []
        for units, (cx, cy), facing in ((sc.agents, sc.agent_spawn, -1.0), (sc.enemies, sc.enemy_spawn, 1.0)):
            n = len(units)
            n_cols = -(-n // sc.columns)
            for i in range(n):
                col, row = divmod(i, sc.columns)
                rows_here = min(sc.columns, n - col * sc.columns)
                x = cx + facing * (col - (n_cols - 1) / 2) * sc.spacing
                y = cy + (row - (rows_here - 1) / 2) * sc.spacing
                out.append((x, y))
        return torch.tensor(out, dtype=torch.float32, device=self.device)

    def _reset_games(self, mask: torch.Tensor):
        """Start a new episode in every game where `mask` (E,) is true."""
        self.episode = torch.where(mask, self.episode + 1, self.episode)
        U = self.n_units
        noise = _hash_uniform(self.seeds, self.episode, 2 * U).reshape(-1, U, 2)
        pos = self.spawn[None] + (noise * 2 - 1) * self.scenario.jitter
        pos = torch.minimum(torch.maximum(pos, torch.zeros_like(self.map_size)), self.map_size)
        m1, m2 = mask[:, None], mask[:, None, None]
        self.pos = torch.where(m2, pos, self.pos)
        self.hp = torch.where(m1, self.max_hp.expand_as(self.hp), self.hp)
        self.sh = torch.where(m1, self.max_sh.expand_as(self.sh), self.sh)
        self.energy = torch.where(m1, self.energy_start.expand_as(self.energy), self.energy)
        self.cooldown = torch.where(m1, 0.0, self.cooldown)
        self.since_hit = torch.where(m1, 0.0, self.since_hit)
        self.alive = self.alive | m1
        self.ai_target = torch.where(m1, -1, self.ai_target)
        self.t = torch.where(mask, 0, self.t)
        self.ep_return = torch.where(mask, 0.0, self.ep_return)
        self.last_actions = torch.where(m1, 0, self.last_actions)

    # --- public API -------------------------------------------------------------------------------------
    def reset(self) -> StepOutput:
        """Restart every game."""
        self._reset_games(torch.ones(self.n_envs, dtype=torch.bool, device=self.device))
        return self.refresh()

    def step(self, actions: torch.Tensor) -> StepOutput:
        A, E = self.n_agents, self.n_envs
        actions = torch.as_tensor(actions, device=self.device)
        if actions.shape != (E, A):
            raise ValueError(f"actions must have shape (n_envs, n_agents) = ({E}, {A}), got {tuple(actions.shape)}")
        actions = actions.long()
        if self.check_actions:
            self._check(actions)
        pre_hp, pre_sh, pre_alive = self.hp, self.sh, self.alive
        target, move_dir = self._orders(actions)
        fire, in_range, chase_len, tgt = self._engage(target)
        self.last_fire, self.last_target = fire, tgt  # for drawing replays: who fired at whom this step
        self.last_heal = in_range & self.healer
        damage_taken, hits_taken = self._hits(fire, tgt)
        heal = self._heals(in_range, tgt)
        self._apply(damage_taken, hits_taken, heal, fire)
        self._move(move_dir, chase_len, tgt)
        self._tick(fire, damage_taken > 0)

        # --- reward and episode end (SMAC: enemy health + shield lost, 10 per kill, 200 for the win) ---
        enemy = slice(A, None)
        dealt = ((pre_hp + pre_sh) - (self.hp + self.sh))[:, enemy].clamp(min=0).sum(1)
        kills = (pre_alive & ~self.alive)[:, enemy].sum(1)
        army = self.alive & ~self.healer  # only healers left counts as a dead army
        ally_army, enemy_army = army[:, :A].any(1), army[:, enemy].any(1)
        won = ally_army & ~enemy_army
        lost = ~ally_army
        self.t = self.t + 1
        timeout = (self.t >= self.scenario.episode_limit) & ~won & ~lost
        done = won | lost | timeout
        reward = (dealt + 10.0 * kills + 200.0 * won) / self.reward_scale
        self.ep_return = self.ep_return + reward
        self.last_actions = actions
        stats = dict(won=won, timeout=timeout, episode_return=self.ep_return, episode_length=self.t,
                     allies_left=self.alive[:, :A].sum(1), enemies_left=self.alive[:, enemy].sum(1))
        if self.auto_reset and bool(done.any()):
            self._reset_games(done)
        self._observe()
        return StepOutput(self.obs, self.state, self.avail, self.alive[:, :A], reward, done, **stats)

    def refresh(self) -> StepOutput:
        """Recompute observations, state and masks after editing unit state by hand (tests, custom set-ups)."""
        self._observe()
        zeros = torch.zeros(self.n_envs, device=self.device)
        izeros = torch.zeros(self.n_envs, dtype=torch.int64, device=self.device)
        no = torch.zeros(self.n_envs, dtype=torch.bool, device=self.device)
        return StepOutput(self.obs, self.state, self.avail, self.alive[:, :self.n_agents], zeros, no, no, no,
                          zeros, izeros, izeros, izeros)

    def _check(self, actions: torch.Tensor):
        if bool(((actions < 0) | (actions >= self.n_actions)).any()):
            bad = torch.nonzero((actions < 0) | (actions >= self.n_actions))[0].tolist()
            raise IllegalActionError(f"action {int(actions[bad[0], bad[1]])} for game {bad[0]} agent {bad[1]} "
                                     f"is outside 0..{self.n_actions - 1}")
        legal = self.avail.gather(2, actions[:, :, None]).squeeze(2)
        if not bool(legal.all()):
            g, a = torch.nonzero(~legal)[0].tolist()
            raise IllegalActionError(f"action {int(actions[g, a])} for game {g} agent {a} is masked out "
                                     f"(legal: {torch.nonzero(self.avail[g, a]).flatten().tolist()})")

    # --- 1. orders --------------------------------------------------------------------------------------
    def _orders(self, actions: torch.Tensor):
        """Every unit's target (E, U) (-1 for none) and move direction (E, U, 2)."""
        A, M = self.n_agents, self.n_enemies
        E = self.n_envs
        attack = actions >= N_NON_ATTACK_ACTIONS
        slot = (actions - N_NON_ATTACK_ACTIONS).clamp(min=0)
        agent_target = torch.where(self.healer[:A], slot, slot + A)  # healers act on ally slots
        agent_target = torch.where(attack, agent_target, -1)
        is_move = (actions >= 2) & (actions < 6)
        agent_move = self.moves[(actions - 2).clamp(0, 3)] * is_move[..., None]

        enemy_target, enemy_move = self._ai_orders()
        target = torch.cat([agent_target, enemy_target], 1)
        move_dir = torch.cat([agent_move, enemy_move], 1)
        return target, move_dir

    def _ai_orders(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The built-in AI attack-moves to the agents' start (SMAC's attack point), engaging agents within
        sight on the way. It keeps its target while that stays alive and in weapon range; otherwise it
        prefers agents in range, then agents that can fight back, then the nearest. AI healers follow and
        heal the most hurt friendly fighter in reach. -> target (E, M) (-1: none), move direction (E, M, 2)."""
        A = self.n_agents
        d = self.edge[:, A:, :A]  # (E, M, A) edge distance enemy -> agent
        alive_a = self.alive[:, None, :A]
        in_range = d <= self.wrange[A:, None] + RANGE_SLACK
        seen = self.dist[:, A:, :A] <= self.scenario.sight_range
        score = (d + 1000.0 * (~in_range) + 100.0 * self.healer[None, None, :A] + 1e5 * (~seen)
                 + 1e6 * (~alive_a))
        best_score, best = score.min(2)  # (E, M)
        best = torch.where(best_score < 1e5, best, -1)
        cur = self.ai_target[:, A:]
        cur_ok = (cur >= 0) & (cur < A)
        cur_idx = cur.clamp(0, A - 1)
        keep = cur_ok & self.alive[:, :A].gather(1, cur_idx) & in_range.gather(2, cur_idx[..., None]).squeeze(2)
        target = torch.where(keep, cur, best)
        if bool(self.healer[A:].any()):
            # heal targets among the enemy's own fighters, global index A + j
            de = self.edge[:, A:, A:]
            fighter = self.alive[:, None, A:] & ~self.healer[None, None, A:]
            hurt = self.hp[:, None, A:] < self.max_hp[None, None, A:]
            in_heal_range = de <= self.wrange[A:, None] + RANGE_SLACK
            hscore = (de + 1000.0 * ~(hurt & in_heal_range) + self.hp[:, None, A:] / self.max_hp[A:]
                      + 1e6 * ~fighter)
            heal_target = hscore.argmin(2) + A
            target = torch.where(self.healer[A:], heal_target, target)
        target = torch.where(self.alive[:, A:], target, -1)
        self.ai_target = torch.cat([self.ai_target[:, :A], target], 1)
        # nobody to fight: walk on towards the attack point, arriving exactly
        to_point = self.attack_point - self.pos[:, A:]
        gap = to_point.norm(dim=2, keepdim=True)
        walk = to_point / gap.clamp(min=1e-6) * (gap / self.step_len[A:, None]).clamp(max=1.0)
        move = torch.where((target < 0)[..., None] & self.alive[:, A:, None], walk, 0.0)
        return target, move

    # --- 2. attacks --------------------------------------------------------------------------------------
    def _engage(self, target: torch.Tensor):
        """Who fires this step, who is in range of its target, and how far each chaser must close in."""
        has = (target >= 0) & self.alive
        tgt = target.clamp(min=0)
        tgt_alive = self.alive.gather(1, tgt)
        edge = self.edge.gather(2, tgt[..., None]).squeeze(2)  # (E, U)
        has = has & tgt_alive
        in_range = has & (edge <= self.wrange + RANGE_SLACK)
        ready = self.cooldown < LOOPS_PER_STEP
        fire = in_range & ready & ~self.healer
        chase_len = torch.where(has & ~in_range, (edge - self.wrange).clamp(min=0), 0.0)
        return fire, in_range, chase_len, torch.where(has, tgt, -1)

    def _hits(self, fire: torch.Tensor, tgt: torch.Tensor):
        """Raw damage (E, U) and hit count landing on each unit: targets, plus everyone in a splash."""
        U = self.n_units
        victim = torch.arange(U, device=self.device)
        hit = fire[..., None] & (tgt[..., None] == victim)  # (E, attacker, victim)
        if bool((self.splash_r > 0).any()):
            # splash centre: the target's position, or the attacker's own (banelings)
            centre_idx = torch.where(self.splash_self, victim, tgt.clamp(min=0))
            d_centre = self.dist.gather(1, centre_idx[..., None].expand(-1, -1, U))  # (E, attacker, victim)
            splash = (d_centre <= self.splash_r[:, None]) & self.opposing & self.alive[:, None, :]
            hit = hit | (fire[..., None] & (self.splash_r[:, None] > 0) & splash)
        hitf = hit.to(torch.float32)
        raw = (hitf * self.raw_damage).sum(1)
        n_hits = (hitf * self.hits[:, None]).sum(1)
        return raw, n_hits

    def _heals(self, in_range: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """HP healed on each unit (E, U): healers in range of a hurt ally spend energy to heal it."""
        if not bool(self.healer.any()):
            return torch.zeros_like(self.hp)
        tgt0 = tgt.clamp(min=0)
        missing = (self.max_hp - self.hp).gather(1, tgt0)
        can = in_range & self.healer & ~self.opposing[torch.arange(self.n_units, device=self.device), tgt0]
        amount = torch.minimum(torch.minimum(self.heal_step.expand_as(missing), missing),
                               self.energy / self.heal_cost.clamp(min=1e-9))
        amount = torch.where(can, amount, 0.0)
        self.energy = self.energy - amount * self.heal_cost
        return torch.zeros_like(self.hp).scatter_add(1, tgt0, amount)

    def _apply(self, raw: torch.Tensor, n_hits: torch.Tensor, heal: torch.Tensor, fire: torch.Tensor):
        """Shields absorb first; what passes loses armor once per hit (at least 0.5 per hit) off health."""
        absorbed = torch.minimum(self.sh, raw)
        over = raw - absorbed
        frac_hits = torch.ceil(n_hits * over / raw.clamp(min=1e-9)).clamp(min=1.0)
        over_hits = torch.where(self.sh > 0, torch.minimum(frac_hits, n_hits), n_hits)
        to_health = torch.where(over > 0, torch.maximum(over - self.armor * over_hits, 0.5 * over_hits), 0.0)
        self.sh = self.sh - absorbed
        hp = self.hp - to_health
        dies = self.alive & ((hp <= 0) | (fire & self.suicide))
        self.alive = self.alive & ~dies
        self.hp = torch.where(self.alive, torch.minimum(hp + heal, self.max_hp), 0.0)
        self.sh = torch.where(self.alive, self.sh, 0.0)

    # --- 3. movement --------------------------------------------------------------------------------------
    def _move(self, move_dir: torch.Tensor, chase_len: torch.Tensor, tgt: torch.Tensor):
        step = torch.minimum(self.step_len, torch.tensor(self.scenario.move_amount, device=self.device))
        delta = move_dir * step[:, None]
        # towards the target: the pairwise offsets of the start of the step, gathered at each unit's target
        tgt0 = tgt.clamp(min=0)[..., None]
        tx, ty = self.dx.gather(2, tgt0).squeeze(2), self.dy.gather(2, tgt0).squeeze(2)
        length = torch.hypot(tx, ty).clamp(min=1e-6)
        chase = torch.minimum(chase_len, self.step_len) / length
        chasing = chase_len > 0
        delta_x = torch.where(chasing, chase * tx, delta[..., 0]) * self.alive
        delta_y = torch.where(chasing, chase * ty, delta[..., 1]) * self.alive
        x, y = self.pos[..., 0] + delta_x, self.pos[..., 1] + delta_y
        # ground units push each other apart: one relaxation pass per step, split by who can move
        dx, dy = _pairwise(x), _pairwise(y)  # (E, i, j): from i to j
        dist = torch.hypot(dx, dy)
        both = self.alive[:, :, None] & self.alive[:, None, :] & self.collides
        push = (self.radius[:, None] + self.radius[None, :] - dist).clamp(min=0) * both * self.push_share
        apart = dist > 1e-6
        inv = push / dist.clamp(min=1e-6)
        x = x - torch.where(apart, inv * dx, push * self.tie_break).sum(2)
        y = y - torch.where(apart, inv * dy, 0.0).sum(2)
        self.pos = torch.stack([x, y], 2)
        self.pos = torch.minimum(torch.maximum(self.pos, torch.zeros_like(self.map_size)), self.map_size)

    # --- 4. timers and regeneration ---------------------------------------------------------------------
    def _tick(self, fire: torch.Tensor, was_hit: torch.Tensor):
        self.cooldown = (torch.where(fire, self.cooldown + self.cd_loops, self.cooldown) - LOOPS_PER_STEP).clamp(min=0)
        regen_shield = self.alive & ~was_hit & (self.since_hit >= self.sh_delay)
        self.sh = torch.where(regen_shield, torch.minimum(self.sh + self.sh_regen, self.max_sh), self.sh)
        self.since_hit = torch.where(was_hit, 0.0, self.since_hit + LOOPS_PER_STEP)
        self.hp = torch.where(self.alive, torch.minimum(self.hp + self.hp_regen, self.max_hp), self.hp)
        self.energy = torch.where(self.alive, torch.minimum(self.energy + self.energy_regen, self.energy_max), 0.0)

    # --- observations, global state, action masks ------------------------------------------------------
    def _observe(self):
        sc = self.scenario
        A, M, E = self.n_agents, self.n_enemies, self.n_envs
        self.dx, self.dy = _pairwise(self.pos[..., 0]), _pairwise(self.pos[..., 1])  # (E, from, to): to - from
        self.dist = torch.hypot(self.dx, self.dy)
        self.edge = self.dist - self.radius[None, :, None] - self.radius[None, None, :]
        sight = sc.sight_range
        alive_a, alive_e = self.alive[:, :A], self.alive[:, A:]

        # action mask
        healer_a = self.healer[:A]
        targets_enemy = alive_a[..., None] & alive_e[:, None, :] & (self.dist[:, :A, A:] <= sc.shoot_range)
        n_slots = self.n_actions - N_NON_ATTACK_ACTIONS
        ally_slots = min(A, n_slots)
        heal_ok = (alive_a[..., None] & alive_a[:, None, :ally_slots] & ~self.healer[None, None, :ally_slots]
                   & (self.dist[:, :A, :ally_slots] <= sc.shoot_range))
        heal_ok = torch.nn.functional.pad(heal_ok, (0, n_slots - ally_slots))
        attack_ok = torch.where(healer_a[None, :, None], heal_ok, targets_enemy)
        dest = self.pos[:, :A, None, :] + self.moves * sc.move_amount  # (E, A, 4, 2)
        can_move = ((dest >= 0) & (dest <= self.map_size)).all(3) & alive_a[..., None]
        self.avail = torch.cat([~alive_a[..., None], alive_a[..., None], can_move, attack_ok], 2)

        def rel_block(j_from: int, j_to: int, others: torch.Tensor | None):
            """[distance, dx, dy, health, (shield), (type one-hot)] of units j_from:j_to seen from each agent."""
            d = self.dist[:, :A, j_from:j_to]
            hp = (self.hp / self.max_hp)[:, None, j_from:j_to].expand(-1, A, -1)
            feats = [d[..., None] / sight, self.dx[:, :A, j_from:j_to, None] / sight,
                     self.dy[:, :A, j_from:j_to, None] / sight, hp[..., None]]
            if (self.max_sh[j_from:j_to] > 0).any():
                sh = (self.sh / self.max_sh.clamp(min=1e-9))[:, None, j_from:j_to].expand(-1, A, -1)
                feats.append(sh[..., None])
            if sc.type_bits:
                feats.append(self.type_onehot[j_from:j_to].expand(E, A, -1, -1))
            block = torch.cat(feats, 3)
            visible = alive_a[..., None] & self.alive[:, None, j_from:j_to] & (d < sight)
            if others is not None:  # drop each agent's own column
                idx = others[None, :, :, None].expand(E, -1, -1, block.shape[3])
                block = block.gather(2, idx)
                visible = visible.gather(2, others[None].expand(E, -1, -1))
            return block, visible

        enemy_block, enemy_vis = rel_block(A, A + M, None)
        # SMAC's first enemy feature is the matching action's availability (for healers: healing that ally slot)
        enemy_feats = torch.cat([attack_ok[..., None].float(), enemy_block], 3) * enemy_vis[..., None]
        ally_block, ally_vis = rel_block(0, A, self.others)
        ally_feats = torch.cat([ally_vis[..., None].float(), ally_block], 3) * ally_vis[..., None]
        own = [(self.hp / self.max_hp)[:, :A, None]]
        if sc.agent_shields:
            own.append((self.sh / self.max_sh.clamp(min=1e-9))[:, :A, None])
        if sc.type_bits:
            own.append(self.type_onehot[:A].expand(E, -1, -1))
        own_feats = torch.cat(own, 2) * alive_a[..., None]
        move_feats = can_move.float()
        self.obs = torch.cat([move_feats, enemy_feats.flatten(2), ally_feats.flatten(2), own_feats], 2)

        # global state
        W, H = sc.map_size
        rel = (self.pos - torch.tensor([W / 2, H / 2], device=self.device)) / torch.tensor([W, H], device=self.device)
        cd = torch.where(self.healer, self.energy / 200.0, self.cooldown / self.cd_norm)
        hp = self.hp / self.max_hp
        sh = self.sh / self.max_sh.clamp(min=1e-9)
        typ = self.type_onehot.expand(E, -1, -1)
        ally = [hp[:, :A, None], cd[:, :A, None], rel[:, :A]]
        enemy = [hp[:, A:, None], rel[:, A:]]
        if sc.agent_shields:
            ally.append(sh[:, :A, None])
        if sc.enemy_shields:
            enemy.append(sh[:, A:, None])
        if sc.type_bits:
            ally.append(typ[:, :A])
            enemy.append(typ[:, A:])
        ally_state = torch.cat(ally, 2) * alive_a[..., None]
        enemy_state = torch.cat(enemy, 2) * alive_e[..., None]
        last = torch.nn.functional.one_hot(self.last_actions, self.n_actions).to(torch.float32)
        self.state = torch.cat([ally_state.flatten(1), enemy_state.flatten(1), last.flatten(1)], 1)
