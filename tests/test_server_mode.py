"""Server mode (`shopguide serve --qdrant-url`): replica limits, the API key's path, one-line start errors.

The HTTP contract on the server backend is tests/test_api.py (every test runs on both backends). There
is no Qdrant server binary here (none on PyPI or in Debian), so Ray replicas against a real server are
not tested: two Recommenders on one qdrant-client ":memory:" store and one events.db stand for two
replicas (each with its own caches, sharing what a server and the host share). The errors below come
from real code paths, with a stand-in HTTP server only where a server's refusal has to be provoked.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from index import Filters, IndexError_
from index.server import ServerStore
from serving.cli import main
from serving.deployments import (
    AppArgs,
    build_recommender,
    check_recommender_replicas,
    qdrant_api_key,
    resolve_paths,
)
from serving.server import (
    DEFAULT_CONFIG,
    deployment_options,
    local_runtime_env,
    recommender_options,
    with_explore_policy,
)
from tests.conftest import free_port
from tests.serving_fixtures import ingest_into_memory_qdrant, serving_data_copy, tiny_ids

SECRET = "qdrant-secret-5f2c"  # a Qdrant API key that must never be printed or passed through Ray
KEY_VAR = "SHOPGUIDE_TEST_QDRANT_KEY"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir with the one file serving checks before it opens the index (its manifest)."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "ingest.json").write_text(json.dumps({"collection": "products_x", "encoders": {}}))
    return folder


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ---- replicas -----------------------------------------------------------------------------------------
def test_more_than_one_replica_is_refused_on_the_embedded_index(
    capsys: pytest.CaptureFixture, data_dir: Path
) -> None:
    code, out = _run(capsys, "serve", "--data-dir", str(data_dir), "--recommender-replicas", "2")
    assert code == 2
    assert "--recommender-replicas 2 asks for 2 replicas of the Recommender" in out
    assert "one process owns" in out and "--qdrant-url URL" in out
    assert len(out.strip().splitlines()) == 1, out  # one line, no traceback, and no Ray started
    code, out = _run(capsys, "serve", "--data-dir", str(data_dir), "--recommender-replicas", "2", "--no-ray")
    assert code == 2 and "--no-ray serves from one process" in out


def test_replica_count_must_be_positive(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--recommender-replicas", "0"])
    assert exit_info.value.code == 2
    assert "--recommender-replicas: must be at least 1, got 0" in capsys.readouterr().err


def test_a_config_asking_for_replicas_on_the_embedded_index_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "applications:\n  - name: shopguide\n    deployments:\n      - {name: Recommender, num_replicas: 3}\n"
    )
    with pytest.raises(ValueError, match=r"serve.yaml asks for 3 replicas of the Recommender"):
        recommender_options(deployment_options(config), None, None, config)
    autoscaled = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}
    with pytest.raises(ValueError, match="asks for autoscaling of the Recommender"):
        check_recommender_replicas(None, autoscaled)
    # The shipped config is valid on both backends.
    options = deployment_options(DEFAULT_CONFIG)
    assert recommender_options(options, None, None, DEFAULT_CONFIG) == options


def test_replicas_flag_sets_num_replicas_against_a_qdrant_server() -> None:
    options = deployment_options(DEFAULT_CONFIG)
    yaml_recommender = options["Recommender"]
    merged = recommender_options(options, 4, "http://qdrant:6333", DEFAULT_CONFIG)
    assert merged["Recommender"] == {**yaml_recommender, "num_replicas": 4}  # the rest of the YAML kept
    assert merged["Ingress"] == options["Ingress"] and options["Recommender"] is yaml_recommender
    # Without the flag the YAML's count stands; a fixed count replaces the YAML's autoscaling.
    assert recommender_options(options, None, "http://qdrant:6333", DEFAULT_CONFIG) == options
    autoscaled = {"Recommender": {"autoscaling_config": {"max_replicas": 4}, "max_ongoing_requests": 8}}
    fixed = recommender_options(autoscaled, 2, "http://qdrant:6333", None)["Recommender"]
    assert fixed == {"max_ongoing_requests": 8, "num_replicas": 2}


def test_explore_policy_flag_replaces_the_configs_and_bad_specs_fail_first() -> None:
    options = deployment_options(DEFAULT_CONFIG)
    assert options["Recommender"]["user_config"]["explore_policy"] == "greedy"
    assert with_explore_policy(options, None) is options
    merged = with_explore_policy(options, "epsilon:0.2")
    assert merged["Recommender"]["user_config"] == {
        **options["Recommender"]["user_config"],
        "explore_policy": "epsilon:0.2",
    }
    assert options["Recommender"]["user_config"]["explore_policy"] == "greedy"  # not changed in place
    for bad in ("epsilon:2", "softmax", "logging"):  # "logging" is a target, never a serving policy
        with pytest.raises(ValueError):
            with_explore_policy(options, bad)


def test_replica_grpc_goes_to_loopback_only_on_a_local_only_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = {"worker_process_setup_hook": "serving.server.replica_grpc_on_loopback"}
    for value, expected in (("0", hook), ("false", hook), ("1", None), ("true", None)):
        monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", value)
        assert local_runtime_env() == expected, value
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    assert local_runtime_env() is None  # Ray's Linux default: a cluster other machines may join


# ---- the API key --------------------------------------------------------------------------------------
def test_resolve_paths_carries_the_key_variable_never_the_key(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_VAR, SECRET)
    args = AppArgs(data_dir=str(data_dir), qdrant_url="http://qdrant:6333", qdrant_api_key_env=KEY_VAR)
    paths = resolve_paths(args)
    # paths travel to the replicas through Ray (the controller stores them): no key in there.
    assert SECRET not in json.dumps(paths)
    assert paths["qdrant_url"] == "http://qdrant:6333" and paths["data_dir"] == str(data_dir.resolve())
    assert paths["qdrant_api_key_env"] == KEY_VAR and paths["qdrant_api_key_set"] is True
    assert qdrant_api_key(paths) == SECRET  # each replica reads it from its own environment
    # A replica whose environment lacks the key refuses to start and names the variable.
    monkeypatch.delenv(KEY_VAR)
    with pytest.raises(ValueError, match=f"\\${KEY_VAR} .* not in this process"):
        qdrant_api_key(paths)
    # No variable set where serving started: no key (a Qdrant server without authentication).
    unkeyed = resolve_paths(args)
    assert unkeyed["qdrant_api_key_set"] is False and qdrant_api_key(unkeyed) is None
    # The embedded index has no key to read.
    embedded = resolve_paths(AppArgs(data_dir=str(data_dir), qdrant_api_key_env=KEY_VAR))
    assert embedded["qdrant_url"] is None and embedded["qdrant_api_key_env"] is None


@contextmanager
def _standin_qdrant(version: str, key: str | None) -> Iterator[str]:
    """A stand-in HTTP server, not Qdrant: answers GET /collections (401 unless the `api-key` header is
    `key`) and GET / (the version), which is all ServerStore asks before anything else."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path.startswith("/collections"):
                if key is not None and self.headers.get("api-key") != key:
                    self._answer(401, {"status": {"error": "Must provide an API key"}})
                else:
                    self._answer(200, {"result": {"collections": []}, "status": "ok", "time": 0.0})
            else:
                self._answer(200, {"title": "qdrant - vector search engine", "version": version})

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:  # keep the test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_a_refused_or_missing_key_and_an_old_server_are_one_line_errors(
    capsys: pytest.CaptureFixture, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_VAR, "a-wrong-key-7731")
    with _standin_qdrant("1.16.2", key=SECRET) as url:
        with pytest.raises(IndexError_, match="needs an API key"):
            ServerStore(url)
        code, out = _run(
            capsys, "serve", "--data-dir", str(data_dir), "--qdrant-url", url, "--qdrant-api-key-env", KEY_VAR
        )
        assert code == 2 and f"the Qdrant server at {url} refused the API key (HTTP 401)" in out
        assert "a-wrong-key-7731" not in out
        ServerStore(url, api_key=SECRET).close()  # the right key gets through
    with _standin_qdrant("1.15.3", key=None) as url:
        with pytest.raises(IndexError_, match=r"runs 1\.15\.3; .* needs Qdrant >= 1\.16: upgrade"):
            ServerStore(url)


