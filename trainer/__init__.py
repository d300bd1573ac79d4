"""Phalanx's learning side: the built-in simulator, the shared policy, PPO, the model repository."""
