"""Losses: each term against hand-computed values, DMD's gradient, and where gradients go in the
generator and fake steps; plus the training inputs of SWD.md section 4."""

import math

import pytest
import torch

from pipeline.bench_models import build_transformer, random_text_cond
from pipeline.swd.config import SwdConfig
from pipeline.swd.inputs import area_downsample, choose_scale_index, grid_indices, scale_images, training_inputs
from pipeline.swd.losses import (diffusion_loss, dmd_gradient, dmd_loss, fake_loss, gan_discriminator_loss,
                                 gan_generator_loss, generator_loss, mmd_linear, mmd_loss, mmd_rbf)
from pipeline.swd.networks import build_networks, frozen
from pipeline.swd.sampler import TextCond, x0_hat

BATCH = 2


def softplus(v):
    return math.log1p(math.exp(v))


# ----------------------------------------------------------------------------- per-term values


def test_diffusion_and_gan_losses_by_hand():
    assert diffusion_loss(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)).item() == pytest.approx(2.5)
    fake, real = torch.tensor([0.0, 1.0]), torch.tensor([2.0, -1.0])
    expected_d = (softplus(0) + softplus(1)) / 2 + (softplus(-2) + softplus(1)) / 2
    assert gan_discriminator_loss(fake, real).item() == pytest.approx(expected_d, rel=1e-6)
    assert gan_generator_loss(fake).item() == pytest.approx((softplus(0) + softplus(-1)) / 2, rel=1e-6)


def test_dmd_by_hand_and_its_gradient():
    # sample 0: |x - x0_real| = [1, 2] -> normaliser 1.5; g = ([2, 1] - [0, 1]) / 1.5 = [4/3, 0]
    # sample 1: x0_fake == x0_real == x: normaliser 0 (floored), g = 0, not NaN
    x = torch.tensor([[[[1.0, 3.0]]], [[[0.5, 0.5]]]], requires_grad=True)
    x0_real = torch.tensor([[[[0.0, 1.0]]], [[[0.5, 0.5]]]])
    x0_fake = torch.tensor([[[[2.0, 1.0]]], [[[0.5, 0.5]]]])
    g = dmd_gradient(x, x0_real, x0_fake)
    torch.testing.assert_close(g, torch.tensor([[[[4 / 3, 0.0]]], [[[0.0, 0.0]]]]))
    loss = dmd_loss(x, x0_real, x0_fake)
    assert loss.item() == pytest.approx(0.5 * (4 / 3) ** 2 / 4)  # 0.5 * mean(g^2)
    loss.backward()
    torch.testing.assert_close(x.grad, g / x.numel())  # d/dx 0.5 * mean((x - sg(x - g))^2) = g / numel
    # NaN-safe: NaNs in the estimates give a zero gradient, not NaN.
    g_nan = dmd_gradient(x.detach(), torch.full_like(x0_real, float("nan")), x0_fake)
    assert torch.isfinite(g_nan).all()


def test_mmd_linear_by_hand():
    c = 1e-3
    f_real = torch.tensor([[[0.0, 0.0], [2.0, 2.0]]])   # token mean [1, 1]
    f_fake = torch.tensor([[[1.0, 1.0], [1.0, 3.0]]])   # token mean [1, 2]
    expected = ((math.sqrt(0 + c * c) - c) + (math.sqrt(1 + c * c) - c)) / 2
    assert mmd_linear(f_real, f_fake, c).item() == pytest.approx(expected, rel=1e-6)
    assert mmd_linear(f_real, f_fake, 0.0).item() == pytest.approx(0.5)


def test_mmd_rbf_by_hand():
    x = torch.tensor([[[0.0], [1.0]]])
    y = torch.tensor([[[0.0], [2.0]]])
    k = lambda d: math.exp(-d * d / 2)  # bandwidth 1
    xx, yy = k(1), k(2)                 # unbiased: off-diagonal pairs only
    xy = (k(0) + k(2) + k(1) + k(1)) / 4
    assert mmd_rbf(x, y, bandwidth=1.0).item() == pytest.approx(xx + yy - 2 * xy, rel=1e-6)
    assert mmd_rbf(x, x, bandwidth=1.0).item() == pytest.approx(2 * k(1) - 2 * (2 + 2 * k(1)) / 4, abs=1e-7)
    with pytest.raises(ValueError, match="needs the same number >= 2 of tokens"):
        mmd_rbf(x[:, :1], y[:, :1])