# ---- preflight: one line before Ray starts ---------------------------------------------------------------
def test_an_unreachable_qdrant_url_is_one_line(
    capsys: pytest.CaptureFixture, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_VAR, SECRET)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    serve = ("serve", "--data-dir", str(data_dir), "--qdrant-url", url, "--qdrant-api-key-env", KEY_VAR)
    for argv in (serve + ("--recommender-replicas", "2"), serve + ("--no-ray",)):
        code, out = _run(capsys, *argv)
        assert code == 2, out
        assert out.strip() == (
            f"shopguide: error: cannot reach a Qdrant server at {url} ([Errno 111] Connection refused); "
            "start it, or fix --qdrant-url"
        )
        assert SECRET not in out
    # Every command that takes --qdrant-url says the same.
    code, out = _run(capsys, "ingest", "--catalog", str(data_dir), "--qdrant-url", url)
    assert code == 2 and f"cannot reach a Qdrant server at {url}" in out


def test_a_qdrant_without_the_products_alias_says_to_ingest(
    capsys: pytest.CaptureFixture, data_dir: Path
) -> None:
    # ":memory:" is a real (in-process) Qdrant, and a fresh one is empty.
    for extra in ((), ("--no-ray",)):
        code, out = _run(capsys, "serve", "--data-dir", str(data_dir), "--qdrant-url", ":memory:", *extra)
        assert code == 2, out
        assert out.strip() == (
            "shopguide: error: no alias 'products' on :memory: (collections there: []); "
            "run `shopguide ingest --qdrant-url :memory:` first"
        )
    code, out = _run(
        capsys, "serve", "--data-dir", str(data_dir / "nothing"), "--qdrant-url", "http://q:6333"
    )
    assert code == 2 and "run `shopguide ingest --qdrant-url http://q:6333 --data-dir" in out


