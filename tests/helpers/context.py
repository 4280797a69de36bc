"""A StageContext for calling a stage's `run(ctx)` directly, with its own MLflow run."""

from __future__ import annotations

import types
from pathlib import Path

from pipeline import graph
from pipeline.context import StageContext


def stage_context(name: str, sections: dict, root: Path, inputs: dict | None = None, uri: str | None = None,
                  experiment: str = "stage-test") -> StageContext:
    """`sections`: the stage's own section first (as the stage's SECTIONS); `root` holds out/, scratch/,
    shared/ and (without `uri`) a SQLite MLflow store."""
    import mlflow

    root = Path(root)
    for d in ("out", "scratch", "shared"):
        (root / d).mkdir(parents=True, exist_ok=True)
    uri = uri or f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment,
                                                                   artifact_location=(root / "artifacts").as_uri())
    return StageContext(name=name, config=next(iter(sections.values())), sections=dict(sections),
                        inputs=dict(inputs or {}), output_dir=root / "out", scratch_dir=root / "scratch",
                        shared_dir=root / "shared", tracking_uri=uri, run_id=client.create_run(exp_id).info.run_id,
                        fingerprint="test")


def pretrained_teacher_stages(upto: str = "cache") -> list[graph.StageSpec]:
    """The default stages up to `upto`; the teacher spec relaxes OUTPUTS to what a pretrained teacher
    writes (bundle/ and samples.png come only from training)."""
    import stages
    from stages import teacher as t

    module = types.SimpleNamespace(VERSION=t.VERSION, SECTIONS=t.SECTIONS, OUTPUTS=(t.TEACHER_FILE,), run=t.run,
                                   external_fingerprint=t.external_fingerprint)
    names = [s.name for s in stages.default_stages()]
    upstream = stages.default_stages()[: names.index(upto) + 1]
    return [graph.StageSpec(s.name, module, s.inputs) if s.name == "teacher" else s for s in upstream]
