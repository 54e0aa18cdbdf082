"""Scale-out copy mode without a cluster (appliance/scale/files.py and mirror.py): a node's copy
of a model is the repository's serving version, fetched in chunks and SHA-256-verified before it
is renamed into place; a damaged local file is found when a replica starts and fetched again; a
mismatch after transfer names the file and installs nothing; a newly published or re-defaulted
version replaces the copy at the next repository poll and is served from it; the repository's
checksums are cached beside each version and follow its changes; chunks never leave a version
folder. The repository's side runs in-process here (on a cluster it is the `repository`
deployment, tests/test_scale_ray.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from appliance.config import load_settings
from appliance.errors import ChecksumMismatch, ModelCopyFailed
from appliance.repository.checksums import digest_cache_path, sha256_file, version_digests
from appliance.repository.store import STAGING_DIR, ModelRepository
from appliance.scale import mirror as mirror_module
from appliance.scale.files import MAX_CHUNK_BYTES, RepositoryFiles
from appliance.scale.mirror import COPY_DIR_ENVIRONMENT, MirroredWatch, NodeMirror, copy_root
from tests.helpers.serving import model_service
from tests.helpers.tiny_models import publish_adder, publish_embedder

EMBED = "tiny-embed"
#: Small chunks, so even the tiny models travel in many of them (and the fetch window fills).
TEST_CHUNK_BYTES = 256


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mirror_module, "CHUNK_BYTES", TEST_CHUNK_BYTES)


@pytest.fixture
def repository(state_dir: Path) -> ModelRepository:
    repository = ModelRepository(state_dir / "models")
    publish_embedder(repository, EMBED)
    return repository


def files_of(state_dir: Path) -> RepositoryFiles:
    return RepositoryFiles(load_settings(state_dir=state_dir))


def same_files(left: Path, right: Path) -> bool:
    names = sorted(path.relative_to(left).as_posix() for path in left.rglob("*") if path.is_file())
    others = sorted(path.relative_to(right).as_posix() for path in right.rglob("*") if path.is_file())
    return names == others and all((left / name).read_bytes() == (right / name).read_bytes() for name in names)


def damage(path: Path) -> None:
    """Flip one byte in the middle, keeping size and mtime (bit rot, not an edit)."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_version_is_copied_in_chunks_verified_and_readable_as_a_repository(state_dir: Path, repository: ModelRepository, tmp_path: Path) -> None:
    root = tmp_path / "node-copy"
    report = asyncio.run(NodeMirror(root, EMBED, files_of(state_dir)).sync())
    source = repository.get(EMBED, 1).path
    assert same_files(source, root / EMBED / "1")
    assert sorted(report.fetched) == sorted(f"1/{path.name}" for path in source.iterdir())
    assert report.bytes_copied == sum(path.stat().st_size for path in source.iterdir()) > 4 * mirror_module.FETCH_WINDOW * TEST_CHUNK_BYTES
    assert report.mismatched == [] and report.removed == []
    assert ModelRepository(root).serving_version(EMBED).version == 1  # type: ignore[union-attr]
    assert list((root / STAGING_DIR).iterdir()) == [], "a staging folder was left behind"
    assert digest_cache_path(source).is_file(), "the repository's checksums were not cached beside the version"
    again = asyncio.run(NodeMirror(root, EMBED, files_of(state_dir)).sync())
    assert again.fetched == [], "a complete, matching copy was fetched again"


def test_a_damaged_local_file_is_found_at_start_and_fetched_again(state_dir: Path, repository: ModelRepository, tmp_path: Path) -> None:
    root = tmp_path / "node-copy"
    asyncio.run(NodeMirror(root, EMBED, files_of(state_dir)).sync())
    copy = root / EMBED / "1"
    untouched = (copy / "tokenizer.json").stat().st_ino
    damage(copy / "model.onnx")
    report = asyncio.run(NodeMirror(root, EMBED, files_of(state_dir)).sync())  # a replica starting on this node
    assert report.mismatched == ["1/model.onnx"] and report.fetched == ["1/model.onnx"]
    assert same_files(repository.get(EMBED, 1).path, copy)
    assert (copy / "tokenizer.json").stat().st_ino == untouched, "a matching file was copied instead of kept"


