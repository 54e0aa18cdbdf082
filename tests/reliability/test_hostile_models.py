"""Models as an attack surface: files placed in the repository (or handed to the export stage)
that try to make the appliance read outside their folder or allocate what they do not hold.

- ONNX external data pointing outside the version folder (`../`, absolute, a symlinked file,
  a symlinked directory on the way): the model is marked failed with the reason, the others
  serve, and no process ever opens the target (it is a FIFO: any open would show up).
- Tensors declaring absurd sizes over a few stored bytes (inline and external): refused by
  the appliance's own check, before ONNX Runtime sees the file.
- Safetensors and GGUF headers that lie: refused by the export stage with one clear error.
- Archives: no input of the appliance takes an archive (sources are folders, .gguf, .onnx
  files and installed packages), so there is no archive path traversal to test; the check
  below pins that the export sources stay archive-free.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
import time
from pathlib import Path

import httpx
import onnx
import pytest
from onnx import TensorProto, helper

from appliance.errors import ApplianceError
from appliance.repository.manifest import TensorSpec
from appliance.repository.store import ModelRepository
from tests.helpers.server import running_server
from tests.helpers.tiny_models import _manifest, _report, publish_adder

OPSET = 17
ABSURD_ROWS = 1 << 38


def _publish_with_initializer(repository: ModelRepository, name: str, tensor: TensorProto, files: dict[str, bytes] | None = None) -> Path:
    """A one-Add model whose constant operand is `tensor`, published with `files` beside it."""
    staged = repository.staging_dir()
    for file_name, data in (files or {}).items():
        (staged / file_name).write_bytes(data)
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "W"], ["Y"])],
        name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[tensor],
    )
    model = helper.make_model(graph)
    model.opset_import[0].version = OPSET
    model.ir_version = 8
    onnx.save(model, str(staged / "model.onnx"))
    manifest = _manifest(name, [TensorSpec(name="X", datatype="FP32", shape=[-1, 4])], [TensorSpec(name="Y", datatype="FP32", shape=[-1, 4])])
    return repository.publish(staged, manifest, _report()).path


def _external(location: str, length: int = 16, dims: tuple[int, ...] = (4,)) -> TensorProto:
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=list(dims))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


class FifoCanary:
    """A FIFO outside the repository: a reader opening it is seen from here (a non-blocking
    write-open succeeds only while someone has it open for reading)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.opened = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.002)
                continue
            self.opened = True
            os.close(fd)  # the reader sees end-of-file and moves on

    def stop(self) -> bool:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.opened


def test_external_data_leaving_the_folder_fails_that_model_only_and_nothing_outside_is_opened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    repository = ModelRepository(state / "models")
    publish_adder(repository)
    outside = tmp_path / "outside"
    outside.mkdir()
    canary = FifoCanary(outside / "weights.bin")
    _publish_with_initializer(repository, "dotdot", _external("../../../../outside/weights.bin"))
    _publish_with_initializer(repository, "absolute", _external(str(outside / "weights.bin")))
    linked = _publish_with_initializer(repository, "linked-file", _external("w.bin"), {"w.bin": b"\0" * 16})
    (linked / "w.bin").unlink()
    (linked / "w.bin").symlink_to(outside / "weights.bin")
    via_dir = _publish_with_initializer(repository, "linked-dir", _external("data/w.bin"))
    (via_dir / "data").symlink_to(outside, target_is_directory=True)
    try:
        with running_server(state) as server:
            index = {e["name"]: e for e in httpx.post(server.url("/v2/repository/index"), headers=server.auth(), timeout=30).json()}
            ok = httpx.post(
                server.url("/v2/models/adder/infer"),
                json={"inputs": [{"name": n, "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]} for n in ("INPUT0", "INPUT1")]},
                headers=server.auth(), timeout=30,
            )
    finally:
        opened = canary.stop()
    assert ok.status_code == 200
    reasons = {name: index[name]["reason"] or "" for name in ("dotdot", "absolute", "linked-file", "linked-dir")}
    assert all(index[name]["state"] == "UNAVAILABLE" and "failed to load" in reasons[name] for name in reasons), index
    assert "leaves the version folder" in reasons["dotdot"]
    assert "must be a relative path" in reasons["absolute"]
    assert "symbolic link" in reasons["linked-file"] and "symbolic link" in reasons["linked-dir"]
    assert not opened, "a file outside the repository was opened"
    assert stat.S_ISFIFO(os.stat(outside / "weights.bin").st_mode)


@pytest.mark.parametrize("where", ["inline", "external"])
def test_tensor_declaring_terabytes_over_a_few_bytes_is_refused_before_any_allocation(state_dir: Path, where: str) -> None:
    repository = ModelRepository(state_dir / "models")
    publish_adder(repository)
    if where == "inline":
        tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[ABSURD_ROWS, 4], raw_data=b"\0" * 16)
        _publish_with_initializer(repository, "absurd", tensor)
    else:
        _publish_with_initializer(repository, "absurd", _external("w.bin", dims=(ABSURD_ROWS, 4)), {"w.bin": b"\0" * 16})
    with running_server(state_dir) as server:
        state = server.status("absurd")
        assert state.state.value == "UNAVAILABLE" and "failed to load" in state.reason
        assert f"declares {ABSURD_ROWS * 16} bytes but 16 are stored" in state.reason
        assert server.state("adder") == "ready"


def _safetensors(path: Path, header: dict[str, object], data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "header, data, fragment",
    [
        ({"w": {"dtype": "F32", "shape": [ABSURD_ROWS, 4], "data_offsets": [0, 16]}}, b"\0" * 16, "declares shape"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, b"\0" * 16, "impossible offsets"),
        ({"w": {"dtype": "F32", "shape": [ABSURD_ROWS], "data_offsets": [0, ABSURD_ROWS * 4]}}, b"\0" * 16, "truncated"),
    ],
)
def test_safetensors_headers_that_lie_are_refused_with_one_clear_error(tmp_path: Path, header: dict[str, object], data: bytes, fragment: str) -> None:
    from appliance.export.sources.hf_folder import check_safetensors

    path = tmp_path / "model.safetensors"
    _safetensors(path, header, data)
    with pytest.raises(ApplianceError) as refused:
        check_safetensors(path)
    assert fragment in refused.value.message and "\n" not in refused.value.message


def test_safetensors_header_length_beyond_the_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    from appliance.export.sources.hf_folder import check_safetensors

    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    with pytest.raises(ApplianceError, match="header length"):
        check_safetensors(path)


def test_gguf_declaring_absurd_counts_is_refused_before_allocating(tmp_path: Path) -> None:
    """A GGUF header claiming 2^60 tensors and 2^60 metadata entries in a 32-byte file."""
    from appliance.export.llm.gguf_header import read_gguf_header

    path = tmp_path / "lies.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", 1 << 60) + struct.pack("<Q", 1 << 60) + b"\0" * 8)
    with pytest.raises(ApplianceError) as refused:
        read_gguf_header(path)
    assert "\n" not in refused.value.message


def test_no_export_source_unpacks_archives() -> None:
    """Path traversal through archives cannot happen while no source opens one; this pins it."""
    import appliance.export.sources as sources

    folder = Path(sources.__file__).parent
    text = "\n".join(path.read_text() for path in folder.glob("*.py"))
    assert "tarfile" not in text and "zipfile" not in text and "unpack_archive" not in text
