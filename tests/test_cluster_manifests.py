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
    mlflow_pin = re.search(r'"mlflow\[auth\]==([\d.]+)"', pyproject).group(1)
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_pin)}-py311", dockerfile, re.M)
    assert f"WORKDIR {IMAGE_ROOT}" in dockerfile
    mlflow_image = (CLUSTER / "mlflow.Dockerfile").read_text()
    assert f'"mlflow[auth]=={mlflow_pin}"' in mlflow_image  # the basic-auth app needs the extra
    for package in ("Flask-WTF", "WTForms"):  # what the extra adds, pinned alike in both
        pin = re.search(rf'"{package}==([\d.]+)"', pyproject).group(1)
        assert f'"{package}=={pin}"' in mlflow_image, package
    cluster = the("RayCluster")["spec"]
    assert cluster["rayVersion"] == ray_pin
    images = {c["image"] for c in ray_containers(cluster)}
    images.add(the("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"])
    for spec in (the("RayJob")["spec"], the("RayCronJob")["spec"]["jobTemplate"]):
        images.add(spec["submitterPodTemplate"]["spec"]["containers"][0]["image"])
    images.add(yaml.safe_load((CLUSTER / "launcher.yaml").read_text())["docker"]["image"])
    assert len(images) == 1, images


# ----------------------------------------------------------------------------- plain Kubernetes objects


def test_every_manifest_object_has_the_basics():
    objects = all_objects()
    assert {d["kind"] for _, d in objects} >= {"RayCluster", "RayJob", "RayCronJob", "CronJob", "Deployment",
                                               "Service", "StatefulSet", "PersistentVolumeClaim", "ConfigMap",
                                               "Job", "NetworkPolicy"}
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