def test_mmd_per_image_versus_batch_pooled():
    c = 1e-3
    f_real = torch.tensor([[[0.0]], [[2.0]]])
    f_fake = torch.tensor([[[1.0]], [[1.0]]])
    assert mmd_loss(f_real, f_fake, "linear", "per_image", c).item() == pytest.approx(math.sqrt(1 + c * c) - c)
    assert mmd_loss(f_real, f_fake, "linear", "batch", c).item() == pytest.approx(0.0, abs=1e-7)
    rbf_pooled = mmd_loss(torch.tensor([[[0.0]], [[1.0]]]), torch.tensor([[[0.0]], [[2.0]]]), "rbf", "batch",
                          rbf_bandwidth=1.0)
    assert rbf_pooled.item() == pytest.approx(mmd_rbf(torch.tensor([[[0.0], [1.0]]]),
                                                      torch.tensor([[[0.0], [2.0]]]), 1.0).item())
    with pytest.raises(ValueError, match=r"swd.loss.mmd_kernel: 'cosine' is not a kernel"):
        mmd_loss(f_real, f_fake, "cosine")


# ----------------------------------------------------------------------------- training inputs


def test_training_inputs():
    scales, sigmas = [4, 6, 8], [1.0, 0.8, 0.6, 0.0]
    z_im1 = torch.randn(BATCH, 4, 4, 4)
    eps = torch.randn(BATCH, 4, 6, 6)
    inp = training_inputs(z_im1, 1, scales, sigmas, eps=eps)
    u = torch.nn.functional.interpolate(z_im1, size=(6, 6), mode="bicubic")
    torch.testing.assert_close(inp.u, u)
    torch.testing.assert_close(inp.x_in, 0.2 * u + 0.8 * eps)
    torch.testing.assert_close(inp.t, torch.full((BATCH,), 800.0))
    first = training_inputs(z_im1, 0, scales, sigmas, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(first.x_in, first.eps)  # sig[0] = 1: pure noise
    assert [choose_scale_index(s, 3, "cycle") for s in range(5)] == [0, 1, 2, 0, 1]
    drawn = {choose_scale_index(0, 3, "random", torch.Generator().manual_seed(s)) for s in range(20)}
    assert drawn == {0, 1, 2}
    k = grid_indices((12, 28), 1000, torch.Generator().manual_seed(0))
    assert k.min() == 12 and k.max() == 27


def test_scale_images_area_downsampling():
    image = torch.rand(1, 3, 64, 64)
    i_1, i_0 = scale_images(image, [4, 6, 8], 1, vae_scale_factor=8)
    assert i_1.shape[-1] == 48 and i_0.shape[-1] == 32
    torch.testing.assert_close(i_0, area_downsample(i_1, 32))
    j_0, j_prev = scale_images(image, [4, 6, 8], 0, vae_scale_factor=8)
    torch.testing.assert_close(j_0, j_prev)  # s[-1] := s[0]
    torch.testing.assert_close(area_downsample(torch.ones(1, 1, 4, 4), 2), torch.ones(1, 1, 2, 2))


# ----------------------------------------------------------------------------- step losses and gradient flow


def _cfg(stop_at_feature_block: bool = False, **loss):
    return SwdConfig.model_validate({
        "preset": None, "scales": [4, 6, 8], "boundaries": [0, 7, 18], "feature_block": 1,
        "stop_at_feature_block": stop_at_feature_block,
        "student": {"lora_rank": 2, "lora_alpha": 2}, "fake": {"lora_rank": 2, "lora_alpha": 2}, "loss": loss})


@pytest.fixture(scope="module")
def batch():
    cond = TextCond(*random_text_cond("test", BATCH, seed=1))
    uncond = TextCond(*random_text_cond("test", 1, seed=2))
    g = torch.Generator().manual_seed(0)
    return cond, uncond, torch.randn(BATCH, 4, 4, 4, generator=g), torch.randn(BATCH, 4, 6, 6, generator=g)


def _student_x(nets, cfg, z_im1, cond):
    sched = cfg.schedule
    inp = training_inputs(z_im1, 1, sched.scales, sched.sigmas, generator=torch.Generator().manual_seed(1))
    return x0_hat(nets.student, inp.x_in, inp.sigma, cond)


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", [{}, {"mmd_features": "fake", "mmd_kernel": "rbf"}, {"mode": "mmd_only"}],
                         ids=["full", "full-fake-features-rbf", "mmd-only"])
