# The MLflow tracking server of cluster/k8s/mlflow.yaml: the MLflow version pyproject.toml pins with
# its `auth` extra (the basic-auth app: Flask-WTF, pinned as in pyproject.toml), the PostgreSQL
# driver (backend store and the auth app's users and permissions) and boto3 (S3-compatible artifact
# store); plus cluster/mlflow_auth_setup.py, which renders the auth config (init container) and
# creates the users and grants (the setup Job).
#   docker build -f cluster/mlflow.Dockerfile -t registry.example.com/swd/swd-mlflow:3.17.2 cluster
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" "Flask-WTF==1.3.0" "WTForms==3.3.2" \
    "psycopg2-binary==2.9.13" "boto3==1.44.5"
COPY mlflow_auth_setup.py /opt/swd/mlflow_auth_setup.py
EXPOSE 5000
