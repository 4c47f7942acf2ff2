"""Deployment files stay valid and in step: Serve configs, KubeRay and Qdrant manifests, Dockerfile."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml
from ray.serve.schema import (
    DeploymentSchema,
    HTTPOptionsSchema,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
)

from index import EdgeSettings, EdgeStore, Record, VectorSpace

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
SERVE_CONFIG = INFRA / "serve" / "shopguide.yaml"
RAYSERVICE = INFRA / "k8s" / "rayservice.yaml"
QDRANT = INFRA / "k8s" / "qdrant.yaml"
SECRETS = INFRA / "k8s" / "secrets.example.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# Environment variables that carry keys: they must come from a Secret, never a literal value.
KEY_VARS = {"SHOPGUIDE_API_KEY", "QDRANT_API_KEY", "QDRANT__SERVICE__API_KEY"}


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _one(path: Path, kind: str) -> dict:
    found = [doc for doc in _docs(path) if doc["kind"] == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _rayservice() -> dict:
    return _one(RAYSERVICE, "RayService")


def _serve_configs() -> dict[str, dict]:
    """Both Serve configs by name: the file `serve run` takes and the RayService's serveConfigV2."""
    return {
        "infra/serve/shopguide.yaml": yaml.safe_load(SERVE_CONFIG.read_text()),
        "rayservice serveConfigV2": yaml.safe_load(_rayservice()["spec"]["serveConfigV2"]),
    }


def _app(config: dict) -> dict:
    (app,) = config["applications"]
    return app


def _unknown_keys(section: dict, schema: type, where: str) -> list[str]:
    # Ray's schemas accept unknown keys (forward compatibility), so a misspelt knob would be ignored
    # silently; name each one here instead.
    return [f"{where}.{key}" for key in section if key not in schema.model_fields]


