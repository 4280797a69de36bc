"""Checkpoints of the distill run: every rank's DeepSpeed engine states and rank 0's loop state in one
Ray Train checkpoint directory, reported with `ray.train.report`; the last one also holds the export
(`pipeline.student_export.save_student`), which the driver commits."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.student_export import STUDENT_DIR

STATE_FILE = "state.json"   # rank 0's loop state inside each checkpoint
EXPORT_DIR = "export"       # the final checkpoint also holds the export
ENGINE_TAG = "state"        # DeepSpeed checkpoint tag (one per Ray Train checkpoint directory)


class Checkpointer:
    """Save and restore the engines (by name: "student", "fake"; None when absent) with the loop state."""

    def __init__(self, rank: int, zero_stage: int, full_finetune: bool, faults):
        self.rank, self.zero_stage, self.full_finetune, self.faults = rank, zero_stage, full_finetune, faults

    def latest(self):
        """The checkpoint Ray Train restores for this attempt (None on a fresh start)."""
        import ray.train

        return ray.train.get_checkpoint()

    def loop_state(self, checkpoint) -> dict:
        with checkpoint.as_directory() as d:
            return json.loads((Path(d) / STATE_FILE).read_text())

    def restore(self, checkpoint, engines: dict) -> None:
        """Every engine's state (every rank reads its own ZeRO partition)."""
        with checkpoint.as_directory() as d:
            for sub, engine in engines.items():
                if engine is not None:
                    path, _ = engine.load_checkpoint(str(Path(d) / sub), tag=ENGINE_TAG, load_module_strict=False)
                    if path is None:
                        raise RuntimeError(f"distill: checkpoint {checkpoint.path} has no {sub} engine state")

    def save(self, step: int, engines: dict, state: dict, metrics: dict, final: bool) -> None:
        """Every rank: its engine states; the last checkpoint the export too; rank 0 the loop state
        (`state`, plus the export kind); then `ray.train.report(metrics, checkpoint)` from every rank."""
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory(prefix="distill-ckpt-") as tmp:
            tmp = Path(tmp)
            for sub, engine in engines.items():
                if engine is not None:
                    engine.save_checkpoint(str(tmp / sub), tag=ENGINE_TAG, exclude_frozen_parameters=True)
            kind = self.export(engines["student"].module, tmp / EXPORT_DIR / STUDENT_DIR) if final else None
            if self.rank == 0:
                (tmp / STATE_FILE).write_text(json.dumps({**state, "export_kind": kind}, indent=1))
                self.faults.dump_weights(f"saved_step{step}", engines["student"].module, self.zero_stage)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=f"checkpoint_step{step:08d}")

    def export(self, module, directory: Path) -> str | None:
        """The student for stock diffusers, written by rank 0; under ZeRO-3 every rank first gathers the
        parameters it needs."""
        import deepspeed

        from pipeline.student_export import save_student

        params = list(module.parameters()) if self.full_finetune else [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.zero_stage == 3):
            if self.rank == 0:
                directory.mkdir(parents=True, exist_ok=True)
                return save_student(module, directory)
        return None
