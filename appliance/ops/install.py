"""Install, upgrade and remove the systemd service as a list of named, printable steps.

A plan is built first and executed second, so `--dry-run` prints exactly what a real run
does. `--root DIR` stages everything into DIR (packaging, tests): no user is created, no
systemctl runs, and the intended owners are recorded in sysusers.d/tmpfiles.d files (and
applied when running as root and the user exists). An upgrade is an install over an
existing one: the state directory, config and environment files are kept, the database is
migrated. Must never import the runtime, the APIs or the store: migrations come in as a callable.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from appliance.errors import InvalidInput, ServiceInstallError
from appliance.ops.service_files import (
    SERVICE_NAME,
    SERVICE_USER,
    ServicePaths,
    check_prefix,
    is_hidden_from_service,
    render_gpu_dropin,
    render_network_dropin,
    render_unit,
    sysusers_text,
    template_text,
    tmpfiles_text,
)

VenvMode = Literal["current", "create"]

#: Modes of what the installer writes (the process umask must not weaken them).
PUBLIC_FILE_MODE = 0o644
CONFIG_DIR_MODE = 0o750
CONFIG_FILE_MODE = 0o640
PRIVATE_DIR_MODE = 0o700
PREFIX_DIR_MODE = 0o755

#: A migration: (state dir as seen here, config file as seen here) -> revision reached.
Migrate = Callable[[Path, Path], str | None]


@dataclass(frozen=True)
class Step:
    """One thing the installer does, described the way `--dry-run` prints it."""

    description: str
    action: Callable[[], None]


@dataclass(frozen=True)
class InstallOptions:
    """What to install where; the CLI fills it from its options and what it detects."""

    paths: ServicePaths = field(default_factory=ServicePaths)
    venv_mode: VenvMode = "current"
    gpu: bool = False
    gpu_nodes: tuple[PurePosixPath, ...] = ()
    #: Client networks beyond the LAN ranges the unit allows (IPAddressAllow= drop-in).
    allow_networks: tuple[str, ...] = ()
    start: bool = True
    #: What `pip install` gets for `--venv create` (a path to the source tree, or a requirement).
    package_spec: str = "inference-appliance[cpu]"
    #: Interpreter a `--venv create` environment is built on.
    python: Path = Path(sys.executable)
    #: Environment `--venv current` links at PREFIX/venv.
    current_venv: Path = Path(sys.prefix)


def run_command(argv: Sequence[str]) -> None:
    """Run one external command; a failure becomes one readable line naming it."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ServiceInstallError(f"{argv[0]}: {exc.strerror}") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        last = detail[-1] if detail else "no output"
        raise ServiceInstallError(f"`{shlex.join(argv)}` exited {result.returncode}: {last}")


def user_exists(name: str = SERVICE_USER) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def interpreter_home(venv: Path) -> PurePosixPath | None:
    """Where a virtual environment's base interpreter lives (pyvenv.cfg `home`, resolved)."""
    try:
        lines = (venv / "pyvenv.cfg").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "home" and value.strip():
            return PurePosixPath(Path(value.strip()).resolve())
    return None


