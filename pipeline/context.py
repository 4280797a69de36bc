"""What a stage sees while it runs: its own config section(s), its inputs, where to write, MLflow."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel


@dataclass
class StageContext:
    """Handed to every stage's `run(ctx)`.

    - `config`: the stage's own config section (a pydantic model).
    - `sections`: every section the stage declared (its own included), by name; only these feed
      the stage's fingerprint, so a stage must not read any other part of the config.
    - `inputs`: upstream stage name -> that stage's committed output directory.
    - `output_dir`: a fresh temporary directory; everything written here is committed atomically
      (renamed into `workdir/<stage>/<fingerprint>/`) when `run` returns without raising.
    - `scratch_dir`: survives a killed or failed run of the same fingerprint (checkpoints,
      partial work to resume from); removed after a successful commit unless `keep_scratch`.
    - `shared_dir`: per stage, shared by every fingerprint (content-addressed reuse, e.g. the
      per-shard latent cache); never removed by the graph.
    - `tracking_uri`, `run_id`: the stage's MLflow child run; pass both to Ray workers, which
      log with `mlflow.MlflowClient(tracking_uri).log_metric(run_id, ...)`.
    - `fingerprint`: this stage's fingerprint (hex).
    - `log`: the stage run's `RunLog` (metrics, params, tags, artifacts); the graph logs the
      declared OUTPUTS as artifacts after `run` returns.
    """

    name: str
    config: BaseModel
    sections: dict[str, BaseModel]
    inputs: dict[str, Path]
    output_dir: Path
    scratch_dir: Path
    shared_dir: Path
    tracking_uri: str
    run_id: str
    fingerprint: str
    keep_scratch: bool = False
    summary: dict[str, Any] = field(default_factory=dict)  # stage puts small results here; lands in manifest.json

    @property
    def log(self):
        from pipeline.run_log import RunLog

        if "_log" not in self.__dict__:
            self.__dict__["_log"] = RunLog(self.tracking_uri, self.run_id)
        return self.__dict__["_log"]
