"""Static checks of the Kubernetes manifests in deploy/k8s (kustomize base + cpu/gpu overlays).

No cluster and no network: the kustomizations are rendered by the small renderer below (the
kustomize subset the manifests use; anything else is refused, and where `kubectl` or `kustomize`
is installed its output is compared with theirs), every object is validated against the
Kubernetes JSON schemas that kubernetes-validate ships (KEDA's kinds against the schemas in
deploy/k8s/schemas), and the links to the rest of the project are checked: the same images,
commands, environment and health checks as docker-compose.yml, commands that are real console
scripts, Secret references that exist, and the queue KEDA watches is fashionrec_shared's.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib
import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from tests.deploy import test_compose as compose

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
SECRETS_EXAMPLE = BASE / "secrets.env.example"
CONFIG_ENV = BASE / "config.env"
SCHEMAS = K8S / "schemas"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

TARGETS = ("base", "overlays/cpu", "overlays/gpu")
NAMESPACE = "fashionrec"
# The oldest Kubernetes the manifests are written for (autoscaling/v2, policy/v1, Job TTLs and
# exec probe timeouts are all GA there) and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

# k8s workload -> compose service, per overlay (the base is the CPU deployment).
COMPOSE_SERVICE = {
    "migrate": "migrate",
    "indexer": "indexer",
    "indexer-worker": "indexer-worker",
    "gateway": "gateway",
    "embedder": "embedder",
}
GPU_COMPOSE_SERVICE = {**COMPOSE_SERVICE, "embedder": "embedder-gpu"}
# Read from the Secret in k8s (URLs of the external services and credentials); compose
# interpolates them from .env or points at its own containers.
SECRET_SOURCED = {
    "DATABASE_URL",
    "REDIS_URL",
    "FASHIONREC_STORAGE_S3_ENDPOINT",
    "FASHIONREC_STORAGE_S3_ACCESS_KEY",
    "FASHIONREC_STORAGE_S3_SECRET_KEY",
    "FASHIONREC_GATEWAY_API_KEY",
}
# Only for KEDA's TriggerAuthentication, never in a container.
KEDA_ONLY_SECRETS = {"REDIS_ADDRESS", "REDIS_PASSWORD"}
EXPECTED_OBJECTS = {
    ("Namespace", "fashionrec"),
    ("ConfigMap", "fashionrec-config"),
    ("Secret", "fashionrec-secrets"),
    ("Job", "migrate"),
    ("Deployment", "indexer"),
    ("Service", "indexer"),
    ("PodDisruptionBudget", "indexer"),
    ("Deployment", "indexer-worker"),
    ("Deployment", "gateway"),
    ("Service", "gateway"),
    ("HorizontalPodAutoscaler", "gateway"),
    ("PodDisruptionBudget", "gateway"),
    ("Deployment", "embedder"),
    ("PodDisruptionBudget", "embedder"),
    ("ScaledObject", "embedder"),
    ("TriggerAuthentication", "fashionrec-redis"),
}
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh/scaledobject_v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh/triggerauthentication_v1alpha1.json",
}


# ---- a small kustomize -----------------------------------------------------------------------
#
# The subset deploy/k8s uses, implemented the way kustomize v5 does it: `resources` (files and
# directories), `namespace`, `configMapGenerator` / `secretGenerator` from env files (names get
# kustomize's content hash, and references to them follow), `configurations` (nameReference
# only), `patches` given by `path` (strategic merge, matched by kind and name) and `images`.
# Anything else raises Unsupported, so a kustomization that grows past it fails loudly here.
# The real command is `kubectl kustomize deploy/k8s/overlays/cpu` (or `kustomize build`).


class Unsupported(Exception):
    """A kustomize feature this renderer does not implement."""


KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "configMapGenerator",
    "secretGenerator",
    "configurations",
    "patches",
    "images",
}
GENERATOR_FIELDS = {"name", "envs", "literals", "type"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "PriorityClass",
    "StorageClass",
}
BUILTIN_GROUPS = {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io"}
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
# kustomize's built-in name references to ConfigMaps and Secrets inside a pod spec.
POD_NAME_REFS = {
    "ConfigMap": [
        "containers/env/valueFrom/configMapKeyRef/name",
        "containers/envFrom/configMapRef/name",
        "initContainers/env/valueFrom/configMapKeyRef/name",
        "initContainers/envFrom/configMapRef/name",
        "volumes/configMap/name",
        "volumes/projected/sources/configMap/name",
    ],
    "Secret": [
        "containers/env/valueFrom/secretKeyRef/name",
        "containers/envFrom/secretRef/name",
        "initContainers/env/valueFrom/secretKeyRef/name",
        "initContainers/envFrom/secretRef/name",
        "volumes/secret/secretName",
        "volumes/projected/sources/secret/name",
        "imagePullSecrets/name",
    ],
}
# Strategic merge: list fields of the built-in kinds merged by key, or replaced whole.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
ATOMIC_LISTS = {"tolerations", "command", "args", "envFrom"}


def group_of(api_version: str) -> str:
    return api_version.split("/", 1)[0] if "/" in api_version else ""


def parse_env_file(text: str, origin: str) -> dict[str, str]:
    """kustomize's env files: KEY=VALUE lines, blank lines and # comments skipped."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise Unsupported(
                f"{origin}: {raw!r} (a bare KEY is read from kustomize's environment)"
            )
        key, value = line.split("=", 1)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise Unsupported(f"{origin}: {key!r} is no environment variable name")
        if value[:1] in ("'", '"') or value != value.strip():
            raise Unsupported(f"{origin}: {key}: quotes and surrounding blanks are not supported")
        values[key] = value
    return values


