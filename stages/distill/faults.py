"""Fault injection for the distill tests: one `Faults` object, parsed once by the driver from
`SWD_DISTILL_TEST_HOOKS` and handed to every worker inside the LoopSpec. The training loop only calls
its methods; nothing here is in the config, so it never changes a fingerprint."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

HOOKS_ENV = "SWD_DISTILL_TEST_HOOKS"  # JSON, e.g. {"pid_dir": "/tmp/x", "nan_at_steps": [3], "fail_at_step": 5,
                                      # "dump_dir": "/tmp/w", "step_delay_s": 0.5}


@dataclass
class Faults:
    pid_dir: str | None = None          # each rank writes rank<r>.pid at start and rank<r>.step after each step
    nan_at_steps: list[int] = field(default_factory=list)  # rank 0's generator loss goes non-finite at these steps
    fail_at_step: int | None = None     # every rank raises after this step
    dump_dir: str | None = None         # rank 0 dumps the student's trained weights at start, save, load and stop
    step_delay_s: float = 0.0           # sleep after each step (time for a test to kill a worker)

    @classmethod
    def from_env(cls) -> "Faults":
        """The driver's one read of the environment."""
        hooks = json.loads(os.environ.get(HOOKS_ENV) or "{}")
        unknown = sorted(set(hooks) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{HOOKS_ENV}: unknown hooks {unknown}; valid: {[f.name for f in fields(cls)]}")
        return cls(**hooks)

    def started(self, rank: int) -> None:
        if self.pid_dir:
            Path(self.pid_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.pid_dir) / f"rank{rank}.pid").write_text(str(os.getpid()))

    def poison(self, loss, step: int, rank: int):
        """The generator loss, made non-finite on rank 0 at `nan_at_steps` (the others see it in the check)."""
        return loss * math.nan if step in self.nan_at_steps and rank == 0 else loss

    def after_step(self, step: int, rank: int) -> None:
        if self.pid_dir:
            (Path(self.pid_dir) / f"rank{rank}.step").write_text(str(step))
        if self.step_delay_s:
            time.sleep(float(self.step_delay_s))
        if self.fail_at_step == step:
            raise RuntimeError(f"test hook: failing at step {step}")

    def dump_weights(self, name: str, module, zero_stage: int) -> None:
        """The trained parameters of `module` as dump_dir/<name>.safetensors (not under ZeRO-3: partitioned)."""
        if not self.dump_dir or zero_stage == 3:
            return
        from safetensors.torch import save_file

        tensors = {n: p.detach().float().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
        Path(self.dump_dir).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(Path(self.dump_dir) / f"{name}.safetensors"))