def dict_nodes(node):
    """Every mapping in a parsed manifest, depth first."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from dict_nodes(v)
    elif isinstance(node, list):
        for v in node:
            yield from dict_nodes(v)


def test_every_secret_used_is_documented_with_its_keys():
    used = {(node["secretKeyRef"]["name"], node["secretKeyRef"]["key"])
            for _, d in all_objects() for node in dict_nodes(d) if "secretKeyRef" in node}
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


# ----------------------------------------------------------------------------- MLflow authentication


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def submitter_containers() -> list[dict]:
    """The pods that only run `ray job submit`: the CronJob's and KubeRay's RayJob / RayCronJob submitters."""
    out = [the("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]]
    for spec in (the("RayJob")["spec"], the("RayCronJob")["spec"]["jobTemplate"]):
        out += spec["submitterPodTemplate"]["spec"]["containers"]
    return out


def test_mlflow_server_runs_the_basic_auth_app_with_its_config_and_secrets():
    import configparser

    deploy = the("Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    (init,) = pod["initContainers"]
    assert server["command"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    env = env_of(server)
    for name, secret in [("MLFLOW_AUTH_ADMIN_USERNAME", "swd-mlflow-admin"), ("MLFLOW_AUTH_ADMIN_PASSWORD", "swd-mlflow-admin"),
                         ("MLFLOW_FLASK_SERVER_SECRET_KEY", "swd-mlflow-server")]:
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret, name
    # The init container renders ConfigMap + database URI into the volume the server reads its config from.
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    assert init["command"][:3] == ["python", "/opt/swd/mlflow_auth_setup.py", "render-config"]
    template, out = init["command"][3:]
    assert out == config_path
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    server_mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    rendered = next(n for n, path in mounts.items() if config_path.startswith(path + "/"))
    assert server_mounts[rendered] == mounts[rendered] and volumes[rendered]["emptyDir"]["medium"] == "Memory"
    source = next(n for n, path in mounts.items() if template.startswith(path + "/"))
    config_map = the("ConfigMap")
    assert volumes[source]["configMap"]["name"] == config_map["metadata"]["name"]
    ini = config_map["data"][Path(template).name]
    parsed = configparser.ConfigParser()
    parsed.read_string(ini)
    assert parsed["mlflow"]["default_permission"] == "NO_PERMISSIONS"  # a user holds only its grants
    assert not {"database_uri", "admin_password", "admin_username"} & set(parsed["mlflow"])  # no secret in a ConfigMap
    init_env = [e["name"] for e in init["env"]]
    assert init_env.index("POSTGRES_PASSWORD") < init_env.index("MLFLOW_AUTH_DATABASE_URI")  # $(VAR) order
    assert env_of(init)["MLFLOW_AUTH_DATABASE_URI"]["value"] == env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert "COPY mlflow_auth_setup.py /opt/swd/mlflow_auth_setup.py" in (CLUSTER / "mlflow.Dockerfile").read_text()


def test_ray_pods_carry_the_pipeline_user_and_submitters_no_mlflow_credential():
    for spec in (the("RayCluster")["spec"], the("RayJob")["spec"]["rayClusterSpec"],
                 the("RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"]):
        for c in ray_containers(spec):
            env = env_of(c)
            assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": "swd-mlflow-pipeline",
                                                                                    "key": "username"}
            assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "swd-mlflow-pipeline",
                                                                                    "key": "password"}
    for c in submitter_containers():  # the pipeline runs on the head: a submitter needs Ray's token only
        assert not {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} & set(env_of(c)), c["name"]


def test_no_credential_is_written_into_a_manifest():
    """Every env var named like a credential comes from a Secret, never a literal value."""
    for _, d in all_objects():
        for node in dict_nodes(d):
            if "name" in node and re.search(r"PASSWORD|SECRET|TOKEN|USERNAME|_USER$", str(node["name"])) \
                    and ("value" in node or "valueFrom" in node):
                assert "secretKeyRef" in node.get("valueFrom", {}), node["name"]


def test_auth_setup_job_grants_every_profiles_experiment_and_model():
    job = the("Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    argv = container["command"]
    assert argv[:3] == ["python", "/opt/swd/mlflow_auth_setup.py", "setup"]
    assert (CLUSTER / "mlflow_auth_setup.py").is_file()
    pairs = list(zip(argv[3::2], argv[4::2]))
    experiments = {v for k, v in pairs if k == "--experiment"}
    models = {v for k, v in pairs if k == "--model"}
    assert {k for k, _ in pairs} == {"--experiment", "--model"}
    # Read as written: each cluster profile names its own experiment and model (none logs to the embedded
    # default's swd-embedded / swd-student, which the pipeline user holds no grant on).
    raw = [yaml.safe_load(p.read_text()) for p in PROFILES]
    assert experiments == {r["tracking"]["experiment"] for r in raw}
    assert models == {r["register"]["model_name"] for r in raw}
    env = env_of(container)
    service = next(d for _, d in all_objects() if d["kind"] == "Service" and d["metadata"]["name"] == "swd-mlflow")
    assert env["MLFLOW_TRACKING_URI"]["value"] == f"http://swd-mlflow.swd.svc.cluster.local:{service['spec']['ports'][0]['port']}"
    for name, secret in [("MLFLOW_TRACKING_USERNAME", "swd-mlflow-admin"), ("MLFLOW_TRACKING_PASSWORD", "swd-mlflow-admin"),
                         ("SWD_PIPELINE_USERNAME", "swd-mlflow-pipeline"), ("SWD_PIPELINE_PASSWORD", "swd-mlflow-pipeline"),
                         ("SWD_READER_USERNAME", "swd-mlflow-reader"), ("SWD_READER_PASSWORD", "swd-mlflow-reader")]:
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret, name


# ----------------------------------------------------------------------------- network policies
# No NetworkPolicy schema ships beside the KubeRay CRDs: a closed JSON schema of the
# networking.k8s.io/v1 fields, and an evaluator of Kubernetes' ingress rules against the pods the
# manifests create.

_LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["key", "operator"],
            "properties": {"key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
_PEER = {"type": "object", "additionalProperties": False, "minProperties": 1,
         "properties": {"podSelector": _LABEL_SELECTOR, "namespaceSelector": _LABEL_SELECTOR,
                        "ipBlock": {"type": "object", "additionalProperties": False, "required": ["cidr"],
                                    "properties": {"cidr": {"type": "string"},
                                                   "except": {"type": "array", "items": {"type": "string"}}}}}}
_PORT = {"type": "object", "additionalProperties": False,
         "properties": {"protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                        "port": {"type": ["integer", "string"]}, "endPort": {"type": "integer"}}}
NETWORK_POLICY_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "networking.k8s.io/v1"}, "kind": {"const": "NetworkPolicy"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["podSelector", "policyTypes"],
                 "properties": {
                     "podSelector": _LABEL_SELECTOR,
                     "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}, "minItems": 1},
                     "ingress": {"type": "array", "items": {
                         "type": "object", "additionalProperties": False,
                         "properties": {"from": {"type": "array", "items": _PEER},
                                        "ports": {"type": "array", "items": _PORT}}}},
                     "egress": {"type": "array", "items": {
                         "type": "object", "additionalProperties": False,
                         "properties": {"to": {"type": "array", "items": _PEER},
                                        "ports": {"type": "array", "items": _PORT}}}}}},
    },
}
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_LABEL_NAME}")
_LABEL_VALUE = re.compile(rf"({_LABEL_NAME})?")


def network_policies() -> list[dict]:
    return [d for _, d in all_objects() if d["kind"] == "NetworkPolicy"]


def policy_errors(policy: dict) -> list[str]:
    """Schema errors, plus the rules the API server adds: label syntax, values for In/NotIn only, no ipBlock
    (the pods' addresses are not known here, so an ipBlock rule could not be checked)."""
    import jsonschema

    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(NETWORK_POLICY_SCHEMA).iter_errors(policy)]

    def selector(sel: dict, where: str):
        for k, v in sel.get("matchLabels", {}).items():
            if not _LABEL_KEY.fullmatch(k) or not _LABEL_VALUE.fullmatch(v):
                errors.append(f"{where}: label {k}={v} is not a valid label")
        for e in sel.get("matchExpressions", []):
            has_values = bool(e.get("values"))
            if not _LABEL_KEY.fullmatch(e.get("key", "")):
                errors.append(f"{where}: {e.get('key')!r} is not a valid label key")
            if has_values != (e.get("operator") in ("In", "NotIn")):
                errors.append(f"{where}: operator {e.get('operator')} with values {e.get('values')}")

    spec = policy.get("spec", {})
    selector(spec.get("podSelector", {}), "spec.podSelector")
    for i, rule in enumerate(spec.get("ingress", [])):
        for j, peer in enumerate(rule.get("from", [])):
            if "ipBlock" in peer:
                errors.append(f"spec.ingress.{i}.from.{j}: ipBlock is not used in this project")
            for key in ("podSelector", "namespaceSelector"):
                if key in peer:
                    selector(peer[key], f"spec.ingress.{i}.from.{j}.{key}")
    return errors