def _go_json(obj: Any) -> str:
    """encoding/json.Marshal of a map: sorted keys, no blanks, HTML characters escaped."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    return text


def kustomize_hash(obj: dict[str, Any]) -> str:
    """The name suffix kustomize v5 gives a generated ConfigMap or Secret (api/hasher).

    It hashes {kind, name, data (, type)} as Go's JSON; the name it looks up with the single
    path element "metadata/name", which finds nothing, so the name it hashes is always "".
    """
    encoded: dict[str, Any] = {"kind": obj["kind"], "name": "", "data": obj.get("data", "")}
    if obj["kind"] == "Secret":
        encoded["type"] = obj.get("type", "")
    digest = hashlib.sha256(_go_json(encoded).encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def kustomize_base64(value: str) -> str:
    """kustomize's encodeBase64: from 70 encoded characters on, lines of 70, each ending in \\n."""
    encoded = base64.b64encode(value.encode()).decode()
    if len(encoded) < 70:
        return encoded
    return "".join(encoded[i : i + 70] + "\n" for i in range(0, len(encoded), 70))


def _walk(node: Any, segments: list[str], fn: Callable[[Any], Any]) -> None:
    """Apply fn to the values at a kustomize field path; sequences are walked through."""
    if isinstance(node, list):
        for item in node:
            _walk(item, segments, fn)
        return
    if not isinstance(node, dict) or not segments or segments[0] not in node:
        return
    head, rest = segments[0], segments[1:]
    if rest:
        _walk(node[head], rest, fn)
    else:
        node[head] = fn(node[head])


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    path = POD_SPEC_PATHS.get(doc.get("kind", ""))
    node: Any = doc
    for key in path or ():
        node = node.get(key) if isinstance(node, dict) else None
    return node if path and isinstance(node, dict) else None


def _merge_list(dst: Any, patch: list[Any], path: tuple[str, ...], builtin: bool) -> list[Any]:
    field = path[-1]
    if not builtin or not isinstance(dst, list) or field in ATOMIC_LISTS:
        return copy.deepcopy(patch)
    if field == "ports":
        key = "containerPort" if len(path) > 1 and path[-2].endswith("ontainers") else "port"
    elif field in MERGE_KEYS:
        key = MERGE_KEYS[field]
    else:
        raise Unsupported(f"list {'/'.join(path)} in a strategic merge patch")
    # kustomize's order: the patch's elements (merged into their match), then the others.
    by_key = {item[key]: item for item in dst}
    merged = [
        strategic_merge(by_key[item[key]], item, path, builtin)
        if item[key] in by_key
        else copy.deepcopy(item)
        for item in patch
    ]
    patched = {item[key] for item in patch}
    return merged + [copy.deepcopy(item) for item in dst if item[key] not in patched]


def strategic_merge(
    dst: dict[str, Any], patch: dict[str, Any], path: tuple[str, ...], builtin: bool
) -> dict[str, Any]:
    out = copy.deepcopy(dst)
    for key, value in patch.items():
        if key.startswith("$"):
            raise Unsupported(f"patch directive {key}")
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list):
            out[key] = _merge_list(out.get(key), value, (*path, key), builtin)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value, (*path, key), builtin)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    name, _, digest = image.partition("@")
    tag = None
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def _set_images(docs: list[dict[str, Any]], images: list[dict[str, Any]]) -> None:
    for entry in images:
        if set(entry) - {"name", "newName", "newTag", "digest"}:
            raise Unsupported(f"images entry {entry}")
        if "newTag" in entry and "digest" in entry:
            raise Unsupported(f"images entry with both newTag and digest: {entry}")
    for doc in docs:
        spec = pod_spec(doc)
        for container in (spec or {}).get("containers", []) + (spec or {}).get(
            "initContainers", []
        ):
            name, tag, digest = _split_image(container["image"])
            for entry in images:
                if entry["name"] != name:
                    continue
                new = entry.get("newName", name)
                if "newTag" in entry:
                    container["image"] = f"{new}:{entry['newTag']}"
                elif "digest" in entry:
                    container["image"] = f"{new}@{entry['digest']}"
                else:
                    suffix = f"@{digest}" if digest else (f":{tag}" if tag else "")
                    container["image"] = new + suffix


