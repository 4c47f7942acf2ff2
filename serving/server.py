"""`shopguide serve`: start a local Ray cluster and the Ray Serve application, stop cleanly on a signal."""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from pathlib import Path

import yaml

from serving.admission import ADMISSION_ENV, PROXY_CALLBACK, AdmissionConfig, check_ingress_room

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "infra" / "serve" / "shopguide.yaml"  # in the repo


def _application(config_path: Path | None) -> dict:
    """The first application of a Ray Serve config file ({} without one)."""
    if config_path is None or not config_path.is_file():
        return {}
    config = yaml.safe_load(config_path.read_text()) or {}
    apps = config.get("applications") or []
    return apps[0] if apps else {}


def deployment_options(config_path: Path | None) -> dict[str, dict]:
    """The `deployments:` section of a Ray Serve config file, by deployment name."""
    deployments = _application(config_path).get("deployments", [])
    return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in deployments}


def logging_options(config_path: Path | None) -> dict | None:
    """The application's `logging_config` in a Ray Serve config file."""
    return _application(config_path).get("logging_config")


def resolve_api_key(given: str | None, disabled: bool) -> tuple[str | None, bool]:
    """(key, generated): the given key, else $SHOPGUIDE_API_KEY, else a fresh random one."""
    from serving.deployments import API_KEY_ENV

    if disabled:
        return None, False
    key = given or os.environ.get(API_KEY_ENV)
    if key:
        return key, False
    return secrets.token_urlsafe(24), True


def _stop_on_sigterm() -> None:
    def handler(signum, frame):  # SIGTERM (e.g. from a process manager) takes the Ctrl-C path
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _announce(
    host: str, port: int, api_key: str | None, generated: bool, data_dir: Path, where: str = ""
) -> None:
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown_host}:{port}"
    print(f"shopguide is serving {data_dir}{where} at {url}  (API docs: {url}/docs)", flush=True)
    if api_key is None:
        print("writes are open: no API key (--no-api-key)", flush=True)
    else:
        origin = "generated for this run" if generated else "as configured"
        print(
            f"API key for writes: POST /events, PATCH /products, DELETE /users ({origin}): {api_key}",
            flush=True,
        )
    print(f"try: curl '{url}/search?q=red+women%27s+handbag+under+2000&k=5'", flush=True)
    print("stop with Ctrl-C", flush=True)


def replica_grpc_on_loopback() -> None:
    """Ray worker setup hook (`local_runtime_env`): Serve replicas bind their inter-deployment gRPC
    server to 127.0.0.1 instead of every interface.

    Ray Serve 2.60 binds it to "[::]:0" unconditionally (ray/serve/_private/replica.py, no setting
    changes it); on a local-only cluster every caller is on this machine and reaches the replica at the
    node address, 127.0.0.1, so loopback is all it needs. A Ray that no longer has the helper is left
    alone (tests/test_bind.py would then show where it listens)."""
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "shopguide_loopback", False):
        return

    def on_loopback(server, address: str) -> int:
        return original(server, address.replace("[::]", "127.0.0.1", 1))

    on_loopback.shopguide_loopback = True
    replica.add_port_to_grpc_server = on_loopback


def local_runtime_env() -> dict | None:
    """The job's runtime_env on a local-only cluster (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0): every Ray
    worker, Serve replicas included, runs `replica_grpc_on_loopback` first. None on a multi-node cluster,
    whose replicas must be reachable from other machines."""
    value = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    if value is not None and value.lower() not in ("true", "1"):  # as ray._common.utils.env_bool reads it
        return {"worker_process_setup_hook": f"{__name__}.replica_grpc_on_loopback"}
    return None


