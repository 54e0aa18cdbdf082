"""Scale-out on Ray Serve, on one machine: a two-node Ray cluster on loopback (a head with 4
CPUs and a worker node with 3, each its own `ray start`), the database on PostgreSQL, and
`appliance serve --ray HEAD` deploying the appliance with 2 replicas of the embedder (at most
one per node), 1 of the chat model, 1 of the adder and an autoscaling model (1..2), its
ingress replica listening on the appliance's port itself (direct ingress, the default), in copy
mode: replicas on the worker node serve a SHA-256-verified copy of their model in the worker's
own copy folder (its `ray start` environment names it), and a copied file damaged on disk is
fetched again when the replica restarts. Through the Ray ingress the
official `openai` and `tritonclient` clients work unchanged (chat, streamed chat, embeddings,
V2 infer); requests are spread over the embedder's replicas (counted per replica in
/metrics); concurrent embeddings leave the ingress as merged calls, each answered on its own;
a second deploy with other HTTP settings is refused while Serve runs; a replica killed with kill -9 under 8 clients costs only the requests that were on
it, each a 503 with Retry-After naming it, never a hang, and Ray brings it back; a burst
scales the autoscaling model up within its bounds and idleness scales it down; a revoked key
is refused within the documented 2 s; in privacy mode `off` no text reaches the database or
any node's logs; SQLite is refused on a cluster of two nodes; the admin's Models page shows the
replicas and their nodes, and its form sets the embedder's replicas from 2 to 1 in place;
SIGTERM drains and exits 0; `--ray auto` (here with `scale.ingress = "proxy"`: Ray Serve's
proxy in front) runs its own local cluster and leaves no process of it behind.

Marked `ray` (select with `-m ray`); skipped only where the `ray` extra is not installed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest

pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]'); scale-out is not tested", exc_type=ImportError)

from appliance.config import load_settings  # noqa: E402
from appliance.export.pipeline import ExportRequest, run_export  # noqa: E402
from appliance.repository.checksums import sha256_file, version_digests  # noqa: E402
from appliance.repository.store import ModelRepository  # noqa: E402
from appliance.scale.mirror import COPY_DIR_ENVIRONMENT  # noqa: E402
from tests.helpers.decoders import make_tiny_llama  # noqa: E402
from tests.helpers.postgres import postgres_url  # noqa: E402,F401  (module fixture)
from tests.helpers.ray_cluster import RayCluster, ray_cluster  # noqa: E402
from tests.helpers.server import ROOT, create_key, free_port  # noqa: E402
from tests.helpers.tiny_models import publish_adder, publish_embedder, publish_heavy  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

CHAT, EMBED, ADDER, ELASTIC = "tiny-llama", "tiny-embed", "adder", "elastic"
#: Longest `appliance serve --ray` may take to deploy every replica on 2 busy cores.
DEPLOY_TIMEOUT_S = 300.0
#: A killed replica must serve again within this (measured: docs/SCALE.md).
RESTART_BOUND_S = 60.0
#: Load of the kill test.
CLIENTS = 8
MARKER = "zebra-quartz-marker-7f3a"


@dataclass
class RayServer:
    port: int
    key: str
    state: Path
    database_url: str
    cluster: RayCluster
    proc: subprocess.Popen[str]
    output: Path
    env: dict[str, str] = field(default_factory=dict)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def replica_counts(self, model: str) -> dict[str, float]:
        """appliance_replica_requests_total{model=...} by replica id."""
        counts: dict[str, float] = {}
        for line in httpx.get(self.url("/metrics"), timeout=10).text.splitlines():
            if line.startswith("appliance_replica_requests_total{") and f'model="{model}"' in line:
                replica = line.split('replica="', 1)[1].split('"', 1)[0]
                counts[replica] = float(line.rsplit(" ", 1)[1])
        return counts


def replica_pids(model: str) -> list[int]:
    """Worker processes of the model's live replicas."""
    return deployment_pids(f"model-{model}")


def deployment_pids(deployment: str) -> list[int]:
    """Worker processes of a deployment's live replicas (Ray titles them `ray::ServeReplica:APP:DEPLOYMENT`)."""
    title = f"ray::ServeReplica:appliance:{deployment}"
    pids = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = process.info.get("cmdline") or []
        if cmdline and cmdline[0].startswith(title) and process.info.get("status") != psutil.STATUS_ZOMBIE:
            pids.append(process.info["pid"])
    return sorted(pids)


