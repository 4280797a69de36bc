"""The networks of SWD.md section 4: student G, teacher T (G with its adapter disabled) and the fake
score network F with its GAN head D.

- `build_student`: T plus a PEFT LoRA through diffusers' adapter API (`add_adapter`; B starts at
  zero so G == T), or a full fine-tune (the teacher then is a frozen copy).
- `Networks.teacher()`: a context manager giving T; for LoRA it disables the student's adapter, so
  the teacher costs no extra weights.
- `FakeScore`: a copy of T with its own LoRA plus `gan_head` on the token mean of the image-stream
  hidden states after `feature_block`, captured with a forward hook (image tokens only).
- `transformer_features`: velocity and image-token features of any SD3 transformer in one forward.
- `frozen`: no gradient reaches a network's parameters inside this block (F in the generator step).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from pipeline.swd.config import FakeConfig, StudentConfig, SwdConfig
from pipeline.swd.sampler import TextCond, velocity

STUDENT_ADAPTER = "student"
FAKE_ADAPTER = "fake"


def add_lora(transformer, rank: int, alpha: float, target_modules: list[str], adapter_name: str,
             key: str = "target_modules", init: str = "kaiming") -> list[nn.Parameter]:
    """Freeze the transformer and add a LoRA adapter (A random: PEFT's kaiming-uniform or, with
    `init="gaussian"`, normal with std 1/rank as released; B zero) through diffusers' PEFT integration;
    returns the adapter's parameters. `key` names the config key in errors."""
    from peft import LoraConfig  # peft is needed only by the training-side networks

    transformer.requires_grad_(False)
    problem = f"{key}: {list(target_modules)} matched no layer of the transformer; valid: suffixes of its " \
              "Linear layers' names, e.g. 'to_q', 'to_out.0', 'ff.net.2'"
    try:
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                                           init_lora_weights="gaussian" if init == "gaussian" else True),
                                adapter_name=adapter_name)
    except ValueError as e:
        raise ValueError(f"{problem} ({e})") from None
    params = [p for n, p in transformer.named_parameters() if f".{adapter_name}." in n]
    if not params:
        raise ValueError(problem)
    for p in params:
        p.requires_grad_(True)
    return params


def gan_head(width: int, num_layers: int = 4) -> nn.Sequential:
    """D: `num_layers` of (LayerNorm, GELU, Linear), widths narrowing linearly from `width` to one logit."""
    dims = [round(width + (1 - width) * j / num_layers) for j in range(num_layers + 1)]
    return nn.Sequential(*[nn.Sequential(nn.LayerNorm(a), nn.GELU(), nn.Linear(a, b)) for a, b in zip(dims, dims[1:])])


class _FeaturesReady(Exception):
    """Raised by the feature hook to end a features-only forward after the feature block."""


