"""The scale-out plan without a cluster: which deployments the Ray Serve application has, with
which replicas and resources, from the settings (`[scale]`) and the repository; `--replicas
MODEL=N`; the `serve deploy` config `appliance scale config` prints (valid for Ray's own
schema where Ray is installed); SQLite refused across nodes; `appliance.scale:app` builds from
the environment; the single-box server never loads Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import load_settings
from appliance.errors import ConfigError
from appliance.repository.store import ModelRepository
from appliance.scale.plan import (
    DIRECT_INGRESS_PROXY_PORT,
    HEAD_NODE_RESOURCE,
    INGRESS,
    SOURCE,
    check_database,
    controller_options,
    deployment_name,
    direct_ingress_environment,
    http_options,
    plan,
    serve_config,
    to_yaml,
    with_replicas,
)
from tests.helpers.server import ROOT, process_env
from tests.helpers.tiny_models import publish_adder, publish_embedder


@pytest.fixture
def repository(state_dir: Path) -> ModelRepository:
    repository = ModelRepository(state_dir / "models")
    publish_embedder(repository, "embed")
    publish_adder(repository, "adder")
    return repository


def test_one_deployment_per_model_with_the_configured_replicas_and_resources(state_dir: Path, repository: ModelRepository) -> None:
    settings = load_settings(
        state_dir=state_dir,
        scale={"models": {"embed": {"replicas": 3, "num_cpus": 0.5, "memory_bytes": 1 << 30}, "adder": {"max_replicas": 4, "target_ongoing_requests": 8}}},
        drain_grace_s=7,
    )
    current = plan(settings)
    assert current.deployments() == {"adder": deployment_name("adder"), "embed": deployment_name("embed")}
    embed = next(d for d in current.models if d.model == "embed")
    assert embed.options["num_replicas"] == 3 and "autoscaling_config" not in embed.options
    assert embed.options["ray_actor_options"] == {"num_cpus": 0.5, "memory": 1 << 30}
    assert embed.options["max_ongoing_requests"] == settings.batching.max_queue_size
    assert embed.options["graceful_shutdown_timeout_s"] == 7
    adder = next(d for d in current.models if d.model == "adder")
    assert "num_replicas" not in adder.options
    autoscaling = adder.options["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"], autoscaling["target_ongoing_requests"]) == (1, 4, 8)
    assert current.ingress["name"] == INGRESS and current.ingress["num_replicas"] == 1


def test_replicas_option_and_undeployed_models(state_dir: Path, repository: ModelRepository) -> None:
    settings = with_replicas(
        load_settings(state_dir=state_dir, scale={"models": {"adder": {"deploy": False}, "embed": {"max_replicas": 5}}}),
        ["embed=2"],
    )
    current = plan(settings)
    assert [d.model for d in current.models] == ["embed"]
    assert current.models[0].options["num_replicas"] == 2 and "autoscaling_config" not in current.models[0].options
    for wrong in ("embed", "embed=0", "Embed=2", "embed=x"):
        with pytest.raises(ConfigError, match="--replicas"):
            with_replicas(settings, [wrong])


def test_copy_mode_adds_the_repository_source_on_the_head_node(state_dir: Path, repository: ModelRepository) -> None:
    assert plan(load_settings(state_dir=state_dir)).source is None  # shared: every node mounts the repository
    copy = load_settings(
        state_dir=state_dir, scale={"model_files": "copy", "models": {"embed": {"replicas": 2, "max_replicas_per_node": 1}}}
    )
    current = plan(copy)
    assert current.source is not None and current.source["name"] == SOURCE and current.source["num_replicas"] == 1
    assert current.source["ray_actor_options"] == {"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}}
    embed = next(d for d in current.models if d.model == "embed")
    assert embed.options["max_replicas_per_node"] == 1
    document = serve_config(copy)
    assert [deployment["name"] for deployment in document["applications"][0]["deployments"]] == [INGRESS, SOURCE, "model-adder", "model-embed"]
    with pytest.raises(ConfigError, match="model_files"):
        load_settings(state_dir=state_dir, scale={"model_files": "rsync"})
    schema = pytest.importorskip("ray.serve.schema", reason="the `ray` extra checks the file against Ray's own schema", exc_type=ImportError)
    schema.ServeDeploySchema.model_validate(document)


def test_direct_ingress_pins_the_ingress_to_the_head_on_the_appliances_port(state_dir: Path, repository: ModelRepository) -> None:
    """`scale.ingress = "direct"` (the default): Ray Serve's controller and every deployment
    get the switch and a port range of exactly the appliance's port; the proxy Ray still
    starts takes a free port; the ingress runs on the head node, alone."""
    direct = load_settings(state_dir=state_dir, port=8100)
    environment = {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "8100",
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "8101",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }
    assert direct_ingress_environment(direct) == environment
    assert plan(direct).ingress["ray_actor_options"] == {"num_cpus": 1.0, "resources": {HEAD_NODE_RESOURCE: 0.001}}
    assert controller_options(direct) == {"runtime_env": {"env_vars": environment}}
    assert http_options(direct)["port"] == DIRECT_INGRESS_PROXY_PORT
    document = serve_config(direct)
    assert document["controller_options"] == {"runtime_env": {"env_vars": environment}}
    assert document["applications"][0]["runtime_env"]["env_vars"].items() >= environment.items()
    proxy = load_settings(state_dir=state_dir, port=8100, scale={"ingress": "proxy"})
    assert http_options(proxy) == {"host": "127.0.0.1", "port": 8100} and controller_options(proxy) is None
    assert direct_ingress_environment(proxy) == {} and plan(proxy).ingress["ray_actor_options"] == {"num_cpus": 1.0}
    with pytest.raises(ConfigError, match="needs ingress = \"proxy\""):
        load_settings(state_dir=state_dir, scale={"ingress_replicas": 2}, batch_api={"enabled": False})
    with pytest.raises(ConfigError, match="EveryNode"):
        load_settings(state_dir=state_dir, scale={"proxy_location": "EveryNode"})
    schema = pytest.importorskip("ray.serve.schema", reason="the `ray` extra checks the file against Ray's own schema", exc_type=ImportError)
    schema.ServeDeploySchema.model_validate(document)


def test_an_admins_saved_changes_override_the_configured_replicas_and_resources(state_dir: Path, repository: ModelRepository) -> None:
    from appliance.store.audit import AuditLog
    from appliance.store.db import Database
    from appliance.store.scale_models import ScaleModelChanges, saved_changes

    settings = load_settings(state_dir=state_dir, scale={"models": {"embed": {"replicas": 3, "max_replicas_per_node": 1}}})
    assert saved_changes(settings.db_url) == {}  # migrates a new database first
    database = Database(settings.db_url)
    chosen = settings.scale.model("embed").with_changes({"min_replicas": 1, "max_replicas": 4, "num_cpus": 0.5})
    ScaleModelChanges(database).set("embed", chosen, actor="alice", address="127.0.0.1")
    ScaleModelChanges(database).set("gone", settings.scale.model("gone"), actor="alice", address="127.0.0.1")  # since deleted
    [event] = [event for event in AuditLog(database).query() if event.target == "embed"]
    assert event.action == "scale.model" and event.actor == "alice" and "autoscaling 1-4 replicas" in event.detail
    database.close()
    current = plan(settings, changes=saved_changes(settings.db_url))
    embed = next(d for d in current.models if d.model == "embed")
    assert "num_replicas" not in embed.options and embed.options["autoscaling_config"]["max_replicas"] == 4
    assert embed.options["ray_actor_options"] == {"num_cpus": 0.5} and embed.options["max_replicas_per_node"] == 1
    assert current.served == {"adder": "tensor", "embed": "tensor"}
    with pytest.raises(ConfigError, match=r"scale.models.embed \(changed in the admin UI\)"):
        plan(settings, changes={"embed": {"min_replicas": 5, "max_replicas": 2}})


def test_settings_for_a_model_not_in_the_repository_are_refused_by_name(state_dir: Path, repository: ModelRepository) -> None:
    with pytest.raises(ConfigError, match="scale.models: ghost not in the model repository"):
        plan(load_settings(state_dir=state_dir, scale={"models": {"ghost": {"replicas": 2}}}))


def test_autoscaling_bounds_and_a_single_batch_runner_are_checked_in_the_settings(state_dir: Path) -> None:
    with pytest.raises(ConfigError, match="min_replicas"):
        load_settings(state_dir=state_dir, scale={"models": {"m": {"min_replicas": 3, "max_replicas": 2}}})
    with pytest.raises(ConfigError, match="needs max_replicas"):
        load_settings(state_dir=state_dir, scale={"models": {"m": {"min_replicas": 2}}})
    with pytest.raises(ConfigError, match="batch_api.enabled"):
        load_settings(state_dir=state_dir, scale={"ingress": "proxy", "ingress_replicas": 2})
    several = load_settings(state_dir=state_dir, scale={"ingress": "proxy", "ingress_replicas": 2}, batch_api={"enabled": False})
    assert several.scale.ingress_replicas == 2


def test_sqlite_only_while_every_replica_runs_on_one_node(state_dir: Path) -> None:
    sqlite = load_settings(state_dir=state_dir)
    check_database(sqlite, 1)
    with pytest.raises(ConfigError, match="PostgreSQL") as refused:
        check_database(sqlite, 3)
    assert refused.value.field == "database_url" and "3 nodes" in refused.value.message
    check_database(load_settings(state_dir=state_dir, database_url="postgresql+psycopg://appliance@db/appliance"), 3)


def test_scale_config_prints_a_serve_deploy_file(state_dir: Path, repository: ModelRepository) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "scale", "config", "--replicas", "embed=2", "--port", "8100"],
        cwd=ROOT, env=process_env(state_dir), text=True, capture_output=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "SQLite" in done.stdout  # the header warns: one node only
    assert "import_path: \"appliance.scale:app\"" in done.stdout
    yaml = pytest.importorskip("yaml", reason="PyYAML (installed with the `ray` extra) reads the config back")
    document = yaml.safe_load(done.stdout)
    assert document["http_options"] == {"host": "127.0.0.1", "port": DIRECT_INGRESS_PROXY_PORT}
    [application] = document["applications"]
    assert application["runtime_env"]["env_vars"]["APPLIANCE_STATE_DIR"] == str(state_dir)
    names = {deployment["name"]: deployment for deployment in application["deployments"]}
    assert set(names) == {INGRESS, "model-embed", "model-adder"} and names["model-embed"]["num_replicas"] == 2
    schema = pytest.importorskip("ray.serve.schema", reason="the `ray` extra checks the file against Ray's own schema", exc_type=ImportError)
    schema.ServeDeploySchema.model_validate(document)


def test_scale_config_carries_the_replicas_an_admin_saved(state_dir: Path, repository: ModelRepository) -> None:
    """A file written after an admin scaled a model on the Models page must not scale it back
    when `serve deploy`ed: the saved change wins over the configuration, as with `serve --ray`."""
    from appliance.config import ScaleModelSettings
    from appliance.store.db import Database
    from appliance.store.migrate import upgrade
    from appliance.store.scale_models import ScaleModelChanges

    database = Database(load_settings(state_dir=state_dir).db_url)
    try:
        upgrade(database)
        ScaleModelChanges(database).set("adder", ScaleModelSettings(replicas=3), actor="alice", address="local")
    finally:
        database.close()
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "scale", "config", "--replicas", "embed=2"],
        cwd=ROOT, env=process_env(state_dir), text=True, capture_output=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "# With the replica changes an admin saved for: adder (over the configuration's)." in done.stdout
    yaml = pytest.importorskip("yaml", reason="PyYAML (installed with the `ray` extra) reads the config back")
    [application] = yaml.safe_load(done.stdout)["applications"]
    names = {deployment["name"]: deployment for deployment in application["deployments"]}
    assert names["model-adder"]["num_replicas"] == 3 and names["model-embed"]["num_replicas"] == 2


def test_yaml_writer_round_trips_nested_values() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the output back")
    value = {"a": [{"b": 1, "c": {"d": "x: y", "e": [1, 2]}}, {"f": None}], "g": True, "h": 0.5, "i": {}, "j": []}
    assert yaml.safe_load(to_yaml(value)) == value


def test_the_ray_application_builds_from_the_environment(state_dir: Path, repository: ModelRepository) -> None:
    pytest.importorskip("ray", reason="the `ray` extra is not installed", exc_type=ImportError)
    code = (
        "import appliance.scale as scale\n"
        "app = scale.app\n"
        "print(type(app).__name__, sorted(app._bound_deployment.init_args[2]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=process_env(state_dir), text=True, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "Application ['adder', 'embed']"


def test_serve_without_the_ray_extra_or_with_replicas_alone_says_what_is_missing(state_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--replicas", "embed=2"],
        cwd=ROOT, env=process_env(state_dir), text=True, capture_output=True, timeout=60,
    )
    assert done.returncode == 2 and "--replicas needs --ray" in done.stderr
