"""The shared policy network: masking, sharing modes as one code path, config round trip, pooled gradients."""

import pytest
import torch

from trainer.policy import GroupedLinear, Policy
from trainer.sim import BattleSim, load_scenario

SHARINGS = ("shared", "per-type", "independent")


def tiny(sc, **kw):
    torch.manual_seed(0)
    kw.setdefault("hidden", 16)
    return Policy.for_scenario(sc, **kw)


@pytest.fixture(scope="module")
def sc():
    return load_scenario("2s3z")


@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("critic", ("central", "local"))
def test_act_respects_mask_and_shapes(sc, sharing, critic):
    policy = tiny(sc, sharing=sharing, critic=critic, agent_id=True, unit_type=True)
    sim = BattleSim(sc, 32, seed=1)
    out = sim.reset()
    B = 32 * sc.n_agents
    obs = out.obs.reshape(B, -1)
    mask = out.avail.reshape(B, -1).clone()
    mask[:, 2:6] = False  # forbid moves as well: only stop and (maybe) attacks remain
    unit = torch.arange(sc.n_agents).repeat(32)
    gen = torch.Generator().manual_seed(3)
    for greedy in (True, False):
        res = policy.act(obs, mask, unit, torch.full((B,), greedy), generator=gen)
        assert res.action.shape == res.log_prob.shape == res.value.shape == (B,)
        assert res.action.dtype == torch.int64
        assert bool(mask.gather(1, res.action[:, None]).all()), "a masked action was chosen"
        assert bool((res.log_prob <= 0).all())
        if critic == "central":
            assert bool((res.value == 0).all())


def test_greedy_is_argmax_and_sampling_follows_the_distribution(sc):
    policy = tiny(sc)
    with torch.no_grad():
        policy.actor_head.bias[0] = torch.linspace(0, 2, sc.n_actions)  # a clear preference order
    obs = torch.zeros(4000, sc.obs_size)
    mask = torch.ones(4000, sc.n_actions, dtype=torch.bool)
    mask[:, -1] = False  # the most preferred action is forbidden
    unit = torch.zeros(4000, dtype=torch.int64)
    g = policy.act(obs, mask, unit, torch.ones(4000, dtype=torch.bool))
    assert bool((g.action == sc.n_actions - 2).all())
    s = policy.act(obs, mask, unit, torch.zeros(4000, dtype=torch.bool), generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(torch.linspace(0, 2, sc.n_actions)[:-1], 0)
    freq = torch.bincount(s.action, minlength=sc.n_actions)[:-1].float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    assert torch.allclose(s.log_prob.exp(), probs[s.action], atol=1e-5)


def test_act_rejects_bad_input(sc):
    policy = tiny(sc)
    obs = torch.zeros(2, sc.obs_size)
    mask = torch.ones(2, sc.n_actions, dtype=torch.bool)
    unit = torch.zeros(2, dtype=torch.int64)
    greedy = torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="obs must have shape"):
        policy.act(torch.zeros(2, 3), mask, unit, greedy)
    with pytest.raises(ValueError, match="allows no action"):
        policy.act(obs, torch.zeros_like(mask), unit, greedy)
    with pytest.raises(ValueError, match="unit slots"):
        policy.act(obs, mask, torch.tensor([0, sc.n_agents]), greedy)
    with pytest.raises(ValueError, match="recurrent"):
        tiny(sc, recurrent=True).act(obs, mask, unit, greedy)


@pytest.mark.parametrize("sharing", SHARINGS)
def test_config_round_trip(sc, sharing):
    policy = tiny(sc, sharing=sharing, critic="local", agent_id=True, recurrent=True)
    clone = Policy.from_config(policy.config)
    assert clone.config == policy.config
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in policy.state_dict().items()}
    with pytest.raises(ValueError, match="sharing"):
        Policy.from_config({**policy.config, "sharing": "some"})
    with pytest.raises(ValueError, match="unknown keys"):
        Policy.from_config({**policy.config, "bogus": 1})


def test_groups_follow_the_sharing_mode(sc):
    assert tiny(sc, sharing="shared").n_groups == 1
    per_type = tiny(sc, sharing="per-type")
    assert per_type.n_groups == 2 and per_type.slot_group.tolist() == sc.agent_type_ids
    assert tiny(sc, sharing="independent").slot_group.tolist() == list(range(sc.n_agents))


def test_grouped_linear_uses_each_rows_own_parameters():
    torch.manual_seed(0)
    layer = GroupedLinear(5, 3, groups=3)
    x = torch.randn(10, 5)
    group = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2, 0])
    y = layer(x, group)
    for b in range(10):
        g = int(group[b])
        assert torch.allclose(y[b], x[b] @ layer.weight[g] + layer.bias[g], atol=1e-6)