def transformer_features(transformer, x: torch.Tensor, sigma, cond: TextCond, block: int,
                         stop_at_block: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(velocity, features): features are the image-stream hidden states [B, L, D] after `block`
    (the second output of diffusers' JointTransformerBlock), captured with a forward hook.
    With `stop_at_block` the forward ends there and the velocity is None."""
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output[1])          # (encoder_hidden_states, hidden_states): image tokens only
        if stop_at_block:
            raise _FeaturesReady

    handle = transformer.transformer_blocks[block].register_forward_hook(hook)
    try:
        v = velocity(transformer, x, sigma, cond)
    except _FeaturesReady:
        v = None
    finally:
        handle.remove()
    return v, captured[0]


class FakeOutput(NamedTuple):
    velocity: torch.Tensor | None   # [B, C, H, W] float32; None for a features-only call
    features: torch.Tensor          # [B, L, D] image tokens after the feature block
    logits: torch.Tensor            # [B] discriminator logits on the token mean


class FakeScore(nn.Module):
    """F + D: one module, so one optimiser / DeepSpeed engine holds the fake LoRA and the GAN head."""

    def __init__(self, transformer, feature_block: int, gan_head_num_layers: int = 4,
                 stop_at_feature_block: bool = False):
        super().__init__()
        num_layers = len(transformer.transformer_blocks)
        if not 0 <= feature_block < num_layers:
            raise ValueError(f"swd.feature_block: {feature_block} is not a block of the teacher, which has "
                             f"{num_layers} blocks; valid: 0..{num_layers - 1}")
        self.transformer = transformer
        self.gan_head = gan_head(transformer.inner_dim, gan_head_num_layers)
        self.feature_block = feature_block
        self.stop_at_feature_block = stop_at_feature_block

    def forward(self, x: torch.Tensor, sigma, cond: TextCond, features_only: bool = False) -> FakeOutput:
        v, feats = transformer_features(self.transformer, x, sigma, cond, self.feature_block,
                                        stop_at_block=features_only and self.stop_at_feature_block)
        return FakeOutput(None if features_only else v, feats, self.discriminate(feats))

    def discriminate(self, features: torch.Tensor) -> torch.Tensor:
        """D(token mean of the image-stream features) -> [B] logits."""
        head_dtype = self.gan_head[0][0].weight.dtype
        return self.gan_head(features.float().mean(dim=1).to(head_dtype)).float().squeeze(-1)


def build_student(transformer, cfg: StudentConfig) -> tuple[nn.Module, nn.Module | None]:
    """(student, frozen_teacher): LoRA in place on `transformer` (frozen_teacher None: the teacher is
    the student with its adapter disabled), or a full fine-tune with a frozen copy as the teacher."""
    if cfg.full_finetune:
        teacher = copy.deepcopy(transformer).requires_grad_(False).eval()
        return transformer.requires_grad_(True), teacher
    add_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.target_modules, STUDENT_ADAPTER,
             key="swd.student.target_modules", init=cfg.lora_init)
    return transformer, None


def build_fake(teacher_transformer, cfg: FakeConfig, feature_block: int,
               stop_at_feature_block: bool = False) -> FakeScore:
    """F: a copy of the teacher with its own LoRA, plus the GAN head (trainable)."""
    transformer = copy.deepcopy(teacher_transformer)
    add_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.target_modules, FAKE_ADAPTER,
             key="swd.fake.target_modules", init=cfg.lora_init)
    return FakeScore(transformer, feature_block, cfg.gan_head_num_layers, stop_at_feature_block)


@dataclass
class Networks:
    student: nn.Module                   # trainable: the student LoRA (or every weight)
    fake: FakeScore | None               # None in mmd_only mode
    frozen_teacher: nn.Module | None = None  # only for a full fine-tune

    @contextmanager
    def teacher(self):
        """Yields the teacher T. With LoRA: the student with its adapter disabled. Gradient
        checkpointing is off inside, so no recomputation in a later backward runs with the adapter on."""
        if self.frozen_teacher is not None:
            yield self.frozen_teacher
            return
        student = self.student
        checkpointing = getattr(student, "gradient_checkpointing", False)
        student.disable_adapters()
        student.gradient_checkpointing = False
        try:
            yield student
        finally:
            student.gradient_checkpointing = checkpointing
            student.enable_adapters()

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def fake_parameters(self) -> list[nn.Parameter]:
        return [] if self.fake is None else [p for p in self.fake.parameters() if p.requires_grad]


def build_networks(teacher_transformer, cfg: SwdConfig) -> Networks:
    """Student, teacher and (in full mode) fake network from one pretrained transformer, which
    becomes the student (LoRA in place). The fake network copies it first."""
    fake = None
    if cfg.loss.mode == "full":
        fake = build_fake(teacher_transformer, cfg.fake, cfg.feature_block, cfg.stop_at_feature_block)
    student, frozen_teacher = build_student(teacher_transformer, cfg.student)
    return Networks(student=student, fake=fake, frozen_teacher=frozen_teacher)


@contextmanager
def frozen(*modules: nn.Module | None):
    """Inside, no parameter of `modules` requires grad (gradients still flow through to inputs);
    the previous flags are restored on exit."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def student_lora_state_dict(student) -> dict[str, torch.Tensor]:
    """The student's LoRA weights in diffusers' PEFT naming, without the adapter name."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(student, adapter_name=STUDENT_ADAPTER)


