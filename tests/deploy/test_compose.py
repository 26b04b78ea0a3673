"""Static checks of docker-compose.yml, deploy/Dockerfile and deploy/env.example.

Docker is not available to the tests, so the files are parsed: the structure compose needs
(profiles, health conditions, volumes, secrets failing fast) and the links to the code (every
command names a real console script and subcommand, the image installs what requirements.txt
installs, every variable is documented).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"

REQUIRED = {
    "minio",
    "createbuckets",
    "postgres",
    "redis",
    "migrate",
    "gateway",
    "indexer",
    "indexer-worker",
    "embedder",
    "embedder-gpu",
}
ONE_SHOT = {"createbuckets", "migrate"}
SCALABLE = {"embedder", "embedder-gpu", "indexer-worker"}
SECRETS = {
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "FASHIONREC_STORAGE_S3_ACCESS_KEY",
    "FASHIONREC_STORAGE_S3_SECRET_KEY",
    "FASHIONREC_GATEWAY_API_KEY",
}
_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)((?::?[-?])[^}]*)?\}")


@pytest.fixture(scope="module")
def raw() -> str:
    return COMPOSE.read_text()


@pytest.fixture(scope="module")
def services(raw: str) -> dict[str, dict[str, Any]]:
    return yaml.safe_load(raw)["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str | None]:
    """name -> value (None when only documented in a comment)."""
    names: dict[str, str | None] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^(#\s*)?([A-Z_][A-Z0-9_]*)=(.*)$", line.strip())
        if m and (m.group(1) is None or m.group(2) not in names):
            names[m.group(2)] = None if m.group(1) else m.group(3)
    return names


def app_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services built from deploy/Dockerfile."""
    return {n: s for n, s in services.items() if "build" in s}