class Rendered:
    """What one kustomization produced: objects, generated names, extra name references."""

    def __init__(self) -> None:
        self.docs: list[dict[str, Any]] = []
        self.generated: dict[tuple[str, str], str] = {}  # (kind, name) -> name with hash
        self.name_refs: list[tuple[str, str, str, str]] = []  # kind, group, referrer, path


def _generate(kdir: Path, kind: str, spec: dict[str, Any], read: Callable[[Path], str]) -> dict:
    if set(spec) - GENERATOR_FIELDS:
        raise Unsupported(f"{kind} generator fields {sorted(set(spec) - GENERATOR_FIELDS)}")
    values: dict[str, str] = {}
    for env in spec.get("envs", []):
        values.update(parse_env_file(read(kdir / env), str(kdir / env)))
    for literal in spec.get("literals", []):
        values.update(parse_env_file(literal, f"{spec['name']} literal"))
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if kind == "Secret":
        obj["type"] = spec.get("type", "Opaque")
        obj["data"] = {k: kustomize_base64(v) for k, v in values.items()}
    else:
        if "type" in spec:
            raise Unsupported("configMapGenerator type")
        obj["data"] = values
    return obj


def build(kdir: Path, read: Callable[[Path], str]) -> Rendered:
    k = yaml.safe_load(read(kdir / "kustomization.yaml")) or {}
    unknown = set(k) - KUSTOMIZATION_FIELDS
    if unknown:
        raise Unsupported(f"{kdir}: kustomization fields {sorted(unknown)}")
    out = Rendered()
    for entry in k.get("resources", []):
        path = (kdir / entry).resolve()
        if path.is_dir():
            sub = build(path, read)
            out.docs += sub.docs
            out.generated.update(sub.generated)
            out.name_refs += sub.name_refs
        else:
            out.docs += [d for d in yaml.safe_load_all(read(path)) if d]
    for kind, field in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for spec in k.get(field, []):
            obj = _generate(kdir, kind, spec, read)
            out.docs.append(obj)
            out.generated[(kind, spec["name"])] = f"{spec['name']}-{kustomize_hash(obj)}"
    for config in k.get("configurations", []):
        tconfig = yaml.safe_load(read(kdir / config)) or {}
        if set(tconfig) - {"nameReference"}:
            raise Unsupported(f"{config}: transformer configs {sorted(tconfig)}")
        for ref in tconfig["nameReference"]:
            for spec in ref["fieldSpecs"]:
                out.name_refs.append(
                    (ref["kind"], spec.get("group", ""), spec["kind"], spec["path"])
                )
    for patch in k.get("patches", []):
        if set(patch) != {"path"}:
            raise Unsupported(f"patch {patch} (only `path:` strategic merge patches)")
        body = yaml.safe_load(read(kdir / patch["path"]))
        matches = [
            d
            for d in out.docs
            if d["kind"] == body["kind"]
            and d["metadata"]["name"] == body["metadata"]["name"]
            and group_of(d["apiVersion"]) == group_of(body["apiVersion"])
        ]
        if len(matches) != 1:
            raise Unsupported(f"patch {patch['path']} matches {len(matches)} objects")
        if (matches[0]["kind"], matches[0]["metadata"]["name"]) in out.generated:
            raise Unsupported(f"patch {patch['path']} of a generated object")
        builtin = group_of(body["apiVersion"]) in BUILTIN_GROUPS
        merged = strategic_merge(matches[0], body, (), builtin)
        out.docs[out.docs.index(matches[0])] = merged
    if "namespace" in k:
        for doc in out.docs:
            if doc["kind"] == "Namespace":
                if doc["metadata"]["name"] != k["namespace"]:
                    raise Unsupported("a Namespace object named unlike `namespace:`")
            elif doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = k["namespace"]
    _set_images(out.docs, k.get("images", []))
    return out


def finish(rendered: Rendered) -> list[dict[str, Any]]:
    """Give generated objects their hashed names and update every reference to them."""
    docs = copy.deepcopy(rendered.docs)
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        if key in rendered.generated:
            doc["metadata"]["name"] = rendered.generated[key]
    for kind in ("ConfigMap", "Secret"):
        names = {n: h for (k, n), h in rendered.generated.items() if k == kind}

        def rename(value: Any, names: dict[str, str] = names) -> Any:
            return names.get(value, value) if isinstance(value, str) else value

        for doc in docs:
            spec = pod_spec(doc)
            if spec is not None:
                for path in POD_NAME_REFS[kind]:
                    _walk(spec, path.split("/"), rename)
            for ref_kind, group, referrer, path in rendered.name_refs:
                if (ref_kind, referrer, group) == (kind, doc["kind"], group_of(doc["apiVersion"])):
                    _walk(doc, path.split("/"), rename)
    return docs