def appliance(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], cwd=ROOT, env=env, text=True, capture_output=True, timeout=timeout)


def base_env(cluster: RayCluster, state: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "RAY_"))}
    env.update(cluster.env)
    env["APPLIANCE_STATE_DIR"] = str(state)
    env.update(extra)
    return env


def on_worker_node(pid: int, cluster: RayCluster) -> bool:
    """Whether the process runs on the worker node (only its processes have its copy folder)."""
    try:
        environment = psutil.Process(pid).environ()
    except psutil.Error:
        return False
    return environment.get(COPY_DIR_ENVIRONMENT) == cluster.worker_env[COPY_DIR_ENVIRONMENT]


def damage(path: Path) -> None:
    """Flip one byte in the middle, keeping size and mtime (bit rot, not an edit)."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    # Autoscaling reads the requests in flight every half second (Ray's default: 10 s).
    push = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5", "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
    # The worker node keeps its copies of models apart from the head's state directory, as a
    # separate box would (both nodes share this machine's disk).
    worker = {COPY_DIR_ENVIRONMENT: str(tmp_path_factory.mktemp("worker-node") / "model-copies")}
    with ray_cluster(head_cpus=4, worker_cpus=3, env=push, worker_env=worker) as running:
        yield running


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scale")
    state = root / "state"
    settings = load_settings(state_dir=state)
    run_export(ExportRequest(source=str(make_tiny_llama(root / "llama")), name=CHAT, task="text-generation", quant="fp32"), settings)
    repository = ModelRepository(state / "models")
    publish_embedder(repository, EMBED)
    publish_adder(repository, ADDER)
    publish_heavy(repository, ELASTIC, width=256, layers=48)
    return state


@pytest.fixture(scope="module")
def server(cluster: RayCluster, state: Path, postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServer]:  # noqa: F811
    key = create_key(state, "ray-test", ["infer", "admin", "metrics"], database_url=postgres_url)
    port = free_port()
    output = tmp_path_factory.mktemp("scale-out") / "serve.log"
    env = base_env(
        cluster, state,
        APPLIANCE_DATABASE_URL=postgres_url,
        APPLIANCE_LOGGING_MODE="off",
        APPLIANCE_GENERATION__KV_BUDGET_BYTES=str(32 << 20),
        APPLIANCE_CPU_THREADS="1",
        APPLIANCE_REPOSITORY_POLL_S="0",
        APPLIANCE_SCALE__MODEL_FILES="copy",
        **{f"APPLIANCE_SCALE__MODELS__{EMBED.upper()}__MAX_REPLICAS_PER_NODE": "1"},
        APPLIANCE_SCALE__MODELS__ELASTIC__MIN_REPLICAS="1",
        APPLIANCE_SCALE__MODELS__ELASTIC__MAX_REPLICAS="2",
        APPLIANCE_SCALE__MODELS__ELASTIC__TARGET_ONGOING_REQUESTS="1",
        APPLIANCE_SCALE__UPSCALE_DELAY_S="1",
        APPLIANCE_SCALE__DOWNSCALE_DELAY_S="4",
        APPLIANCE_SCALE__AUTOSCALING_WINDOW_S="2",
    )
    with output.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve", "--ray", cluster.address, "--port", str(port),
             "--replicas", f"{EMBED}=2", "--replicas", f"{CHAT}=1"],
            cwd=ROOT, env=env, text=True, stdout=sink, stderr=subprocess.STDOUT,
        )
    running = RayServer(port=port, key=key, state=state, database_url=postgres_url, cluster=cluster, proc=proc, output=output, env=env)
    try:
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while "serving on" not in output.read_text(errors="replace"):
            assert proc.poll() is None, f"appliance serve --ray exited with {proc.returncode}: {output.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not deployed in {DEPLOY_TIMEOUT_S:g} s: {output.read_text()[-4000:]}"
            time.sleep(0.5)
        while httpx.get(running.url("/v2/health/ready"), timeout=10).status_code != 200:  # the cluster's view catches up
            assert time.monotonic() < deadline, httpx.get(running.url("/v2/health/ready"), timeout=10).text
            time.sleep(0.2)
        yield running
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def test_sqlite_is_refused_on_a_cluster_of_two_nodes(cluster: RayCluster, tmp_path: Path) -> None:
    state = tmp_path / "state"
    publish_adder(ModelRepository(state / "models"))
    done = appliance("serve", "--ray", cluster.address, "--port", str(free_port()), env=base_env(cluster, state))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "database_url" in done.stderr and "SQLite" in done.stderr and "PostgreSQL" in done.stderr and "2 nodes" in done.stderr


def test_the_official_clients_work_through_the_ray_ingress(server: RayServer) -> None:
    import tritonclient.http as triton

    assert httpx.get(server.url("/v2/health/ready"), timeout=10).json() == {"ready": True, "reason": None}
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=server.key, max_retries=0, timeout=60)
    assert {model.id for model in client.models.list().data} >= {CHAT, EMBED, ADDER}
    chat = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 6
    chunks = list(
        client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0, stream=True,
            logprobs=True, top_logprobs=2,
        )
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == chat.choices[0].message.content, "the stream and the answer differ"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(len(entry.top_logprobs) == 2 for chunk in chunks if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content)
    embeddings = client.embeddings.create(model=EMBED, input=["hello world", "the cat sat"])
    vectors = np.array([item.embedding for item in embeddings.data])
    assert vectors.shape == (2, 8) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    triton_client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert triton_client.is_model_ready(ADDER, headers=server.auth)
    left, right = np.arange(8, dtype=np.float32).reshape(2, 4), np.ones((2, 4), dtype=np.float32)
    inputs = [triton.InferInput("INPUT0", [2, 4], "FP32"), triton.InferInput("INPUT1", [2, 4], "FP32")]
    inputs[0].set_data_from_numpy(left, binary_data=True)
    inputs[1].set_data_from_numpy(right, binary_data=True)
    result = triton_client.infer(ADDER, inputs, headers=server.auth)
    assert np.array_equal(result.as_numpy("OUTPUT0"), left + right) and np.array_equal(result.as_numpy("OUTPUT1"), left - right)
    # Structured output: compiled and enforced on the replica (the grammar never crosses the network).
    schema = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"], "additionalProperties": False}
    shaped = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "unit?"}], max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
    )
    assert json.loads(shaped.choices[0].message.content) in ({"unit": "c"}, {"unit": "f"})
    # A request the model refuses keeps its status and field through the replica.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=9.0)
    assert refused.value.body["param"] == "temperature"


def test_concurrent_streams_arrive_complete_and_in_order_while_the_replica_groups_their_tokens(server: RayServer) -> None:
    """Several sequences on the one chat replica: their tokens cross Ray in groups (the stream
    interval, `scale.stream_interval_*`), and each SSE stream still carries every token, in
    order: its text is the unstreamed answer's, its usage counts every token."""
    streams, tokens = 6, 40
    prompts = [f"story number {index}:" for index in range(streams)]
    body = {"model": CHAT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}

    async def run() -> tuple[list[str], list[tuple[str, int]]]:
        async with httpx.AsyncClient(base_url=server.url(""), headers=server.auth, timeout=120) as client:
            answers = [(await client.post("/v1/completions", json={**body, "prompt": prompt})).json() for prompt in prompts]

            async def stream(prompt: str) -> tuple[str, int]:
                text, usage = "", 0
                request = {**body, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True}}
                async with client.stream("POST", "/v1/completions", json=request) as response:
                    assert response.status_code == 200, await response.aread()
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[len("data: "):])
                        if chunk.get("usage"):
                            usage = chunk["usage"]["completion_tokens"]
                        for choice in chunk.get("choices") or ():
                            text += choice["text"]
                return text, usage

            return [answer["choices"][0]["text"] for answer in answers], list(await asyncio.gather(*(stream(p) for p in prompts)))

    expected, streamed = asyncio.run(run())
    for prompt, answer, (text, usage) in zip(prompts, expected, streamed, strict=True):
        assert text == answer, f"{prompt!r}: the stream's text differs from the answer (tokens lost or reordered)"
        assert usage == tokens, f"{prompt!r}: usage counts {usage} tokens, wanted {tokens}"


