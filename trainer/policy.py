"""The shared unit-control policy: one network that every unit runs on its own observation.

Shapes: B rows (one row = one unit at one moment), O = obs_size, S = state_size, N = n_actions,
A = n_agents, H = hidden, G = number of parameter groups.

Sharing is one code path with the mode as a parameter. Every layer that belongs to "the policy of a unit"
is a `GroupedLinear` holding G weight matrices; each row picks its matrix by the group id of its unit slot:

- `shared`      G = 1: every slot uses the same parameters (the point of the project);
- `per-type`    G = number of unit types: group = `agent_type_ids[slot]`;
- `independent` G = A: group = slot (the baseline that sharing must beat).

Critics:
- `central` (MAPPO): one value per *game*, from the global state (S,). A server has no global state,
  so `act` reports value 0.0 for such policies. Every live unit of a game shares its game's advantage.
- `local` (IPPO): one value per unit from the same inputs as the actor, grouped like the actor.

Values are predicted in normalised units; `value_norm` (running mean/variance of the return targets,
saved with the weights) turns them back into returns. `act` reports denormalised values.

The optional GRU core (`recurrent=True`) sits in the actor between the input layer and the head; it is for
training (`actor_sequence`); `act` refuses recurrent policies because a stateless server cannot carry h.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from trainer.config import CRITICS, SHARING_MODES

CONFIG_FORMAT = 1
_MASKED = -1e9  # logit of a forbidden action: exp() underflows to exactly 0 probability


@dataclass
class ActOutput:
    action: torch.Tensor  # (B,) int64
    log_prob: torch.Tensor  # (B,) float32, of the chosen action
    value: torch.Tensor  # (B,) float32, denormalised local value; 0.0 for a central critic


class GroupedLinear(nn.Module):
    """G independent affine maps; row b of the input uses map `group[b]`.

    x (B, in), group (B,) int64 in 0..G-1 -> (B, out). With G = 1 this is exactly `nn.Linear`.
    """

    def __init__(self, in_features: int, out_features: int, *, groups: int, gain: float = math.sqrt(2),
                 init: bool = True):
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(groups, out_features))
        for g in range(groups if init else 0):  # orthogonal init per group, as in the PPO implementation details
            w = torch.empty(out_features, in_features)
            nn.init.orthogonal_(w, gain)
            self.weight.data[g] = w.t()

    def forward(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return torch.addmm(self.bias[0], x, self.weight[0])
        if torch.jit.is_tracing():
            # Every group's map for every row, then each row keeps its own: G times the work, but no
            # Python branch on the data, so a trace holds for any batch and any mix of groups.
            every = torch.baddbmm(self.bias[:, None, :], x.expand(self.groups, -1, -1), self.weight)  # (G, B, out)
            pick = group.view(1, -1, 1).expand(1, -1, self.weight.shape[2])
            return every.gather(0, pick).squeeze(0)
        out = x.new_empty(x.shape[0], self.weight.shape[2])
        for g in range(self.groups):
            rows = torch.nonzero(group == g).squeeze(1)
            if rows.numel():
                out[rows] = torch.addmm(self.bias[g], x[rows], self.weight[g])
        return out


class GroupedGRUCell(nn.Module):
    """A GRU cell whose input and hidden maps are `GroupedLinear`: x (B, H_in), h (B, H), group (B,) -> (B, H)."""

    def __init__(self, in_features: int, hidden: int, *, groups: int, init: bool = True):
        super().__init__()
        self.hidden = hidden
        self.x_map = GroupedLinear(in_features, 3 * hidden, groups=groups, gain=1.0, init=init)
        self.h_map = GroupedLinear(hidden, 3 * hidden, groups=groups, gain=1.0, init=init)

    def forward(self, x: torch.Tensor, h: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        xr, xz, xn = self.x_map(x, group).chunk(3, 1)
        hr, hz, hn = self.h_map(h, group).chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h


class ValueNorm(nn.Module):
    """Running mean and variance of the value targets (a PopArt-lite without rescaling the head).

    Buffers travel with the weights, so a loaded policy denormalises exactly as in training.
    """

    def __init__(self, beta: float = 0.995, eps: float = 1e-5):
        super().__init__()
        self.beta, self.eps = beta, eps
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("mean_sq", torch.zeros(()))
        self.register_buffer("debias", torch.zeros(()))

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.debias.clamp(min=self.eps)
        mean = self.mean / d
        var = (self.mean_sq / d - mean ** 2).clamp(min=1e-2)
        return mean, var.sqrt()

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of targets x (any shape) into the running statistics (one decay step per batch)."""
        self.update_moments(float(x.mean()), float((x.double() ** 2).mean()))

    @torch.no_grad()
    def update_moments(self, mean: float, mean_sq: float) -> None:
        """Fold a batch's first and second moments in (under DDP: the moments averaged over ranks)."""
        w = self.beta
        self.mean.mul_(w).add_((1 - w) * mean)
        self.mean_sq.mul_(w).add_((1 - w) * mean_sq)
        self.debias.mul_(w).add_(1 - w)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats()
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats()
        return x * std + mean


