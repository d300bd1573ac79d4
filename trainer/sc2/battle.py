"""`SC2Battle`: one real StarCraft II game behind the simulator's API (reset/step -> StepOutput).

Playing needs the game: StarCraft II installed (SC2PATH pointing at it, or the default location for the
platform), SMAC's maps copied into `$SC2PATH/Maps/SMAC_Maps/` (https://github.com/oxwhirl/smac#smac-maps),
and `pysc2-evolved` (the `sc2` extra). Without them pass any pysc2-style env object to `SC2Battle(env=...)`
(tests use pysc2's `mock_sc2_env.SC2TestEnv`).

Seeds. SMAC seeds the game once at launch and starts each later episode inside the same game (it kills
every unit and the map respawns them), so the game's random numbers run on across episodes. pysc2's
`reset()` instead creates the game anew for every episode (with a bot there are two players, so no fast
restart: the map is reloaded) and sets the same `random_seed` on each creation: with a fixed `seed` the
built-in bot's random choices start from the same state every episode. pysc2 has no public way to change
the seed between episodes, so keep `seed=None` for training (the game then draws its own seed for each
game) and fix it only to reproduce a run.
"""

from __future__ import annotations

import functools
import os

import torch

from trainer.sim.engine import StepOutput
from trainer.sim.scenario import Scenario

from .adapter import RawConverter, RawGeometry, SlotError

DEFAULT_RAW_CELLS_PER_UNIT = 8  # raw_resolution = 8 x the scenario map: positions to 1/8 map unit


@functools.cache
def _smac_map_class():
    from pysc2_evolved.maps import lib

    class SMACMap(lib.Map):
        """A SMAC map file by name. The file name is set per instance (not per subclass, which pysc2
        would register globally), so any scenario name works: `SMACMap()` then `.filename = "3m"`."""

        directory = "SMAC_Maps"
        download = "https://github.com/oxwhirl/smac#smac-maps"
        players = 2
        step_mul = 8
        game_steps_per_episode = 0

        @property
        def name(self) -> str:
            return self.filename or "SMACMap"

    return SMACMap


def smac_map(name: str):
    """A pysc2 Map object for `<SC2PATH>/Maps/SMAC_Maps/<name>.SC2Map`."""
    m = _smac_map_class()()
    m.filename = name
    return m


def team_race(scenario: Scenario, agents: bool = True) -> str:
    """The one race of the scenario's agents (or enemies): 'terran' | 'protoss' | 'zerg'."""
    team = scenario.agents if agents else scenario.enemies
    races = {u.race for u in team}
    if len(races) != 1 or races <= {"other"}:
        raise ValueError(f"scenario {scenario.name}: the {'agents' if agents else 'enemies'} must be of one "
                         f"StarCraft II race to play the real game, got {sorted(races)}")
    return races.pop()