def test_network_policies_validate_strictly():
    policies = network_policies()
    assert {p["metadata"]["name"] for p in policies} == {"swd-ray-cluster", "swd-ray-head-jobs", "swd-mlflow",
                                                         "swd-postgres"}
    for p in policies:
        assert policy_errors(p) == [], p["metadata"]["name"]
        assert p["spec"]["policyTypes"] == ["Ingress"]


def test_the_policy_check_catches_a_misspelled_field_and_a_bad_selector():
    bad = copy.deepcopy(next(p for p in network_policies() if p["metadata"]["name"] == "swd-mlflow"))
    bad["spec"]["ingress"][0]["form"] = bad["spec"]["ingress"][0].pop("from")
    bad["spec"]["podSelector"]["matchExpressions"] = [{"key": "app", "operator": "Exists", "values": ["x"]}]
    bad["spec"]["ingress"][0]["ports"][0]["protocol"] = "HTTP"
    errors = "\n".join(policy_errors(bad))
    assert "'form' was unexpected" in errors and "operator Exists with values" in errors and "'HTTP' is not one of" in errors


class Pod:
    def __init__(self, name: str, labels: dict, namespace: str = "swd", namespace_labels: dict | None = None,
                 ports: dict[str, int] | None = None):
        self.name, self.labels, self.namespace, self.ports = name, dict(labels), namespace, dict(ports or {})
        self.namespace_labels = {"kubernetes.io/metadata.name": namespace, **(namespace_labels or {})}