# Units one network drives; far above any scenario (SMAC's largest has 27), and it bounds what a corrupt card can
# make a loader build (one set of weights per unit in independent mode).
MAX_AGENTS = 1024


class Policy(nn.Module):
    """Actor over one unit's observation (masked softmax over its actions) plus a central or local critic.

    Build with named values, or from a card's architecture: `Policy.from_config(policy.config)`.
    """

    def __init__(self, *, obs_size: int, state_size: int, n_actions: int, n_agents: int,
                 agent_type_ids: list[int] | tuple[int, ...] | None = None, sharing: str = "shared",
                 critic: str = "central", hidden: int = 64, agent_id: bool = False, unit_type: bool = False,
                 recurrent: bool = False, init_weights: bool = True):
        super().__init__()
        for field, value in (("obs_size", obs_size), ("state_size", state_size), ("n_actions", n_actions),
                             ("n_agents", n_agents), ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if n_actions < 2:
            raise ValueError(f"n_actions must be >= 2, got {n_actions}")
        if n_agents > MAX_AGENTS:
            raise ValueError(f"n_agents must be at most {MAX_AGENTS}, got {n_agents}")
        if sharing not in SHARING_MODES:
            raise ValueError(f"sharing must be one of {', '.join(SHARING_MODES)}; got {sharing!r}")
        if critic not in CRITICS:
            raise ValueError(f"critic must be one of {', '.join(CRITICS)}; got {critic!r}")
        type_ids = [0] * n_agents if agent_type_ids is None else [int(t) for t in agent_type_ids]
        if len(type_ids) != n_agents or min(type_ids) < 0 or max(type_ids) >= n_agents:
            raise ValueError(f"agent_type_ids must list one type index per agent ({n_agents}), each in "
                             f"0..{n_agents - 1}; got {list(type_ids)!r}"[:300])
        self.obs_size, self.state_size, self.n_actions, self.n_agents = obs_size, state_size, n_actions, n_agents
        self.agent_type_ids = type_ids
        self.n_types = max(type_ids) + 1
        self.sharing, self.critic, self.hidden = sharing, critic, hidden
        self.agent_id, self.unit_type, self.recurrent = bool(agent_id), bool(unit_type), bool(recurrent)

        if sharing == "shared":
            slot_group = [0] * n_agents
        elif sharing == "per-type":
            slot_group = type_ids
        else:
            slot_group = list(range(n_agents))
        self.n_groups = max(slot_group) + 1
        self.register_buffer("slot_group", torch.tensor(slot_group, dtype=torch.int64), persistent=False)
        self.register_buffer("slot_type", torch.tensor(type_ids, dtype=torch.int64), persistent=False)

        G, H = self.n_groups, hidden
        self.input_size = obs_size + (n_agents if self.agent_id else 0) + (self.n_types if self.unit_type else 0)
        # init_weights=False: stored weights are about to be loaded (the orthogonal init took 0.1 s for 27
        # independent width-256 networks, on the service's reload path)
        Linear = functools.partial(GroupedLinear, init=init_weights)
        self.actor_in = Linear(self.input_size, H, groups=G)
        self.actor_core = GroupedGRUCell(H, H, groups=G, init=init_weights) if self.recurrent else None
        self.actor_mid = Linear(H, H, groups=G)
        self.actor_head = Linear(H, n_actions, groups=G, gain=0.01)
        critic_in, critic_groups = (state_size, 1) if critic == "central" else (self.input_size, G)
        self.critic_in = Linear(critic_in, H, groups=critic_groups)
        self.critic_mid = Linear(H, H, groups=critic_groups)
        self.critic_head = Linear(H, 1, groups=critic_groups, gain=1.0)
        self.value_norm = ValueNorm()

    # --- configuration ------------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """Plain JSON that rebuilds this architecture: `Policy.from_config(policy.config)`."""
        return {"format": CONFIG_FORMAT, "obs_size": self.obs_size, "state_size": self.state_size,
                "n_actions": self.n_actions, "n_agents": self.n_agents,
                "agent_type_ids": list(self.agent_type_ids), "sharing": self.sharing, "critic": self.critic,
                "hidden": self.hidden, "agent_id": self.agent_id, "unit_type": self.unit_type,
                "recurrent": self.recurrent}

    @classmethod
    def from_config(cls, config: dict, *, init_weights: bool = True) -> "Policy":
        if not isinstance(config, dict):
            raise ValueError(f"policy config must be a JSON object, got {type(config).__name__}")
        config = dict(config)
        fmt = config.pop("format", CONFIG_FORMAT)
        if fmt != CONFIG_FORMAT:
            raise ValueError(f"policy config format {fmt!r} is not supported (expected {CONFIG_FORMAT})")
        allowed = {"obs_size", "state_size", "n_actions", "n_agents", "agent_type_ids", "sharing", "critic",
                   "hidden", "agent_id", "unit_type", "recurrent"}
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(f"policy config has unknown keys: {', '.join(unknown)}")
        missing = sorted({"obs_size", "state_size", "n_actions", "n_agents"} - set(config))
        if missing:
            raise ValueError(f"policy config lacks required keys: {', '.join(missing)}")
        return cls(**config, init_weights=init_weights)

    @classmethod
    def for_scenario(cls, scenario, **kwargs) -> "Policy":
        """A policy sized for a `trainer.sim.Scenario`; kwargs are the architecture switches."""
        return cls(obs_size=scenario.obs_size, state_size=scenario.state_size, n_actions=scenario.n_actions,
                   n_agents=scenario.n_agents, agent_type_ids=scenario.agent_type_ids, **kwargs)

    # --- building blocks ----------------------------------------------------------------------------------
    def features(self, obs: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """obs (B, O), unit (B,) slot -> actor input (B, input_size): obs [+ agent-id one-hot] [+ type one-hot]."""
        parts = [obs]
        if self.agent_id:
            parts.append(nn.functional.one_hot(unit, self.n_agents).to(obs.dtype))
        if self.unit_type:
            parts.append(nn.functional.one_hot(self.slot_type[unit], self.n_types).to(obs.dtype))
        return torch.cat(parts, 1) if len(parts) > 1 else obs

    def actor_step(self, obs: torch.Tensor, mask: torch.Tensor, unit: torch.Tensor,
                   h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step of the actor. obs (B, O), mask (B, N) bool, unit (B,), h (B, H) or None ->
        masked logits (B, N) (forbidden actions at -1e9), next hidden (B, H) or None."""
        group = self.slot_group[unit]
        x = torch.relu(self.actor_in(self.features(obs, unit), group))
        if self.actor_core is not None:
            if h is None:
                h = x.new_zeros(x.shape[0], self.hidden)
            h = self.actor_core(x, h, group)
            x = h
        x = torch.relu(self.actor_mid(x, group))
        logits = self.actor_head(x, group)
        return logits.masked_fill(~mask, _MASKED), h

    def actor_sequence(self, obs: torch.Tensor, mask: torch.Tensor, unit: torch.Tensor, h0: torch.Tensor,
                       starts: torch.Tensor) -> torch.Tensor:
        """The recurrent actor over a rollout. obs (T, B, O), mask (T, B, N), unit (B,), h0 (B, H) the hidden
        state before step 0, starts (T, B) bool: a new episode begins at that step (h is zeroed first).
        -> masked logits (T, B, N)."""
        out = []
        h = h0
        for t in range(obs.shape[0]):
            h = h * (~starts[t]).unsqueeze(1).to(h.dtype)
            logits, h = self.actor_step(obs[t], mask[t], unit, h)
            out.append(logits)
        return torch.stack(out)

    def value(self, x: torch.Tensor, unit: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised value. Central: x = state (B, S), unit ignored. Local: x = obs (B, O), unit (B,). -> (B,)"""
        if self.critic == "central":
            group = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
            inp = x
        else:
            if unit is None:
                raise ValueError("a local critic needs the unit slot of every row")
            group = self.slot_group[unit]
            inp = self.features(x, unit)
        v = torch.relu(self.critic_in(inp, group))
        v = torch.relu(self.critic_mid(v, group))
        return self.critic_head(v, group).squeeze(1)

    def forward(self, obs: torch.Tensor, mask: torch.Tensor, unit: torch.Tensor, v_in: torch.Tensor,
                v_unit: torch.Tensor | None = None, h0: torch.Tensor | None = None,
                starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward (what DistributedDataParallel wraps): masked logits and normalised values.

        Feed-forward: obs (B, O), mask (B, N), unit (B,) -> logits (B, N). Recurrent (h0 given): obs (T, B, O),
        mask (T, B, N), unit (B,), h0 (B, H), starts (T, B) -> logits (T, B, N). Values: `value(v_in, v_unit)`.
        """
        if h0 is not None:
            if starts is None:
                raise ValueError("a recurrent forward needs `starts` with h0")
            logits = self.actor_sequence(obs, mask, unit, h0, starts)
        else:
            logits, _ = self.actor_step(obs, mask, unit)
        return logits, self.value(v_in, v_unit)

    # --- serving ------------------------------------------------------------------------------------------
    def act_graph(self, obs: torch.Tensor, mask: torch.Tensor, unit: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tensor work of `act`, free of Python branches on the data so that `torch.jit.trace` can record
        it once for every batch size (the service runs it that way: see `serving_graph`).
        obs (B, O), mask (B, N) bool, unit (B,) int64 -> log-probs (B, N), greedy action (B,), its log-prob (B,),
        value (B,)."""
        logits, _ = self.actor_step(obs, mask, unit)
        if self.critic == "local":
            value = self.value_norm.denormalize(self.value(obs, unit))
        else:
            value = torch.zeros_like(obs[:, 0])  # a server has no global state (zeros_like: a trace keeps it sized by B)
        log_probs = torch.log_softmax(logits, 1)
        action = logits.argmax(1)
        return log_probs, action, log_probs.gather(1, action[:, None]).squeeze(1), value

    def test_rows(self, rows: int, generator: torch.Generator):
        """Random inputs for a load-time check: obs (rows, O), mask (rows, N) with action 1 always legal, and
        unit slots cycling through every agent."""
        obs = torch.randn(rows, self.obs_size, generator=generator)
        mask = torch.rand(rows, self.n_actions, generator=generator) < 0.5
        mask[:, 1] = True
        return obs, mask, torch.arange(rows) % self.n_agents

    def serving_graph(self, example_rows: int = 8) -> torch.jit.ScriptModule:
        """`act_graph` recorded by `torch.jit.trace`: one call into C++ per batch instead of ~50 Python-level
        ops, each of which would take and drop the GIL while the server's event loop competes for it.
        Checked against the eager policy on random rows (1 and 3 x agents) before it is returned; raises
        RuntimeError if they disagree (callers then serve the eager policy)."""
        if self.recurrent:
            raise ValueError("a recurrent policy has no serving graph (act() needs no hidden state)")
        obs = torch.zeros(example_rows, self.obs_size)
        mask = torch.ones(example_rows, self.n_actions, dtype=torch.bool)
        unit = torch.arange(example_rows, dtype=torch.int64) % self.n_agents  # every group takes part
        with torch.no_grad(), warnings.catch_warnings():
            # torch 2.9+ marks torch.jit deprecated; it is still the lightest way to run a fixed graph with
            # one GIL release, and callers fall back to eager `act_graph` should a future torch drop it.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace")
            graph = torch.jit.trace(_ActGraph(self), (obs, mask, unit), check_trace=False)
        gen = torch.Generator().manual_seed(1)
        for rows in (1, 3 * self.n_agents):
            obs, mask, unit = self.test_rows(rows, gen)
            greedy = torch.ones(rows, dtype=torch.bool)
            eager, traced = self.act(obs, mask, unit, greedy), self.act(obs, mask, unit, greedy, graph=graph)
            if not (torch.equal(eager.action, traced.action)
                    and torch.allclose(eager.log_prob, traced.log_prob, rtol=1e-4, atol=1e-5)
                    and torch.allclose(eager.value, traced.value, rtol=1e-4, atol=1e-4)):
                raise RuntimeError(f"the traced graph disagrees with the eager policy on {rows} test rows")
        return graph

    @torch.no_grad()
    def act(self, obs: torch.Tensor, mask: torch.Tensor, unit: torch.Tensor, greedy: torch.Tensor | bool,
            generator: torch.Generator | None = None, *, graph=None, checked: bool = False) -> ActOutput:
        """Choose actions for B units. obs (B, O) float32, mask (B, N) bool, unit (B,) int64 slot,
        greedy (B,) bool, or one bool for every row: argmax where true, a sample where false.
        -> ActOutput of (B,) tensors.

        `graph`: a `serving_graph()` to run instead of `act_graph` (same numbers, far fewer ops);
        `checked`: the caller has already validated every row (the service does, per request)."""
        if self.recurrent:
            raise ValueError("this policy is recurrent (GRU core): act() needs no hidden state, so it cannot "
                             "serve it; train a feed-forward policy (recurrent=False) to serve")
        if greedy is False:
            greedy = torch.zeros(obs.shape[0], dtype=torch.bool)  # every row samples
        if not checked:
            self._check_act_inputs(obs, mask, unit, greedy)
        if unit.dtype != torch.int64:
            unit = unit.long()
        log_probs, action, log_prob, value = (graph or self.act_graph)(obs, mask, unit)
        # sample only when some row asks for it (serving is mostly greedy: then the graph's answer stands)
        if greedy is not True and obs.shape[0] and not bool(greedy.all()):
            probs = log_probs.exp()
            # A finite observation can still be too large for the network: its row's probabilities come out NaN
            # and multinomial would refuse the whole batch. That row samples among its legal actions instead;
            # its log-prob and value stay non-finite, for the caller to refuse (the service fails it alone).
            unusable = ~(torch.isfinite(probs.sum(1)) & (probs.sum(1) > 0))
            if bool(unusable.any()):
                probs[unusable] = mask[unusable].to(probs.dtype)
            sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            action = torch.where(greedy, action, sampled)
            log_prob = log_probs.gather(1, action[:, None]).squeeze(1)
        return ActOutput(action, log_prob, value)

    def _check_act_inputs(self, obs: torch.Tensor, mask: torch.Tensor, unit: torch.Tensor,
                          greedy: torch.Tensor) -> None:
        B = obs.shape[0]
        if obs.dim() != 2 or obs.shape[1] != self.obs_size:
            raise ValueError(f"obs must have shape (B, {self.obs_size}), got {tuple(obs.shape)}")
        if mask.shape != (B, self.n_actions) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape ({B}, {self.n_actions}), "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        greedy_shape = (B,) if greedy is True else tuple(greedy.shape)
        if unit.shape != (B,) or greedy_shape != (B,):
            raise ValueError(f"unit and greedy must have shape ({B},), got {tuple(unit.shape)} and {greedy_shape}")
        if B and (int(unit.min()) < 0 or int(unit.max()) >= self.n_agents):
            raise ValueError(f"unit slots must lie in 0..{self.n_agents - 1}, got {unit.tolist()}")
        if B and not bool(mask.any(1).all()):
            row = int(torch.nonzero(~mask.any(1))[0])
            raise ValueError(f"the action mask of row {row} allows no action")


class _ActGraph(nn.Module):
    """`Policy.act_graph` as a module's forward, which is what `torch.jit.trace` records."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    def forward(self, obs: torch.Tensor, mask: torch.Tensor, unit: torch.Tensor):
        return self.policy.act_graph(obs, mask, unit)
