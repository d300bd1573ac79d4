"""The service's subcommands of `phalanx`: serve, health and play. Flags are parsed here, once, into named values."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from trainer.commands import add_game_flags

    p = sub.add_parser("serve", help="serve a model from the repository over gRPC (Act, ActStream, ActBatch)",
                       description="Run the batching gRPC inference service for one model of the repository: "
                                   "health checking, reflection, hot reload of new versions, Prometheus metrics, "
                                   "optional TLS and bearer-token auth. Stops gracefully on SIGTERM/SIGINT.")
    p.add_argument("--models", required=True, type=Path, help="model repository root (<models>/<name>/<version>/)")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--version", type=int, help="serve exactly this version (default: the newest; follows new ones)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 = pick a free one)")
    p.add_argument("--max-batch-size", type=int, default=1024,
                   help="most unit rows per forward pass (default 1024; 1 turns batching off)")
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0,
                   help="longest a request waits for its batch to fill; a lone caller never waits "
                        "(default 2; 0: take what is waiting)")
    p.add_argument("--max-queue", type=int, default=8192,
                   help="most unit rows waiting; beyond it requests get RESOURCE_EXHAUSTED (default 8192)")
    p.add_argument("--poll-seconds", type=float, default=5.0,
                   help="how often to look for a new model version (default 5; 0 = never: then a servable version "
                        "must be there at start)")
    p.add_argument("--min-eval-win-rate", type=float, metavar="W",
                   help="serve only versions whose card records an evaluation win rate >= W (0..1): a training "
                        "run's weak checkpoints are skipped, never swapped in (default: any version)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="interface of /metrics (default 127.0.0.1)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key: TLS on)")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument("--auth-token-file", type=Path,
                   help="file with a bearer token every call must carry (health checks stay open)")
    p.add_argument("--grace-seconds", type=float, default=10.0,
                   help="on SIGTERM/SIGINT, time for in-flight calls to finish (default 10)")
    p.add_argument("--max-message-mb", type=float, default=16.0,
                   help="largest request/response message in MiB (default 16)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="intra-op threads of the forward pass (default 1; 0: torch's default)")
    p.add_argument("--forward-worker", choices=("process", "thread"), default="process",
                   help="where the forward pass runs, off the event loop: a child process with its own GIL "
                        "(default; the fast choice under load) or a worker thread in the server process")
    p.add_argument("--seed", type=int, default=0, help="seed for sampled (non-greedy) actions (default 0)")
    p.add_argument("--experience-dir", type=Path,
                   help="log every served unit-step as trajectories in Parquet shards here, for `phalanx train "
                        "--from-shards` (default: off)")
    p.add_argument("--experience-chunk-rows", type=int, default=65536,
                   help="completed steps per experience shard (default 65536)")
    p.add_argument("--experience-max-open", type=int, default=50000,
                   help="most units waiting for their step's reward; the stalest beyond it is evicted and its step "
                        "written as truncated (default 50000)")
    p.add_argument("--experience-flush-seconds", type=float, default=60.0,
                   help="also write the open chunk this often (default 60; 0 = only when full)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="DEBUG, INFO (default), WARNING, ERROR")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("health", help="is a running service serving? (grpc.health.v1; for container probes)",
                       description="Ask a running `phalanx serve` for its grpc.health.v1 status and print it as one "
                                   "JSON line. Exit 0 when SERVING (a model is loaded and warm), 1 when not "
                                   "(no model yet, draining, or no answer), 2 for bad flags.")
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of `phalanx serve` (default "
                                                                "127.0.0.1:50051)")
    p.add_argument("--tls-ca", type=Path, help="PEM CA certificate to verify the server (turns TLS on; default: "
                                                "plaintext)")
    p.add_argument("--tls-server-name", help="expected name in the server's certificate (default: the host)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("play", help="play games (simulator or StarCraft II) with actions from a running service",
                       description="Run N built-in-simulator games at once (BattleSim(scenario, N, seed)), or N "
                                   "episodes of real StarCraft II (--env sc2), asking the service for every live "
                                   "unit's action each step; prints win rate, throughput and latency as one JSON "
                                   "line.")
    p.add_argument("--server", required=True, help="HOST:PORT of `phalanx serve`")
    p.add_argument("--scenario", required=True, help="scenario name, e.g. 3m (see `phalanx scenarios`)")
    p.add_argument("--games", type=int, default=8,
                   help="games played at once; each game's first episode counts (default 8)")
    p.add_argument("--seed", type=int, help="game i plays with seed + i (default 0); with --env sc2 the real game's "
                                            "seed, re-applied to every episode (default: none, a new game each "
                                            "episode)")
    p.add_argument("--rpc", choices=("unary", "stream", "batch"), default="stream",
                   help="unary: one Act per unit; stream: one ActStream (default); batch: one ActBatch per game "
                        "frame")
    p.add_argument("--greedy", action="store_true", help="most probable actions (default: sampled)")
    p.add_argument("--scenario-file", action="append", default=[], metavar="FILE",
                   help="a TOML file of extra units and scenarios (repeatable; default: the built-in ones only)")
    p.add_argument("--tls-ca", type=Path, help="PEM CA certificate to verify the server (turns TLS on; default: "
                                                "plaintext)")
    p.add_argument("--tls-server-name", help="expected name in the server's certificate (default: the host)")
    p.add_argument("--auth-token-file", type=Path, help="file with the bearer token (default: none, no auth)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="deadline per call in seconds; with --rpc stream, the longest wait for each answer "
                        "(default 10)")
    add_game_flags(p, "--games episodes one after another")
    p.set_defaults(func=cmd_play)


def _client_flag_error(args) -> str | None:
    """The first bad flag of those health and play share, as one line (None: all good). Checked before dialing:
    gRPC dials port 443 for a --server with no port, and finds a --tls-ca that is not PEM only in its handshake,
    after printing its own internal errors."""
    from service.client import check_target

    try:
        check_target(args.server)
    except ValueError as e:
        return f"--server {e}"
    if not args.timeout > 0:
        return f"--timeout must be > 0 seconds, got {args.timeout}"
    if args.tls_ca is not None:
        try:
            pem = args.tls_ca.read_bytes()
        except OSError as e:
            return f"--tls-ca {args.tls_ca}: {e.strerror or e}"
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            return f"--tls-ca {args.tls_ca}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)"
    return None


def cmd_health(args) -> int:
    import grpc

    from service.client import Client

    if (error := _client_flag_error(args)) is not None:
        print(f"phalanx health: {error}", file=sys.stderr)
        return 2
    try:
        with Client(args.server, tls_ca=args.tls_ca, server_name=args.tls_server_name, timeout=args.timeout,
                    retries=0) as client:
            status = client.health()
    except OSError as e:  # --tls-ca became unreadable since it was checked
        print(f"phalanx health: --tls-ca {args.tls_ca}: {e.strerror or e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(json.dumps({"server": args.server, "status": "UNREACHABLE", "code": e.code().name,
                          "details": e.details()}), flush=True)
        return 1
    print(json.dumps({"server": args.server, "status": status}), flush=True)
    return 0 if status == "SERVING" else 1


def cmd_serve(args) -> int:
    from service.server import ServeConfig, serve

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 1 <= args.max_message_mb <= 2047:  # gRPC takes a 32-bit byte count; a frame of 4,096 units needs ~1
        print(f"phalanx serve: --max-message-mb must lie in 1..2047, got {args.max_message_mb:g}", file=sys.stderr)
        return 2
    config = ServeConfig(
        models=args.models, name=args.name, version=args.version, host=args.host, port=args.port,
        max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms, max_queue=args.max_queue,
        poll_seconds=args.poll_seconds, min_eval_win_rate=args.min_eval_win_rate, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        tls_cert=args.tls_cert, tls_key=args.tls_key, auth_token_file=args.auth_token_file,
        grace_seconds=args.grace_seconds, max_message_bytes=int(args.max_message_mb * 2 ** 20),
        torch_threads=args.torch_threads, forward_worker=args.forward_worker, seed=args.seed,
        experience_dir=args.experience_dir,
        experience_chunk_rows=args.experience_chunk_rows, experience_max_open=args.experience_max_open,
        experience_flush_seconds=args.experience_flush_seconds)

    def listening(running) -> None:
        model = running.holder.current
        print(json.dumps({"event": "listening", "address": running.address, "port": running.port,
                          "metrics_port": running.metrics_port, "model": config.name,
                          "version": model.version if model else None}), flush=True)

    from service.forward_process import WorkerStartError

    try:
        summary = asyncio.run(serve(config, on_listening=listening))
    except (OSError, ValueError) as e:
        print(f"phalanx serve: {e}", file=sys.stderr)
        return 2
    except WorkerStartError as e:
        print(f"phalanx serve: {e}; see its error above, or run with --forward-worker thread", file=sys.stderr)
        return 1
    print(json.dumps(summary), flush=True)
    return 0


def _game_error(e: Exception) -> bool:
    """Whether `e` came from the real game rather than from this code: pysc2's lost connection or protocol
    error, or units the scenario's slots cannot hold (trainer.sc2's SlotError)."""
    from pysc2_evolved.lib import protocol, remote_controller

    from trainer.sc2.adapter import SlotError

    return isinstance(e, (protocol.ConnectionError, protocol.ProtocolError, remote_controller.RequestError,
                          SlotError))


def cmd_play(args) -> int:
    from service.client import AsyncClient, StreamError, read_token, rpc_error_text
    from service.play import play_games, play_in_game
    from trainer.commands import game_flag_error
    from trainer.sim import ScenarioError, load_scenario

    if args.games < 1:
        print(f"phalanx play: --games must be >= 1, got {args.games}", file=sys.stderr)
        return 2
    if (error := _client_flag_error(args)) is not None:
        print(f"phalanx play: {error}", file=sys.stderr)
        return 2
    try:
        token = read_token(args.auth_token_file)
    except (OSError, UnicodeDecodeError) as e:
        print(f"phalanx play: --auth-token-file {args.auth_token_file}: {getattr(e, 'strerror', None) or e}",
              file=sys.stderr)
        return 2
    if token == "":  # else the calls would go out without a token and come back UNAUTHENTICATED
        print(f"phalanx play: --auth-token-file {args.auth_token_file} is empty", file=sys.stderr)
        return 2
    try:
        scenario = load_scenario(args.scenario, files=args.scenario_file)
    except ScenarioError as e:
        print(f"phalanx play: {e}", file=sys.stderr)
        return 2
    battle = None
    if args.env == "sc2":
        try:
            from trainer.sc2.battle import SC2Battle
        except ImportError as e:
            print(f"phalanx play: --env sc2 needs pysc2-evolved (pip install -e '.[sc2]'): {e}", file=sys.stderr)
            return 2
        try:
            # auto_reset off: play_games resets the game at each episode itself (pysc2: a new game each time)
            battle = SC2Battle(scenario, auto_reset=False, seed=args.seed, map_name=args.sc2_map,
                               difficulty=args.sc2_difficulty)
        except (RuntimeError, ValueError) as e:  # no game or map, a map unlike the scenario
            print(f"phalanx play: --env sc2: {e}", file=sys.stderr)
            return 2
    elif (error := game_flag_error(args)) is not None:
        print(f"phalanx play: {error}", file=sys.stderr)
        return 2

    async def run() -> dict:
        async with AsyncClient(args.server, tls_ca=args.tls_ca, token=token,
                               server_name=args.tls_server_name, timeout=args.timeout) as client:
            info = await client.model_info()
            if info.spec_hash != scenario.spec_hash:
                raise SystemExit(f"phalanx play: the server's model {info.name!r} v{info.version} was trained on "
                                 f"spec {info.spec_name} (hash {info.spec_hash}); scenario {scenario.name} has hash "
                                 f"{scenario.spec_hash}")
            if battle is not None:
                result = await play_in_game(client, scenario, battle, episodes=args.games, seed=args.seed or 0,
                                            rpc=args.rpc, greedy=args.greedy)
            else:
                result = await play_games(client, scenario, games=args.games, seed=args.seed or 0, rpc=args.rpc,
                                          greedy=args.greedy)
            return {**result.summary(), "env": args.env}

    import grpc

    try:
        summary = asyncio.run(run())
    except grpc.RpcError as e:
        print(f"phalanx play: {args.server}: {rpc_error_text(e.code(), e.details())}", file=sys.stderr)
        return 1
    except StreamError as e:  # one message of --rpc stream failed (RESOURCE_EXHAUSTED, no answer in time, ...)
        print(f"phalanx play: {args.server}: {rpc_error_text(e.code, e.message)}", file=sys.stderr)
        return 1
    except Exception as e:
        if battle is None or not _game_error(e):
            raise
        print(f"phalanx play: --env sc2: the game failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if battle is not None:
            battle.close()  # the game quits with us
    print(json.dumps(summary), flush=True)
    return 0
