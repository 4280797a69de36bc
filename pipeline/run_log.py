"""One metrics logger for every stage: a stage run's MLflow record, written from the driver or from
any Ray worker, given only (tracking_uri, run_id)."""

from __future__ import annotations

import math
import time
from pathlib import Path

BATCH_MAX_METRICS = 1000  # MLflow's log_batch limit
BATCH_MAX_PARAMS = 100
PARAM_VALUE_MAX_CHARS = 6000  # MLflow's limit for one param value


class RunLog:
    """Metrics, params, tags and artifacts of one MLflow run. `after_step`: steps at or before it are
    dropped (a resumed attempt does not log a step twice). Non-finite and None values are dropped:
    MLflow stores them, but they break every chart."""

    def __init__(self, tracking_uri: str | None, run_id: str, after_step: int | None = None, client=None):
        import mlflow

        self.client = client or mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id
        self.after_step = after_step

    @classmethod
    def of(cls, client, run_id: str) -> "RunLog":
        """A logger on an existing `MlflowClient`."""
        return cls(None, run_id, client=client)

    def metrics(self, values: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        if self.after_step is not None and step <= self.after_step:
            return
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(items), BATCH_MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i:i + BATCH_MAX_METRICS])

    def params(self, values: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_VALUE_MAX_CHARS]) for k, v in values.items()]
        for i in range(0, len(items), BATCH_MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + BATCH_MAX_PARAMS])

    def tags(self, values: dict) -> None:
        from mlflow.entities import RunTag

        if values:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a directory's files under `artifact_path` (default: its own name)."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def history_last_step(self, key: str) -> int:
        """The last step logged for `key` (-1 when none)."""
        return max([int(m.step) for m in self.client.get_metric_history(self.run_id, key)] + [-1])
