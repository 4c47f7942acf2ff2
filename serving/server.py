"""`shopguide serve`: start a local Ray cluster and the Ray Serve application, stop cleanly on a signal."""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from pathlib import Path

import yaml

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


def _announce(host: str, port: int, api_key: str | None, generated: bool, data_dir: Path) -> None:
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown_host}:{port}"
    print(f"shopguide is serving {data_dir} at {url}  (API docs: {url}/docs)", flush=True)
    if api_key is None:
        print("writes are open: no API key (--no-api-key)", flush=True)
    else:
        origin = "generated for this run" if generated else "as configured"
        print(f"API key for POST /events and DELETE /users ({origin}): {api_key}", flush=True)
    print(f"try: curl '{url}/search?q=red+women%27s+handbag+under+2000&k=5'", flush=True)
    print("stop with Ctrl-C", flush=True)


def ray_environment() -> None:
    """Ray settings `shopguide serve` starts with (before Ray starts, so every Ray process inherits them;
    for `serve run`, export them in the shell)."""
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


def preflight(paths: dict) -> None:
    """Open what the recommender replica will open, then close it: a missing index, heads file or
    model fails here in one line instead of as a Ray deployment failure with retries."""
    from serving.deployments import build_recommender

    build_recommender(paths).close()


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
) -> int:
    """Serve until Ctrl-C or SIGTERM; returns the exit code."""
    from serving.deployments import AppArgs, resolve_paths

    key, generated = resolve_api_key(api_key, no_api_key)
    args = AppArgs(
        data_dir=str(data_dir),
        qdrant_url=qdrant_url,
        sequence_model=str(sequence_model) if sequence_model else None,
        api_key=key,
    )
    if not use_ray:
        return _run_single_process(args, host, port, key, generated, data_dir)
    preflight(resolve_paths(args))
    ray_environment()
    import ray
    from ray import serve

    from serving.deployments import APP_NAME, compose_app

    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    _stop_on_sigterm()  # after ray.init, which installs its own SIGTERM handler (a core dump)
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        serve.run(
            compose_app(args, deployment_options(config)),
            name=APP_NAME,
            route_prefix="/",
            logging_config=logging_options(config),
        )
        _announce(host, port, key, generated, data_dir)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _run_single_process(args, host: str, port: int, key: str | None, generated: bool, data_dir: Path) -> int:
    """The same app in one process (uvicorn, no Ray): for development and to measure Ray's overhead."""
    import json

    import uvicorn

    from encoders import get_image_encoder, get_text_encoder
    from serving.api import ApiSettings, LocalBackend, create_app
    from serving.deployments import build_recommender, resolve_paths
    from training.ingest import MANIFEST

    paths = resolve_paths(args)
    encoders = json.loads((Path(paths["data_dir"]) / MANIFEST).read_text())["encoders"]
    recommender = build_recommender(paths)
    backend = LocalBackend(
        recommender,
        get_text_encoder(encoders["text_encoder"], **encoders.get("text_encoder_args", {})),
        get_image_encoder(encoders["image_encoder"], **encoders.get("image_encoder_args", {})),
    )
    app = create_app(backend, ApiSettings(api_key=key))
    _announce(host, port, key, generated, data_dir)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")  # handles Ctrl-C and SIGTERM itself
    finally:
        recommender.close()
    return 0