def _pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in the Kubernetes manifests."""
    specs = []
    for path in (RAYSERVICE, QDRANT):
        for doc in _docs(path):
            if doc["kind"] == "RayService":
                cluster = doc["spec"]["rayClusterConfig"]
                specs.append((f"{path.name} head", cluster["headGroupSpec"]["template"]["spec"]))
                for group in cluster["workerGroupSpecs"]:
                    specs.append((f"{path.name} {group['groupName']}", group["template"]["spec"]))
            elif "template" in doc.get("spec", {}):
                specs.append((f"{path.name} {doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
    return specs


def _ray_resources(group: dict) -> dict[str, float]:
    # KubeRay's format: a JSON object inside a quoted string, e.g. '"{\"shopguide_events\": 4}"'.
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


# ---- Serve configs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(_serve_configs()))
def test_serve_config_validates_against_ray_schema(name: str) -> None:
    config = _serve_configs()[name]
    schema = ServeDeploySchema.model_validate(config)
    assert len(schema.applications) == 1
    unknown = _unknown_keys(config, ServeDeploySchema, "")
    unknown += _unknown_keys(config.get("http_options", {}), HTTPOptionsSchema, "http_options")
    app = _app(config)
    unknown += _unknown_keys(app, ServeApplicationSchema, "app")
    for deployment in app["deployments"]:
        where = f"deployments[{deployment['name']}]"
        unknown += _unknown_keys(deployment, DeploymentSchema, where)
        unknown += _unknown_keys(deployment.get("ray_actor_options", {}), RayActorOptionsSchema, where)
    assert not unknown, f"{name}: keys Ray's schema does not know: {unknown}"


@pytest.mark.parametrize("name", list(_serve_configs()))
def test_serve_config_args_are_app_args(name: str) -> None:
    from serving.deployments import AppArgs

    args = AppArgs(**_app(_serve_configs()[name]).get("args", {}))  # unknown keys are errors
    assert args.api_key is None, "never put an API key in a config file; name its variable instead"


def test_rayservice_runs_the_same_application_as_serve_run() -> None:
    local, cluster = (_app(c) for c in _serve_configs().values())
    for key in ("name", "route_prefix", "import_path"):
        assert local[key] == cluster[key], key
    local_deployments = {d["name"]: d for d in local["deployments"]}
    cluster_deployments = {d["name"]: d for d in cluster["deployments"]}
    assert list(local_deployments) == list(cluster_deployments)
    # The live settings (recommender knobs, encoder batching) must not diverge between the two, except
    # where the encoders run: the cluster's encoder replicas hold a GPU, the local config a CPU.
    for name, deployment in local_deployments.items():
        cluster_config = dict(cluster_deployments[name].get("user_config") or {})
        if "num_gpus" in cluster_deployments[name].get("ray_actor_options", {}):
            assert cluster_config.pop("device") == "cuda", name
        assert (deployment.get("user_config") or {}) == cluster_config, name


@pytest.mark.parametrize("name", list(_serve_configs()))
def test_serve_config_ingress_holds_what_the_admission_gate_admits(name: str) -> None:
    from serving.admission import AdmissionConfig, check_ingress_room

    ingress = next(d for d in _app(_serve_configs()[name])["deployments"] if d["name"] == "Ingress")
    check_ingress_room(AdmissionConfig(), ingress, name)  # raises when Ray would refuse first


def test_every_configured_deployment_exists_in_code() -> None:
    from ray.serve.deployment import Deployment

    import serving.deployments as code

    in_code = {value.name for value in vars(code).values() if isinstance(value, Deployment)}
    import_path = f"{code.__name__}:{code.build_app.__name__}"
    for name, config in _serve_configs().items():
        app = _app(config)
        assert app["import_path"] == import_path, name
        assert {d["name"] for d in app["deployments"]} == in_code, name


# ---- KubeRay -------------------------------------------------------------------------------------


def test_rayservice_cluster_layout() -> None:
    service = _rayservice()
    assert service["apiVersion"] == "ray.io/v1"
    cluster = service["spec"]["rayClusterConfig"]
    ray_pin = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert ray_pin and cluster["rayVersion"] == ray_pin.group(1), "rayVersion must be the image's Ray"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    deployments = {d["name"]: d for d in _app(_serve_configs()["rayservice serveConfigV2"])["deployments"]}

    # The encoders ask for GPUs, and some worker group has them.
    gpu_groups = [
        g
        for g in groups.values()
        for c in g["template"]["spec"]["containers"]
        if int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
    ]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    gpus_asked = sum(
        deployments[n]["ray_actor_options"].get("num_gpus", 0) for n in ("TextEncoder", "ImageEncoder")
    )
    assert (
        0 < gpus_asked <= sum(int(g["rayStartParams"].get("num-gpus", 0)) * g["replicas"] for g in gpu_groups)
    )

    # Every custom resource a deployment asks for is advertised by a group with room for all replicas.
    advertised: dict[str, float] = {}
    for group in groups.values():
        for key, amount in _ray_resources(group).items():
            advertised[key] = advertised.get(key, 0) + amount * group["replicas"]
    for name, deployment in deployments.items():
        for key, amount in deployment["ray_actor_options"].get("resources", {}).items():
            needed = amount * deployment["num_replicas"]
            assert advertised.get(key, 0) >= needed, (
                f"{name} needs {needed} {key}, cluster has {advertised.get(key)}"
            )

    # The recommender points at the Qdrant client Service, with its key from the environment.
    args = _app(_serve_configs()["rayservice serveConfigV2"])["args"]
    qdrant_service = next(
        d for d in _docs(QDRANT) if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None"
    )
    assert args["qdrant_url"] == f"http://{qdrant_service['metadata']['name']}:6333"
    assert args["qdrant_api_key_env"] == "QDRANT_API_KEY"
    # The SQLite event store has one host: the group holding the recommender replicas is one pod.
    events_groups = [g for g in groups.values() if "shopguide_events" in _ray_resources(g)]
    assert len(events_groups) == 1 and events_groups[0]["maxReplicas"] == 1


def test_k8s_manifests_have_required_fields() -> None:
    for path in (RAYSERVICE, QDRANT, SECRETS):
        docs = _docs(path)
        assert docs, path
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), (path.name, doc)
    for where, spec in _pod_specs():
        assert spec["containers"], where
        for container in spec["containers"]:
            assert container.get("image"), where
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{where}: {part} cpu and memory"
            assert container.get("readinessProbe"), f"{where}: no readinessProbe"


def test_keys_come_from_secrets() -> None:
    secrets = {d["metadata"]["name"]: d for d in _docs(SECRETS) if d["kind"] == "Secret"}
    seen = set()
    for where, spec in _pod_specs():
        for container in spec["containers"]:
            for env in container.get("env", []):
                if env["name"] not in KEY_VARS:
                    continue
                assert "value" not in env, f"{where}: {env['name']} is a literal; use valueFrom.secretKeyRef"
                ref = env["valueFrom"]["secretKeyRef"]
                assert ref["name"] in secrets, f"{where}: Secret {ref['name']} is not in {SECRETS.name}"
                assert ref["key"] in secrets[ref["name"]]["stringData"], (where, ref)
                seen.add(env["name"])
    assert seen == KEY_VARS
    for secret in secrets.values():  # the example holds placeholders only
        assert all("REPLACE-ME" in value for value in secret["stringData"].values())


def test_qdrant_cluster_manifest() -> None:
    statefulset = _one(QDRANT, "StatefulSet")
    spec = statefulset["spec"]
    assert spec["replicas"] == 3
    assert spec["volumeClaimTemplates"], "each Qdrant pod needs its own persistent volume"
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["QDRANT__CLUSTER__ENABLED"]["value"] == "true"
    assert env["QDRANT__CLUSTER__P2P__PORT"]["value"] == "6335"
    assert int(env["QDRANT__STORAGE__COLLECTION__REPLICATION_FACTOR"]["value"]) >= 2
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]} <= mounts
    assert container["readinessProbe"]["httpGet"]["path"] in ("/readyz", "/healthz")
    script = "\n".join(container["args"])
    headless = next(
        d for d in _docs(QDRANT) if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"
    )
    assert spec["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert 6335 in {p["port"] for p in headless["spec"]["ports"]}
    # Pod 0 founds the cluster, the others bootstrap from it by its stable name.
    assert "--bootstrap" in script and f"qdrant-0.{headless['metadata']['name']}:6335" in script


# ---- Docker --------------------------------------------------------------------------------------


def _pip_install(command: str) -> tuple[list[str], str]:
    """(flags that shape the install, target without extras) of a `pip install ...` line."""
    words = shlex.split(command)
    words = words[words.index("install") + 1 :]
    flags = [w for w in words if w not in ("-q", "--quiet")]
    target = flags.pop()
    return flags, target.split("[")[0]


def test_dockerfile_installs_like_make_install() -> None:
    dockerfile = DOCKERFILE.read_text()
    lines = [line.strip() for line in dockerfile.replace("\\\n", " ").splitlines()]
    assert re.search(r"^FROM python:3\.11(-slim)?$", dockerfile, re.M), "the base image must be Python 3.11"
    docker_pip = [line for line in lines if line.startswith("RUN") and "pip install" in line]
    assert len(docker_pip) == 1, docker_pip
    make_pip = [
        line
        for line in (ROOT / "Makefile").read_text().splitlines()
        if "pip install" in line and "-c" in line
    ]
    assert len(make_pip) == 1, make_pip
    make_flags, make_target = _pip_install(make_pip[0])
    docker_flags, docker_target = _pip_install(docker_pip[0])
    assert docker_flags == make_flags and docker_target == make_target == "."
    assert "[dev]" not in docker_pip[0], "the image installs the runtime dependencies only"
    copied = {src for line in lines if line.startswith("COPY") for src in line.split()[1:-1]}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {"constraints.txt", "pyproject.toml", "infra", *packages} <= copied
    # pip install must come after everything it installs has been copied
    last_copy = max(i for i, line in enumerate(lines) if line.startswith("COPY"))
    assert lines.index(docker_pip[0]) > last_copy
    for switch in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"):
        assert switch in dockerfile
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert "EXPOSE 8000" in lines
    assert re.search(r'^CMD \["shopguide", "serve"', dockerfile, re.M)


def test_dockerignore_keeps_data_out_and_sources_in() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "data", "bench-results", "test-artifacts", ".git"} <= patterns
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert not patterns & {"constraints.txt", "pyproject.toml", "infra", "README.md", *packages}


# ---- EdgeSettings: int8 scalar quantization ------------------------------------------------------


def test_edge_int8_quantization_builds_and_searches(tmp_path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1500, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # (1500, 32)
    # Tiny thresholds: the engine builds HNSW and the int8 copy only for segments above them.
    settings = EdgeSettings(
        full_scan_threshold_kb=1,
        indexing_threshold_kb=1,
        quantization="int8",
        vectors_on_disk=True,
        quantization_rescore=True,
        quantization_oversampling=2.0,
    )
    with EdgeStore(tmp_path, settings) as store:
        index = store.create_collection("q", [VectorSpace("vec", 32, "test/random")])
        index.upsert([Record(str(i), {"vec": vectors[i]}, {}) for i in range(len(vectors))])
        index.optimize()
        assert index.info()["indexed_vectors"] == len(vectors)
        quantized = [p for p in (tmp_path / "collections" / "q").rglob("quantized*") if p.is_file()]
        # the int8 copy: at least 1 byte per component of every vector
        assert quantized and sum(p.stat().st_size for p in quantized) >= vectors.size
        top = index.search_batch("vec", vectors[:20], k=5)
        assert [hits[0].product_id for hits in top] == [str(i) for i in range(20)]  # each finds itself
        assert index.search("vec", vectors[3], k=5, hnsw_ef=64)[0].product_id == "3"  # ef override keeps it


def test_edge_settings_quantization_knobs() -> None:
    with pytest.raises(ValueError, match="int8"):
        EdgeSettings(quantization="int4")
    with pytest.raises(ValueError, match=">= 1"):
        EdgeSettings(quantization_oversampling=0.5)
    assert EdgeSettings().search_params() is None and EdgeSettings().quantization_config() is None
    params = EdgeSettings(
        hnsw_ef=64, quantization_rescore=False, quantization_oversampling=3.0
    ).search_params(128)
    assert params.hnsw_ef == 128  # the per-call ef wins
    assert params.quantization.rescore is False and params.quantization.oversampling == 3.0
    assert EdgeSettings(quantization="int8").quantization_config() is not None


def test_quantization_bench_toy_size(tmp_path, monkeypatch) -> None:
    from tests.bench.bench_quantization import QuantBenchConfig, run

    monkeypatch.chdir(tmp_path)  # no data/bench/index here: the Gaussian-mixture fallback
    config = QuantBenchConfig(
        points=1500,
        queries=20,
        mixture_centres=50,
        collections=("float", "int8-disk"),
        warmup=2,
        force_index=True,
    )
    result = run(config, work_dir=tmp_path)
    assert result["vectors"].startswith("Gaussian mixture")
    assert set(result["searches"]) == {"float", "int8-disk", "int8-disk/no-rescore", "int8-disk/rescore-x2"}
    for name, collection in result["collections"].items():
        assert collection["indexed_vectors"] == 1500, name  # HNSW really built
        assert collection["rss"]["VmRSS_mb"] > 0, name
    assert "vectors_int8" in result["collections"]["int8-disk"]["disk"]
    assert "vectors_int8" not in result["collections"]["float"]["disk"]
    for name, search in result["searches"].items():
        assert 0.5 <= search["recall_at_k"] <= 1.0, name
        assert 0 < search["p50_ms"] <= search["p99_ms"], name
    assert result["ratios_vs_float"]["int8-disk"]["p50"] > 0