def test_requests_are_spread_over_the_embedders_replicas(server: RayServer) -> None:
    before = server.replica_counts(EMBED)
    with httpx.Client(timeout=30, headers=server.auth) as http:
        def worker() -> None:
            for _ in range(15):
                assert http.post(server.url("/v1/embeddings"), json={"model": EMBED, "input": "the dog"}).status_code == 200

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    after = server.replica_counts(EMBED)
    served = {replica: after[replica] - before.get(replica, 0.0) for replica in after}
    busy = [replica for replica, count in served.items() if count > 0]
    assert len(busy) == 2 and sum(served.values()) == 60, served
    assert len(replica_pids(EMBED)) == 2
    ready = httpx.get(server.url(f"/v2/models/{EMBED}/ready"), headers=server.auth, timeout=10)
    assert ready.status_code == 200


def test_concurrent_embeddings_share_merged_calls_and_each_keeps_its_own_answer(server: RayServer) -> None:
    """32 requests at once: the ingress merges their calls to the embedder (two in flight per
    replica, the others leave together); each answer equals the one its sentence gets alone,
    and a request the replica refuses gets its own 400 without failing its batch-mates."""
    sentences = [f"sentence {index} about a cat" for index in range(32)]
    with httpx.Client(timeout=30, headers=server.auth) as http:
        alone = [http.post(server.url("/v1/embeddings"), json={"model": EMBED, "input": text}).json()["data"][0]["embedding"] for text in sentences[:3]]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, headers=server.auth, limits=httpx.Limits(max_connections=40)) as client:
            bodies = [{"model": EMBED, "input": text} for text in sentences] + [{"model": EMBED, "input": "a cat", "dimensions": 999}]
            return await asyncio.gather(*(client.post(server.url("/v1/embeddings"), json=body) for body in bodies))

    before = sum(server.replica_counts(EMBED).values())
    *answers, refused = asyncio.run(burst())
    assert [answer.status_code for answer in answers] == [200] * len(sentences), [answer.text for answer in answers if answer.status_code != 200]
    assert np.allclose([answer.json()["data"][0]["embedding"] for answer in answers[:3]], alone, atol=1e-4)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "dimensions", refused.text
    assert sum(server.replica_counts(EMBED).values()) - before == len(sentences) + 1  # counted per request, not per merged call


