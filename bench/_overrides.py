"""`--set FIELD=VALUE` for the training benchmarks: override any TrainConfig field from the command line."""


def parse_overrides(items: list[str]) -> dict:
    """["envs=64", "sharing=per-type"] -> {"envs": 64, "sharing": "per-type"} (JSON values, else strings)."""
    import json

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)  # numbers, true/false
        except json.JSONDecodeError:
            overrides[key] = value  # plain strings such as sharing=per-type
    return overrides
