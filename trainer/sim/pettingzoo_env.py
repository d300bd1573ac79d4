"""PettingZoo `ParallelEnv` over one game of the built-in simulator, so other MARL libraries can train on it.

    from trainer.sim.pettingzoo_env import parallel_env
    env = parallel_env("3m")
    observations, infos = env.reset(seed=0)
    observations, rewards, terminations, truncations, infos = env.step({agent: action, ...})

Agents are named "agent_0" .. "agent_{A-1}". Each observation is a dict {"observation": float32 (O,),
"action_mask": int8 (N,)}; every agent gets the team reward. A unit that dies leaves `env.agents` at
the next step (terminated); the episode limit truncates everyone. `infos[agent]["state"]` carries the
global state for centralized critics, and the final step's infos carry the episode statistics.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv

from .engine import BattleSim
from .scenario import Scenario, load_scenario


class PhalanxParallelEnv(ParallelEnv):
    metadata = {"name": "phalanx_v0", "render_modes": []}

    def __init__(self, scenario: Scenario | str, scenario_files: tuple = ()):
        self.scenario = load_scenario(scenario, scenario_files) if isinstance(scenario, str) else scenario
        self.possible_agents = [f"agent_{i}" for i in range(self.scenario.n_agents)]
        self.agents: list[str] = []
        self._sim: BattleSim | None = None
        self._seed = 0
        self._out = None

    @functools.lru_cache(maxsize=None)
    def observation_space(self, agent: str) -> spaces.Space:
        sc = self.scenario
        return spaces.Dict({
            "observation": spaces.Box(-np.inf, np.inf, shape=(sc.obs_size,), dtype=np.float32),
            "action_mask": spaces.Box(0, 1, shape=(sc.n_actions,), dtype=np.int8),
        })

    @functools.lru_cache(maxsize=None)
    def action_space(self, agent: str) -> spaces.Space:
        return spaces.Discrete(self.scenario.n_actions)

    def state(self) -> np.ndarray:
        return self._out.state[0].numpy().copy()

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._seed = int(seed)
            self._sim = None
        if self._sim is None:
            self._sim = BattleSim(self.scenario, 1, seed=self._seed)
            self._out = self._sim.reset()
        else:  # a fresh episode of the same game stream
            self._out = self._sim.reset()
        self.agents = list(self.possible_agents)
        return self._observations(), {a: {"state": self.state()} for a in self.agents}

    def _observations(self) -> dict:
        obs = self._out.obs[0].numpy()
        mask = self._out.avail[0].numpy().astype(np.int8)
        return {a: {"observation": obs[i].copy(), "action_mask": mask[i].copy()}
                for i, a in enumerate(self.possible_agents) if a in self.agents}

    def step(self, actions: dict):
        if not self.agents:
            raise RuntimeError("step() called on a finished episode: call reset() first")
        index = {a: i for i, a in enumerate(self.possible_agents)}
        joint = torch.zeros(1, self.scenario.n_agents, dtype=torch.int64)  # agents gone from the game no-op
        for agent, action in actions.items():
            if agent not in self.agents:
                raise KeyError(f"{agent!r} is not an active agent (active: {self.agents})")
            joint[0, index[agent]] = int(action)
        missing = [a for a in self.agents if a not in actions]
        if missing:  # filling them in with no-op would fail as an illegal action the caller never sent
            raise KeyError(f"no action for active agent(s) {missing}: step() takes one for every agent in "
                           f"env.agents")
        out = self._sim.step(joint)
        self._out = out
        done = bool(out.done[0])
        timeout = done and bool(out.timeout[0])
        reward = float(out.reward[0])
        stats = ({k: float(getattr(out, k)[0]) for k in
                  ("won", "timeout", "episode_return", "episode_length", "allies_left", "enemies_left")}
                 if done else None)
        terminations, truncations, rewards, infos = {}, {}, {}, {}
        for agent in self.agents:
            rewards[agent] = reward
            truncations[agent] = timeout
            # a unit that died is terminated; at the episode's end everyone is (or truncated at the limit)
            terminations[agent] = (not timeout) if done else not bool(out.alive[0, index[agent]])
            infos[agent] = dict(stats) if done else {"state": out.state[0].numpy().copy()}
        observations = (self._observations() if not done else
                        {a: {"observation": np.zeros(self.scenario.obs_size, np.float32),
                             "action_mask": np.eye(self.scenario.n_actions, dtype=np.int8)[0]} for a in self.agents})
        self.agents = [a for a in self.agents if not (terminations[a] or truncations[a])]
        return observations, rewards, terminations, truncations, infos


def parallel_env(scenario: str = "3m", scenario_files: tuple = ()) -> PhalanxParallelEnv:
    return PhalanxParallelEnv(scenario, scenario_files)