def kuberay_pod_labels(template_labels: dict, cluster: str, node_type: str, group: str) -> dict:
    """The labels KubeRay puts on a Ray pod (ray-operator/controllers/ray/common/pod.go `labelPod`, v1.7):
    its defaults, then the template's labels, which override all but node-type, group and cluster."""
    labels = {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster, "ray.io/node-type": node_type,
              "ray.io/group": group, "ray.io/identifier": f"{cluster}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    for k, v in template_labels.items():
        if k not in ("ray.io/node-type", "ray.io/group", "ray.io/cluster"):
            labels[k] = v
    return labels


def container_ports(pod_spec: dict) -> dict[str, int]:
    return {p.get("name", str(p["containerPort"])): p["containerPort"]
            for c in pod_spec["containers"] for p in c.get("ports", [])}


def manifest_pods() -> dict[str, Pod]:
    """Every pod the manifests create, with the labels it will carry in the cluster."""
    pods = {}
    clusters = [("raycluster", the("RayCluster")["metadata"]["name"], the("RayCluster")["spec"]),
                ("rayjob", the("RayJob")["metadata"]["name"] + "-x7k2p", the("RayJob")["spec"]["rayClusterSpec"]),
                ("raycronjob", the("RayCronJob")["metadata"]["name"] + "-29a1c-x7k2p",
                 the("RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"])]
    for key, cluster, spec in clusters:
        head = spec["headGroupSpec"]["template"]
        pods[f"{key}/head"] = Pod(f"{cluster}-head", kuberay_pod_labels(head.get("metadata", {}).get("labels", {}),
                                                                        cluster, "head", "headgroup"),
                                  ports=container_ports(head["spec"]))
        for g in spec["workerGroupSpecs"]:
            t = g["template"]
            pods[f"{key}/{g['groupName']}"] = Pod(
                f"{cluster}-{g['groupName']}-worker", kuberay_pod_labels(t.get("metadata", {}).get("labels", {}), cluster,
                                                                          "worker", g["groupName"]),
                ports=container_ports(t["spec"]))
    # Submitters: KubeRay labels its submitter pods (rayjob_controller.go getSubmitterTemplate), the Job
    # controller adds job-name.
    for key, obj, spec in [("rayjob", the("RayJob"), the("RayJob")["spec"]),
                           ("raycronjob", the("RayCronJob"), the("RayCronJob")["spec"]["jobTemplate"])]:
        name = obj["metadata"]["name"] + ("-29a1c" if key == "raycronjob" else "")
        pods[f"{key}/submitter"] = Pod(f"{name}-submit", {
            **spec["submitterPodTemplate"]["metadata"]["labels"], "ray.io/originated-from-cr-name": name,
            "ray.io/originated-from-crd": "RayJob", "app.kubernetes.io/created-by": "kuberay-operator",
            "batch.kubernetes.io/job-name": name})
    cron = the("CronJob")
    pods["cronjob/submitter"] = Pod("swd-retrain-submit-29a1c", {
        **cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"],
        "batch.kubernetes.io/job-name": "swd-retrain-submit-29a1c"})
    for _, d in all_objects():
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            t = d["spec"]["template"]
            pods[d["metadata"]["name"]] = Pod(d["metadata"]["name"], t["metadata"]["labels"],
                                              ports=container_ports(t["spec"]))
    return pods


def other_pods() -> dict[str, Pod]:
    """Pods the manifests do not create, that the policies must tell apart."""
    operator = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator"}
    ray_like = {"app.kubernetes.io/part-of": "swd-pipeline", "app.kubernetes.io/component": "ray-head"}
    return {
        "operator": Pod("kuberay-operator-5d8f", operator, "kuberay-system", {"swd-pipeline/kuberay-operator": "true"}),
        "operator-unlabelled-ns": Pod("kuberay-operator-5d8f", operator, "default"),
        "ui-namespace": Pod("ingress-nginx-controller", {"app.kubernetes.io/name": "ingress-nginx"}, "ingress-nginx",
                            {"swd-pipeline/mlflow-ui": "true"}),
        "unlabelled-namespace": Pod("someone", {"app": "notebook"}, "team-a"),
        "ray-labels-elsewhere": Pod("impostor", ray_like, "team-a"),  # right labels, wrong namespace
        "stray-in-swd": Pod("debug", {"run": "debug"}),
        "minio-in-swd": Pod("minio-0", {"app": "minio"}),
    }


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes LabelSelector: all matchLabels and all matchExpressions hold ({} selects everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": present and value in e.get("values", []), "NotIn": not present or value not in e.get("values", []),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


def peer_admits(peer: dict, src: Pod, policy_namespace: str) -> bool:
    assert "ipBlock" not in peer
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], src.namespace_labels):
            return False
    elif src.namespace != policy_namespace:  # a podSelector alone means the policy's own namespace
        return False
    return selects(peer.get("podSelector", {}), src.labels)