def test_a_mismatch_after_transfer_names_the_file_and_installs_nothing(state_dir: Path, repository: ModelRepository, tmp_path: Path) -> None:
    root = tmp_path / "node-copy"
    files = files_of(state_dir)
    wanted = asyncio.run(files.wanted(EMBED))
    damage(repository.get(EMBED, 1).path / "model.onnx")  # the bytes sent are no longer the ones hashed
    with pytest.raises(ChecksumMismatch, match=r"tiny-embed version 1: model\.onnx does not match the repository's SHA-256"):
        asyncio.run(NodeMirror(root, EMBED, files).sync(wanted))
    assert not (root / EMBED / "1").exists(), "a version that failed its checksum was installed"
    assert list((root / STAGING_DIR).iterdir()) == []


def test_a_new_version_is_copied_at_the_next_poll_and_served_from_the_copy(state_dir: Path, tmp_path: Path) -> None:
    repository = ModelRepository(state_dir / "models")
    publish_adder(repository)
    node = tmp_path / "node"  # the node's own state: its models folder is the copy
    mirror = NodeMirror(node / "models", "adder", files_of(state_dir))

    async def scenario() -> None:
        await mirror.sync()
        service = model_service(node, repository_poll_s=0)
        await service.start()
        try:
            async with mirror.reading():
                assert (await service.load("adder")).loaded_version == 1
            watch = MirroredWatch(service, 60.0, mirror)
            publish_adder(repository)  # `appliance export` on the head
            await watch.poll_once()
            assert service.status("adder").loaded_version == 2
            assert sorted(path.name for path in (node / "models" / "adder").iterdir() if not path.name.startswith(".")) == ["2"]
            repository.set_default("adder", 1)  # `appliance models set-default adder 1` on the head
            await watch.poll_once()
            assert service.status("adder").loaded_version == 1
        finally:
            await service.close(0.0)

    asyncio.run(scenario())
    assert same_files(repository.get("adder", 1).path, node / "models" / "adder" / "1")


def test_the_checksum_cache_is_reused_and_follows_a_rewritten_manifest(state_dir: Path, repository: ModelRepository) -> None:
    version = repository.get(EMBED, 1).path
    first = version_digests(version)
    cache = digest_cache_path(version)
    written = cache.stat().st_mtime_ns
    assert version_digests(version) == first and cache.stat().st_mtime_ns == written, "unchanged files were hashed again"
    repository.set_deployable(EMBED, 1, False)  # rewrites manifest.json
    changed = version_digests(version)
    assert changed["manifest.json"].sha256 == sha256_file(version / "manifest.json") != first["manifest.json"].sha256
    assert {name: digest for name, digest in changed.items() if name != "manifest.json"} == {
        name: digest for name, digest in first.items() if name != "manifest.json"
    }
    repository.delete(EMBED, 1)
    assert not cache.exists(), "the checksum cache outlived its version"


def test_chunks_never_leave_a_version_folder(state_dir: Path, repository: ModelRepository) -> None:
    files = files_of(state_dir)
    for path in ("../../appliance.db", "/etc/passwd", "a//b", ""):
        with pytest.raises(ModelCopyFailed):
            asyncio.run(files.chunk(EMBED, 1, path, 0, 10))
    with pytest.raises(ModelCopyFailed, match="at most"):
        asyncio.run(files.chunk(EMBED, 1, "model.onnx", 0, MAX_CHUNK_BYTES + 1))
    assert asyncio.run(files.chunk(EMBED, 1, "model.onnx", 0, 4)) == (repository.get(EMBED, 1).path / "model.onnx").read_bytes()[:4]


def test_a_node_may_name_its_own_copy_folder(state_dir: Path) -> None:
    settings = load_settings(state_dir=state_dir)
    assert copy_root(settings, {}) == state_dir / "node-models"
    assert copy_root(settings, {COPY_DIR_ENVIRONMENT: "/srv/models-copy"}) == Path("/srv/models-copy")
    assert copy_root(load_settings(state_dir=state_dir, scale={"copy_dir": "/data/copy"}), {}) == Path("/data/copy")