# ---- what replicas share --------------------------------------------------------------------------------
def test_handles_of_one_collection_keep_each_others_spaces() -> None:
    """Each Recommender replica holds its own handle on the live collection and adds (a promoted
    model's) or drops (a retired model's) behavior spaces: no handle may undo another's change."""
    from index import VectorSpace

    with ServerStore(":memory:") as store:
        first = store.create_collection("c", [VectorSpace("fused", 4, "enc/1")])
        second = store.open_collection("c")  # opened before the first one adds anything
        first.add_space(VectorSpace("behavior-a", 3, "gru/1"))
        second.add_space(VectorSpace("behavior-b", 3, "gru/2"))
        assert set(store.open_collection("c").spaces) == {"fused", "behavior-a", "behavior-b"}
        first.drop_space("behavior-a")
        assert set(store.open_collection("c").spaces) == {"fused", "behavior-b"}
        second.drop_space("behavior-a")  # already gone: a no-op, and behavior-b stays
        assert set(store.open_collection("c").spaces) == set(second.spaces) == {"fused", "behavior-b"}


def test_two_recommenders_on_one_qdrant_see_each_others_writes(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data_dir = serving_data_copy(tmp_path_factory, "server-mode")
    store = ingest_into_memory_qdrant(data_dir)
    paths = resolve_paths(AppArgs(data_dir=str(data_dir), qdrant_url=":memory:"))
    first = build_recommender(paths, store=store)
    second = build_recommender(paths, store=store)  # finds the first one's behavior space: no rewrite
    try:
        assert first.index.name == second.index.name and first.model_versions() == second.model_versions()
        # A price and stock change through one replica is what the other one filters on next.
        first.update_product("101", {"price": 1.5, "in_stock": False})
        assert second.product("101")["price"] == 1.5 and second.product("101")["in_stock"] is False
        cheap = second.similar("102", 10, filters=Filters(max_price=2.0))["items"]
        assert [i["product_id"] for i in cheap] == ["101"]
        # Events posted to one replica drive the feed another replica serves (the shared events.db).
        user = "replica-hopper"
        cold = [i["product_id"] for i in second.feed(user, 8)["items"]]
        viewed = tiny_ids("Red", "Handbags")[:3]
        events = [
            {"event_id": f"{user}-{n}", "user_id": user, "product_id": pid, "type": "view"}
            for n, pid in enumerate(viewed)
        ]
        assert first.add_events(events) == {"accepted": 3, "duplicates": 0}
        warm = second.feed(user, 8)
        assert warm["personalized"] is True and [i["product_id"] for i in warm["items"]] != cold
        assert first.delete_user(user)["deleted_events"] == 3
        assert second.user_events(user)["events"] == [] and second.feed(user, 8)["personalized"] is False
    finally:
        first.close()
        second.close()
        store.close()
