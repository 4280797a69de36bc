"""Users and permissions of the MLflow tracking server's basic-auth app (cluster/k8s/mlflow.yaml).

Two subcommands, both run from the MLflow server image (cluster/mlflow.Dockerfile puts this file at
/opt/swd/mlflow_auth_setup.py); they need MLflow with its `auth` extra, not this repository.

`render-config TEMPLATE OUT` (the server's init container): TEMPLATE (basic_auth.ini of the ConfigMap)
plus `database_uri` from $MLFLOW_AUTH_DATABASE_URI, written to OUT. The URI holds the database
password, so it comes from a Secret through the environment and never sits in the ConfigMap.

`setup --experiment NAME ... --model NAME ...` (the setup Job), as the admin:
1. wait for the server's /health;
2. create the pipeline's service user ($SWD_PIPELINE_USERNAME / $SWD_PIPELINE_PASSWORD) and the
   read-only user ($SWD_READER_USERNAME / $SWD_READER_PASSWORD); a user that exists gets the password
   from the environment (rotating one = change its Secret, run the Job again);
3. create each experiment and registered model that does not exist yet, as the admin: nobody else
   can take one of these names first and hold MANAGE on it (MLflow gives a creator MANAGE);
4. grant, least privilege (default_permission is NO_PERMISSIONS, so a user holds only these):
   - pipeline user: EDIT on each experiment (create runs, log to them, set tags; no deletes) and EDIT
     on each registered model (new versions, tags, move the `champion` alias; no deletes);
   - read-only user: READ on every experiment and every registered model (`*`): the UI and
     `pipeline/run.py compare`; it cannot write to any of them.
   A grant that exists is reset to the level above.
The admin's credential is MLflow's own: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, with
MLFLOW_TRACKING_URI. No password is printed.

    python cluster/mlflow_auth_setup.py setup --experiment swd-sd35-medium-6step --model swd-sd35-medium-6step
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request

# Set on each experiment created here, as pipeline/tracking.py's ensure_experiment would (the MLflow UI
# then shows it as model training); tests/test_registry_auth.py keeps the two equal.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MODEL_DESCRIPTION = "SwD scale-wise students (pipeline/run.py register stage)"

PIPELINE_PERMISSION = "EDIT"  # creates runs, versions and moves aliases; MANAGE would also delete
READER_PERMISSION = "READ"
USER_ENV = {"pipeline": ("SWD_PIPELINE_USERNAME", "SWD_PIPELINE_PASSWORD"),
            "reader": ("SWD_READER_USERNAME", "SWD_READER_PASSWORD")}
ADMIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
DATABASE_URI_ENV = "MLFLOW_AUTH_DATABASE_URI"


class SetupError(RuntimeError):
    pass


def render_config(template: str, out: str) -> None:
    """TEMPLATE + `database_uri = $MLFLOW_AUTH_DATABASE_URI` -> OUT (mode 0600: it holds a password)."""
    uri = os.environ.get(DATABASE_URI_ENV)
    if not uri:
        raise SetupError(f"{DATABASE_URI_ENV} is not set: give the auth app's database URI (from a Secret)")
    text = open(template).read()
    if "database_uri" in text:
        raise SetupError(f"{template}: has a database_uri already; it comes from {DATABASE_URI_ENV} only")
    # `%` is configparser's interpolation character: a percent-encoded password must survive it.
    line = "database_uri = " + uri.replace("%", "%%") + "\n"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text.rstrip("\n") + "\n" + line)


def wait_healthy(uri: str, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SetupError(f"MLflow server {uri} did not answer /health within {wait_s:.0f} s")
        time.sleep(2)


def credentials(role: str) -> tuple[str, str]:
    names = USER_ENV[role]
    values = [os.environ.get(n, "") for n in names]
    missing = [n for n, v in zip(names, values) if not v]
    if missing:
        raise SetupError(f"{', '.join(missing)} not set: the {role} user's credential (from its Secret)")
    return values[0], values[1]


def setup(uri: str, experiments: list[str], models: list[str], wait_s: float) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    admin = os.environ.get(ADMIN_ENV[0])
    if not admin or not os.environ.get(ADMIN_ENV[1]):
        raise SetupError(f"{' and '.join(ADMIN_ENV)}: set both to the admin credential (Secret swd-mlflow-admin)")
    users = {role: credentials(role) for role in USER_ENV}
    names = [admin, *(u for u, _ in users.values())]
    if len(set(names)) != len(names):
        raise SetupError(f"the admin, pipeline and reader users must be three different users, got {names}")
    wait_healthy(uri, wait_s)
    auth, mlc = AuthServiceClient(uri), MlflowClient(uri)

    def already_exists(e: MlflowException) -> bool:
        return e.error_code == "RESOURCE_ALREADY_EXISTS"

    try:
        if not auth.get_user(admin).is_admin:
            raise SetupError(f"{ADMIN_ENV[0]}={admin!r} is not an admin of {uri}")
    except MlflowException as e:
        raise SetupError(f"{uri} refused the admin credential in {' / '.join(ADMIN_ENV)} "
                         f"(HTTP {e.get_http_status_code()}): {e.message[:300]}") from None

    for role, (username, password) in users.items():
        try:
            auth.create_user(username, password)
            print(f"[auth] user {username!r} ({role}) created")
        except MlflowException as e:
            if not already_exists(e):
                raise
            auth.update_user_password(username, password)
            print(f"[auth] user {username!r} ({role}) exists: password set from {USER_ENV[role][1]}")

    def grant(username: str, resource_type: str, resource_id: str, permission: str) -> None:
        try:
            auth.grant_user_permission(username, resource_type, resource_id, permission)
        except MlflowException as e:
            if not already_exists(e):
                raise
            auth.revoke_user_permission(username, resource_type, resource_id)
            auth.grant_user_permission(username, resource_type, resource_id, permission)
        print(f"[auth] {username!r}: {permission} on {resource_type} {resource_id!r}")

    pipeline_user, reader = users["pipeline"][0], users["reader"][0]
    for name in experiments:
        exp = mlc.get_experiment_by_name(name)
        if exp is None:
            exp_id = mlc.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            exp_id = exp.experiment_id
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                mlc.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        grant(pipeline_user, "experiment", exp_id, PIPELINE_PERMISSION)
    for name in models:
        try:
            mlc.create_registered_model(name, description=MODEL_DESCRIPTION)
        except MlflowException as e:
            if not already_exists(e):
                raise
        grant(pipeline_user, "registered_model", name, PIPELINE_PERMISSION)
    grant(reader, "experiment", "*", READER_PERMISSION)
    grant(reader, "registered_model", "*", READER_PERMISSION)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlflow_auth_setup.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render-config", help="basic_auth.ini + database_uri from $" + DATABASE_URI_ENV)
    render.add_argument("template")
    render.add_argument("out")
    grants = sub.add_parser("setup", help="users, experiments, registered models and grants")
    grants.add_argument("--experiment", action="append", default=[], metavar="NAME",
                        help="an experiment the pipeline user logs to (repeatable)")
    grants.add_argument("--model", action="append", default=[], metavar="NAME",
                        help="a registered model the pipeline user registers and promotes (repeatable)")
    grants.add_argument("--wait-s", type=float, default=300, help="how long to wait for /health (default 300)")
    args = parser.parse_args(argv)
    try:
        if args.command == "render-config":
            render_config(args.template, args.out)
        else:
            uri = os.environ.get("MLFLOW_TRACKING_URI", "")
            if not uri.startswith(("http://", "https://")):
                raise SetupError(f"MLFLOW_TRACKING_URI={uri!r}: set it to the tracking server (http://...)")
            setup(uri, args.experiment, args.model, args.wait_s)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