def ray_environment() -> None:
    """Ray settings `shopguide serve` starts with (before Ray starts, so every Ray process inherits them;
    for `serve run`, export them in the shell, except RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 on a cluster
    of several machines: it keeps Ray on loopback)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline machines; nothing to report to
    # Ray Serve's documented latency/throughput mode (user code on the replica's event loop, gRPC between
    # deployments): similar-items p50/p99 12/18 ms against 15/28 ms with the defaults on 2 cores.
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # ...but not its direct ingress: that makes the ingress replica listen on ports of its own (30000+)
    # besides the proxy, and holds shutdown for its drain period.
    os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0")
    # Fewer background wake-ups: the Serve controller's reconcile loop (default every 0.1 s) and the
    # replicas' metric exports (every 0.1 s) compete with requests for 2 cores and showed up as the
    # latency tail (similar-items p99 22.7 ms with the defaults, 14.5 ms with these; `make bench`).
    # Replica recovery and config changes still take effect within a second.
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", "1000")
    # Ray's own metrics pipeline (Ray and Serve metrics, exported by every Ray process to the dashboard
    # agent every 10 s for Prometheus): each export was a burst that stalled requests, a latency spike
    # every 10 s under load that alone set the tail (`make soak`, 80% of max on 2 cores: p99 69-73 ms
    # with it, 35-45 ms without; the agent's CPU 0.87 -> 0.16 s per 40 s). The application's own
    # counters and latency histograms stay at GET /metrics; export RAY_enable_metrics_collection=1 to
    # have Ray's as well.
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    # The admission gate in Ray's HTTP proxy (serving/admission.py, configured by $SHOPGUIDE_ADMISSION):
    # refuses beyond what the server should take on before any work is spent on a request, and lets
    # requests wait for a restarting Recommender instead of refusing them.
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    # Ray's local-only mode (the one it runs on macOS and Windows): the node's address is the loopback
    # one, so the GCS, raylet and object manager, every worker's gRPC server, the dashboard head and
    # agent, the runtime-env agent, the autoscaler monitor and the metrics exporters all listen on
    # 127.0.0.1. On Linux Ray otherwise listens on every interface or on the node's IP (and turns an
    # explicit `_node_ip_address="127.0.0.1"` into that IP: ray/_private/services.py
    # resolve_ip_for_localhost / get_node_ip_address, ray_constants.ENABLE_RAY_CLUSTER). No other machine
    # can join this cluster then; a multi-node cluster is `ray start` / KubeRay (or export
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1). The HTTP API still binds where --host says.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray was imported before this ran: it read the variable already
        # Parsed as Ray parses it (ray._common.utils.env_bool).
        constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in (
            "1",
            "true",
        )


def preflight(paths: dict) -> None:
    """Open what the recommender replica will open, then close it: a missing index, heads file or
    model fails here in one line instead of as a Ray deployment failure with retries."""
    from serving.deployments import build_recommender

    recommender = build_recommender(paths)
    recommender.close()
    recommender.store.close()  # the Recommender does not own its store; this process is done with it


def recommender_options(
    options: dict[str, dict], replicas: int | None, qdrant_url: str | None, config: Path | None
) -> dict[str, dict]:
    """`options` (the Serve config's deployments) with the Recommender's replica count set to
    `replicas` when given, refused when the index cannot take that many."""
    from serving.deployments import RecommenderDeployment, check_recommender_replicas

    name = RecommenderDeployment.name
    if replicas is None:
        check_recommender_replicas(qdrant_url, options.get(name, {}), source=str(config))
        return options
    recommender = {k: v for k, v in options.get(name, {}).items() if k != "autoscaling_config"}
    recommender["num_replicas"] = replicas  # a fixed count replaces the config's autoscaling
    check_recommender_replicas(qdrant_url, recommender, source=f"--recommender-replicas {replicas}")
    return {**options, name: recommender}


def with_explore_policy(options: dict[str, dict], explore_policy: str | None) -> dict[str, dict]:
    """`options` with the Recommender's `user_config.explore_policy` replaced (checked here, so a
    bad spec fails before anything starts)."""
    if explore_policy is None:
        return options
    from serving.deployments import RecommenderDeployment
    from training.offpolicy import LOGGING_POLICIES, parse_policy

    parse_policy(explore_policy, LOGGING_POLICIES)
    name = RecommenderDeployment.name
    recommender = dict(options.get(name, {}))
    recommender["user_config"] = {**(recommender.get("user_config") or {}), "explore_policy": explore_policy}
    return {**options, name: recommender}


def _index_note(qdrant_url: str | None, options: dict[str, dict]) -> str:
    """Where the index is and how many Recommender replicas serve it (for the start-up line)."""
    if not qdrant_url:
        return ""
    replicas = options.get("Recommender", {}).get("num_replicas", 1)
    return f" (index on the Qdrant server {qdrant_url}, {replicas} Recommender replica(s))"


def run_server(
    data_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    no_api_key: bool = False,
    config: Path | None = DEFAULT_CONFIG,
    qdrant_url: str | None = None,
    sequence_model: Path | None = None,
    use_ray: bool = True,
    qdrant_api_key_env: str | None = "QDRANT_API_KEY",
    recommender_replicas: int | None = None,
    explore_policy: str | None = None,
) -> int:
    """Serve until Ctrl-C or SIGTERM; returns the exit code.

    qdrant_url: a Qdrant server instead of DATA_DIR/index, with its API key in the environment
    variable `qdrant_api_key_env` (read by each process that connects; never printed or passed on).
    recommender_replicas: the Recommender's num_replicas (default: the config's); more than 1 needs
    qdrant_url. explore_policy: the feed's exploration ("greedy", "epsilon:E", "thompson") instead of
    the config's `explore_policy`. The event store stays DATA_DIR/events.db (SQLite, WAL), shared by
    the replicas of this host."""
    if use_ray:
        ray_environment()  # before anything imports Ray: it reads some of these once, at import
    from serving.deployments import AppArgs, RecommenderDeployment, resolve_paths

    if not use_ray and recommender_replicas not in (None, 1):
        raise ValueError(
            f"--recommender-replicas {recommender_replicas} needs Ray Serve; --no-ray serves from one process"
        )
    # Checked before anything starts, so a refused replica count or policy costs no Ray start-up.
    options = with_explore_policy(deployment_options(config), explore_policy)
    if use_ray:
        options = recommender_options(options, recommender_replicas, qdrant_url, config)
        check_ingress_room(
            AdmissionConfig.from_json(os.environ.get(ADMISSION_ENV)), options.get("Ingress", {})
        )
    key, generated = resolve_api_key(api_key, no_api_key)
    args = AppArgs(
        data_dir=str(data_dir),
        qdrant_url=qdrant_url,
        qdrant_api_key_env=qdrant_api_key_env,
        sequence_model=str(sequence_model) if sequence_model else None,
        api_key=key,
    )
    if not use_ray:
        user_config = options.get(RecommenderDeployment.name, {}).get("user_config")
        return _run_single_process(args, host, port, key, generated, data_dir, user_config)
    preflight(resolve_paths(args))
    import ray
    from ray import serve

    from serving.deployments import APP_NAME, compose_app

    ray.init(
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
        runtime_env=local_runtime_env(),
    )
    _stop_on_sigterm()  # after ray.init, which installs its own SIGTERM handler (a core dump)
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        serve.run(
            compose_app(args, options),
            name=APP_NAME,
            route_prefix="/",
            logging_config=logging_options(config),
        )
        _announce(host, port, key, generated, data_dir, _index_note(qdrant_url, options))
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _run_single_process(
    args, host: str, port: int, key: str | None, generated: bool, data_dir: Path, user_config: dict | None
) -> int:
    """The same app in one process (uvicorn, no Ray): for development and to measure Ray's overhead.
    `user_config`: the Recommender's settings from the Serve config, as its replica would get them."""
    import json

    import uvicorn

    from serving.api import ApiSettings, LocalBackend, create_app
    from serving.deployments import build_recommender, resolve_paths
    from serving.towers import QueryTower
    from training.ingest import MANIFEST

    paths = resolve_paths(args)
    paths_dir = Path(paths["data_dir"])
    encoders = json.loads((paths_dir / MANIFEST).read_text())["encoders"]
    recommender = build_recommender(paths)
    try:
        recommender.reconfigure(user_config)
    except BaseException:
        recommender.close()
        recommender.store.close()
        raise
    recommender.watch()  # follows `models promote` and `reembed` without a restart
    backend = LocalBackend(
        recommender,
        QueryTower("text", encoders["text_encoder"], encoders.get("text_encoder_args", {}), paths_dir),
        QueryTower("image", encoders["image_encoder"], encoders.get("image_encoder_args", {}), paths_dir),
    )
    app = create_app(backend, ApiSettings(api_key=key))
    _announce(host, port, key, generated, data_dir, _index_note(args.qdrant_url, {}))
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")  # handles Ctrl-C and SIGTERM itself
    finally:
        recommender.close()
    return 0
