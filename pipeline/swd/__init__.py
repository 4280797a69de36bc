"""Scale-wise distillation (SwD) core, pure torch (no Ray, MLflow or DeepSpeed): see ../shared/SWD.md.

- schedules: `teacher_sigmas`, `boundaries_to_sigmas`, `PRESETS`, `check_scales_for_patch`
- sampler:   `sample_scalewise` (SWD.md section 3), `sample_teacher` (Euler + CFG), `x0_hat`, `velocity`
- inputs:    `training_inputs`, `scale_images`, `choose_scale_index` (SWD.md section 4, training inputs)
- networks:  `build_networks` (student LoRA, teacher context, fake score + GAN head), `frozen`
             (the export and warm start are pipeline/student_export.py)
- losses:    `generator_loss`, `fake_loss` and each term on its own
- config:    `SwdConfig`, the `swd` section of the config tree
"""

from pipeline.swd.config import SwdConfig, check_against_teacher, check_feature_block
from pipeline.swd.inputs import TrainingInputs, area_downsample, choose_scale_index, scale_images, training_inputs
from pipeline.swd.losses import (dmd_gradient, dmd_loss, diffusion_loss, fake_loss, gan_discriminator_loss,
                                 gan_generator_loss, generator_loss, mmd_linear, mmd_loss, mmd_rbf)
from pipeline.swd.networks import (FakeScore, Networks, build_fake, build_networks, build_student, frozen,
                                   gan_head, student_lora_state_dict,
                                   transformer_features)
from pipeline.swd.sampler import (TextCond, add_noise, bicubic_resize, guided_velocity, sample_scalewise,
                                  sample_teacher, velocity, x0_hat)
from pipeline.swd.schedules import (PRESETS, boundaries_to_sigmas, check_scales_for_patch, relative_cost,
                                    teacher_sigmas)

__all__ = [
    "PRESETS", "FakeScore", "Networks", "SwdConfig", "TextCond", "TrainingInputs", "add_noise", "area_downsample",
    "bicubic_resize", "boundaries_to_sigmas", "build_fake", "build_networks", "build_student", "check_against_teacher",
    "check_feature_block", "check_scales_for_patch", "choose_scale_index", "diffusion_loss", "dmd_gradient",
    "dmd_loss", "fake_loss", "frozen", "gan_discriminator_loss", "gan_generator_loss", "gan_head", "generator_loss",
    "guided_velocity", "mmd_linear", "mmd_loss", "mmd_rbf", "relative_cost", "sample_scalewise", "sample_teacher",
    "scale_images", "student_lora_state_dict", "teacher_sigmas", "training_inputs", "transformer_features",
    "velocity", "x0_hat",
]