def test_independent_units_do_not_share_gradients(sc):
    policy = tiny(sc, sharing="independent")
    obs = torch.randn(3, sc.obs_size)
    mask = torch.ones(3, sc.n_actions, dtype=torch.bool)
    logits, _ = policy.actor_step(obs, mask, torch.tensor([1, 1, 1]))
    logits.sum().backward()
    grad = policy.actor_in.weight.grad
    assert grad[1].abs().sum() > 0
    assert grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0


def test_pooled_gradient_is_the_mean_of_per_unit_gradients():
    """Shared mode: the gradient of the pooled loss equals the mean of the gradients from each unit's data."""
    from trainer.ppo import ppo_loss

    sc = load_scenario("3m")
    policy = tiny(sc, critic="local")
    sim = BattleSim(sc, 16, seed=0)
    out = sim.reset()
    T = 3
    obs, mask = [], []
    for _ in range(T):
        obs.append(out.obs)
        mask.append(out.avail)
        out = sim.step(torch.where(out.avail[..., 1], 1, 0))  # everyone stops: legal and keeps all alive
    A = sc.n_agents
    obs = torch.stack(obs).reshape(T * 16, A, -1)
    mask = torch.stack(mask).reshape(T * 16, A, -1)
    n = obs.shape[0]
    gen = torch.Generator().manual_seed(1)
    actions = torch.multinomial(mask.reshape(n * A, -1).float(), 1, generator=gen).reshape(n, A)
    unit = torch.arange(A).expand(n, A)
    batch = dict(obs=obs, mask=mask, unit=unit, actions=actions, old_log_prob=-torch.rand(n, A, generator=gen),
                 advantages=torch.randn(n, A, generator=gen), returns=torch.randn(n, A, generator=gen),
                 old_values=torch.randn(n, A, generator=gen), active=torch.ones(n, A, dtype=torch.bool))

    def grads(b):
        policy.zero_grad()
        loss, _ = ppo_loss(policy, {k: v.reshape(-1, *v.shape[2:]) for k, v in b.items()},
                           clip_coef=0.2, vf_coef=0.5, ent_coef=0.01, clip_vloss=True)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in policy.parameters()])

    pooled = grads(batch)
    per_unit = torch.stack([grads({k: v[:, a:a + 1] for k, v in batch.items()}) for a in range(A)])
    assert pooled.abs().max() > 1e-4
    assert torch.allclose(pooled, per_unit.mean(0), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("critic", ("central", "local"))
def test_serving_graph_gives_acts_answers_for_any_batch(sc, sharing, critic):
    # traced once (8 rows); must hold for other batch sizes and any mix of unit slots and groups
    policy = tiny(sc, sharing=sharing, critic=critic, agent_id=True, unit_type=True)
    graph = policy.serving_graph()
    gen = torch.Generator().manual_seed(5)
    for rows in (1, 5, 64, 700):
        obs = torch.randn(rows, sc.obs_size, generator=gen)
        mask = torch.rand(rows, sc.n_actions, generator=gen) < 0.5
        mask[:, 1] = True
        unit = torch.randint(0, sc.n_agents, (rows,), generator=gen)
        greedy = torch.rand(rows, generator=gen) < 0.7
        eager = policy.act(obs, mask, unit, greedy, generator=torch.Generator().manual_seed(rows))
        traced = policy.act(obs, mask, unit, greedy, generator=torch.Generator().manual_seed(rows), graph=graph,
                            checked=True)
        assert torch.equal(eager.action, traced.action)
        assert torch.allclose(eager.log_prob, traced.log_prob, atol=1e-5)
        assert torch.allclose(eager.value, traced.value, atol=1e-4)


def test_a_serving_graph_that_disagrees_with_the_policy_is_refused(sc, monkeypatch):
    # what both the model holder and the forward worker process rely on before serving through a graph
    import trainer.policy as policy_module

    class Skewed(policy_module._ActGraph):
        def forward(self, obs, mask, unit):
            return tuple(t + 1 if t.is_floating_point() else t for t in self.policy.act_graph(obs, mask, unit))

    monkeypatch.setattr(policy_module, "_ActGraph", Skewed)
    with pytest.raises(RuntimeError, match="disagrees with the eager policy"):
        tiny(sc).serving_graph()


def test_greedy_may_be_one_bool_for_every_row(sc):
    policy = tiny(sc)
    obs = torch.randn(50, sc.obs_size)
    mask = torch.ones(50, sc.n_actions, dtype=torch.bool)
    unit = torch.arange(50) % sc.n_agents
    for flag in (True, False):
        one = policy.act(obs, mask, unit, flag, generator=torch.Generator().manual_seed(9))
        rows = policy.act(obs, mask, unit, torch.full((50,), flag), generator=torch.Generator().manual_seed(9))
        assert torch.equal(one.action, rows.action) and torch.equal(one.log_prob, rows.log_prob)