def test_generator_step_gradients_reach_only_the_student(batch, loss):
    cond, uncond, z_im1, z_real = batch
    cfg = _cfg(**loss)
    nets = build_networks(build_transformer("test", seed=0), cfg)
    x = _student_x(nets, cfg, z_im1, cond)
    with frozen(nets.fake):
        total, parts = generator_loss(nets, x, z_real, cond, uncond, cfg, torch.Generator().manual_seed(2))
        total.backward()
    w = cfg.loss
    if w.mode == "full":
        expected = w.dmd_weight * parts["dmd"] + w.gan_weight * parts["gan_g"] + w.mmd_weight * parts["mmd"]
    else:
        assert nets.fake is None and set(parts) == {"mmd", "generator_total"}
        expected = w.mmd_weight * parts["mmd"]
    torch.testing.assert_close(total.detach(), expected)
    student_grads = _grads(nets.student)
    assert student_grads and all(".student." in n for n in student_grads)
    assert any(g.abs().sum() > 0 for g in student_grads.values())
    if nets.fake is not None:
        assert _grads(nets.fake) == {}  # no gradient into the fake LoRA or the GAN head
        assert all(p.requires_grad for n, p in nets.fake.named_parameters() if ".fake." in n)  # flags restored
    # The teacher is the frozen base: no base weight got a gradient (checked above: only .student. names).


def test_fake_step_gradients_reach_only_the_fake(batch):
    cond, _, z_im1, z_real = batch
    cfg = _cfg()
    nets = build_networks(build_transformer("test", seed=0), cfg)
    with torch.no_grad():
        x = _student_x(nets, cfg, z_im1, cond)
    x.requires_grad_(True)  # even a student sample that carries grad is detached inside
    total, parts = fake_loss(nets.fake, x, z_real, cond, cfg, torch.Generator().manual_seed(3))
    total.backward()
    torch.testing.assert_close(total.detach(), parts["fake_diffusion"] + 0.01 * parts["fake_gan_d"])
    assert _grads(nets.student) == {} and x.grad is None
    fake_grads = _grads(nets.fake)
    assert any(n.startswith("gan_head.") for n in fake_grads) and any(".fake." in n for n in fake_grads)
    assert all(".fake." in n or n.startswith("gan_head.") for n in fake_grads)


def test_teacher_features_ignore_gradient_checkpointing(batch):
    """MMD through the teacher: recomputation in backward must not run with the student's adapter on."""
    cond, uncond, _, z_real = batch
    cfg = _cfg(mode="mmd_only")
    grads = []
    for checkpointing in (False, True):
        nets = build_networks(build_transformer("test", seed=0), cfg)
        with torch.no_grad():
            for n, p in nets.student.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.05)  # student != teacher, so a wrong recomputation would show
        if checkpointing:
            nets.student.enable_gradient_checkpointing()
        x = torch.randn(BATCH, 4, 6, 6, generator=torch.Generator().manual_seed(4), requires_grad=True)
        total, _ = generator_loss(nets, x, z_real, cond, uncond, cfg, torch.Generator().manual_seed(5))
        total.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_generator_loss_refuses_a_trainable_fake_network(batch):
    cond, uncond, z_im1, z_real = batch
    cfg = _cfg()
    nets = build_networks(build_transformer("test", seed=0), cfg)
    x = _student_x(nets, cfg, z_im1, cond)
    with pytest.raises(RuntimeError, match=r"generator_loss: the fake network has trainable parameters .*"
                                           r"inside `with frozen\(networks.fake\):`"):
        generator_loss(nets, x, z_real, cond, uncond, cfg)


