"""Static checks of the docker compose stack: schema, exposure, secrets and wiring.

No Docker engine runs in CI, so these tests read the files only. The Compose
Specification JSON schema comes from an installed package (check-jsonschema vendors it
as ``compose-spec.json``) or from the file named by ``GENRE_SEARCH_COMPOSE_SCHEMA``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

REPOSITORY = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPOSITORY / "docker-compose.yml"
CPU_OVERRIDE_FILE = REPOSITORY / "docker" / "compose.cpu.yml"
ENV_EXAMPLE_FILE = REPOSITORY / ".env.example"
DOCKERFILE = REPOSITORY / "Dockerfile"

SCHEMA_ENV_VARIABLE = "GENRE_SEARCH_COMPOSE_SCHEMA"
# (distribution, file inside it) pairs that ship the Compose Specification schema.
SCHEMA_DISTRIBUTIONS = (
    ("check-jsonschema", "check_jsonschema/builtin_schemas/vendor/compose-spec.json"),
    ("docker-compose", "compose/config/compose_spec.json"),
)
WORKER_ENV_NAMES = {
    "GENRE_SEARCH_STORAGE",
    "GENRE_SEARCH_TRACKING_URI",
    "GENRE_SEARCH_DATA",
    "GENRE_SEARCH_CACHE_DIR",
}
TEST_PASSWORD = "compose-test-password"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error} and ${NAME?error}. A
# doubled $$ is an escaped dollar sign and starts no reference.
_REFERENCE = re.compile(
    r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?])(?P<argument>[^}]*))?\}"
)
_BARE_REFERENCE = re.compile(r"(?<!\$)\$(?P<name>[A-Za-z_][A-Za-z0-9_]*)")
_ONLY_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}")
_URL_PASSWORD = re.compile(r"://[^/\s:@]+:(?P<password>\$\{[^}]*\}|[^@\s]+)@")
_SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY", re.IGNORECASE)


class _ComposeLoader(yaml.SafeLoader):  # type: ignore[misc,unused-ignore]
    """SafeLoader that also accepts the Compose ``!reset`` and ``!override`` tags."""


def _construct_compose_tag(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    raise yaml.constructor.ConstructorError(
        None, None, f"unexpected node {node!r}", node.start_mark
    )


_ComposeLoader.add_constructor("!reset", _construct_compose_tag)
_ComposeLoader.add_constructor("!override", _construct_compose_tag)


def _load_yaml(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as stream:
        # _ComposeLoader is a SafeLoader, so this constructs no arbitrary objects.
        document = yaml.load(stream, Loader=_ComposeLoader)
    assert isinstance(document, dict), f"{path} must contain a YAML mapping"
    return document


def _env_example() -> dict[str, tuple[str, str]]:
    """Map each variable of .env.example to (value, comment lines right above it)."""
    entries: dict[str, tuple[str, str]] = {}
    comment: list[str] = []
    for line in ENV_EXAMPLE_FILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped:
            comment = []
        elif stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
        else:
            name, _, value = stripped.partition("=")
            entries[name.strip()] = (value.strip(), " ".join(comment))
            comment = []
    return entries


def _substitute(text: str, environment: Mapping[str, str]) -> str:
    """Apply Compose variable interpolation to one string."""

    def replace(match: re.Match[str]) -> str:
        name, operator, argument = match["name"], match["operator"], match["argument"]
        value = environment.get(name)
        unset = value is None or (value == "" and operator is not None and operator[0] == ":")
        if not unset:
            return value or ""
        if operator is not None and operator.endswith("?"):
            raise ValueError(f"Required variable is missing: {name} ({argument})")
        return argument if operator is not None else ""

    return _REFERENCE.sub(replace, text).replace("$$", "$")


def _interpolate(document: Any, environment: Mapping[str, str]) -> Any:
    if isinstance(document, str):
        return _substitute(document, environment)
    if isinstance(document, list):
        return [_interpolate(item, environment) for item in document]
    if isinstance(document, dict):
        return {key: _interpolate(value, environment) for key, value in document.items()}
    return document


def _example_environment() -> dict[str, str]:
    environment = {name: value for name, (value, _) in _env_example().items() if value}
    environment["POSTGRES_PASSWORD"] = TEST_PASSWORD
    return environment


def _find_schema() -> Path | None:
    configured = os.environ.get(SCHEMA_ENV_VARIABLE, "").strip()
    if configured:
        path = Path(configured)
        if not path.is_file():
            pytest.fail(f"{SCHEMA_ENV_VARIABLE}={configured!r} is not a file. Fix or unset it.")
        return path

    for distribution_name, relative_path in SCHEMA_DISTRIBUTIONS:
        try:
            distribution = importlib.metadata.distribution(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        path = Path(str(distribution.locate_file(relative_path)))
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    path = _find_schema()
    if path is None:
        pytest.skip(
            "Compose Specification schema not found: pip install check-jsonschema "
            f"(it ships compose-spec.json) or set {SCHEMA_ENV_VARIABLE} to the schema file."
        )
    schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return schema


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    services: dict[str, Any] = compose["services"]
    return services


@pytest.fixture(scope="module")
def resolved_services(compose: dict[str, Any]) -> dict[str, Any]:
    """Services after interpolation with the .env.example values and a test password."""
    resolved: dict[str, Any] = _interpolate(compose, _example_environment())["services"]
    return resolved


def _schema_errors(document: Any, schema: dict[str, Any]) -> list[str]:
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    errors = sorted(validator.iter_errors(document), key=lambda error: list(error.path))
    return [f"{'/'.join(map(str, error.path)) or '<root>'}: {error.message}" for error in errors]


def _environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        return dict(entry.partition("=")[::2] for entry in environment)
    return {str(name): str(value) for name, value in environment.items()}


def _published_ports(services: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for service_name, service in services.items():
        for port in service.get("ports", []):
            yield service_name, port


def _strings_in(document: Any) -> Iterator[str]:
    if isinstance(document, str):
        yield document
    elif isinstance(document, list):
        for item in document:
            yield from _strings_in(item)
    elif isinstance(document, dict):
        for value in document.values():
            yield from _strings_in(value)


def _mounts(service: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Return (source, target, mode) of each volume of an interpolated service."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mode = "ro" if volume.get("read_only") else "rw"
            mounts.append((str(volume.get("source", "")), str(volume["target"]), mode))
        else:
            source, target, *options = str(volume).split(":")
            mounts.append((source, target, options[0] if options else "rw"))
    return mounts


def _variables_used(text: str) -> set[str]:
    return {match["name"] for match in _REFERENCE.finditer(text)}


# --------------------------------------------------------------------------------------
# Compose Specification schema
# --------------------------------------------------------------------------------------


def test_compose_file_matches_schema(
    compose: dict[str, Any], compose_schema: dict[str, Any]
) -> None:
    resolved = _interpolate(compose, _example_environment())

    # The interpolated file is what docker compose validates and runs.
    assert _schema_errors(resolved, compose_schema) == []


def test_cpu_override_matches_schema(compose_schema: dict[str, Any]) -> None:
    override = _interpolate(_load_yaml(CPU_OVERRIDE_FILE), _example_environment())

    # The override is a partial compose file and must still follow the specification.
    assert _schema_errors(override, compose_schema) == []


def test_compose_file_no_version_key(compose: dict[str, Any]) -> None:
    # The Compose Specification made the top-level `version` obsolete.
    assert "version" not in compose


def test_compose_file_requires_password(compose: dict[str, Any]) -> None:
    environment = _example_environment()
    del environment["POSTGRES_PASSWORD"]

    # Without a password docker compose stops with the `:?` message instead of starting.
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        _interpolate(compose, environment)


# --------------------------------------------------------------------------------------
# Exposure and secrets
# --------------------------------------------------------------------------------------


def test_published_ports_bind_loopback(services: dict[str, Any]) -> None:
    ports = list(_published_ports(services))

    # The stack publishes at least the MLflow UI.
    assert ports != []
    for service_name, port in ports:
        host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
        # Every published port is reachable from this host only.
        assert host_ip == "127.0.0.1", f"{service_name}: port {port!r} is not bound to loopback"


def test_services_no_host_network(services: dict[str, Any]) -> None:
    for service_name, service in services.items():
        # Host networking would bypass the loopback-only port bindings.
        assert service.get("network_mode") != "host", service_name


def test_secret_variables_only_references(services: dict[str, Any]) -> None:
    for service_name, service in services.items():
        for name, value in _environment_of(service).items():
            if _SECRET_KEY.search(name):
                # A secret is taken from .env through a ${...} reference, never written here.
                assert _ONLY_REFERENCE.fullmatch(value), f"{service_name}: {name}={value!r}"


def test_url_passwords_only_references(compose: dict[str, Any]) -> None:
    passwords = [
        match["password"] for text in _strings_in(compose) for match in _URL_PASSWORD.finditer(text)
    ]

    # The database URLs carry a password, so this check has something to inspect.
    assert passwords != []
    for password in passwords:
        # Each URL password is a ${...} reference to .env.
        assert _ONLY_REFERENCE.fullmatch(password), f"literal password in a URL: {password!r}"


def test_env_example_no_password_value() -> None:
    value, _ = _env_example()["POSTGRES_PASSWORD"]

    # The example leaves the password empty, so no deployment uses a published password.
    assert value == ""


def test_env_file_git_ignored() -> None:
    if shutil.which("git") is None or not (REPOSITORY / ".git").exists():
        pytest.skip("git or the repository metadata is not available")
    result = subprocess.run(["git", "check-ignore", "--quiet", ".env"], cwd=REPOSITORY, check=False)

    # .env contains the real password, so git must never pick it up.
    assert result.returncode == 0, "add `/.env` to .gitignore"


# --------------------------------------------------------------------------------------
# Variables and .env.example
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [COMPOSE_FILE, CPU_OVERRIDE_FILE], ids=lambda path: path.name)
def test_variables_documented_in_env_example(path: Path) -> None:
    documented = _env_example()
    used = _variables_used(path.read_text(encoding="utf-8"))

    # Every ${VAR} that the compose file reads appears in .env.example.
    assert used - documented.keys() == set()


def test_env_example_variables_used() -> None:
    used = _variables_used(COMPOSE_FILE.read_text(encoding="utf-8"))

    # .env.example lists no variable that the stack ignores.
    assert _env_example().keys() - used == set()


def test_env_example_variables_commented() -> None:
    for name, (_, comment) in _env_example().items():
        # Each variable has a comment right above it.
        assert comment, f"{name} has no comment in .env.example"


def test_compose_file_braced_references_only() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")

    # Bare $NAME is easy to miss in review and checks above only see ${NAME}.
    assert [match[0] for match in _BARE_REFERENCE.finditer(text)] == []


# --------------------------------------------------------------------------------------
# Services
# --------------------------------------------------------------------------------------


def test_postgres_healthcheck_pg_isready(services: dict[str, Any]) -> None:
    test = services["postgres"]["healthcheck"]["test"]

    # The health check runs pg_isready against the server itself.
    assert "pg_isready" in " ".join(test)


def test_postgres_data_named_volume(
    compose: dict[str, Any], resolved_services: dict[str, Any]
) -> None:
    mounts = _mounts(resolved_services["postgres"])
    sources = [source for source, target, _ in mounts if target == "/var/lib/postgresql/data"]

    # The data folder lives in a volume declared at the top level, so it survives `down`.
    assert sources != []
    assert sources[0] in compose["volumes"]


def test_postgres_init_script_creates_databases(resolved_services: dict[str, Any]) -> None:
    scripts = [
        REPOSITORY / source
        for source, target, _ in _mounts(resolved_services["postgres"])
        if target.startswith("/docker-entrypoint-initdb.d/")
    ]

    # One init script is mounted from the repository.
    assert len(scripts) == 1
    sql = scripts[0].read_text(encoding="utf-8")
    for database in ("optuna", "mlflow"):
        # It creates the databases that the worker and MLflow URLs name.
        assert re.search(rf"CREATE DATABASE {database}\b", sql, re.IGNORECASE), database


def test_worker_no_container_name(services: dict[str, Any]) -> None:
    # A fixed name would make `docker compose up --scale worker=N` fail.
    assert "container_name" not in services["worker"]


def test_worker_gpu_reservation(services: dict[str, Any]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [device for device in devices if device.get("driver") == "nvidia"]

    # The worker reserves exactly one NVIDIA GPU...
    assert len(nvidia) == 1
    assert nvidia[0]["count"] == 1
    # ...with the gpu capability, without which the engine rejects the request.
    assert "gpu" in nvidia[0]["capabilities"]


def test_worker_environment_names(services: dict[str, Any]) -> None:
    # The worker is configured through exactly the settings the CLI documents.
    assert set(_environment_of(services["worker"])) == WORKER_ENV_NAMES


def test_worker_urls_name_databases(resolved_services: dict[str, Any]) -> None:
    storage = urlparse(_environment_of(resolved_services["worker"])["GENRE_SEARCH_STORAGE"])
    command = resolved_services["mlflow"]["command"]
    backend = urlparse(command[command.index("--backend-store-uri") + 1])

    # Optuna and MLflow use the two databases that the init script creates.
    assert storage.path == "/optuna"
    assert backend.path == "/mlflow"
    # Both reach PostgreSQL by its service name with the password from .env.
    assert storage.hostname == "postgres"
    assert storage.password == TEST_PASSWORD
    assert backend.password == TEST_PASSWORD


def test_worker_mounts_data_read_only(resolved_services: dict[str, Any]) -> None:
    worker = resolved_services["worker"]
    data_dir = _environment_of(worker)["GENRE_SEARCH_DATA"]
    modes = [mode for _, target, mode in _mounts(worker) if target == data_dir]

    # The dataset folder is mounted at the path GENRE_SEARCH_DATA names...
    assert len(modes) == 1
    # ...and read-only, so no trial can change the data.
    assert modes[0] == "ro"


def test_worker_cache_named_volume(
    compose: dict[str, Any], resolved_services: dict[str, Any]
) -> None:
    worker = resolved_services["worker"]
    cache_dir = _environment_of(worker)["GENRE_SEARCH_CACHE_DIR"]
    cache_sources = [source for source, target, _ in _mounts(worker) if target == cache_dir]

    # The feature cache is a named volume that all scaled workers share.
    assert cache_sources != []
    assert cache_sources[0] in compose["volumes"]


def test_worker_dependency_conditions(services: dict[str, Any]) -> None:
    depends_on = services["worker"]["depends_on"]

    # Workers start only when PostgreSQL accepts connections...
    assert depends_on["postgres"]["condition"] == "service_healthy"
    # ...and after the tracking server container has started.
    assert depends_on["mlflow"]["condition"] == "service_started"


def test_worker_command_study_and_device(resolved_services: dict[str, Any]) -> None:
    # The defaults run the gtzan study on the reserved GPU.
    assert resolved_services["worker"]["command"] == ["worker", "gtzan", "--device", "cuda"]


def test_mlflow_allows_worker_host(resolved_services: dict[str, Any]) -> None:
    tracking_uri = _environment_of(resolved_services["worker"])["GENRE_SEARCH_TRACKING_URI"]
    command = resolved_services["mlflow"]["command"]
    allowed_hosts = command[command.index("--allowed-hosts") + 1].split(",")

    # MLflow 3 returns 403 for Host headers outside --allowed-hosts, and the workers send
    # the service name as Host.
    assert urlparse(tracking_uri).netloc in allowed_hosts


def test_mlflow_serves_artifacts_from_volume(
    compose: dict[str, Any], resolved_services: dict[str, Any]
) -> None:
    mlflow = resolved_services["mlflow"]
    command = mlflow["command"]
    destination = command[command.index("--artifacts-destination") + 1]
    sources = [source for source, target, _ in _mounts(mlflow) if target == destination]

    # Workers upload through the server, so the artifacts need no shared host folder.
    assert "--serve-artifacts" in command
    # The artifact folder is a declared named volume.
    assert sources != []
    assert sources[0] in compose["volumes"]


def test_mlflow_waits_for_postgres(services: dict[str, Any]) -> None:
    # MLflow migrates its database on start, so PostgreSQL must accept connections first.
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_cpu_override_drops_gpu() -> None:
    worker = _load_yaml(CPU_OVERRIDE_FILE)["services"]["worker"]

    # `deploy: !reset` removes the GPU reservation when the override is merged.
    assert worker["deploy"] == {}
    # The override passes --device cpu and ignores WORKER_DEVICE.
    assert worker["command"][-2:] == ["--device", "cpu"]


# --------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, argument = stripped.partition(" ")
            instructions.append((keyword.upper(), argument.strip()))
    return instructions


def test_dockerfile_base_image() -> None:
    base_images = [
        argument for keyword, argument in _dockerfile_instructions() if keyword == "FROM"
    ]

    # A single stage on the slim Python 3.11 image.
    assert base_images == ["python:3.11-slim"]


def test_dockerfile_installs_project_and_libsndfile() -> None:
    runs = " ".join(
        argument for keyword, argument in _dockerfile_instructions() if keyword == "RUN"
    )

    # soundfile needs the system libsndfile.
    assert "libsndfile1" in runs
    # The project itself is installed with pip from the build context.
    assert re.search(r"pip install \.(\s|$)", runs)


def test_dockerfile_runs_as_non_root() -> None:
    users = [argument for keyword, argument in _dockerfile_instructions() if keyword == "USER"]

    # The last USER instruction decides who runs the entrypoint.
    assert users != []
    assert users[-1] not in {"root", "0", "0:0"}


def test_dockerfile_entrypoint_cli() -> None:
    entrypoints = [
        argument for keyword, argument in _dockerfile_instructions() if keyword == "ENTRYPOINT"
    ]

    # The image runs the genre-search console script, so `command` contains its arguments.
    assert [json.loads(argument) for argument in entrypoints] == [["genre-search"]]