def as_list(command: Any) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def console_scripts() -> dict[str, tuple[str, str]]:
    """script name -> (service dir name, entry point) from services/*/pyproject.toml."""
    scripts = {}
    for pyproject in ROOT.glob("services/*/pyproject.toml"):
        data = tomllib.loads(pyproject.read_text())
        for name, target in data["project"].get("scripts", {}).items():
            scripts[name] = (pyproject.parent.name, target)
    return scripts


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: ${V}, ${V:-default}, ${V-default}, ${V:?err}, ${V?err}, $$."""

    def sub(m: re.Match[str]) -> str:
        name, rest = m.group(1), m.group(2) or ""
        value = env.get(name)
        if rest.startswith((":?", "?")):
            if value is None or (rest.startswith(":") and value == ""):
                raise KeyError(f"{name}: {rest.lstrip(':?')}")
            return value
        if rest.startswith((":-", "-")):
            if value is None or (rest.startswith(":") and value == ""):
                return rest.split("-", 1)[1]
            return value
        return value or ""

    return _VAR.sub(sub, text).replace("$$", "$")


# ---- structure ----------------------------------------------------------------------------


def test_required_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= REQUIRED


def test_profiles_choose_the_embedder(
    services: dict[str, dict[str, Any]], env_example: dict[str, str | None]
) -> None:
    assert services["embedder"]["profiles"] == ["cpu"]
    assert services["embedder-gpu"]["profiles"] == ["gpu"]
    others = {n for n, s in services.items() if "profiles" in s} - {"embedder", "embedder-gpu"}
    assert not others, f"only the embedders are optional: {others}"
    # Compose has no default profile: the env file selects one.
    assert env_example.get("COMPOSE_PROFILES") == "cpu"


def test_gpu_embedder_reserves_a_gpu(services: dict[str, dict[str, Any]]) -> None:
    gpu, cpu = services["embedder-gpu"], services["embedder"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
    assert "deploy" not in cpu
    assert gpu["build"]["args"] == {"SERVICE": "embedder", "DEVICE": "gpu"}
    assert cpu["build"]["args"] == {"SERVICE": "embedder", "DEVICE": "cpu"}
    assert gpu["environment"]["FASHIONREC_EMBEDDER_DEVICE"] == "cuda"
    assert cpu["environment"]["FASHIONREC_EMBEDDER_DEVICE"] == "cpu"
    assert gpu["command"] == cpu["command"] == ["fashionrec-embedder", "worker"]


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if name in ONE_SHOT:
            assert svc.get("restart") == "no", name
            assert "healthcheck" not in svc, name
            continue
        check = svc.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert svc.get("restart") == "unless-stopped", name


def test_depends_on_uses_conditions(services: dict[str, dict[str, Any]]) -> None:
    optional = {n for n, s in services.items() if "profiles" in s}
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must be a mapping with conditions"
        for target, spec in deps.items():
            assert target in services, f"{name} depends on unknown {target}"
            assert target not in optional, f"{name} depends on profiled {target}"
            expected = "service_completed_successfully" if target in ONE_SHOT else "service_healthy"
            assert spec == {"condition": expected}, f"{name} -> {target}: {spec}"
    # The chain that makes a fresh start safe.
    assert "migrate" in services["indexer"]["depends_on"]
    assert "migrate" in services["indexer-worker"]["depends_on"]
    assert "createbuckets" in services["gateway"]["depends_on"]
    assert "indexer" in services["gateway"]["depends_on"]


def test_no_container_names_and_no_fixed_host_ports(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        assert "container_name" not in svc, name
        if name in SCALABLE:
            assert "ports" not in svc, f"{name} is scaled: it must not publish host ports"
        for port in svc.get("ports", []):
            host_part = str(port).rsplit(":", 1)[0]
            assert "${" in host_part, f"{name}: host port {port} must come from a variable"
    assert set(n for n, s in services.items() if "ports" in s) <= {"gateway"}


def test_named_volumes_are_declared(raw: str, services: dict[str, dict[str, Any]]) -> None:
    declared = set(yaml.safe_load(raw).get("volumes") or {})
    used = set()
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith((".", "/", "~")):
                used.add(source)
                assert source in declared, f"{name}: volume {source} not declared"
    assert used == declared
    data_dirs = {
        "postgres": "/var/lib/postgresql/data",
        "redis": "/data",
        "minio": "/data",
    }
    for name, path in data_dirs.items():
        targets = [v.split(":")[1] for v in services[name]["volumes"]]
        assert path in targets, f"{name} keeps its data in a named volume"


def test_redis_persists_and_never_evicts(services: dict[str, dict[str, Any]]) -> None:
    command = " ".join(as_list(services["redis"]["command"]))
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_postgres_and_minio_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    bucket_job = " ".join(as_list(services["createbuckets"]["command"]))
    assert "mc mb --ignore-existing" in bucket_job


def test_required_secrets_fail_fast(raw: str) -> None:
    seen = set()
    for m in _VAR.finditer(raw):
        name, rest = m.group(1), m.group(2) or ""
        if name in SECRETS:
            seen.add(name)
            assert rest.startswith(":?"), f"${{{name}}} must be required (:?)"
    assert seen == SECRETS


def test_interpolation_with_the_example_env(raw: str, env_example: dict[str, str | None]) -> None:
    env = {k: v for k, v in env_example.items() if v is not None}
    resolved = yaml.safe_load(interpolate(raw, env))
    gateway = resolved["services"]["gateway"]
    assert gateway["ports"] == ["127.0.0.1:8000:8000"]
    url = resolved["services"]["indexer"]["environment"]["DATABASE_URL"]
    assert (
        url
        == f"postgresql+psycopg2://fashionrec:{env['POSTGRES_PASSWORD']}@postgres:5432/fashionrec"
    )
    for secret in SECRETS:
        without = {k: v for k, v in env.items() if k != secret}
        with pytest.raises(KeyError, match=secret):
            interpolate(raw, without)


def test_app_services_read_the_env_file(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in app_services(services).items():
        assert svc.get("env_file") == ".env", name
        env = svc["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0", name
        assert env["FASHIONREC_STORAGE_S3_ENDPOINT"] == "http://minio:9000", name
        if svc["build"]["args"]["SERVICE"] == "indexer":
            assert env["DATABASE_URL"].startswith("postgresql"), name
        else:
            assert "DATABASE_URL" not in env, f"only the indexer talks to Postgres ({name})"
    assert services["gateway"]["environment"]["FASHIONREC_GATEWAY_INDEXER_URL"] == (
        "http://indexer:8001"
    )


def _settings_fields(module: str, prefix: str) -> set[str] | None:
    if importlib.util.find_spec(module) is None:
        return None
    from pydantic_settings import BaseSettings

    mod = importlib.import_module(module)
    for obj in vars(mod).values():
        if (
            isinstance(obj, type)
            and issubclass(obj, BaseSettings)
            and obj.model_config.get("env_prefix") == prefix
        ):
            return set(obj.model_fields)
    return None


def test_environment_names_are_real_settings(services: dict[str, dict[str, Any]]) -> None:
    from fashionrec_shared.settings import StorageSettings

    prefixes = {
        "FASHIONREC_STORAGE_": set(StorageSettings.model_fields),
        "FASHIONREC_GATEWAY_": _settings_fields(
            "fashionrec_gateway.settings", "FASHIONREC_GATEWAY_"
        ),
        "FASHIONREC_INDEXER_": _settings_fields(
            "fashionrec_indexer.settings", "FASHIONREC_INDEXER_"
        ),
        "FASHIONREC_EMBEDDER_": _settings_fields(
            "fashionrec_embedder.settings", "FASHIONREC_EMBEDDER_"
        ),
    }
    unchecked = set()
    for name, svc in app_services(services).items():
        for key in svc["environment"]:
            if key in ("DATABASE_URL", "REDIS_URL"):
                continue
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            assert prefix, f"{name}: {key} is not a fashionrec setting"
            fields = prefixes[prefix]
            if fields is None:
                unchecked.add(prefix)
                continue
            field = key.removeprefix(prefix).lower()
            assert field in fields, f"{name}: {key} names no field of the {prefix} settings"
    if unchecked:
        pytest.skip(f"settings classes not importable yet for {sorted(unchecked)}")


# ---- commands -----------------------------------------------------------------------------


def _commands(services: dict[str, dict[str, Any]]) -> list[tuple[str, list[str], str]]:
    return [
        (name, as_list(svc["command"]), svc["build"]["args"]["SERVICE"])
        for name, svc in app_services(services).items()
    ]


def test_commands_name_console_scripts_of_the_image(services: dict[str, dict[str, Any]]) -> None:
    scripts = console_scripts()
    for name, command, image_service in _commands(services):
        assert "entrypoint" not in services[name], name
        script = command[0]
        assert script in scripts, f"{name}: {script} is no [project.scripts] entry"
        assert scripts[script][0] == image_service, (
            f"{name}: {script} comes from services/{scripts[script][0]}, "
            f"but the image installs services/{image_service}"
        )


@pytest.mark.parametrize(
    "service", ["migrate", "indexer", "indexer-worker", "gateway", "embedder", "embedder-gpu"]
)
def test_subcommands_and_options_exist(services: dict[str, dict[str, Any]], service: str) -> None:
    import typer

    command = as_list(services[service]["command"])
    target = console_scripts()[command[0]][1]
    module_name = target.split(":")[0]
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} does not exist yet")
    module = importlib.import_module(module_name)
    apps = [obj for obj in vars(module).values() if isinstance(obj, typer.Typer)]
    assert apps, f"{module_name} has no typer app"
    group = typer.main.get_command(apps[0])
    # Typer builds click-style groups (its own vendored click in recent releases).
    assert hasattr(group, "commands"), f"{module_name}: expected subcommands"
    sub_name, args = command[1], command[2:]
    sub = group.commands.get(sub_name)
    assert sub is not None, f"{command[0]} has no subcommand {sub_name!r}"
    # Parsing (not running) the arguments proves every option exists and takes its value.
    sub.make_context(sub_name, list(args))


# ---- image and variables ----------------------------------------------------------------------


def _requirements_paths() -> set[str]:
    paths = set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^-e\s+(\S+)", line.strip())
        if m:
            # Service extras (the embedder's fastai `train`) are for development, not for images.
            path = m.group(1)
            paths.add(re.sub(r"\[.*\]$", "", path) if path.startswith("./services/") else path)
    return paths


def test_dockerfile_installs_like_requirements(services: dict[str, dict[str, Any]]) -> None:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert len(installs) == 1, installs
    args = [a.strip('"') for a in shlex.split(installs[0].split("pip install", 1)[1])]
    local = [a for a in args if a.startswith("./")]
    assert local == ["./shared[http]", "./services/${SERVICE}"]
    wanted = _requirements_paths()
    assert "./shared[http]" in wanted
    for _, _, image_service in _commands(services):
        assert f"./services/{image_service}" in wanted, image_service
        assert (ROOT / "services" / image_service / "pyproject.toml").is_file()
    for arg in ("ARG SERVICE", "ARG DEVICE=cpu"):
        assert arg in text
    assert "download.pytorch.org/whl/cpu" in text
    assert re.search(r"^USER (?!root)\S+", text, re.M), "the image runs as a non-root user"
    assert "HEALTHCHECK" in text
    assert "COPY deploy/healthcheck.py /opt/fashionrec/healthcheck.py" in text
    for name, svc in services.items():
        test = " ".join(svc.get("healthcheck", {}).get("test", []))
        if "healthcheck.py" in test:
            assert "/opt/fashionrec/healthcheck.py" in test, name


def test_env_example_documents_every_variable(raw: str, env_example: dict[str, str | None]) -> None:
    used = {m.group(1) for m in _VAR.finditer(raw)}
    missing = used - set(env_example)
    assert not missing, f"deploy/env.example does not document {sorted(missing)}"
    required = {m.group(1) for m in _VAR.finditer(raw) if (m.group(2) or "").startswith(":?")}
    unset = {n for n in required if not env_example.get(n)}
    assert not unset, f"required variables need an example value: {sorted(unset)}"
