"""Shared fixtures. The service_* fixtures belong to the service tests (tests/test_service_*.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def service_repo(tmp_path):
    """A model repository with model "m" version 1: a randomly initialised 3m policy with a local critic.

    Returns (root, scenario, policy)."""
    import torch

    from trainer.policy import Policy
    from trainer.repository import ModelRepository
    from trainer.sim import load_scenario

    torch.manual_seed(1234)
    scenario = load_scenario("3m")
    policy = Policy.for_scenario(scenario, critic="local").eval()
    root = tmp_path / "models"
    ModelRepository(root).save("m", policy, scenario=scenario, step=0, eval_win_rate=None)
    return root, scenario, policy