def port_admits(rule_ports: list | None, dst: Pod, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str):  # a named port of the destination pod
            want = dst.ports.get(want)
        if want is not None and want <= port <= p.get("endPort", want):
            return True
    return False


def admitted(policies: list[dict], src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
    """Kubernetes' ingress semantics: a pod no Ingress policy selects accepts everything; a selected pod
    accepts a connection that some rule of some selecting policy admits (peers and ports both)."""
    selecting = [p for p in policies if p["metadata"]["namespace"] == dst.namespace
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"]["podSelector"], dst.labels)]
    if not selecting:
        return True
    return any(port_admits(rule.get("ports"), dst, port, protocol)
               and (not rule.get("from") or any(peer_admits(peer, src, p["metadata"]["namespace"]) for peer in rule["from"]))
               for p in selecting for rule in p["spec"].get("ingress", []))


RAY_INTERNAL_PORT = 10002  # a Ray worker port (raylet, object manager and workers use many)
# (source, destination, port, admitted): sources and destinations name manifest_pods() / other_pods().
REACHABILITY = [
    # the Ray head: GCS, dashboard / jobs, client
    *[(src, "raycluster/head", port, True) for src in ("raycluster/cpu", "raycluster/gpu")
      for port in (6379, 8265, 10001, RAY_INTERNAL_PORT)],
    ("cronjob/submitter", "raycluster/head", 8265, True),
    ("cronjob/submitter", "raycluster/head", 6379, False),
    ("cronjob/submitter", "raycluster/head", 10001, False),
    ("rayjob/submitter", "rayjob/head", 8265, True),
    ("rayjob/submitter", "rayjob/head", 6379, False),
    ("raycronjob/submitter", "raycronjob/head", 8265, True),
    ("raycronjob/gpu", "raycronjob/head", 6379, True),
    ("operator", "rayjob/head", 8265, True),
    ("operator", "rayjob/head", 6379, False),
    ("operator-unlabelled-ns", "rayjob/head", 8265, False),
    ("swd-mlflow", "raycluster/head", 8265, False),
    ("swd-mlflow-auth-setup", "raycluster/head", 8265, False),
    ("ui-namespace", "raycluster/head", 8265, False),
    ("unlabelled-namespace", "raycluster/head", 8265, False),
    ("ray-labels-elsewhere", "raycluster/head", 6379, False),
    ("stray-in-swd", "raycluster/head", 10001, False),
    ("minio-in-swd", "raycluster/head", 8265, False),
    # Ray workers: Ray's own traffic only
    ("raycluster/head", "raycluster/gpu", RAY_INTERNAL_PORT, True),
    ("raycluster/cpu", "raycluster/gpu", RAY_INTERNAL_PORT, True),
    ("cronjob/submitter", "raycluster/gpu", RAY_INTERNAL_PORT, False),
    ("stray-in-swd", "raycluster/cpu", RAY_INTERNAL_PORT, False),
    # MLflow
    *[(src, "swd-mlflow", 5000, True) for src in ("raycluster/head", "raycluster/cpu", "raycluster/gpu", "rayjob/head",
                                                  "rayjob/gpu", "raycronjob/head", "raycronjob/cpu",
                                                  "swd-mlflow-auth-setup", "ui-namespace")],
    *[(src, "swd-mlflow", 5000, False) for src in ("cronjob/submitter", "rayjob/submitter", "swd-postgres",
                                                   "unlabelled-namespace", "ray-labels-elsewhere", "stray-in-swd",
                                                   "operator")],
    # PostgreSQL
    ("swd-mlflow", "swd-postgres", 5432, True),
    *[(src, "swd-postgres", 5432, False) for src in ("raycluster/head", "raycluster/gpu", "swd-mlflow-auth-setup",
                                                     "cronjob/submitter", "ui-namespace", "stray-in-swd",
                                                     "unlabelled-namespace")],
]


@pytest.mark.parametrize("src, dst, port, expected", REACHABILITY, ids=[f"{s}->{d}:{p}" for s, d, p, _ in REACHABILITY])
def test_network_policies_admit_exactly_the_table(src, dst, port, expected):
    pods = {**manifest_pods(), **other_pods()}
    assert admitted(network_policies(), pods[src], pods[dst], port) is expected


def test_every_open_port_is_behind_a_policy_and_every_selector_matches_real_pods():
    policies, pods = network_policies(), manifest_pods()
    # each port a manifest opens is one the table checks, on a pod some policy isolates
    for key, pod in pods.items():
        if pod.ports:
            assert any(selects(p["spec"]["podSelector"], pod.labels) for p in policies), key
    tested = {(d, port) for _, d, port, _ in REACHABILITY}
    for key in ("raycluster/head", "swd-mlflow", "swd-postgres"):
        assert {(key, port) for port in pods[key].ports.values()} <= tested, key
    # no selector that matches nothing (a typo in a label would silently admit no one, or isolate no one)
    for p in policies:
        assert any(selects(p["spec"]["podSelector"], pod.labels) for pod in pods.values()), p["metadata"]["name"]
        for rule in p["spec"]["ingress"]:
            for peer in rule["from"]:
                if "namespaceSelector" not in peer:
                    assert any(peer_admits(peer, pod, "swd") for pod in pods.values()), (p["metadata"]["name"], peer)
    # the two namespace labels are documented
    readme = (CLUSTER / "README.md").read_text() + (K8S / "networkpolicies.yaml").read_text()
    for p in policies:
        for rule in p["spec"]["ingress"]:
            for peer in rule["from"]:
                for k, v in peer.get("namespaceSelector", {}).get("matchLabels", {}).items():
                    assert f"{k}={v}" in readme, k


def test_the_template_labels_survive_kuberay():
    """KubeRay keeps a template's labels (labelPod), so the policies' selectors see them on the Ray pods."""
    pods = manifest_pods()
    assert pods["raycluster/head"].labels["app.kubernetes.io/component"] == "ray-head"
    assert pods["rayjob/gpu"].labels["app.kubernetes.io/component"] == "ray-worker"
    assert pods["raycluster/head"].labels["ray.io/node-type"] == "head"
    assert all(p.labels["app.kubernetes.io/component"] == "ray-submitter"
               for k, p in pods.items() if k.endswith("/submitter"))