def make_sc2_env(scenario: Scenario, *, map_name: str | None = None, difficulty: str = "very_hard",
                 step_mul: int = 8, raw_resolution: int | None = None, seed: int | None = None,
                 disable_fog: bool = False, **kwargs):
    """A pysc2 SC2Env for the scenario: raw units and raw actions, our race against the built-in bot
    (SMAC's difficulty "7" is very_hard) on the SMAC map of the same name. Starts StarCraft II.

    seed: the game's random seed, re-applied at every episode (see the module docstring); None: the
    game's own. disable_fog: False plays with fog of war, as SMAC does (it creates its game without
    setting disable_fog, whose protocol default is false); an enemy out of every agent's sight is then
    missing from raw_units and counts as dead, as in SMAC. `kwargs` go to SC2Env (visualize, replay_dir, ...).
    """
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    from pysc2_evolved.env import sc2_env
    from pysc2_evolved.lib import actions

    res = raw_resolution or int(DEFAULT_RAW_CELLS_PER_UNIT * max(scenario.map_size))
    players = [sc2_env.Agent(sc2_env.Race[team_race(scenario, True)]),
               sc2_env.Bot(sc2_env.Race[team_race(scenario, False)], sc2_env.Difficulty[difficulty])]
    aif = sc2_env.AgentInterfaceFormat(use_raw_units=True, use_raw_actions=True, raw_resolution=res,
                                       action_space=actions.ActionSpace.RAW)
    try:
        return sc2_env.SC2Env(map_name=smac_map(map_name or scenario.name), players=players,
                              agent_interface_format=aif, step_mul=step_mul, game_steps_per_episode=0,
                              random_seed=seed, disable_fog=disable_fog, ensure_available_actions=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - the game, its binary or the map missing (OSError, pysc2's SC2LaunchError)
        raise RuntimeError(
            f"cannot start StarCraft II for scenario {scenario.name}: {e}. Install the game (SC2PATH, default "
            f"~/StarCraftII) and SMAC's maps in $SC2PATH/Maps/SMAC_Maps/ "
            "(https://github.com/oxwhirl/smac#smac-maps)") from e


def geometry_from_env(env, origin: tuple[float, float] = (0.0, 0.0), *,
                      scenario: Scenario | None = None) -> RawGeometry:
    """Read the raw frame from a pysc2 env: map size from `game_info`, raw grid from the action spec.

    scenario: when given, the game's map must be the scenario's map (same width and height), else
    ValueError: the state's positions (relative to the map centre, scaled by its size) and the move
    masks (the map's bounds) are computed on the scenario's map, so a different game map would give
    features that look right and are not.
    """
    try:
        size = env.game_info[0].start_raw.map_size
        world = env.action_spec()[0].types.world.sizes
    except (AttributeError, IndexError, TypeError) as e:
        raise ValueError(f"cannot read the map size / raw_resolution from the env ({e}); "
                         "pass geometry=RawGeometry(...)") from None
    game_size = (float(size.x), float(size.y))
    if scenario is not None and game_size != tuple(float(v) for v in scenario.map_size):
        raise ValueError(f"the game's map is {game_size[0]:g} x {game_size[1]:g}, but scenario {scenario.name}'s "
                         f"map is {scenario.map_size[0]:g} x {scenario.map_size[1]:g}: the features assume the "
                         "scenario's map; play its own map, correct the scenario's map size, or pass "
                         "geometry=RawGeometry(...) for a scenario that covers part of the game's map")
    return RawGeometry(game_size, (int(world[0]), int(world[1])), origin)


class SC2Battle:
    """One real game with BattleSim's interface (n_envs = 1): `reset()` and `step(actions (1, A))` return
    StepOutput with obs (1, A, O), state (1, S), avail (1, A, N), alive (1, A), and (1,) reward, done,
    won, timeout, episode_return, episode_length, allies_left, enemies_left.

    Reward is SMAC's (positive part): enemy health + shield lost, 10 per kill (once per unit: the dead stay
    dead, see adapter.py), 200 for the win, divided by `scenario.max_reward / 20`. An episode ends when an
    army is gone (only healers left counts as gone): won if it is theirs alone, else not won and not a
    timeout (ours gone, or both at once: SMAC's draw); at the episode limit (a timeout, a loss), or when
    the game itself ends (a timeout). With `auto_reset` a finished episode restarts at once and the
    returned obs belong to the next one, as in BattleSim.

    env: a pysc2 env (SC2Env, mock_sc2_env.SC2TestEnv, or a fake with reset()/step([calls]) returning a
    sequence of TimeSteps); None starts the real game via `make_sc2_env(scenario, **env_kwargs)`.
    geometry: the raw frame; None reads it from the env (`geometry_from_env`, which refuses a game map
    of another size than the scenario's).
    """

    def __init__(self, scenario: Scenario, env=None, *, geometry: RawGeometry | None = None,
                 unit_types: dict[int, str] | None = None, auto_reset: bool = True, check_actions: bool = True,
                 first_frame_tries: int = 20, **env_kwargs):
        self.scenario = scenario
        self.env = env if env is not None else make_sc2_env(scenario, **env_kwargs)
        try:
            geometry = geometry or geometry_from_env(self.env, scenario=scenario)
        except ValueError:
            if env is None:  # the game we started: do not leave it running
                self.env.close()
            raise
        self.conv = RawConverter(scenario, geometry, unit_types)
        self.n_envs, self.n_agents, self.n_enemies = 1, scenario.n_agents, scenario.n_enemies
        self.n_actions = scenario.n_actions
        self.auto_reset, self.check_actions = auto_reset, check_actions
        self.first_frame_tries = first_frame_tries
        self.reward_scale = scenario.max_reward / 20.0
        self.t, self.ep_return = 0, 0.0
        self.timestep = None  # the last pysc2 TimeStep

    def reset(self) -> StepOutput:
        """Start a new game episode; wait (no-op steps) until every scenario unit has spawned."""
        ts = self.env.reset()[0]
        for tries in range(self.first_frame_tries + 1):
            try:
                self.conv.assign(ts)
                break
            except SlotError:
                if tries == self.first_frame_tries:
                    raise
                ts = self.env.step([[]])[0]
        self.timestep, self.t, self.ep_return = ts, 0, 0.0
        return self.conv.observe(ts)

    def step(self, actions) -> StepOutput:
        A, sim = self.n_agents, self.conv.sim
        acts = torch.as_tensor(actions)
        if tuple(acts.shape) != (1, A):
            raise ValueError(f"actions must have shape (1, n_agents) = (1, {A}), got {tuple(acts.shape)}")
        acts = acts.long().cpu().numpy()[0]
        calls = self.conv.to_raw_actions(acts, check=self.check_actions)
        pre = (sim.hp + sim.sh)[0, A:].clone()
        tracked = torch.as_tensor(self.conv.dead[A:].copy())  # enemies whose death already paid out
        ts = self.env.step([calls])[0]
        self.timestep = ts
        out = self.conv.observe(ts, last_actions=acts)

        alive = sim.alive[0]
        # SMAC's reward: each enemy's damage and kill count until its death is tracked, and never again
        # (a tag that comes back and goes again pays nothing more)
        dealt = ((pre - (sim.hp + sim.sh)[0, A:]).clamp(min=0) * ~tracked).sum()
        kills = (torch.as_tensor(self.conv.dead[A:]) & ~tracked).sum()
        army = alive & ~sim.healer
        won = bool(army[:A].any() and not army[A:].any())
        lost = not bool(army[:A].any())
        self.t += 1
        timeout = not (won or lost) and (self.t >= self.scenario.episode_limit or ts.last())
        done = won or lost or timeout
        reward = float(dealt + 10.0 * kills + 200.0 * won) / self.reward_scale
        self.ep_return += reward

        def one(v, dtype):
            return torch.tensor([v], dtype=dtype)

        stats = dict(reward=one(reward, torch.float32), done=one(done, torch.bool), won=one(won, torch.bool),
                     timeout=one(timeout, torch.bool), episode_return=one(self.ep_return, torch.float32),
                     episode_length=one(self.t, torch.int64), allies_left=one(int(alive[:A].sum()), torch.int64),
                     enemies_left=one(int(alive[A:].sum()), torch.int64))
        if done and self.auto_reset:
            out = self.reset()
        return StepOutput(out.obs, out.state, out.avail, out.alive, **stats)

    def close(self) -> None:
        self.env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@torch.no_grad()
def evaluate_in_game(policy, scenario: Scenario, episodes: int, *, greedy: bool = True, seed: int | None = None,
                     baseline: str | None = None, battle: SC2Battle | None = None, **env_kwargs) -> dict:
    """`trainer.ppo.evaluate` in the real game: play `episodes` episodes one after another in one SC2Battle (a
    game started with `make_sc2_env(scenario, seed=seed, **env_kwargs)` unless `battle` is given), with `policy`
    (greedy or sampled) or a scripted `baseline`, and return the same keys (plus `env`: "sc2"). A `seed` is
    re-applied to every episode's game (the module docstring's Seeds): None, the default, lets each be new."""
    from trainer.ppo import policy_actions
    from trainer.sim.baselines import BASELINES

    own = battle is None
    battle = battle or SC2Battle(scenario, auto_reset=False, seed=seed, **env_kwargs)
    A = scenario.n_agents
    unit = torch.arange(A)
    greedy_t = torch.full((A,), greedy, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed or 0)
    keys = ("won", "timeout", "episode_return", "episode_length", "allies_left", "enemies_left")
    totals = dict.fromkeys(keys, 0.0)
    was_training = policy is not None and policy.training
    if policy is not None:
        policy.eval()
    try:
        for _ in range(episodes):
            out, h = battle.reset(), None
            while True:
                obs, mask = out.obs.reshape(A, -1), out.avail.reshape(A, -1)
                if baseline is not None:  # the scripted players read the simulator mirror of the frame
                    actions = BASELINES[baseline](battle.conv.sim, generator=gen)
                else:
                    actions, h = policy_actions(policy, obs, mask, unit, greedy_t, gen, h)
                    actions = actions.reshape(1, A)
                out = battle.step(actions)
                if bool(out.done[0]):
                    for k in keys:
                        totals[k] += float(getattr(out, k)[0])
                    break
    finally:
        if own:
            battle.close()
        if was_training:
            policy.train()
    return {"env": "sc2", "win_rate": totals["won"] / episodes, "episodes": episodes,
            "mean_return": totals["episode_return"] / episodes,
            "mean_length": totals["episode_length"] / episodes,
            "mean_allies_left": totals["allies_left"] / episodes,
            "mean_enemies_left": totals["enemies_left"] / episodes, "timeouts": int(totals["timeout"])}
