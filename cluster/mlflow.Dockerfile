# The MLflow tracking server of cluster/k8s/mlflow.yaml: the MLflow version pyproject.toml pins,
# the PostgreSQL driver (backend store) and boto3 (S3-compatible artifact store).
#   docker build -f cluster/mlflow.Dockerfile -t registry.example.com/swd/swd-mlflow:3.17.2 cluster
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg2-binary==2.9.13" "boto3==1.44.5"
EXPOSE 5000