def test_a_second_deploy_with_other_http_settings_is_refused_while_serve_runs(server: RayServer) -> None:
    """Ray Serve keeps the HTTP options and ingress mode its controller started with: a deploy
    that wants others says so and how to stop it, rather than serve elsewhere."""
    env = {**server.env, "APPLIANCE_SCALE__INGRESS": "proxy"}
    done = appliance("serve", "--ray", server.cluster.address, "--port", str(free_port()), env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert 'Ray Serve already runs on this cluster with ingress = "direct"' in done.stderr and "serve shutdown" in done.stderr


@pytest.fixture(scope="module")
def admin(server: RayServer) -> tuple[str, str]:
    """An admin of the Ray server's database: (name, password)."""
    from appliance.store.admin_users import AdminUserStore
    from appliance.store.db import Database

    database = Database(server.database_url)
    AdminUserStore(database).create("ray-admin", "a long admin passphrase")
    database.close()
    return "ray-admin", "a long admin passphrase"


def test_the_admin_models_page_shows_replicas_and_where_they_run(server: RayServer, admin: tuple[str, str]) -> None:
    from tests.helpers.admin import sign_in

    with httpx.Client(timeout=30) as browser:
        sign_in(browser, server.url(), *admin)
        page = browser.get(server.url("/admin/models")).text
    assert "Served through Ray Serve" in page
    section = page.split(f'data-model="{EMBED}"', 1)[1].split("</section>", 1)[0]
    assert "2 running of 2 wanted" in section
    rows = section.split('data-role="replica-list"', 1)[1].count("<tr data-replica=")
    assert rows == 2
    for pid in replica_pids(EMBED):
        assert f"<td>{pid}</td>" in section
    elastic = page.split(f'data-model="{ELASTIC}"', 1)[1].split("</section>", 1)[0]
    assert "(autoscaling 1–2)" in elastic
    nodes = {chunk.split("</code>", 1)[0] for chunk in page.split("<small><code>")[1:]}
    assert len(nodes) == 2, f"every replica on one node: {nodes}"


def test_the_worker_nodes_replica_serves_a_verified_copy_and_fetches_a_damaged_file_again(server: RayServer) -> None:
    """Copy mode: the embedder's replica on the worker node (one per node) reads the copy in
    the worker's copy folder, equal to the repository's files by SHA-256; a byte damaged there
    is found when the replica restarts, that file is fetched again, and the new replica serves,
    while the ingress keeps answering from the head's replica."""
    copy_dir = Path(server.cluster.worker_env[COPY_DIR_ENVIRONMENT])
    serving = ModelRepository(server.state / "models").get(EMBED)
    local = copy_dir / EMBED / str(serving.version)
    expected = {name: digest.sha256 for name, digest in version_digests(serving.path).items()}
    assert {path.relative_to(local).as_posix(): sha256_file(path) for path in local.rglob("*") if path.is_file()} == expected
    [worker_pid] = [pid for pid in replica_pids(EMBED) if on_worker_node(pid, server.cluster)]
    before = server.replica_counts(EMBED)
    damage(local / "model.onnx")
    psutil.Process(worker_pid).kill()
    killed_at = time.monotonic()
    answers: list[tuple[int, str | None]] = []
    served_by_new: list[str] = []
    with httpx.Client(timeout=30, headers=server.auth) as http:
        while not served_by_new and time.monotonic() - killed_at < RESTART_BOUND_S:
            answer = http.post(server.url("/v1/embeddings"), json={"model": EMBED, "input": "the dog"})
            answers.append((answer.status_code, answer.headers.get("retry-after")))
            served_by_new = [replica for replica, count in server.replica_counts(EMBED).items() if replica not in before and count > 0]
            time.sleep(0.1)
    assert served_by_new, f"no new embedder replica served within {RESTART_BOUND_S:g} s"
    assert all(status == 200 or (status == 503 and retry_after) for status, retry_after in answers), answers
    assert answers[-1][0] == 200
    [new_pid] = [pid for pid in replica_pids(EMBED) if on_worker_node(pid, server.cluster)]
    assert new_pid != worker_pid
    assert sha256_file(local / "model.onnx") == expected["model.onnx"], "the damaged file was not fetched again"
    assert any(
        "the copy of model.onnx on this node does not match the repository's SHA-256" in log.read_text(errors="replace")
        for log in server.cluster.logs()
    ), "the replica did not say it found the damaged file"
    print(f"damaged copy on the worker node: fetched again, a new replica served {time.monotonic() - killed_at:.1f} s after the kill")


def test_a_replica_killed_under_load_costs_only_its_requests_and_comes_back(server: RayServer) -> None:
    pids = replica_pids(EMBED)
    assert len(pids) == 2
    victim = pids[0]
    results: list[tuple[int, str | None, str, float]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30, headers=server.auth) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    answer = http.post(server.url("/v1/embeddings"), json={"model": EMBED, "input": ["hello world the cat"] * 64})
                except httpx.HTTPError as exc:  # a hang shows as a timeout here
                    errors.append(exc)
                    return
                results.append((answer.status_code, answer.headers.get("retry-after"), answer.text, time.monotonic() - started))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    before = server.replica_counts(EMBED)
    killed_at = time.monotonic()
    psutil.Process(victim).kill()
    # The ingress keeps answering while Ray replaces the replica.
    assert httpx.get(server.url("/v2/health/live"), timeout=5).status_code == 200
    came_back: float | None = None
    while came_back is None and time.monotonic() - killed_at < RESTART_BOUND_S:
        time.sleep(0.25)
        now = server.replica_counts(EMBED)
        if any(replica not in before and count > 0 for replica, count in now.items()):
            came_back = time.monotonic() - killed_at
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    assert not errors, errors
    failures = [result for result in results if result[0] != 200]
    assert all(status == 503 and retry_after is not None and int(retry_after) >= 1 for status, retry_after, _, _ in failures), failures
    assert all(f"pid {victim}" in body for _, _, body, _ in failures), failures
    # Only requests the replica had accepted and was running fail: Ray's router sends the
    # others (not yet accepted) to the other replica. A tiny embedder answers in milliseconds,
    # so often none was running at the kill (the chat test below always has some).
    assert len(failures) <= CLIENTS, failures
    assert max(seconds for *_, seconds in results) < 30
    assert came_back is not None, f"no new replica served within {RESTART_BOUND_S:g} s"
    assert len(replica_pids(EMBED)) == 2 and victim not in replica_pids(EMBED)
    print(f"kill -9 under {CLIENTS} clients: {len(failures)} of {len(results)} requests failed (503), "
          f"a new replica served {came_back:.1f} s after the kill")


def test_the_only_chat_replica_killed_mid_generation_gives_503s_and_readiness_follows_it(server: RayServer) -> None:
    """With one replica, the sequences on it fail (503 naming it; a stream already answering
    ends with an error event), requests meanwhile are refused at once with 503 + Retry-After,
    readiness says 503 until Ray has replaced the replica, then everything serves again."""
    [victim] = replica_pids(CHAT)
    body = {"model": CHAT, "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    results: list[tuple[int, str | None, str]] = []
    streams: list[str] = []
    stop = threading.Event()

    def client(streaming: bool) -> None:
        with httpx.Client(timeout=60, headers=server.auth) as http:
            while not stop.is_set():
                if streaming:
                    with http.stream("POST", server.url("/v1/chat/completions"), json={**body, "stream": True}) as answer:
                        text = answer.read().decode()
                    if answer.status_code == 200:
                        streams.append(text)
                        continue
                    results.append((answer.status_code, answer.headers.get("retry-after"), text))
                else:
                    answer = http.post(server.url("/v1/chat/completions"), json=body)
                    results.append((answer.status_code, answer.headers.get("retry-after"), answer.text))

    threads = [threading.Thread(target=client, args=(index == 0,)) for index in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    psutil.Process(victim).kill()
    killed_at = time.monotonic()
    unready = False
    while time.monotonic() - killed_at < RESTART_BOUND_S:
        ready = httpx.get(server.url("/v2/health/ready"), timeout=10)
        unready = unready or ready.status_code == 503
        if unready and ready.status_code == 200:
            break
        time.sleep(0.2)
    back_after = time.monotonic() - killed_at
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    assert unready, "readiness never reported the missing replica"
    assert back_after < RESTART_BOUND_S, "the chat model did not come back"
    failures = [result for result in results if result[0] != 200]
    assert failures, "no request was on the killed replica"
    assert all(status == 503 and retry_after is not None for status, retry_after, _ in failures), failures
    died = [text for *_, text in failures if f"pid {victim}" in text]
    # Whether a non-streaming request was on the replica at the kill is a race (CI once had
    # every failure refused while the replica was gone): each failure is one or the other.
    assert all("no running replica" in text for *_, text in failures if f"pid {victim}" not in text), failures
    cut = [text for text in streams if '"error"' in text]
    assert all(text.rstrip().endswith("data: [DONE]") and f"pid {victim}" in text for text in cut), cut
    assert results[-1][0] == 200, "the chat model did not serve again"
    print(f"chat replica killed: {len(died)} in-flight sequence(s) failed, {len(failures) - len(died)} refused while "
          f"restarting, {len(cut)} stream(s) cut; ready again {back_after:.1f} s after the kill")


def test_a_burst_scales_the_autoscaling_model_up_within_bounds_and_idleness_down(server: RayServer) -> None:
    assert len(replica_pids(ELASTIC)) == 1
    body = {"inputs": [{"name": "X", "shape": [8, 256], "datatype": "FP32", "data": [0.1] * (8 * 256)}]}
    stop = threading.Event()
    peak = 1

    def client() -> None:
        with httpx.Client(timeout=30, headers=server.auth) as http:
            while not stop.is_set():
                assert http.post(server.url(f"/v2/models/{ELASTIC}/infer"), json=body).status_code == 200

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while peak < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        peak = max(peak, len(replica_pids(ELASTIC)))
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert peak == 2, "the burst did not add a replica"
    deadline = time.monotonic() + 60
    while len(replica_pids(ELASTIC)) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(replica_pids(ELASTIC)) == 1, "idleness did not remove the added replica"


def test_a_revoked_key_is_refused_within_two_seconds(server: RayServer) -> None:
    key = create_key(server.state, "short-lived", ["infer"], database_url=server.database_url)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": EMBED, "input": "the cat"}
    assert httpx.post(server.url("/v1/embeddings"), json=body, headers=headers, timeout=10).status_code == 200
    revoked = appliance("keys", "revoke", "short-lived", env={**server.env})
    assert revoked.returncode == 0, revoked.stderr
    at = time.monotonic()
    while httpx.post(server.url("/v1/embeddings"), json=body, headers=headers, timeout=10).status_code != 401:
        assert time.monotonic() - at < 2.5, "a revoked key was still served after 2.5 s"
        time.sleep(0.1)


def test_privacy_mode_off_stores_no_text_on_any_node(server: RayServer) -> None:
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=server.key, max_retries=0, timeout=60)
    client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": f"say {MARKER}"}], max_tokens=4)
    client.embeddings.create(model=EMBED, input=[f"{MARKER} hello"])
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(server.database_url)
    with engine.connect() as connection:
        for table in inspect(connection).get_table_names():
            rows = connection.execute(text(f'SELECT t::text FROM "{table}" AS t')).scalars().all()
            assert not any(MARKER in row for row in rows), f"the marker was stored in table {table}"
    engine.dispose()
    for log in server.cluster.logs():
        assert MARKER not in log.read_text(errors="replace"), f"the marker reached {log}"
    assert MARKER not in server.output.read_text(errors="replace")


def test_an_admin_sets_the_embedders_replicas_from_two_to_one_in_place(server: RayServer, admin: tuple[str, str]) -> None:
    """The Models page's replicas form: refused with the field named when the values do not fit
    `[scale.models.NAME]`'s rules; else saved (audited, in the database for the next deploy)
    and applied to the running application: one of the two replicas stops, the other keeps
    running (the same process: no restart), the ingress and the other models are untouched."""
    from appliance.store.db import Database
    from appliance.store.scale_models import ScaleModelChanges
    from tests.helpers.admin import form_token, sign_in

    before = replica_pids(EMBED)
    others = {deployment: deployment_pids(deployment) for deployment in ("ingress", f"model-{CHAT}", f"model-{ADDER}")}
    assert len(before) == 2
    with httpx.Client(timeout=60, base_url=server.url()) as browser:
        sign_in(browser, server.url(), *admin)
        page = browser.get("/admin/models").text
        section = page.split(f'data-model="{EMBED}"', 1)[1].split("</section>", 1)[0]
        assert 'data-role="scale-form"' in section and 'name="replicas" type="number" min="1" max="1024" value="2"' in section
        form = {"csrf_token": form_token(section), "num_cpus": "1", "num_gpus": "0", "memory_mib": ""}
        refused = browser.post(
            f"/admin/models/{EMBED}/replicas",
            data={**form, "mode": "autoscaling", "min_replicas": "3", "max_replicas": "2", "target_ongoing_requests": "2"},
        )
        assert refused.status_code == 400 and "max_replicas" in refused.text and "must not exceed" in refused.text
        applied = browser.post(f"/admin/models/{EMBED}/replicas", data={**form, "mode": "fixed", "replicas": "1"})
        assert applied.status_code == 303 and applied.headers["location"].endswith("done=replicas-set"), applied.text
        deadline = time.monotonic() + 60
        while len(replica_pids(EMBED)) != 1:
            assert time.monotonic() < deadline, f"still {replica_pids(EMBED)} after 60 s"
            time.sleep(0.2)
        assert set(replica_pids(EMBED)) < set(before), "the remaining replica was restarted"
        assert {deployment: deployment_pids(deployment) for deployment in others} == others, "the ingress or another model was restarted"
        answer = browser.post("/v1/embeddings", json={"model": EMBED, "input": "the cat"}, headers=server.auth)
        assert answer.status_code == 200
        while "1 running of 1 wanted" not in browser.get("/admin/models").text.split(f'data-model="{EMBED}"', 1)[1].split("</section>", 1)[0]:
            assert time.monotonic() < deadline, "the Models page does not show the new count"
            time.sleep(0.5)
        assert "scale.model" in browser.get("/admin/audit").text
    database = Database(server.database_url)
    assert ScaleModelChanges(database).all()[EMBED]["replicas"] == 1
    database.close()


def test_an_admin_changes_the_adders_cpus_and_only_its_replica_restarts(server: RayServer, admin: tuple[str, str]) -> None:
    """The replicas form's resource path: new CPUs per replica are saved and restart that
    model's replica (Ray Serve replaces it: the process changes), while the ingress and the
    other models keep their processes; the model answers again afterwards."""
    from appliance.store.db import Database
    from appliance.store.scale_models import ScaleModelChanges
    from tests.helpers.admin import form_token, sign_in

    [before] = replica_pids(ADDER)
    others = {deployment: deployment_pids(deployment) for deployment in ("ingress", f"model-{CHAT}", f"model-{EMBED}")}
    with httpx.Client(timeout=60, base_url=server.url()) as browser:
        sign_in(browser, server.url(), *admin)
        section = browser.get("/admin/models").text.split(f'data-model="{ADDER}"', 1)[1].split("</section>", 1)[0]
        form = {"csrf_token": form_token(section), "mode": "fixed", "replicas": "1", "num_cpus": "0.5", "num_gpus": "0", "memory_mib": ""}
        applied = browser.post(f"/admin/models/{ADDER}/replicas", data=form)
        assert applied.status_code == 303, applied.text
        deadline = time.monotonic() + 120
        while replica_pids(ADDER) in ([], [before]):
            assert time.monotonic() < deadline, f"the adder's replica was not replaced within 120 s: {replica_pids(ADDER)}"
            time.sleep(0.5)
        assert {deployment: deployment_pids(deployment) for deployment in others} == others, "the ingress or another model was restarted"
        inputs = {"inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]} for name in ("INPUT0", "INPUT1")]}
        while (answer := browser.post(f"/v2/models/{ADDER}/infer", json=inputs, headers=server.auth)).status_code != 200:
            assert answer.status_code == 503 and "retry-after" in answer.headers, answer.text
            assert time.monotonic() < deadline, "the new replica does not answer"
            time.sleep(0.5)
        outputs = {output["name"]: output["data"] for output in answer.json()["outputs"]}
        assert outputs["OUTPUT0"] == [2, 4, 6, 8]
    database = Database(server.database_url)
    assert ScaleModelChanges(database).all()[ADDER]["num_cpus"] == 0.5
    database.close()


def test_sigterm_deletes_the_application_and_exits_zero(server: RayServer) -> None:
    server.proc.terminate()
    assert server.proc.wait(timeout=90) == 0, server.output.read_text()[-3000:]
    deadline = time.monotonic() + 30
    while replica_pids(EMBED) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert replica_pids(EMBED) == [], "the replicas outlived the application"


def test_ray_auto_serves_on_a_local_cluster_and_stops_it_on_exit(tmp_path: Path) -> None:
    """`--ray auto`: a local Ray cluster for the server's lifetime (SQLite is fine on one node);
    SIGTERM drains, exits 0 and leaves none of the cluster's processes behind."""
    state = tmp_path / "state"
    publish_adder(ModelRepository(state / "models"))
    key = create_key(state, "auto", ["infer"])
    port = free_port()
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "RAY_"))}
    env.update(
        APPLIANCE_STATE_DIR=str(state), RAY_TMPDIR=ray_tmp, APPLIANCE_SCALE__MODELS__ADDER__NUM_CPUS="0.5", APPLIANCE_SCALE__INGRESS="proxy",
    )
    output = tmp_path / "serve.log"
    with output.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve", "--ray", "auto", "--port", str(port)],
            cwd=ROOT, env=env, text=True, stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while "serving on" not in output.read_text(errors="replace"):
            assert proc.poll() is None, output.read_text()[-4000:]
            assert time.monotonic() < deadline, output.read_text()[-4000:]
            time.sleep(0.5)
        while httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10).status_code != 200:  # as the server fixture
            assert time.monotonic() < deadline, output.read_text()[-4000:]
            time.sleep(0.2)
        cluster = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(child.cmdline()) for child in cluster)
        body = {"inputs": [{"name": n, "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]} for n in ("INPUT0", "INPUT1")]}
        answer = httpx.post(f"http://127.0.0.1:{port}/v2/models/adder/infer", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [2, 4, 6, 8], answer.text
        proc.terminate()
        assert proc.wait(timeout=90) == 0, output.read_text()[-3000:]
        _gone, alive = psutil.wait_procs(cluster, timeout=30)
        assert not alive, f"left running: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