def render(target: str, replace: dict[Path, str] | None = None) -> list[dict[str, Any]]:
    """Render deploy/k8s/<target>; `replace` maps paths to contents read instead of the files."""
    replaced = {p.resolve(): text for p, text in (replace or {}).items()}

    def read(path: Path) -> str:
        path = path.resolve()
        return replaced[path] if path in replaced else path.read_text()

    return finish(build(K8S / target, read))


def render_with_example_secrets(target: str) -> list[dict[str, Any]]:
    return render(target, {BASE / "secrets.env": SECRETS_EXAMPLE.read_text()})


# ---- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {target: render_with_example_secrets(target) for target in TARGETS}


@pytest.fixture(scope="module")
def compose_services() -> dict[str, dict[str, Any]]:
    """docker-compose.yml resolved with deploy/env.example, as its own test does."""
    env = {}
    for line in compose.ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^([A-Z_][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            env[m.group(1)] = m.group(2)
    return yaml.safe_load(compose.interpolate(compose.COMPOSE.read_text(), env))["services"]


@pytest.fixture(scope="module")
def example_secrets() -> dict[str, str]:
    return parse_env_file(SECRETS_EXAMPLE.read_text(), str(SECRETS_EXAMPLE))


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [d for d in docs if d["kind"] == kind]
    return obj


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {**objects(docs, "Deployment"), **objects(docs, "Job")}


def container(doc: dict[str, Any]) -> dict[str, Any]:
    spec = pod_spec(doc)
    assert spec is not None
    (main,) = spec["containers"]
    return main


def compose_map(target: str) -> dict[str, str]:
    return GPU_COMPOSE_SERVICE if target.endswith("gpu") else COMPOSE_SERVICE


def seconds(duration: str) -> int:
    m = re.fullmatch(r"(\d+)s", duration)
    assert m, f"compose duration {duration!r}"
    return int(m.group(1))


def environment(doc: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, Any]:
    """name -> literal value, or ("secret", key) for a value read from the Secret."""
    main = container(doc)
    env: dict[str, Any] = {}
    configmaps = objects(docs, "ConfigMap")
    for source in main.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for var in main.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = ("secret", ref["key"])
    return env


def min_replicas(name: str, docs: list[dict[str, Any]]) -> int:
    for hpa in objects(docs, "HorizontalPodAutoscaler").values():
        if hpa["spec"]["scaleTargetRef"]["name"] == name:
            return int(hpa["spec"].get("minReplicas", 1))
    for scaled in objects(docs, "ScaledObject").values():
        if scaled["spec"]["scaleTargetRef"]["name"] == name:
            return int(scaled["spec"].get("minReplicaCount", 0))
    return int(objects(docs, "Deployment")[name]["spec"].get("replicas", 1))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- rendering -----------------------------------------------------------------------------------


def test_every_target_renders_the_expected_objects(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for target, docs in rendered.items():
        names = {
            (d["kind"], re.sub(r"-[a-z0-9]{10}$", "", d["metadata"]["name"]))
            if d["kind"] in ("ConfigMap", "Secret")
            else (d["kind"], d["metadata"]["name"])
            for d in docs
        }
        assert names == EXPECTED_OBJECTS, target
        assert len(docs) == len(EXPECTED_OBJECTS), f"{target}: duplicate objects"
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                assert doc["metadata"].get("namespace") == NAMESPACE, (target, doc["kind"])


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _by_identity(docs: list[dict[str, Any]]) -> dict[tuple[str, str, str], Any]:
    return {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d for d in docs}


@pytest.mark.parametrize("target", TARGETS)
def test_renderer_matches_real_kustomize(
    target: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    # The example secrets, never a real secrets.env that may lie in the work tree.
    shutil.copyfile(SECRETS_EXAMPLE, tree / "base" / "secrets.env")
    result = subprocess.run(
        [*command, str(tree / target)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    real = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert _by_identity(real) == _by_identity(rendered[target])


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    def read(path: Path) -> str:
        return path.read_text()

    (tmp_path / "kustomization.yaml").write_text("namePrefix: x-\nresources: []\n")
    with pytest.raises(Unsupported, match="namePrefix"):
        build(tmp_path, read)
    with pytest.raises(Unsupported, match="bare KEY"):
        parse_env_file("FROM_THE_ENVIRONMENT\n", "test")
    with pytest.raises(Unsupported, match="quotes"):
        parse_env_file('QUOTED="x"\n', "test")
    with pytest.raises(Unsupported, match="list"):
        strategic_merge({"spec": {"hostAliases": []}}, {"spec": {"hostAliases": [{}]}}, (), True)


def test_kustomize_hash_of_known_objects() -> None:
    # What kustomize v5.5 names `configMapGenerator: [{name: x, literals: [a=b]}]` and
    # `secretGenerator: [{name: s, literals: ["p=<&>"]}]` (Go's JSON escapes <, &, >).
    configmap = {"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}}
    assert kustomize_hash(configmap) == "4h2mbtbbt6"
    data = {"p": base64.b64encode(b"<&>").decode()}
    secret = {"kind": "Secret", "metadata": {"name": "s"}, "type": "Opaque", "data": data}
    assert kustomize_hash(secret) == "b289k5t9fg"


# ---- schemas -------------------------------------------------------------------------------------


def _k8s_definitions(version: str) -> Resource:
    path = files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json"
    )
    return Resource.from_contents(json.loads(path.read_text()))


def _crd_validator(doc: dict[str, Any], version: str) -> jsonschema.Validator:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]).read_text())
    registry = Registry().with_resource(
        "https://kubernetes.io/api/_definitions.json", _k8s_definitions(version)
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_objects_match_the_kubernetes_schemas(
    target: str, version: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for doc in rendered[target]:
        where = f"{target}: {doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            errors = list(_crd_validator(doc, version).iter_errors(doc))
            assert not errors, f"{where}: " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
            )
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(map(str, exc.path))
            pytest.fail(f"{where} against Kubernetes {version}: {path}: {exc.message}")


def test_crd_schemas_reject_mistakes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    scaled = one(rendered["base"], "ScaledObject")
    validator = _crd_validator(scaled, K8S_VERSIONS[0])
    assert validator.is_valid(scaled)
    typo = copy.deepcopy(scaled)
    typo["spec"]["maxReplicas"] = typo["spec"].pop("maxReplicaCount")
    assert not validator.is_valid(typo)
    number = copy.deepcopy(scaled)
    number["spec"]["triggers"][0]["metadata"]["listLength"] = 10
    assert not validator.is_valid(number), "KEDA trigger metadata values are strings"
    unknown = copy.deepcopy(scaled)
    unknown["spec"]["triggers"][0]["metadata"]["list"] = "embed"
    assert not validator.is_valid(unknown)
    behavior = copy.deepcopy(scaled)
    behavior["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] = {"down": {}}
    assert not validator.is_valid(behavior), "behavior is checked against the HPA schema"


# ---- the same deployment as docker-compose.yml --------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_images_match_compose(
    target: str,
    rendered: dict[str, list[dict[str, Any]]],
    compose_services: dict[str, dict[str, Any]],
) -> None:
    for name, doc in workloads(rendered[target]).items():
        service = compose_services[compose_map(target)[name]]
        assert container(doc)["image"] == service["image"], f"{target}: {name}"
    embedder = container(objects(rendered[target], "Deployment")["embedder"])
    device = "gpu" if target.endswith("gpu") else "cpu"
    build_args = compose_services[compose_map(target)["embedder"]]["build"]["args"]
    assert build_args["DEVICE"] == device
    assert embedder["image"].endswith(f"-{device}"), "tag suffix = deploy/Dockerfile's DEVICE"


def _image_service(image: str) -> str:
    name = _split_image(image)[0]
    assert name.startswith("fashionrec/"), image
    return name.removeprefix("fashionrec/")


@pytest.mark.parametrize("target", TARGETS)
def test_commands_match_compose_and_are_console_scripts(
    target: str,
    rendered: dict[str, list[dict[str, Any]]],
    compose_services: dict[str, dict[str, Any]],
) -> None:
    scripts = compose.console_scripts()
    for name, doc in workloads(rendered[target]).items():
        main = container(doc)
        command = main["command"]
        assert "args" not in main, name
        assert command == compose.as_list(compose_services[compose_map(target)[name]]["command"])
        assert command[0] in scripts, f"{name}: {command[0]} is no [project.scripts] entry"
        assert scripts[command[0]][0] == _image_service(main["image"]), (
            f"{name}: {command[0]} is not installed in {main['image']}"
        )


@pytest.mark.parametrize("name", ["migrate", "indexer", "indexer-worker", "gateway", "embedder"])
def test_subcommands_and_options_exist(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    import typer

    command = container(workloads(rendered["base"])[name])["command"]
    module_name = compose.console_scripts()[command[0]][1].split(":")[0]
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} is not installed")
    module = importlib.import_module(module_name)
    apps = [obj for obj in vars(module).values() if isinstance(obj, typer.Typer)]
    assert apps, f"{module_name} has no typer app"
    group = typer.main.get_command(apps[0])
    assert hasattr(group, "commands"), f"{module_name}: expected subcommands"
    sub = group.commands.get(command[1])
    assert sub is not None, f"{command[0]} has no subcommand {command[1]!r}"
    sub.make_context(command[1], list(command[2:]))  # parses, does not run


@pytest.mark.parametrize("target", TARGETS)
def test_environment_matches_compose(
    target: str,
    rendered: dict[str, list[dict[str, Any]]],
    compose_services: dict[str, dict[str, Any]],
) -> None:
    docs = rendered[target]
    for name, doc in workloads(docs).items():
        env = environment(doc, docs)
        wanted = compose_services[compose_map(target)[name]]["environment"]
        missing = set(wanted) - set(env)
        assert not missing, f"{target}: {name} lacks {sorted(missing)}"
        for key, value in wanted.items():
            if key in SECRET_SOURCED:
                assert env[key] == ("secret", key), f"{name}: {key} comes from the Secret"
            else:
                assert env[key] == str(value), f"{target}: {name}: {key}"
        image_service = _image_service(container(doc)["image"])
        if image_service == "indexer":
            assert "DATABASE_URL" in env, name
        else:
            assert "DATABASE_URL" not in env, f"only the indexer talks to Postgres ({name})"
        assert not KEDA_ONLY_SECRETS & set(env), name


def test_environment_names_are_real_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from fashionrec_shared.settings import StorageSettings

    prefixes = {
        "FASHIONREC_STORAGE_": set(StorageSettings.model_fields),
        "FASHIONREC_GATEWAY_": compose._settings_fields(
            "fashionrec_gateway.settings", "FASHIONREC_GATEWAY_"
        ),
        "FASHIONREC_INDEXER_": compose._settings_fields(
            "fashionrec_indexer.settings", "FASHIONREC_INDEXER_"
        ),
        "FASHIONREC_EMBEDDER_": compose._settings_fields(
            "fashionrec_embedder.settings", "FASHIONREC_EMBEDDER_"
        ),
    }
    unchecked = set()
    names = set()
    for docs in rendered.values():
        for doc in workloads(docs).values():
            names |= set(environment(doc, docs))
    for key in sorted(names):
        if key in ("DATABASE_URL", "REDIS_URL"):
            continue
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        assert prefix, f"{key} is not a fashionrec setting"
        fields = prefixes[prefix]
        if fields is None:
            unchecked.add(prefix)
            continue
        assert key.removeprefix(prefix).lower() in fields, f"{key} names no {prefix} setting"
    if unchecked:
        pytest.skip(f"settings classes not importable for {sorted(unchecked)}")


@pytest.mark.parametrize("target", TARGETS)
def test_probes_match_compose_healthchecks(
    target: str,
    rendered: dict[str, list[dict[str, Any]]],
    compose_services: dict[str, dict[str, Any]],
) -> None:
    for name, doc in objects(rendered[target], "Deployment").items():
        main = container(doc)
        check = compose_services[compose_map(target)[name]]["healthcheck"]
        probes = {p: main.get(f"{p}Probe") for p in ("startup", "liveness", "readiness")}
        assert all(probes.values()), f"{name}: startup, liveness and readiness probes"
        if main["command"][1] == "serve":
            port = int(main["command"][main["command"].index("--port") + 1])
            ports = {p["name"]: p["containerPort"] for p in main["ports"]}
            for probe, path in (
                ("startup", "/livez"),
                ("liveness", "/livez"),
                ("readiness", "/readyz"),
            ):
                get = probes[probe]["httpGet"]
                assert get["path"] == path, f"{name}: {probe} probe on {path}"
                assert ports[get["port"]] == port, f"{name}: {probe} probe port"
            # compose probes the same URL (healthcheck.py http URL).
            assert check["test"][-1] == f"http://127.0.0.1:{port}/livez"
        else:
            # Workers: the exec probe compose runs (a Celery ping, the embedder's heartbeat).
            for probe, spec in probes.items():
                assert spec["exec"]["command"] == check["test"][1:], f"{name}: {probe}"
                assert spec["timeoutSeconds"] >= seconds(check["timeout"]), f"{name}: {probe}"
        startup = probes["startup"]
        window = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        assert window >= seconds(check["start_period"]), f"{name}: startup window"


@pytest.mark.parametrize("target", TARGETS)
def test_resources_and_security(
    target: str,
    rendered: dict[str, list[dict[str, Any]]],
    compose_services: dict[str, dict[str, Any]],
) -> None:
    uid = int(re.search(r"--uid (\d+)", DOCKERFILE.read_text()).group(1))  # type: ignore[union-attr]
    x_app = yaml.safe_load(compose.COMPOSE.read_text())["x-app"]
    grace = seconds(x_app["stop_grace_period"])
    for name, doc in workloads(rendered[target]).items():
        spec = pod_spec(doc)
        assert spec is not None
        main = container(doc)
        requests = main["resources"]["requests"]
        assert {"cpu", "memory"} <= set(requests), f"{name}: cpu and memory requests"
        assert "memory" in main["resources"]["limits"], f"{name}: a memory limit"
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == uid, f"{name}: the image's user"
        assert spec["automountServiceAccountToken"] is False, name
        context = main["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"]["drop"] == ["ALL"], name
        if context.get("readOnlyRootFilesystem"):
            mounts = {m["mountPath"] for m in main.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: a writable /tmp"
        if doc["kind"] == "Deployment":
            assert spec["terminationGracePeriodSeconds"] >= grace, name
    embedder = container(objects(rendered[target], "Deployment")["embedder"])
    cache = environment(objects(rendered[target], "Deployment")["embedder"], rendered[target])
    mounts = {m["mountPath"] for m in embedder["volumeMounts"]}
    assert cache["FASHIONREC_EMBEDDER_CACHE_DIR"] in mounts, "the model cache is a volume"


# ---- Secrets and config -------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_secret_and_config_references_resolve(
    target: str, rendered: dict[str, list[dict[str, Any]]], example_secrets: dict[str, str]
) -> None:
    docs = rendered[target]
    secret = one(docs, "Secret")
    configmap = one(docs, "ConfigMap")
    assert set(secret["data"]) == set(example_secrets), "the Secret is secrets.env"
    used = set()
    for name, doc in workloads(docs).items():
        main = container(doc)
        for source in main.get("envFrom", []):
            assert source == {"configMapRef": {"name": configmap["metadata"]["name"]}}, name
        for var in main.get("env", []):
            if "valueFrom" in var:
                ref = var["valueFrom"]["secretKeyRef"]
                assert ref["name"] == secret["metadata"]["name"], f"{name}: {var['name']}"
                assert ref["key"] in example_secrets, f"{name}: {ref['key']} not in the template"
                used.add(ref["key"])
    auth = one(docs, "TriggerAuthentication")
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == secret["metadata"]["name"], "TriggerAuthentication -> Secret"
        assert ref["key"] in example_secrets, ref
        used.add(ref["key"])
    assert used == set(example_secrets), f"unused secrets: {sorted(set(example_secrets) - used)}"
    assert not set(configmap["data"]) & set(example_secrets), "a setting is in both"


def test_real_secrets_stay_out_of_git() -> None:
    ignored = [line.strip() for line in (K8S / ".gitignore").read_text().splitlines()]
    assert "secrets.env" in ignored
    base = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (generator,) = base["secretGenerator"]
    assert generator["envs"] == ["secrets.env"]
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = subprocess.run(
            ["git", "ls-files", "deploy/k8s"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.split()
        assert not [p for p in tracked if p.endswith("/secrets.env")]


def test_keda_redis_settings_agree_with_redis_url(
    example_secrets: dict[str, str], rendered: dict[str, list[dict[str, Any]]]
) -> None:
    url = urlsplit(example_secrets["REDIS_URL"])
    assert example_secrets["REDIS_ADDRESS"] == f"{url.hostname}:{url.port}"
    assert example_secrets["REDIS_PASSWORD"] == (url.password or "")
    (trigger,) = one(rendered["base"], "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["databaseIndex"] == (url.path.strip("/") or "0")


def test_config_env_is_plain(rendered: dict[str, list[dict[str, Any]]]) -> None:
    values = parse_env_file(CONFIG_ENV.read_text(), str(CONFIG_ENV))
    assert one(rendered["base"], "ConfigMap")["data"] == values
    assert values["FASHIONREC_STORAGE_S3_CREATE_BUCKET"] == "false"


# ---- scaling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_keda_scales_the_embedders_on_the_embed_queue(
    target: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    from fashionrec_shared.tasks import TASK_QUEUES, Queue, TaskName

    docs = rendered[target]
    scaled = one(docs, "ScaledObject")
    ref = scaled["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", "embedder")
    embedder = objects(docs, "Deployment")["embedder"]
    assert "replicas" not in embedder["spec"], "KEDA owns the embedder's replica count"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    # The Redis list Celery keeps the queue's waiting tasks in has the queue's name.
    assert trigger["metadata"]["listName"] == str(Queue.EMBED)
    assert {TASK_QUEUES[TaskName.EMBED_QUERY], TASK_QUEUES[TaskName.EMBED_ITEMS]} == {Queue.EMBED}
    auth = objects(docs, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    params = {r["parameter"]: r["key"] for r in auth["spec"]["secretTargetRef"]}
    assert params == {"address": "REDIS_ADDRESS", "password": "REDIS_PASSWORD"}
    # Queries need an embedder at once and the gateway's /readyz asks for one: never zero.
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert scaled["spec"]["maxReplicaCount"] > scaled["spec"]["minReplicaCount"]
    hpa_targets = {
        h["spec"]["scaleTargetRef"]["name"]
        for h in objects(docs, "HorizontalPodAutoscaler").values()
    }
    assert "embedder" not in hpa_targets, "KEDA makes the embedder's HPA itself"


@pytest.mark.parametrize("target", TARGETS)
def test_gateway_is_scaled_by_an_hpa(
    target: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[target]
    (hpa,) = objects(docs, "HorizontalPodAutoscaler").values()
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", "gateway")
    gateway = objects(docs, "Deployment")["gateway"]
    assert "replicas" not in gateway["spec"], "the HPA owns the gateway's replica count"
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in container(gateway)["resources"]["requests"], "utilisation needs a request"


@pytest.mark.parametrize("target", TARGETS)
def test_one_indexer_worker_with_the_beat(
    target: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[target]
    worker = objects(docs, "Deployment")["indexer-worker"]
    assert worker["spec"]["replicas"] == 1
    assert worker["spec"]["strategy"] == {"type": "Recreate"}, "two beats must never overlap"
    assert "--beat" in container(worker)["command"]
    scaled = {
        o["spec"]["scaleTargetRef"]["name"]
        for k in ("HorizontalPodAutoscaler", "ScaledObject")
        for o in objects(docs, k).values()
    }
    assert "indexer-worker" not in scaled
    labels = worker["spec"]["template"]["metadata"]["labels"]
    for pdb in objects(docs, "PodDisruptionBudget").values():
        assert not selects(pdb["spec"]["selector"]["matchLabels"], labels), "no PDB: one replica"
    beats = [
        n
        for n, d in objects(docs, "Deployment").items()
        if container(d)["command"][1] == "worker"
        and _image_service(container(d)["image"]) == "indexer"
        and "--no-beat" not in container(d)["command"]
    ]
    assert beats == ["indexer-worker"], "exactly one Deployment runs the beat"
    indexer = objects(docs, "Deployment")["indexer"]
    assert indexer["spec"]["replicas"] >= 2, "indexer API replicas share builds via storage"


@pytest.mark.parametrize("target", TARGETS)
def test_disruption_budgets_select_pods_and_allow_drains(
    target: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[target]
    deployments = objects(docs, "Deployment")
    covered = set()
    for name, pdb in objects(docs, "PodDisruptionBudget").items():
        selector = pdb["spec"]["selector"]["matchLabels"]
        matched = [
            n
            for n, d in deployments.items()
            if selects(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matched) == 1, f"PDB {name} selects {matched}"
        covered.add(matched[0])
        if "minAvailable" in pdb["spec"]:
            assert min_replicas(matched[0], docs) > pdb["spec"]["minAvailable"], (
                f"PDB {name} would block every drain"
            )
    assert covered == {"gateway", "indexer", "embedder"}


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_and_services_match_pods(
    target: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[target]
    deployments = objects(docs, "Deployment")
    for name, doc in deployments.items():
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert selects(doc["spec"]["selector"]["matchLabels"], labels), name
        others = [n for n, d in deployments.items() if n != name]
        for other in others:
            other_labels = deployments[other]["spec"]["template"]["metadata"]["labels"]
            assert not selects(doc["spec"]["selector"]["matchLabels"], other_labels), name
    for name, service in objects(docs, "Service").items():
        (target_name,) = [
            n
            for n, d in deployments.items()
            if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        ports = {
            p["name"]: p["containerPort"] for p in container(deployments[target_name])["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"service {name}: {port}"
            assert port["port"] == ports[port["targetPort"]], "the same port as in compose"
    config = one(docs, "ConfigMap")["data"]
    indexer_url = urlsplit(config["FASHIONREC_GATEWAY_INDEXER_URL"])
    indexer = objects(docs, "Service")[indexer_url.hostname]
    assert indexer_url.port in {p["port"] for p in indexer["spec"]["ports"]}


# ---- overlays and the Job ---------------------------------------------------------------------


def test_gpu_overlay_puts_the_embedder_on_a_gpu(
    rendered: dict[str, list[dict[str, Any]]], compose_services: dict[str, dict[str, Any]]
) -> None:
    docs = rendered["overlays/gpu"]
    embedder = objects(docs, "Deployment")["embedder"]
    spec = pod_spec(embedder)
    assert spec is not None
    main = container(embedder)
    (device,) = compose_services["embedder-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert int(main["resources"]["limits"]["nvidia.com/gpu"]) == device["count"] == 1
    assert environment(embedder, docs)["FASHIONREC_EMBEDDER_DEVICE"] == "cuda"
    assert spec["nodeSelector"], "GPU nodes only"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert embedder["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "no spare GPU needed"
    others = [d for n, d in workloads(docs).items() if n != "embedder"]
    assert not any("nvidia.com/gpu" in json.dumps(d) for d in others), "only embedders get GPUs"
    # Everything else is the base's.
    base = {(d["kind"], d["metadata"]["name"]): d for d in rendered["overlays/cpu"]}
    for doc in docs:
        if (
            doc["kind"] not in ("Deployment", "ScaledObject")
            or doc["metadata"]["name"] != "embedder"
        ):
            assert base[(doc["kind"], doc["metadata"]["name"])] == doc, doc["kind"]


@pytest.mark.parametrize("target", ["base", "overlays/cpu"])
def test_cpu_targets_use_no_gpu(target: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered[target]
    assert "nvidia.com/gpu" not in json.dumps(docs)
    embedder = objects(docs, "Deployment")["embedder"]
    assert environment(embedder, docs)["FASHIONREC_EMBEDDER_DEVICE"] == "cpu"


@pytest.mark.parametrize("target", TARGETS)
def test_migrate_job_runs_once(target: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    job = one(rendered[target], "Job")
    spec = pod_spec(job)
    assert spec is not None
    assert spec["restartPolicy"] in ("OnFailure", "Never")
    assert job["spec"]["backoffLimit"] >= 1
    main = container(job)
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(main), "one-shot"
    assert main["command"][:2] == ["fashionrec-indexer", "migrate"]
