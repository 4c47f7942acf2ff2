"""`shopguide reembed --ray-address` on a real two-node Ray cluster started on this machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from index import EdgeStore
from serving.cli import main
from tests.conftest import free_port, make_catalog
from training.catalog import load_catalog
from training.features import EmbeddingCache, file_hash, text_hash
from training.ingest import ALIAS
from training.reembed import RayConfig, check_pool_fits, map_batches_options, product_texts, run_reembed
from training.vectors import EncoderConfig

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")
# Token authentication is Ray 2.60's default; this private test cluster and its driver run without it.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
TINY_CLIP = {"model_name": "shopguide-tiny-vit"}  # 64-px ViT: loads and runs in a blink


class LocalRayCluster:
    """A head node and a worker node (`ray start`) on this machine, each with its own CPUs and the
    worker with a custom resource, in a private temp dir on free ports.

    Stopped by PID, never with `ray stop` (which stops every Ray on the machine, other engineers' test
    servers included): every process whose command line names this cluster's temp dir or GCS port,
    and all their descendants (the raylets' workers and agents)."""

    def __init__(
        self, head_cpus: int = 1, worker_cpus: int = 1, worker_resources: dict | None = None
    ) -> None:
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.worker_resources = worker_resources if worker_resources is not None else {"encoder_node": 1}
        # Short: Ray's socket paths under it must stay below the 107-byte limit of a Unix socket.
        self.temp_dir = tempfile.mkdtemp(prefix="sgray", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, *args: str) -> None:
        # Every port a second node on the same machine would otherwise share (fixed defaults) is free-picked.
        ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
        command = [str(RAY), "start", *args, "--node-ip-address", "127.0.0.1", "--temp-dir", self.temp_dir]
        command += ["--disable-usage-stats", "--metrics-export-port", str(free_port())]
        for flag in ports:
            command += [flag, str(free_port())]
        proc = subprocess.run(
            command, env={**os.environ, **RAY_ENV}, capture_output=True, text=True, timeout=180
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")

    def start(self) -> LocalRayCluster:
        try:
            self._start(
                "--head",
                "--port",
                str(self.port),
                "--num-cpus",
                str(self.head_cpus),
                "--include-dashboard=false",
                "--dashboard-port",
                str(free_port()),
                "--ray-client-server-port",
                str(free_port()),
            )
            self._start(
                "--address",
                self.address,
                "--num-cpus",
                str(self.worker_cpus),
                "--resources",
                json.dumps(self.worker_resources),
            )
        except BaseException:
            self.stop()
            raise
        return self

    def pids(self) -> set[int]:
        """This cluster's processes and their descendants."""
        marks = (self.temp_dir.encode(), f":{self.port}\0".encode(), f":{self.port} ".encode())
        children: dict[int, list[int]] = {}
        roots = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # exited meanwhile
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if state == "Z":
                continue  # a zombie is already dead
            children.setdefault(int(ppid), []).append(int(entry))
            if any(mark in cmdline for mark in marks):
                roots.append(int(entry))
        found, todo = set(), list(roots)
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, []))
        return found

    def stop(self) -> None:
        """SIGTERM this cluster's processes, SIGKILL what is left after 10 s, remove the temp dir."""
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.pids():
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def driver_auth_mode() -> str:
    """Ray's token-auth mode in this process ("token" or "disabled"): the test cluster must run in it.

    A local `ray.init` (tests/test_serve_ray.py, earlier in the same process) turns token auth on, and
    Ray keeps that for the life of the process, whatever RAY_AUTH_MODE says later: this driver then
    rejects every call without a token, so actors of a cluster with auth disabled cannot report back
    ("Missing authorization header", and Ray Data's actors die before they run). Both sides then use
    the token in ~/.ray/auth_token, the one that ray.init wrote."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"


@pytest.fixture(scope="module")
def ray_cluster():
    """The two-node cluster, with this process connected to it as the driver."""
    import ray

    env = {**RAY_ENV, "RAY_AUTH_MODE": driver_auth_mode()}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # for `ray start` (LocalRayCluster passes this environment on) and ray.init
    cluster = LocalRayCluster().start()
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert not cluster.pids(), "processes of the test cluster survived its stop"


def test_reembed_on_two_nodes_resumes_and_validates(ray_cluster, tmp_path: Path, capsys) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    worker = next(n["NodeID"] for n in nodes if "encoder_node" in n["Resources"])
    head = next(n["NodeID"] for n in nodes if n["NodeID"] != worker)
    catalog = make_catalog(tmp_path / "catalog")
    data_dir = tmp_path / "data"
    # Weights from a file, as every node of a real cluster would load them: a random-init tower would
    # differ per actor process (the validation's `features` check catches that).
    import open_clip
    import torch

    from encoders.clip import CONFIG_DIR

    open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(0)
    torch.save(open_clip.create_model("shopguide-tiny-vit").state_dict(), tmp_path / "tiny-clip.pt")
    clip_args = {**TINY_CLIP, "checkpoint": str(tmp_path / "tiny-clip.pt")}
    config = EncoderConfig(image_encoder="clip", image_encoder_args=clip_args)  # + MiniLM for text

    # First the first 40 products, validated but not swapped in (as a run killed half-way would leave the
    # cache); then all 72: Ray gets only the photos and texts the cache lacks.
    store = EdgeStore(data_dir / "index")
    try:
        first = run_reembed(
            catalog,
            store,
            data_dir,
            config,
            limit=40,
            ray=RayConfig(ray_cluster.address, actors=2, batch_size=8),
            swap=False,
            progress=False,
        )
    finally:
        store.close()
    products = load_catalog(catalog).products
    photos = [file_hash(p.image_path) for p in products]
    texts = [text_hash(t) for t in product_texts(products)]
    assert first.distributed and first.validation.ok and not first.swapped
    assert (first.embed.images, first.embed.texts) == (len(set(photos[:40])), len(set(texts[: 3 * 40])))
    # Both actors ran, one on each node (each node has one CPU, each actor takes one).
    assert first.embed.actors == 2 and set(first.embed.nodes) == {head, worker}

    yaml = tmp_path / "encoders.yaml"
    yaml.write_text(json.dumps({"image_encoder": "clip", "image_encoder_args": clip_args}))
    summary_json = tmp_path / "summary.json"
    args = ["--catalog", str(catalog), "--data-dir", str(data_dir), "--config", str(yaml)]
    ray_args = ["--ray-address", ray_cluster.address, "--actors", "2", "--batch-size", "8"]
    assert main(["reembed", *args, *ray_args, "--json", str(summary_json)]) == 0
    out = capsys.readouterr().out
    assert "Ray actors" in out and "alias products: None -> " in out
    summary = json.loads(summary_json.read_text())
    assert summary["embed"]["images"] == len(set(photos)) - len(set(photos[:40]))
    assert summary["embed"]["texts"] == len(set(texts)) - len(set(texts[: 3 * 40]))
    assert summary["embed"]["nodes"] and set(summary["embed"]["nodes"]) <= {head, worker}
    assert summary["validation"]["ok"] and summary["products_total"] == 72 and summary["swapped"]
    store = EdgeStore(data_dir / "index")
    try:
        assert store.get_alias(ALIAS) == summary["collection"] == first.collection
        with store.open(ALIAS) as index:
            assert sorted(index.product_ids()) == sorted(p.id for p in products)
    finally:
        store.close()

    # What the actors sent back is what this process computes for the same photos.
    from PIL import Image

    from encoders import get_image_encoder

    encoder = get_image_encoder("clip", **clip_args)
    cache = EmbeddingCache(data_dir / "cache" / "embeddings.sqlite")
    try:
        cached = cache.get_many(encoder.info.id, photos[:8])
    finally:
        cache.close()
    for product, key in zip(products[:8], photos[:8], strict=True):
        with Image.open(product.image_path) as image:
            local = encoder.encode_images([image.convert("RGB")])[0]
        assert float(local @ cached[key]) > 0.9999
    assert isinstance(cached[photos[0]], np.ndarray)


# ---- CPU or GPU actors (no cluster needed) --------------------------------------------------------


def test_ray_config_rejects_negative_gpus_per_actor() -> None:
    assert RayConfig("local").gpus_per_actor == 0.0
    assert RayConfig("local", gpus_per_actor=0.5).gpus_per_actor == 0.5
    with pytest.raises(ValueError, match=r"--gpus-per-actor must be >= 0 \(0 = CPU actors\), got -1"):
        RayConfig("local", gpus_per_actor=-1)


def test_map_batches_asks_for_gpus_only_for_gpu_actors() -> None:
    """A CPU pool asks Ray for what it always did; a GPU pool reserves GPUs and runs its towers there."""
    encoders = EncoderConfig(image_encoder="clip", image_encoder_args=TINY_CLIP, device="auto")
    cpu = map_batches_options(RayConfig("local", actors=3, cpus_per_actor=2, batch_size=8), encoders)
    assert "num_gpus" not in cpu
    assert (cpu["num_cpus"], cpu["batch_size"], cpu["resources"]) == (2, 8, None)
    assert cpu["compute"].min_size == cpu["compute"].max_size == 3
    actor = cpu["fn_constructor_kwargs"]
    # The driver's device is its own: a CPU actor runs on the CPU, with the same towers otherwise.
    assert actor["threads"] == 2 and actor["config"] == {**asdict(encoders), "device": "cpu"}

    gpu = map_batches_options(
        RayConfig("local", gpus_per_actor=0.5, resources={"encoder_node": 1}), EncoderConfig()
    )
    assert gpu["num_gpus"] == 0.5 and gpu["resources"] == {"encoder_node": 1}
    assert gpu["fn_constructor_kwargs"]["config"]["device"] == "cuda"
    # What the actor builds its towers from is a valid EncoderConfig.
    assert EncoderConfig(**gpu["fn_constructor_kwargs"]["config"]).device == "cuda"


def test_cli_reembed_passes_gpus_per_actor_and_the_config_device(tmp_path: Path, monkeypatch, capsys) -> None:
    import training.reembed
    from serving.cli import build_parser

    assert build_parser().parse_args(["reembed"]).gpus_per_actor == 0.0
    seen = {}

    def fake_run_reembed(catalog, store, data_dir, encoder_config, **kwargs):
        seen.update(encoder_config=encoder_config, ray=kwargs["ray"])
        raise ValueError("stopped before embedding")  # main prints it in one line and returns 2

    monkeypatch.setattr(training.reembed, "run_reembed", fake_run_reembed)
    yaml = tmp_path / "encoders.yaml"
    yaml.write_text(
        "image_encoder: clip\nimage_encoder_args: {model_name: shopguide-tiny-vit}\ndevice: auto\n"
    )
    args = ["reembed", "--data-dir", str(tmp_path / "data"), "--config", str(yaml), "--ray-address", "local"]
    assert main([*args, "--gpus-per-actor", "0.5", "--cpus-per-actor", "2"]) == 2
    assert "stopped before embedding" in capsys.readouterr().err
    assert (seen["ray"].gpus_per_actor, seen["ray"].cpus_per_actor) == (0.5, 2.0)
    assert seen["encoder_config"].device == "auto"  # `device` is a known key of the encoder YAML

    assert main([*args, "--gpus-per-actor", "-1"]) == 2
    assert "--gpus-per-actor must be >= 0" in capsys.readouterr().err
    yaml.write_text("image_encoder_args: {device: cuda}\n")
    assert main(args) == 2
    assert "set `device` at the top of the encoder config" in capsys.readouterr().err


def test_a_pool_the_cluster_cannot_hold_fails_at_once(ray_cluster) -> None:
    """No GPU on the two-node test cluster: GPU actors are refused before Ray Data waits for them."""
    import ray

    resources = ray.cluster_resources()
    check_pool_fits(RayConfig(ray_cluster.address, actors=2, cpus_per_actor=1), resources)  # fits
    with pytest.raises(ValueError, match=r"need 2 GPU \(it has 0\)"):
        check_pool_fits(RayConfig(ray_cluster.address, actors=2, gpus_per_actor=1), resources)
    with pytest.raises(ValueError, match=r"need 2 encoder_node \(it has 1\)"):
        check_pool_fits(RayConfig(ray_cluster.address, actors=2, resources={"encoder_node": 1}), resources)
