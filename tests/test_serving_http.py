"""Many models in one memory budget, through a real server: three models that fit two at a
time serve 300 round-robin requests from 8 clients (every answer 200, evictions counted, the
process's resident memory within the budget plus a documented slack); a stream is never cut
by an eviction; V2 unload stops a generation engine and unmaps its KV cache, V2 load brings it
back; the repository index tells the truth for both families. Real HTTP, real sessions."""

from __future__ import annotations

import gc
import mmap
import re
import shutil
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from appliance.repository.store import ModelRepository
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture
from tests.helpers.server import RunningServer, running_server
from tests.helpers.tiny_models import publish_adder, publish_weighty

SMOLLM2 = "smollm2-135m-instruct"
WEIGHTY = ("alpha", "beta", "gamma")
WEIGHTY_MB = 12
WIDTH = 512
CLIENTS = 8
REQUESTS = 300
#: What the process may hold beyond its size before the server started and the models'
#: budget: the server itself, ONNX Runtime's arenas growing past their warm-up, request
#: buffers of 8 clients, allocator fragmentation (measured peaks: docs/SERVING.md) ...
SERVER_SLACK_BYTES = 48 << 20
#: A load reads its file twice (the hostile-file check, then ONNX Runtime) before it keeps
#: the weights: for that moment the process holds about two more copies of the model file.
LOAD_COPIES = 2
#: Budget headroom above the two largest measured costs (less than the third model).
TWO_MODEL_HEADROOM = 1.15


def infer(client: httpx.Client, name: str) -> httpx.Response:
    body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, WIDTH], "data": [0.5] * WIDTH}]}
    return client.post(f"/v2/models/{name}/infer", json=body, timeout=60)


def measured_costs(state: Path) -> dict[str, int]:
    """Each model's cost as a server measures it at load (one load each, nothing evicted)."""
    with running_server(state, serving={"load_at_start": False}) as server:
        with httpx.Client(base_url=server.base_url, headers=server.auth()) as client:
            for name in WEIGHTY:
                assert infer(client, name).status_code == 200
        costs = {name: server.status(name).resident_bytes for name in WEIGHTY}
        assert all(server.status(name).measured for name in WEIGHTY)
    return costs


