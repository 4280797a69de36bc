"""cluster/: every manifest parses; the KubeRay ones validate against the KubeRay v1.7.0 CRD schemas
(../shared/kuberay-crds, objects closed like `kubectl apply --validate=strict`); the plain Kubernetes
objects have their required fields and consistent names; entrypoints and config paths exist in the
repository; the cluster's resources add up with every profile; the launcher YAML passes Ray's own
validation."""

from __future__ import annotations

import copy
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from pipeline.config import REPO_ROOT
from stages import load_config

CLUSTER = REPO_ROOT / "cluster"
K8S = CLUSTER / "k8s"
CRDS = REPO_ROOT.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
IMAGE_ROOT = "/app"  # where cluster/Dockerfile puts the repository in the image
PROFILES = sorted(CLUSTER.glob("profiles/*.yaml"))
MANIFESTS = sorted(K8S.glob("*.yaml"))


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in documents(p)]


def the(kind: str) -> dict:
    found = [d for _, d in all_objects() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} under cluster/k8s, found {len(found)}"
    return found[0]


# ----------------------------------------------------------------------------- CRD schemas


def closed(schema):
    """Every object schema that lists `properties` and neither sets `additionalProperties` nor
    preserves unknown fields is closed: unknown (e.g. misspelled) fields become errors."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def validator(kind: str):
    import jsonschema

    path = CRDS / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"the KubeRay CRDs are not beside the repository ({path} missing)")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    assert version["name"] == "v1"
    return jsonschema.Draft7Validator(closed(version["schema"]["openAPIV3Schema"]))


def crd_errors(obj: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(obj["kind"]).iter_errors(obj)]


@pytest.mark.parametrize("kind", list(CRD_FILES))
def test_kuberay_manifests_validate_against_the_crds_strictly(kind):
    obj = the(kind)
    assert obj["apiVersion"] == "ray.io/v1"
    assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == "swd"
    assert crd_errors(obj) == []


def test_the_strict_check_catches_a_misspelled_field_and_a_wrong_type():
    obj = copy.deepcopy(the("RayCluster"))
    obj["spec"]["workerGroupSpecs"][0]["replica"] = 2  # replicas
    obj["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    obj["spec"]["workerGroupSpecs"][1]["minReplicas"] = "zero"
    errors = "\n".join(crd_errors(obj))
    assert "'replica' was unexpected" in errors
    assert "'imagePullPolice' was unexpected" in errors
    assert "'zero' is not of type 'integer'" in errors
    job = copy.deepcopy(the("RayJob"))
    job["spec"]["shutdownAfterJobFinish"] = True
    assert any("shutdownAfterJobFinish" in e for e in crd_errors(job))


def test_rayjob_and_raycronjob_run_the_standing_clusters_spec():
    cluster = the("RayCluster")["spec"]
    assert the("RayJob")["spec"]["rayClusterSpec"] == cluster
    assert the("RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"] == cluster


def test_token_auth_stays_on_everywhere():
    assert the("RayCluster")["spec"]["authOptions"] == {"mode": "token", "secretName": "swd-ray-token"}
    cron = the("CronJob")
    env = {e["name"]: e for e in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "swd-ray-token", "key": "auth_token"}
    launcher = yaml.safe_load((CLUSTER / "launcher.yaml").read_text())
    assert "-e RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    assert "~/.ray/auth_token" in launcher["file_mounts"]


def test_raycronjob_schedule_and_its_feature_gate_is_documented():
    cron = the("RayCronJob")
    assert valid_cron(cron["spec"]["schedule"]) and cron["spec"]["timeZone"]
    assert "--schedule-slot auto" in cron["spec"]["jobTemplate"]["entrypoint"]
    header = (K8S / "raycronjob.yaml").read_text()
    assert "--feature-gates=RayCronJob=true" in header and "KubeRay >= 1.6" in header
    assert "RayCronJob" in (CLUSTER / "README.md").read_text()


# ----------------------------------------------------------------------------- entrypoints and paths


def repo_path(path: str, cwd: str = IMAGE_ROOT) -> Path:
    """A path inside the image (absolute under /app, or relative to the working dir) -> the repo."""
    p = path if path.startswith("/") else f"{cwd}/{path}"
    assert p.startswith(IMAGE_ROOT + "/"), f"{path} is not inside the image's repository {IMAGE_ROOT}"
    return REPO_ROOT / p[len(IMAGE_ROOT) + 1:]


def check_pipeline_command(argv: list[str], cwd: str = IMAGE_ROOT) -> list[Path]:
    """`python pipeline/run.py --config P ...`: the script and configs exist, the flags parse, the
    configs validate. Returns the config files."""
    from pipeline.run import _parse_args

    assert argv[0] == "python" and repo_path(argv[1], cwd) == REPO_ROOT / "pipeline" / "run.py"
    args = _parse_args(argv[2:])
    configs = [repo_path(c, cwd) for c in args.config]
    assert configs, f"{argv}: no --config profile"
    for c in configs:
        assert c.is_file(), f"{argv}: {c} does not exist"
        assert c.parent == CLUSTER / "profiles"
    load_config(configs, args.overrides)
    return configs


def test_rayjob_entrypoints_exist_and_parse():
    for spec in (the("RayJob")["spec"], the("RayCronJob")["spec"]["jobTemplate"]):
        check_pipeline_command(shlex.split(spec["entrypoint"]))
        assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True


def test_runtime_env_is_valid_and_the_rayjobs_carry_its_env_vars():
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**runtime_env)  # Ray's own validation of the fields
    assert set(runtime_env) <= {"excludes", "env_vars"}  # nothing installed at job start
    assert {"workdir", ".git", "mlruns"} <= set(runtime_env["excludes"])
    for spec in (the("RayJob")["spec"], the("RayCronJob")["spec"]["jobTemplate"]):
        assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"env_vars": runtime_env["env_vars"]}


def test_cronjob_fallback_submits_to_the_standing_cluster():
    cron = the("CronJob")
    assert cron["apiVersion"] == "batch/v1" and valid_cron(cron["spec"]["schedule"])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    argv = container["command"]
    assert argv[:3] == ["ray", "job", "submit"]
    cluster = the("RayCluster")
    head_ports = {p["name"]: p["containerPort"]
                  for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    address = argv[argv.index("--address") + 1]
    assert address == (f"http://{cluster['metadata']['name']}-head-svc.{cluster['metadata']['namespace']}"
                       f".svc.cluster.local:{head_ports['dashboard']}")
    cwd = container["workingDir"]
    assert argv[argv.index("--working-dir") + 1] == IMAGE_ROOT
    assert repo_path(argv[argv.index("--runtime-env") + 1]) == CLUSTER / "runtime_env.yaml"
    check_pipeline_command(argv[argv.index("--") + 1:], cwd)
    assert argv[-2:] == ["--schedule-slot", "auto"]


def test_images_and_versions_agree():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)
    mlflow_pin = re.search(r'"mlflow==([\d.]+)"', pyproject).group(1)
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_pin)}-py311", dockerfile, re.M)
    assert f"WORKDIR {IMAGE_ROOT}" in dockerfile
    assert f'"mlflow=={mlflow_pin}"' in (CLUSTER / "mlflow.Dockerfile").read_text()
    cluster = the("RayCluster")["spec"]
    assert cluster["rayVersion"] == ray_pin
    images = {c["image"] for c in ray_containers(cluster)}
    images.add(the("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"])
    images.add(yaml.safe_load((CLUSTER / "launcher.yaml").read_text())["docker"]["image"])
    assert len(images) == 1, images


# ----------------------------------------------------------------------------- plain Kubernetes objects


def test_every_manifest_object_has_the_basics():
    objects = all_objects()
    assert {d["kind"] for _, d in objects} >= {"RayCluster", "RayJob", "RayCronJob", "CronJob", "Deployment",
                                               "Service", "StatefulSet", "PersistentVolumeClaim"}
    for path, d in objects:
        assert d.get("apiVersion") and d.get("kind"), path
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), path
        assert d["metadata"].get("namespace") == "swd", f"{path}: {d['kind']} {d['metadata']['name']}"
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "swd-pipeline", path


def test_services_select_their_pods_and_ports():
    workloads = {d["metadata"]["name"]: d for _, d in all_objects() if d["kind"] in ("Deployment", "StatefulSet")}
    for _, svc in [(p, d) for p, d in all_objects() if d["kind"] == "Service"]:
        target = workloads[svc["metadata"]["name"]]
        labels = target["spec"]["template"]["metadata"]["labels"]
        assert target["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert svc["spec"]["selector"].items() <= labels.items()
        ports = {p["name"] for c in target["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    assert the("StatefulSet")["spec"]["serviceName"] in {d["metadata"]["name"] for _, d in all_objects()
                                                         if d["kind"] == "Service"}


def test_mlflow_server_uses_postgres_and_s3_with_credentials_from_secrets():
    deploy = the("Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    uri = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert uri.startswith("postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@swd-postgres.swd.svc.cluster.local:5432/")
    names = [e["name"] for e in container["env"]]
    assert names.index("POSTGRES_USER") < names.index("MLFLOW_BACKEND_STORE_URI")  # $(VAR) needs it defined first
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert "--serve-artifacts" in container["command"]
    hosts = container["command"][container["command"].index("--allowed-hosts") + 1].split(",")
    assert "swd-mlflow.swd.svc.cluster.local:5000" in hosts
    service = next(d for _, d in all_objects() if d["kind"] == "Service" and d["metadata"]["name"] == "swd-mlflow")
    tracking = f"http://swd-mlflow.swd.svc.cluster.local:{service['spec']['ports'][0]['port']}"
    for c in ray_containers(the("RayCluster")["spec"]):
        assert {"name": "MLFLOW_TRACKING_URI", "value": tracking} in c["env"]


def test_every_secret_used_is_documented_with_its_keys():
    used = set()

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                used.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for _, d in all_objects():
        walk(d)
    used.add(("swd-ray-token", "auth_token"))  # authOptions.secretName
    readme = (CLUSTER / "README.md").read_text()
    documented = {(m.group(1), k) for m in re.finditer(r"kubectl -n swd create secret generic (\S+)(.*)", readme)
                  for k in re.findall(r"--from-literal=(\w+)=", m.group(2))}
    assert used <= documented, f"not in cluster/README.md: {sorted(used - documented)}"


def valid_cron(expr: str) -> bool:
    fields = expr.split()
    return len(fields) == 5 and all(re.fullmatch(r"[\d*/,\-]+", f) for f in fields)


# ----------------------------------------------------------------------------- resources vs profiles


def ray_containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"]["spec"]["containers"][0] for g in groups]


def group(cluster_spec: dict, name: str) -> dict:
    return next(g for g in cluster_spec["workerGroupSpecs"] if g["groupName"] == name)


def quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_ray_resources_match_the_pod_resources():
    spec = the("RayCluster")["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no Ray work
    for g in spec["workerGroupSpecs"]:
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"] == res["limits"], g["groupName"]  # guaranteed QoS: Ray's view stays true
        assert quantity(g["rayStartParams"]["num-cpus"]) <= quantity(res["limits"]["cpu"]), g["groupName"]
        gpus = res["limits"].get("nvidia.com/gpu")
        assert g["rayStartParams"].get("num-gpus") == gpus, g["groupName"]
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert group(spec, "gpu")["rayStartParams"]["num-gpus"] and "num-gpus" not in group(spec, "cpu")["rayStartParams"]


def node_types() -> dict[str, dict]:
    """Per worker kind, (Ray CPUs, Ray GPUs, how many nodes) in the KubeRay cluster and the launcher."""
    spec = the("RayCluster")["spec"]
    launcher = yaml.safe_load((CLUSTER / "launcher.yaml").read_text())["available_node_types"]
    out = {}
    for kind in ("cpu", "gpu"):
        g = group(spec, kind)
        out[f"kuberay-{kind}"] = (float(g["rayStartParams"]["num-cpus"]), float(g["rayStartParams"].get("num-gpus", 0)),
                                  g["replicas"])
        t = launcher[kind]
        out[f"launcher-{kind}"] = (float(t["resources"]["CPU"]), float(t["resources"].get("GPU", 0)), t["max_workers"])
    return out


def test_there_are_the_three_sd35_profiles():
    assert {p.stem for p in PROFILES} >= {"sd35-medium-6step", "sd35-medium-4step", "sd35-large-4step"}


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
@pytest.mark.parametrize("where", ["kuberay", "launcher"])
def test_every_profile_fits_the_cluster(profile, where):
    cfg = load_config([profile])
    types = node_types()
    cpus, gpus_per_node, gpu_nodes = types[f"{where}-gpu"]
    cpu_node_cpus, _, cpu_nodes = types[f"{where}-cpu"]
    total_gpus, total_cpus = gpus_per_node * gpu_nodes, cpus * gpu_nodes + cpu_node_cpus * cpu_nodes
    d = cfg.distill
    assert d.use_gpu
    # distill: every Ray Train worker gets its GPUs and CPUs on a GPU node, and CPUs stay free for Ray Data
    assert d.num_workers * d.num_gpus_per_worker <= total_gpus
    per_node = int(gpus_per_node // d.num_gpus_per_worker)
    assert per_node >= 1 and per_node * d.num_cpus_per_worker <= cpus
    assert total_cpus - d.num_workers * d.num_cpus_per_worker >= 16, "leave CPUs for Ray Data"
    # cache: encoder actors (one GPU each by default on a GPU cluster)
    c = cfg.cache
    enc_gpus = 1.0 if c.num_gpus_per_encoder is None else c.num_gpus_per_encoder
    assert c.num_encoders * enc_gpus <= total_gpus and enc_gpus <= gpus_per_node
    assert c.num_encoders * c.num_cpus_per_encoder <= cpus * gpu_nodes
    # evaluate: generation actors
    e = cfg.evaluate
    gen_gpus = 1.0 if e.num_gpus_per_actor is None else e.num_gpus_per_actor
    assert e.num_actors * gen_gpus <= total_gpus and e.num_actors * e.num_cpus_per_actor <= cpus * gpu_nodes


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_profile_keeps_its_state_on_storage_every_pod_mounts(profile):
    cfg = load_config([profile])
    spec = the("RayCluster")["spec"]
    pvc = the("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = g["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        shared = next(mounts[n] for n, claim in claims.items() if claim == pvc["metadata"]["name"])
        assert str(cfg.workdir).startswith(shared + "/")
        for shards in (cfg.data.train_shards, cfg.data.eval_shards):
            assert isinstance(shards, str) and (shards.startswith(shared + "/") or shards.startswith("s3://"))
        storage = cfg.distill.storage_path
        assert storage and (storage.startswith("s3://") or storage.startswith(shared + "/"))
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["HF_HOME"].startswith(shared + "/")  # the teacher's snapshot (local_files_only)


# ----------------------------------------------------------------------------- launcher


def test_launcher_passes_rays_validation_and_has_head_cpu_gpu_types():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "launcher.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    assert raw["head_node_type"] == "head" and set(raw["available_node_types"]) == {"head", "cpu", "gpu"}
    assert raw["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert "--num-cpus=0" in " ".join(raw["head_start_ray_commands"])
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu"]["max_worker"] = 2
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(bad))
