"""Train the embedded tiny teacher with the `teacher` stage's trainer, outside the pipeline.

Generates the shapes dataset (same `make_sample` as the shards stage) into a work directory, opens
a run in a local MLflow store there, calls `pipeline.teacher_training.train` in this process (no
stage, no graph, no Ray) and copies the trained bundle to `--out`. This is how `assets/tiny-teacher`
was made (see assets/README.md for the exact command):

    nice python scripts/train_tiny_teacher.py --out assets/tiny-teacher \
        --set num_steps=3000 --set vae_num_steps=600

`--set key=value` sets any training key of the teacher section (pipeline/teacher_training.py:
TrainingConfig; `sampler.num_steps=2` for the nested sampler block), value in YAML.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning threads thrash on shared cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the trained bundle to (replaced)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="training key of the teacher section (pipeline/teacher_training.py TrainingConfig), "
                             "value in YAML")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--num-train-samples", type=int, default=4096)
    parser.add_argument("--num-eval-samples", type=int, default=256)
    parser.add_argument("--shapes", default="circle,square,triangle")
    parser.add_argument("--colours", default="red,green,blue,yellow,purple,orange")
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--backgrounds", default="black,white")
    parser.add_argument("--workdir", default=None, help="keep shards, MLflow store and scratch here")
    args = parser.parse_args()

    import mlflow

    from pipeline import teacher_training
    from pipeline.config import parse_override
    from pipeline.data import shard_urls

    overrides: dict = {}
    for item in args.set:
        key, value = parse_override(f"teacher.{item}")
        *parents, leaf = key.split(".")[1:]
        node = overrides
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    cfg = teacher_training.TrainingConfig.model_validate(overrides)
    grammar = {k: getattr(args, k).split(",") for k in ("shapes", "colours", "sizes", "backgrounds")}

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tiny-teacher-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = work / "shards"
    _write_shards(shards, args.data_seed, {"train": args.num_train_samples, "eval": args.num_eval_samples},
                  grammar)
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tiny-teacher") or client.get_experiment(
        client.create_experiment("tiny-teacher", artifact_location=str(work / "mlartifacts")))
    run = client.create_run(experiment.experiment_id, run_name="train_tiny_teacher")
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v))
                                              for k, v in {**cfg.model_dump(), **grammar}.items()])
    output, scratch = work / "output", work / "scratch"  # scratch survives: a rerun with --workdir resumes
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir()
    scratch.mkdir(exist_ok=True)
    started = time.monotonic()
    result = teacher_training.train(cfg, shard_urls(shards, "train"), shard_urls(shards, "eval"), output, scratch,
                                    tracking_uri, run.info.run_id)
    client.set_terminated(run.info.run_id)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(output / teacher_training.BUNDLE_DIR, out)
    # the stage's teacher.json record, plus how it was made
    record = {"source": "trained", "location": teacher_training.BUNDLE_DIR, **result}
    record.update(command=" ".join(sys.argv), grammar=grammar, data_seed=args.data_seed,
                  num_train_samples=args.num_train_samples, stage_wall_s=round(time.monotonic() - started, 1))
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    if (output / teacher_training.GRID_FILE).is_file():
        shutil.copy(output / teacher_training.GRID_FILE, out / "samples.png")
    print(json.dumps(record, indent=1))


def _write_shards(root: Path, seed: int, counts: dict[str, int], grammar: dict, per_shard: int = 512) -> None:
    """The shards stage's layout: <split>/<split>-NNNNNN.tar and shards.json."""
    import webdataset as wds

    from pipeline.shapes import make_sample

    listing = {}
    for split, count in counts.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        listing[split] = []
        for shard, first in enumerate(range(0, count, per_shard)):
            rel = f"{split}/{split}-{shard:06d}.tar"
            with wds.TarWriter(str(root / rel)) as sink:
                for index in range(first, min(first + per_shard, count)):
                    sink.write(make_sample(seed, split, index, 64, grammar["shapes"], grammar["colours"],
                                           grammar["sizes"], grammar["backgrounds"]))
            listing[split].append({"url": rel, "samples": min(per_shard, count - first)})
    (root / "shards.json").write_text(json.dumps(listing, indent=1))


if __name__ == "__main__":
    main()