class RssSampler:
    """The process's resident set, sampled every few milliseconds in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_three_models_that_fit_two_at_a_time_serve_300_round_robin_requests(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "models")
    for name in WEIGHTY:
        publish_weighty(repository, name, megabytes=WEIGHTY_MB, width=WIDTH)
    costs = measured_costs(tmp_path)
    ordered = sorted(costs.values())
    budget = int((ordered[1] + ordered[2]) * TWO_MODEL_HEADROOM)
    assert sum(ordered) > budget, f"the three must not fit together: {costs}, budget {budget}"
    gc.collect()
    base_rss = psutil.Process().memory_info().rss
    with running_server(tmp_path, serving={"memory_budget_bytes": budget}, create_keys={"second": ["infer", "metrics"]}) as server:
        statuses: list[int] = []
        lock = threading.Lock()

        def client_loop(index: int) -> None:
            with httpx.Client(base_url=server.base_url, headers=server.auth()) as client:
                for k in range(index, REQUESTS, CLIENTS):
                    response = infer(client, WEIGHTY[k % len(WEIGHTY)])
                    with lock:
                        statuses.append(response.status_code)
                    assert response.status_code == 200, response.text

        with RssSampler() as rss:
            threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert statuses == [200] * REQUESTS
        metrics = httpx.get(server.url("/metrics")).text
        evictions = sum(float(v) for v in re.findall(r'appliance_model_evictions_total\{model="\w+",reason="room"\} ([0-9.]+)', metrics))
        assert evictions >= 1, "serving three models in a budget for two must evict"
        assert 'appliance_model_resident_bytes{model="' in metrics and "appliance_model_loads_total" in metrics
        over = rss.peak - base_rss - budget
        slack = SERVER_SLACK_BYTES + LOAD_COPIES * WEIGHTY_MB * (1 << 20)
        print(f"budget {budget >> 20} MiB, costs {[c >> 20 for c in ordered]} MiB, peak over base+budget {over / 2**20:.1f} MiB (slack {slack >> 20}), evictions {evictions:g}")
        assert rss.peak <= base_rss + budget + slack, f"peak RSS {over / 2**20:.0f} MiB over base + budget"
        assert server.ctx.models.memory_in_use()["cpu"] <= budget


@pytest.fixture
def llm_state(tiny_decoders: TinyDecoders, tmp_path: Path) -> Path:
    state = tmp_path / "state"
    shutil.copytree(tiny_decoders.state_dir / "models", state / "models", ignore=shutil.ignore_patterns(".staging", ".lock"))
    repository = ModelRepository(state / "models")
    repository.delete("tiny-gpt2")
    repository.set_default("tiny-llama", tiny_decoders.llama_fp32.version)
    publish_adder(repository)
    return state


@pytest.fixture
def llm_server(llm_state: Path) -> Iterator[RunningServer]:
    with running_server(
        llm_state, generation={"kv_budget_bytes": 16 << 20, "speculative": "off"}, serving={"max_load_wait_s": 0.5}
    ) as server:
        yield server


def test_a_stream_is_never_cut_by_an_eviction(exported_smollm2: ModelRepository, tmp_path: Path) -> None:
    """SmolLM2 rather than the tiny decoder: its stream must outlast the requests below."""
    int4 = next(v for v in exported_smollm2.versions(SMOLLM2) if v.manifest.quantization == "int4")
    shutil.copytree(int4.path, tmp_path / "models" / SMOLLM2 / str(int4.version))
    publish_adder(ModelRepository(tmp_path / "models"))
    serving = {"max_loaded_models": 1, "max_load_wait_s": 0.5, "load_at_start": False}
    body = {"model": SMOLLM2, "prompt": "Once upon a time", "max_tokens": 400, "stream": True, "ignore_eos": True, "temperature": 0}
    adder = {"inputs": [{"name": n, "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]} for n in ("INPUT0", "INPUT1")]}
    with running_server(tmp_path, serving=serving, generation={"kv_budget_bytes": 256 << 20, "speculative": "off"}) as server:
        with httpx.Client(base_url=server.base_url, headers=server.auth(), timeout=120) as client:
            frames: list[str] = []
            with client.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                frames.append(next(lines))
                refused = client.post("/v2/models/adder/infer", json=adder)
                assert refused.status_code == 503 and "Retry-After" in refused.headers, refused.text
                assert SMOLLM2 in refused.json()["error"] and "in use" in refused.json()["error"]
                assert server.state(SMOLLM2) == "ready"
                frames.extend(line for line in lines if line)
            assert frames[-1] == "data: [DONE]" and '"finish_reason":"length"' in "".join(frames), "the stream ran to its end"
            assert client.post("/v2/models/adder/infer", json=adder).status_code == 200, "once idle, the LLM makes room"
            assert server.state(SMOLLM2) == "evicted"


def _kv_mappings(server: RunningServer) -> list[weakref.ref[mmap.mmap]]:
    """Weak references to the anonymous mappings that hold the engine's KV cache: dead once
    the mappings are closed (unmapped)."""
    engine = server.engine("tiny-llama")
    return [weakref.ref(mapping) for store in engine.kv.stores for mapping in store._mappings]


def test_v2_unload_of_a_generation_model_stops_its_engine_and_frees_its_kv_and_load_brings_it_back(llm_server: RunningServer) -> None:
    server = llm_server
    with httpx.Client(base_url=server.base_url, headers=server.auth(), timeout=60) as client:
        index = {entry["name"]: entry for entry in client.post("/v2/repository/index").json()}
        assert index["tiny-llama"]["state"] == "READY" and index["adder"]["state"] == "READY", index
        assert client.get("/v2/models/tiny-llama/ready").status_code == 200
        chat = {"model": "tiny-llama", "prompt": [5, 17, 42], "max_tokens": 64, "ignore_eos": True}
        assert client.post("/v1/completions", json=chat).status_code == 200
        mappings = _kv_mappings(server)
        assert mappings and all(ref() is not None for ref in mappings)
        rss_before = psutil.Process().memory_info().rss
        unloaded = client.post("/v2/repository/models/tiny-llama/unload")
        assert unloaded.status_code == 200 and unloaded.json()["state"] == "UNAVAILABLE"
        gc.collect()
        rss_after = psutil.Process().memory_info().rss
        print(f"RSS before unload {rss_before / 2**20:.1f} MiB, after {rss_after / 2**20:.1f} MiB")
        assert all(ref() is None for ref in mappings), "the KV buffers are unmapped"
        assert not [t for t in threading.enumerate() if t.name.startswith("generation-tiny-llama")], "the engine thread stopped"
        assert rss_after <= rss_before + (8 << 20)
        index = {entry["name"]: entry for entry in client.post("/v2/repository/index").json()}
        assert index["tiny-llama"]["state"] == "UNAVAILABLE" and "unloaded" in index["tiny-llama"]["reason"]
        assert client.get("/v2/models/tiny-llama/ready").status_code == 503
        assert client.post("/v1/completions", json=chat).status_code == 503
        assert client.post("/v2/repository/models/tiny-llama/load").json()["state"] == "READY"
        assert client.post("/v1/completions", json=chat).status_code == 200


def test_every_route_tells_the_truth_about_a_generation_model(llm_server: RunningServer) -> None:
    """Found while testing as a new user: the tensor routes answered 503 "not loaded" for a
    serving LLM."""
    server = llm_server
    with httpx.Client(base_url=server.base_url, headers=server.auth(), timeout=60) as client:
        assert client.get("/v2/models/tiny-llama/ready").status_code == 200
        version = server.status("tiny-llama").loaded_version
        assert client.get(f"/v2/models/tiny-llama/versions/{version}/ready").status_code == 200
        assert client.get("/v2/models/tiny-llama").json()["state"] == "READY"
        body = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]}
        infer_llm = client.post("/v2/models/tiny-llama/infer", json=body)
        assert infer_llm.status_code == 400 and "text-generation" in infer_llm.json()["error"]
        embed_llm = client.post("/v1/embeddings", json={"model": "tiny-llama", "input": "hi"})
        assert embed_llm.status_code == 400 and embed_llm.json()["error"]["param"] == "model"
        assert "text-generation" in embed_llm.json()["error"]["message"]
        chat_adder = client.post("/v1/chat/completions", json={"model": "adder", "messages": [{"role": "user", "content": "x"}]})
        assert chat_adder.status_code == 400 and chat_adder.json()["error"]["param"] == "model"


@pytest.mark.parametrize(
    "path",
    ["/v2/models/{name}", "/v2/models/{name}/ready", "/v2/models/{name}/versions/1", "/v2/models/{name}/versions/1/ready"],
)
def test_a_4096_character_model_name_is_a_400_on_every_route(llm_server: RunningServer, path: str) -> None:
    name = "m" * 4096
    with httpx.Client(base_url=llm_server.base_url, headers=llm_server.auth(), timeout=30) as client:
        response = client.get(path.format(name=name))
        assert response.status_code == 400 and "not a model name" in response.json()["error"]
        posted = client.post(f"/v2/models/{name}/infer", json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})
        assert posted.status_code == 400
        for route, body in (("/v1/embeddings", {"model": name[:128], "input": "x"}), ("/v1/completions", {"model": name[:128], "prompt": "x"})):
            answer = client.post(route, json=body)
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "model"
        assert client.post(f"/v2/repository/models/{name}/load").status_code == 400


def test_a_request_keep_alive_of_zero_unloads_the_model_after_the_answer(llm_server: RunningServer) -> None:
    with httpx.Client(base_url=llm_server.base_url, headers=llm_server.auth(), timeout=60) as client:
        answer = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": [5, 6], "max_tokens": 2, "keep_alive": 0})
        assert answer.status_code == 200
        deadline = time.monotonic() + 5
        while llm_server.state("tiny-llama") != "evicted" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert llm_server.state("tiny-llama") == "evicted"
        bad = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": [5], "keep_alive": "soon"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"
        again = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": [5, 6], "max_tokens": 2, "keep_alive": "10m"})
        assert again.status_code == 200 and llm_server.state("tiny-llama") == "ready"
        assert llm_server.status("tiny-llama").keep_alive_s == 600


def test_models_list_names_what_a_request_may_use_including_evicted_models(llm_server: RunningServer) -> None:
    with httpx.Client(base_url=llm_server.base_url, headers=llm_server.auth(), timeout=60) as client:
        client.post("/v1/completions", json={"model": "tiny-llama", "prompt": [5, 6], "max_tokens": 1, "keep_alive": 0})
        deadline = time.monotonic() + 5
        while llm_server.state("tiny-llama") != "evicted" and time.monotonic() < deadline:
            time.sleep(0.02)
        listed = [model["id"] for model in client.get("/v1/models").json()["data"]]
        assert listed == ["adder", "tiny-llama"], "an evicted model loads on its next request, so it is listed"
        client.post("/v2/repository/models/adder/unload")
        assert [model["id"] for model in client.get("/v1/models").json()["data"]] == ["tiny-llama"]
        client.post("/v2/repository/models/adder/load")

