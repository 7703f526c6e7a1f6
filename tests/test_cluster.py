"""cluster/: the AWS launcher config passes Ray's own validation, the KubeRay manifests are well formed, ask for
one T4 per worker, hold no credentials, and run job modules and configs that exist."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from support.shared import KUBERAY_SCHEMAS, needs_kuberay_schemas

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
AWS_CONFIG = CLUSTER / "aws" / "phi2sum-t4.yaml"
KUBERAY = CLUSTER / "kuberay"
RAYJOBS = [KUBERAY / "rayjob-train.yaml", KUBERAY / "rayjob-summarize.yaml"]
IMAGE = "ghcr.io/your-org/phi2sum:latest"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _ray_validate(config: dict) -> None:
    """What `ray up` does before touching the cloud: fill in the provider's defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_aws_config_passes_rays_validation():
    config = _load(AWS_CONFIG)
    _ray_validate(config)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    worker = nodes["t4-worker"]
    assert worker["resources"]["GPU"] == 1 and worker["node_config"]["InstanceType"] == "g4dn.xlarge"
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]


@pytest.mark.parametrize("breakage", ["typo", "bad_resources", "missing_head_type"])
def test_a_broken_aws_config_fails_validation(breakage):
    import jsonschema

    config = _load(AWS_CONFIG)
    if breakage == "typo":
        config["max_worker"] = config.pop("max_workers")
    elif breakage == "bad_resources":
        config["available_node_types"]["t4-worker"]["resources"]["GPU"] = "one"
    else:
        config["head_node_type"] = "no-such-node-type"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_validate(config)


def test_aws_setup_installs_the_synced_project_and_the_local_ray():
    import ray

    config = _load(AWS_CONFIG)
    remote = next(iter(config["file_mounts"]))
    assert config["file_mounts"][remote] == "."
    setup = "\n".join(config["setup_commands"])
    assert f"pip install -q -e {remote}" in setup and f"=={ray.__version__}" in setup
    assert "download.pytorch.org/whl/cu" in setup  # a CUDA build of torch


def test_raycluster_has_a_head_and_a_t4_worker_group():
    import ray

    cluster = _load(KUBERAY / "raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["rayVersion"] == ray.__version__
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["spec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    for spec in (head["template"]["spec"], pod):
        for c in spec["containers"]:
            assert c["image"] == IMAGE
            secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(secrets)
            assert secrets["AWS_ENDPOINT_URL"].get("optional") is True


def test_dockerfile_builds_on_the_matching_ray_image():
    import ray

    dockerfile = (KUBERAY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu$", dockerfile, re.M)
    assert "pip install --no-cache-dir -e ." in dockerfile


def _entrypoint(path: Path) -> list[str]:
    job = _load(path)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == _load(KUBERAY / "raycluster.yaml")["metadata"]["name"]
    return shlex.split(job["spec"]["entrypoint"])


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.stem)
def test_rayjob_runs_an_existing_config_with_valid_overrides(path):
    from phi2sum.config import load_config

    from phi2sum.cli import JOB_ARGUMENTS

    argv = _entrypoint(path)
    module = argv[argv.index("-m") + 1]
    assert re.fullmatch(r"jobs\.\w+", module) and (REPO / (module.replace(".", "/") + ".py")).is_file(), module
    config = argv[argv.index("--config") + 1]
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith(("-", *(f"{a}=" for a in JOB_ARGUMENTS)))]
    load_config(config, overrides)  # a preset that exists, and every override names a real key with a valid value


CREDENTIAL_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # an AWS access key id
    re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),  # the shape of an AWS secret key
    re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)\w*\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}", re.I),  # KEY=value
    re.compile(r"name:\s*AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID)\s*\n\s*value:"),  # a literal env value
]


def _credentials(text: str) -> list[str]:
    return [p.pattern for p in CREDENTIAL_PATTERNS if p.search(text)]


def test_no_credentials_in_cluster_files():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert len(files) >= 6
    for path in files:
        found = _credentials(path.read_text(encoding="utf-8"))
        assert not found, f"{path.relative_to(REPO)} looks like it holds a credential: {found}"


def test_the_credential_scan_catches_planted_keys():
    planted = "env:\n  - name: AWS_SECRET_ACCESS_KEY\n    value: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
    assert len(_credentials(planted)) >= 2
    assert _credentials("aws_access_key_id: AKIAIOSFODNN7EXAMPLE")


# --- the KubeRay manifests against KubeRay's own CRD schemas, unknown fields forbidden ---------------------------


def _strict(schema):
    """The CRD schema as the API server applies it, but refusing unknown fields (the server would silently drop
    them, so a misspelt field would just not take effect): objects that list properties and do not preserve
    unknown fields get additionalProperties: false."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators():
    import jsonschema

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
    validators = {}
    for kind, file in (("RayCluster", "ray.io_rayclusters.yaml"), ("RayJob", "ray.io_rayjobs.yaml")):
        crd = yaml.load((KUBERAY_SCHEMAS / file).read_text(encoding="utf-8"), Loader=loader)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        validators[kind] = jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))
    return validators


def _errors(validators, manifest) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validators[manifest["kind"]].iter_errors(manifest)]


@needs_kuberay_schemas
@pytest.mark.parametrize("path", [KUBERAY / "raycluster.yaml", *RAYJOBS], ids=lambda p: p.stem)
def test_kuberay_manifests_pass_the_v1_7_crd_schemas(crd_validators, path):
    assert _errors(crd_validators, _load(path)) == []


@needs_kuberay_schemas
@pytest.mark.parametrize("breakage", ["misspelt_field", "wrong_type", "unknown_top_level"])
def test_a_broken_manifest_fails_the_crd_schema(crd_validators, breakage):
    cluster = _load(KUBERAY / "raycluster.yaml")
    container = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    if breakage == "misspelt_field":
        container["imagePullPolicyy"] = "Always"  # the API server would drop it without a word
    elif breakage == "wrong_type":
        cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    else:
        cluster["spec"]["autoscalerOptionz"] = {}
    assert _errors(crd_validators, cluster)