# Every loss mode of the generator step: the MMD features from the teacher (paper) or F (released),
# with and without the early exit after the feature block.
LOSS_MODES = {
    "full-teacher-features": dict(),
    "full-teacher-features-early-exit": dict(stop_at_feature_block=True),
    "full-fake-features": dict(mmd_features="fake"),
    "full-fake-features-early-exit": dict(mmd_features="fake", stop_at_feature_block=True),
    "mmd-only": dict(mode="mmd_only"),
    "mmd-only-early-exit": dict(mode="mmd_only", stop_at_feature_block=True),
}


def _perturbed_networks(cfg, checkpointing: bool):
    """Networks with non-zero LoRA B (student != teacher, F != teacher), checkpointed or not."""
    torch.manual_seed(0)  # PEFT draws LoRA A from the global generator
    nets = build_networks(build_transformer("test", seed=0), cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in (nets.student, nets.fake):
            for n, p in (module.named_parameters() if module is not None else ()):
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    if checkpointing:
        nets.student.enable_gradient_checkpointing()
        if nets.fake is not None:
            nets.fake.transformer.enable_gradient_checkpointing()
    return nets


@pytest.mark.parametrize("mode", list(LOSS_MODES), ids=list(LOSS_MODES))
def test_generator_step_with_gradient_checkpointing_equals_the_plain_step(batch, mode):
    """Regression: with F frozen only inside the loss, the backward's recomputation saw F's LoRA trainable
    again (CheckpointError). Frozen through backward and optimiser step, checkpointing changes nothing."""
    cond, uncond, z_im1, z_real = batch
    cfg = _cfg(**LOSS_MODES[mode])
    results = []
    for checkpointing in (False, True):
        nets = _perturbed_networks(cfg, checkpointing)
        assert nets.student.is_gradient_checkpointing == checkpointing
        opt = torch.optim.AdamW(nets.student_parameters(), lr=1e-2)
        x = _student_x(nets, cfg, z_im1, cond)
        with frozen(nets.fake):
            total, _ = generator_loss(nets, x, z_real, cond, uncond, cfg, torch.Generator().manual_seed(2))
            total.backward()
            grads = {n: g.clone() for n, g in _grads(nets.student).items()}
            opt.step()
        if nets.fake is not None:
            assert _grads(nets.fake) == {}
            assert all(p.requires_grad for n, p in nets.fake.named_parameters() if ".fake." in n)
        after = {n: p.detach().clone() for n, p in nets.student.named_parameters() if p.requires_grad}
        results.append((total.detach(), grads, after))
    (loss0, grads0, after0), (loss1, grads1, after1) = results
    torch.testing.assert_close(loss1, loss0)
    assert grads0 and grads0.keys() == grads1.keys() and any(g.abs().sum() > 0 for g in grads0.values())
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-4, atol=1e-6, msg=n)
    for n in after0:
        torch.testing.assert_close(after1[n], after0[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("fake_gan_weight", [0.01, 0.0], ids=["with-gan", "no-gan"])
def test_fake_step_with_gradient_checkpointing_equals_the_plain_step(batch, fake_gan_weight):
    cond, _, z_im1, z_real = batch
    cfg = _cfg(fake_gan_weight=fake_gan_weight, stop_at_feature_block=True)
    results = []
    for checkpointing in (False, True):
        nets = _perturbed_networks(cfg, checkpointing)
        with torch.no_grad():
            x = _student_x(nets, cfg, z_im1, cond)
        total, _ = fake_loss(nets.fake, x, z_real, cond, cfg, torch.Generator().manual_seed(3))
        total.backward()
        results.append((total.detach(), {n: g.clone() for n, g in _grads(nets.fake).items()}))
        assert _grads(nets.student) == {}
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0)
    assert grads0 and grads0.keys() == grads1.keys()
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-4, atol=1e-6, msg=n)