def base_prefix_of(python: Path) -> PurePosixPath | None:
    """The installation a Python interpreter belongs to (its sys.base_prefix, resolved)."""
    if python == Path(sys.executable):
        return PurePosixPath(Path(sys.base_prefix).resolve())
    try:
        result = subprocess.run(
            [str(python), "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0 or not result.stdout.strip():
        return None
    return PurePosixPath(Path(result.stdout.strip()).resolve())


def systemd_is_running() -> bool:
    """sd_booted(3): systemd is PID 1 exactly when /run/systemd/system exists."""
    return Path("/run/systemd/system").is_dir()


def _write(path: Path, text: str, mode: int) -> None:
    """Write atomically (temp file, fsync, rename) with an exact mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temporary, mode)
    os.replace(temporary, path)


class ServiceInstaller:
    """Builds install/uninstall plans for one set of paths; `execute()` runs a plan."""

    def __init__(
        self,
        options: InstallOptions,
        *,
        migrate: Migrate | None = None,
        run: Callable[[Sequence[str]], None] = run_command,
        systemd_running: bool | None = None,
    ) -> None:
        self.options = options
        self.paths = options.paths
        self.migrate = migrate
        self.run = run
        self.systemd_running = systemd_is_running() if systemd_running is None else systemd_running
        check_prefix(self.paths.prefix)

    # ---- helpers -------------------------------------------------------------------------
    def _here(self, path: PurePosixPath) -> Path:
        return self.paths.on_disk(path)

    def _can_chown(self) -> bool:
        """Ownership is applied when root can name the user; in --root mode it is only recorded."""
        return os.geteuid() == 0 and user_exists()

    def _chown(self, path: Path, user: str, group: str, *, recursive: bool = False) -> None:
        if not self._can_chown():
            return
        uid = pwd.getpwnam(user).pw_uid if user != "root" else 0
        gid = grp.getgrnam(group).gr_gid
        targets = [path]
        if recursive:
            targets.extend(Path(top) / name for top, dirs, files in os.walk(path) for name in dirs + files)
        for target in targets:
            os.chown(target, uid, gid, follow_symlinks=False)

    def _systemctl(self, *args: str) -> Step | None:
        if self.paths.staging or not self.systemd_running:
            return None
        argv = ["systemctl", *args]
        return Step(f"run `{shlex.join(argv)}`", lambda: self.run(argv))

    # ---- install -------------------------------------------------------------------------
    def plan_install(self) -> list[Step]:
        """Every step of an install (or an upgrade over an existing install), in order."""
        steps: list[Step] = self._venv_checks()
        steps.extend(self._user_steps())
        steps.extend(self._directory_steps())
        steps.append(self._venv_step())
        steps.extend(self._file_steps())
        if self.migrate is not None:
            steps.append(self._migration_step())
        steps.extend(self._activation_steps())
        return steps

    def _venv_problem(self) -> InvalidInput | None:
        """Why the chosen environment could not run under the unit (ProtectHome=, PrivateTmp=)."""
        options = self.options
        if options.venv_mode == "current":
            current = PurePosixPath(options.current_venv.resolve())
            if is_hidden_from_service(current):
                return InvalidInput(
                    f"venv: the current environment {current} is hidden from the service "
                    "(ProtectHome=/PrivateTmp=); use --venv create",
                    field="venv",
                )
            home = interpreter_home(options.current_venv)
        else:
            home = base_prefix_of(options.python)
        if home is not None and is_hidden_from_service(home):
            return InvalidInput(
                f"python: the environment's interpreter lives in {home}, which the service cannot see "
                "(ProtectHome=/PrivateTmp=); use --venv create --python with a system Python such as /usr/bin/python3",
                field="python",
            )
        return None

    def _venv_checks(self) -> list[Step]:
        """Refuse an environment the service cannot run; when only staging, say so and go on."""
        problem = self._venv_problem()
        if problem is None:
            return []
        if not self.paths.staging:
            raise problem
        return [Step(f"warning: {problem} (staging continues; a real install refuses this)", lambda: None)]

    def _user_steps(self) -> list[Step]:
        paths = self.paths
        steps = [
            Step(
                f"record system user '{SERVICE_USER}' in {paths.sysusers_file}",
                lambda: _write(self._here(paths.sysusers_file), sysusers_text(), PUBLIC_FILE_MODE),
            )
        ]
        if not paths.staging and not user_exists():
            argv = [
                "useradd", "--system", "--user-group", "--home-dir", str(paths.state_dir), "--no-create-home",
                "--shell", "/usr/sbin/nologin", "--comment", "Inference appliance", SERVICE_USER,
            ]  # fmt: skip
            steps.append(Step(f"create system user '{SERVICE_USER}' (`{shlex.join(argv)}`)", lambda: self.run(argv)))
        return steps

    def _directory_steps(self) -> list[Step]:
        paths = self.paths

        def make_dirs() -> None:
            prefix = self._here(paths.prefix)
            prefix.mkdir(parents=True, exist_ok=True)
            os.chmod(prefix, PREFIX_DIR_MODE)
            config = self._here(paths.config_dir)
            config.mkdir(parents=True, exist_ok=True)
            os.chmod(config, CONFIG_DIR_MODE)
            self._chown(config, "root", SERVICE_USER)
            for private in paths.private_dirs:
                here = self._here(private)
                here.mkdir(parents=True, exist_ok=True)
                os.chmod(here, PRIVATE_DIR_MODE)
                self._chown(here, SERVICE_USER, SERVICE_USER, recursive=True)
            _write(self._here(paths.tmpfiles_file), tmpfiles_text(paths), PUBLIC_FILE_MODE)

        private = ", ".join(str(p) for p in paths.private_dirs)
        return [
            Step(
                f"create {paths.prefix} (0755 root), {paths.config_dir} (0750 root:{SERVICE_USER}), "
                f"{private} (0700 {SERVICE_USER}; existing contents kept); record them in {paths.tmpfiles_file}",
                make_dirs,
            )
        ]

    def _venv_step(self) -> Step:
        paths = self.paths
        venv_here = self._here(paths.venv)
        if self.options.venv_mode == "current":
            current = self.options.current_venv.resolve()
            if venv_here.resolve() == current:
                return Step(f"use the environment at {paths.venv} (already in place)", lambda: None)

            def link() -> None:
                if venv_here.exists() and not venv_here.is_symlink():
                    raise ServiceInstallError(
                        f"venv: {paths.venv} is a real environment; upgrade it with --venv create"
                    )
                venv_here.parent.mkdir(parents=True, exist_ok=True)
                if venv_here.is_symlink():
                    venv_here.unlink()
                venv_here.symlink_to(current, target_is_directory=True)

            return Step(f"link {paths.venv} -> {current} (the current environment)", link)

        spec = self.options.package_spec

        def create() -> None:
            if venv_here.is_symlink():
                # It was a link to another environment (--venv current before): never install into that.
                venv_here.unlink()
            old_umask = os.umask(0o022)
            try:
                if not (venv_here / "bin" / "python").exists():
                    self.run([str(self.options.python), "-m", "venv", str(venv_here)])
                pip = [str(venv_here / "bin" / "python"), "-m", "pip", "install", "--quiet", "--upgrade"]
                self.run([*pip, "pip"])
                self.run([*pip, spec])
            finally:
                os.umask(old_umask)
            if paths.staging:
                _retarget_scripts(venv_here / "bin", str(venv_here), str(paths.venv))

        return Step(f"create or upgrade the environment {paths.venv} and `pip install {spec}`", create)

    def _file_steps(self) -> list[Step]:
        paths = self.paths
        options = self.options
        steps = [
            Step(
                f"write {paths.unit_file} (ExecStart={paths.executable} serve)",
                lambda: _write(self._here(paths.unit_file), render_unit(paths.prefix), PUBLIC_FILE_MODE),
            )
        ]
        gpu_here = self._here(paths.gpu_dropin)
        if options.gpu:
            nodes = list(options.gpu_nodes)
            steps.append(
                Step(
                    f"write {paths.gpu_dropin} (DeviceAllow= for the NVIDIA devices)",
                    lambda: _write(gpu_here, render_gpu_dropin(nodes), PUBLIC_FILE_MODE),
                )
            )
        elif gpu_here.exists():
            steps.append(Step(f"remove {paths.gpu_dropin} (no GPU)", lambda: gpu_here.unlink()))
        if options.allow_networks:
            network_text = render_network_dropin(list(options.allow_networks))
            steps.append(
                Step(
                    f"write {paths.network_dropin} (IPAddressAllow= {' '.join(options.allow_networks)})",
                    lambda: _write(self._here(paths.network_dropin), network_text, PUBLIC_FILE_MODE),
                )
            )
        elif self._here(paths.network_dropin).exists():
            steps.append(Step(f"keep {paths.network_dropin} (client networks allowed earlier)", lambda: None))
        for target, template in ((paths.env_file, "appliance.env"), (paths.config_file, "appliance.toml")):
            steps.append(self._config_file_step(target, template))
        return steps

    def _config_file_step(self, target: PurePosixPath, template: str) -> Step:
        here = self._here(target)

        def write_if_missing() -> None:
            if not here.exists():
                _write(here, template_text(template), CONFIG_FILE_MODE)
            self._chown(here, "root", SERVICE_USER)

        verb = "keep" if here.exists() else "write"
        return Step(f"{verb} {target} (0640 root:{SERVICE_USER}; never overwritten)", write_if_missing)

    def _migration_step(self) -> Step:
        paths = self.paths
        migrate = self.migrate
        assert migrate is not None
        state_here = self._here(paths.state_dir)

        def run_migrations() -> None:
            # The service runs with UMask=0077; a database made here must be as private.
            old_umask = os.umask(0o077)
            try:
                migrate(state_here, self._here(paths.config_file))
            finally:
                os.umask(old_umask)
            self._chown(state_here, SERVICE_USER, SERVICE_USER, recursive=True)

        return Step(f"migrate the database in {paths.state_dir} to the newest schema", run_migrations)

    def _activation_steps(self) -> list[Step]:
        if self.paths.staging:
            return []
        if not self.systemd_running:
            return [Step("systemd is not running here: daemon-reload, enable and start skipped", lambda: None)]
        steps = [self._systemctl("daemon-reload")]
        if self.options.start:
            steps.append(self._systemctl("enable", f"{SERVICE_NAME}.service"))
            # restart, not start: an upgrade must load the new code and unit.
            steps.append(self._systemctl("restart", f"{SERVICE_NAME}.service"))
        return [step for step in steps if step is not None]

    # ---- uninstall -----------------------------------------------------------------------
    def plan_uninstall(self, *, purge: bool) -> list[Step]:
        """Stop and remove the service; models, database and config stay unless `purge`."""
        paths = self.paths
        steps: list[Step] = []
        stop = self._systemctl("disable", "--now", f"{SERVICE_NAME}.service")
        if stop is not None:
            steps.append(stop)
        steps.append(Step(f"remove {paths.unit_file} and {paths.dropin_dir}", self._remove_unit))
        reload = self._systemctl("daemon-reload")
        if reload is not None:
            steps.append(reload)
        steps.append(Step(f"remove {paths.venv} and {paths.prefix} if empty", self._remove_venv))
        if not purge:
            kept = ", ".join(str(p) for p in (paths.state_dir, paths.config_dir))
            steps.append(Step(f"keep {kept} (models, database, config; --purge removes them)", lambda: None))
            return steps
        for directory in (*paths.private_dirs, paths.config_dir):
            here = self._here(directory)
            steps.append(Step(f"delete {directory}", lambda here=here: shutil.rmtree(here, ignore_errors=True)))
        for record in (paths.sysusers_file, paths.tmpfiles_file):
            here = self._here(record)
            steps.append(Step(f"delete {record}", lambda here=here: here.unlink(missing_ok=True)))
        if not paths.staging and user_exists():
            argv = ["userdel", SERVICE_USER]
            steps.append(Step(f"delete system user '{SERVICE_USER}' (`userdel {SERVICE_USER}`)", lambda: self.run(argv)))
        return steps

    def _remove_unit(self) -> None:
        self._here(self.paths.unit_file).unlink(missing_ok=True)
        shutil.rmtree(self._here(self.paths.dropin_dir), ignore_errors=True)

    def _remove_venv(self) -> None:
        venv = self._here(self.paths.venv)
        if venv.is_symlink():
            venv.unlink()
        elif venv.is_dir():
            shutil.rmtree(venv)
        prefix = self._here(self.paths.prefix)
        if prefix.is_dir() and not any(prefix.iterdir()):
            prefix.rmdir()


def execute(steps: Sequence[Step], *, dry_run: bool, echo: Callable[[str], None]) -> None:
    """Print each step; run it unless `dry_run`. The first failure names its step and stops."""
    for number, step in enumerate(steps, start=1):
        echo(f"{number:2d}. {step.description}")
        if dry_run:
            continue
        try:
            step.action()
        except ServiceInstallError as exc:
            raise ServiceInstallError(f"step {number} ({step.description}) failed: {exc}") from None
        except OSError as exc:
            raise ServiceInstallError(
                f"step {number} ({step.description}) failed: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
            ) from None


def _retarget_scripts(bin_dir: Path, staged_venv: str, final_venv: str) -> None:
    """Point the staged environment's script shebangs at where the environment will live."""
    staged = f"#!{staged_venv}/".encode()
    final = f"#!{final_venv}/".encode()
    if not bin_dir.is_dir():
        return
    for script in bin_dir.iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        content = script.read_bytes()
        if content.startswith(staged):
            script.write_bytes(final + content[len(staged) :])
