"""Student / teacher / fake networks: LoRA through PEFT, the teacher context, feature hooks, the GAN
head; and that pipeline.swd imports no Ray, MLflow or DeepSpeed."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from pipeline.bench_models import TEST, build_transformer, random_text_cond
from pipeline.swd.config import SwdConfig
from pipeline.student_export import save_student
from pipeline.swd.networks import build_networks, frozen, gan_head, student_lora_state_dict, transformer_features
from pipeline.swd.sampler import TextCond, velocity

BATCH = 2


def _cfg(**overrides):
    base = {"preset": None, "scales": [4, 6, 8], "boundaries": [0, 7, 18], "feature_block": 1,
            "student": {"lora_rank": 2, "lora_alpha": 2}, "fake": {"lora_rank": 2, "lora_alpha": 2}}
    return SwdConfig.model_validate({**base, **overrides})


@pytest.fixture(scope="module")
def cond():
    return TextCond(*random_text_cond("test", BATCH, seed=1))


@pytest.fixture(scope="module")
def x():
    return torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def test_student_starts_equal_to_teacher_and_teacher_disables_adapter(cond, x):
    reference = build_transformer("test", seed=0)
    nets = build_networks(build_transformer("test", seed=0), _cfg())
    with torch.no_grad():
        v_ref = velocity(reference, x, 0.7, cond)
        torch.testing.assert_close(velocity(nets.student, x, 0.7, cond), v_ref)  # B = 0: G == T
        lora_b = [p for n, p in nets.student.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.requires_grad for p in lora_b)
        for p in lora_b:
            p.add_(0.1)
        assert not torch.allclose(velocity(nets.student, x, 0.7, cond), v_ref)
        with nets.teacher() as teacher:
            torch.testing.assert_close(velocity(teacher, x, 0.7, cond), v_ref)
        assert not torch.allclose(velocity(nets.student, x, 0.7, cond), v_ref)  # adapter back on
    trainable = {n for n, p in nets.student.named_parameters() if p.requires_grad}
    assert trainable and all(".student." in n for n in trainable)
    # Default targets: attention q/k/v/out of both streams (and attn2) and the MLP projections.
    assert {"transformer_blocks.0.attn.to_q.lora_A.student.weight", "transformer_blocks.0.attn2.to_out.0.lora_B.student.weight",
            "transformer_blocks.0.attn.add_k_proj.lora_A.student.weight", "transformer_blocks.0.ff.net.2.lora_A.student.weight",
            "transformer_blocks.0.ff_context.net.0.proj.lora_B.student.weight"} <= trainable
    state = student_lora_state_dict(nets.student)
    assert state and all("lora" in k for k in state)
    # The fake network is a copy of the teacher (its own LoRA also starts at B = 0).
    with torch.no_grad():
        torch.testing.assert_close(nets.fake(x, 0.7, cond).velocity, v_ref)
    assert {n for n, p in nets.fake.named_parameters() if p.requires_grad} == (
        {n for n, _ in nets.fake.named_parameters() if ".fake." in n or n.startswith("gan_head.")})


def test_full_finetune_uses_a_frozen_copy(cond, x):
    nets = build_networks(build_transformer("test", seed=0), _cfg(student={"full_finetune": True}, loss={"mode": "mmd_only"}))
    assert nets.fake is None and nets.frozen_teacher is not None
    assert all(p.requires_grad for p in nets.student.parameters())
    assert not any(p.requires_grad for p in nets.frozen_teacher.parameters())
    with nets.teacher() as teacher:
        assert teacher is nets.frozen_teacher


def test_student_export_loads_in_stock_diffusers(tmp_path, cond, x):
    nets = build_networks(build_transformer("test", seed=0), _cfg(student={"lora_rank": 2, "lora_alpha": 8},
                                                                  loss={"mode": "mmd_only"}))
    with torch.no_grad():
        for n, p in nets.student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        v_student = velocity(nets.student, x, 0.5, cond)
    assert save_student(nets.student, tmp_path) == "lora"
    assert [p.name for p in tmp_path.iterdir()] == ["pytorch_lora_weights.safetensors"]
    fresh = build_transformer("test", seed=0)
    fresh.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(velocity(fresh, x, 0.5, cond), v_student)  # alpha 8 != rank 2 survives


def test_bad_target_modules_are_reported():
    with pytest.raises(ValueError, match=r"swd.student.target_modules: \['to_qq'\] matched no layer"):
        build_networks(build_transformer("test"), _cfg(student={"target_modules": ["to_qq"]}))


def test_features_are_image_tokens_after_the_block(cond, x):
    model = build_transformer("test", seed=0)
    block = model.transformer_blocks[1]
    v, feats = transformer_features(model, x, 0.5, cond, block=1)
    tokens = (8 // TEST["patch_size"]) ** 2
    assert feats.shape == (BATCH, tokens, TEST["num_attention_heads"] * TEST["attention_head_dim"])
    torch.testing.assert_close(v, velocity(model, x, 0.5, cond))
    v_stop, feats_stop = transformer_features(model, x, 0.5, cond, block=1, stop_at_block=True)
    assert v_stop is None
    torch.testing.assert_close(feats_stop, feats)
    assert not block._forward_hooks  # hook removed


def test_gan_head_shape():
    head = gan_head(128, 4)
    assert len(head) == 4
    assert [type(m) for m in head[0]] == [nn.LayerNorm, nn.GELU, nn.Linear]
    widths = [layer[2].in_features for layer in head] + [head[-1][2].out_features]
    assert widths == [128, 96, 64, 33, 1]  # narrowing linearly to one logit
    assert head(torch.randn(5, 128)).shape == (5, 1)


def test_frozen_restores_flags():
    m = nn.Linear(2, 2)
    m.bias.requires_grad_(False)
    with frozen(m, None):
        assert not any(p.requires_grad for p in m.parameters())
    assert m.weight.requires_grad and not m.bias.requires_grad


def test_package_imports_no_ray_mlflow_deepspeed():
    code = (
        "import sys\n"
        "import pipeline.swd\n"
        "from pipeline.swd import config, inputs, losses, networks, sampler, schedules\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'deepspeed'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
