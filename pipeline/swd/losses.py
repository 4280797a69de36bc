"""The losses of SWD.md section 4: per-term functions on tensors, and the two step losses.

Per term (plain tensors, checked by hand in the tests):
- `diffusion_loss`: the fake network's x0-prediction MSE.
- `gan_discriminator_loss`, `gan_generator_loss`: softplus (non-saturating) GAN losses on logits.
- `dmd_gradient`, `dmd_loss`: g = (x0_fake - x0_real) / mean|x - x0_real| per sample;
  L = 0.5 * MSE(x, stopgrad(x - g)), whose gradient w.r.t. x is g / x.numel().
- `mmd_linear` (released pseudo-Huber kernel on token means), `mmd_rbf` (unbiased, within image),
  `mmd_loss` (per image or pooled over the batch).

Per step (call networks; k drawn on the teacher's grid):
- `fake_loss`: L_F = MSE(F's x0 at x_k, x) + fake_gan_weight * (softplus(D(fake)) + softplus(-D(real))).
  The student sample is detached: no gradient reaches the student.
- `generator_loss`: L_G = dmd_weight L_DMD + gan_weight L_GAN + mmd_weight L_MMD (mmd_only: L_MMD only).
  Teacher and fake parameters are frozen: gradients reach only x (and from it the student). The
  caller freezes F (`frozen(networks.fake)`) around the loss, its backward and the optimiser step, as
  the released code does: gradient checkpointing recomputes F's forward inside the backward, and a
  recomputation that sees F's LoRA trainable again no longer matches the forward (CheckpointError).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.swd.config import SwdConfig
from pipeline.swd.inputs import grid_indices
from pipeline.swd.networks import Networks, transformer_features
from pipeline.swd.sampler import TextCond, add_noise, guided_velocity

# ----------------------------------------------------------------------------- per-term losses


def diffusion_loss(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """MSE(x0 prediction of F on the noised sample, the clean sample)."""
    return F.mse_loss(x0_pred.float(), x0.float())


def gan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """softplus(D(fake)) + softplus(-D(real)), each averaged over the batch."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """softplus(-D(fake)), averaged over the batch."""
    return F.softplus(-logits_fake.float()).mean()


@torch.no_grad()
def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor,
                 normaliser_min: float = 1e-5) -> torch.Tensor:
    """g = (x0_fake - x0_real) / mean|x - x0_real| per sample (floored at `normaliser_min`; NaN -> 0)."""
    x, x0_real, x0_fake = x.float(), x0_real.float(), x0_fake.float()
    dims = list(range(1, x.ndim))
    normaliser = (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp(min=normaliser_min)
    return torch.nan_to_num((x0_fake - x0_real) / normaliser, nan=0.0)


def dmd_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor,
             normaliser_min: float = 1e-5) -> torch.Tensor:
    """L_DMD = 0.5 * MSE(x, stopgrad(x - g)); d L / d x = g / x.numel()."""
    g = dmd_gradient(x.detach(), x0_real, x0_fake, normaliser_min)
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - g))


def mmd_linear(f_real: torch.Tensor, f_fake: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """Released "linear" kernel: pseudo-Huber sqrt((mu_real - mu_fake)^2 + c^2) - c between the
    token means of each image ([B, L, D] -> [B, D]), averaged over images and channels."""
    diff = f_real.float().mean(dim=1) - f_fake.float().mean(dim=1)
    if c == 0:
        return diff.abs().mean()
    return ((diff ** 2 + c ** 2).sqrt() - c).mean()


def mmd_rbf(f_real: torch.Tensor, f_fake: torch.Tensor, bandwidth: float = 100.0) -> torch.Tensor:
    """Squared MMD with k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2)) between the token sets of each
    image (unbiased: the diagonals of the within-set terms are left out), averaged over images."""
    x, y = f_real.float(), f_fake.float()
    n = x.shape[1]
    if n < 2 or y.shape[1] != n:
        raise ValueError(f"mmd_rbf: needs the same number >= 2 of tokens per image, got {n} and {y.shape[1]}")

    def kernel(a, b):
        d2 = (a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(1) - 2 * a @ b.transpose(1, 2))
        return torch.exp(-d2.clamp(min=0) / (2 * bandwidth ** 2))

    off_diagonal = 1 - torch.eye(n, device=x.device, dtype=x.dtype)
    k_xx = (kernel(x, x) * off_diagonal).sum(dim=(1, 2)) / (n * (n - 1))
    k_yy = (kernel(y, y) * off_diagonal).sum(dim=(1, 2)) / (n * (n - 1))
    k_xy = kernel(x, y).mean(dim=(1, 2))
    return (k_xx + k_yy - 2 * k_xy).mean()


def mmd_loss(f_real: torch.Tensor, f_fake: torch.Tensor, kernel: str = "linear", pooling: str = "per_image",
             huber_c: float = 1e-3, rbf_bandwidth: float = 100.0) -> torch.Tensor:
    """MMD between image-token features [B, L, D]: per image (the paper's choice), or with every
    token of the batch pooled into one set ("batch": costs FID 13.6 -> 16.4 in the paper's ablation)."""
    if pooling == "batch":
        f_real, f_fake = f_real.flatten(0, 1).unsqueeze(0), f_fake.flatten(0, 1).unsqueeze(0)
    elif pooling != "per_image":
        raise ValueError(f"swd.loss.mmd_pooling: {pooling!r} is not a pooling; valid: 'per_image', 'batch'")
    if kernel == "linear":
        return mmd_linear(f_real, f_fake, huber_c)
    if kernel == "rbf":
        return mmd_rbf(f_real, f_fake, rbf_bandwidth)
    raise ValueError(f"swd.loss.mmd_kernel: {kernel!r} is not a kernel; valid: 'linear', 'rbf'")


# ----------------------------------------------------------------------------- step losses


def _noise_at(grid: torch.Tensor, k_range, x: torch.Tensor, generator):
    """k uniform in k_range per sample, sigma_k from the grid, eps ~ N(0, 1)."""
    k = grid_indices(k_range, x.shape[0], generator, device=x.device)
    sigma = grid.to(x.device)[k]
    eps = torch.randn(x.shape, generator=generator, device=x.device)
    return sigma, eps


def fake_loss(fake, x: torch.Tensor, z_real: torch.Tensor, cond: TextCond, cfg: SwdConfig,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fake-score update (SWD.md section 4, loss 1). `fake` is the FakeScore (or a wrapper with the same
    call, e.g. its DeepSpeed engine); `x` the student's x0_hat (detached here), `z_real` the target
    latent z_i. Real and fake are noised with the same k and eps; k uniform in `fake_k_range`."""
    loss_cfg = cfg.loss
    grid = torch.tensor(cfg.schedule.grid, dtype=torch.float32)
    x = x.detach().float()
    sigma, eps = _noise_at(grid, loss_cfg.fake_k_range, x, generator)
    x_k = add_noise(x, sigma, eps)
    out_fake = fake(x_k, sigma, cond)
    x0_pred = x_k - sigma.view(-1, 1, 1, 1) * out_fake.velocity
    l_diffusion = diffusion_loss(x0_pred, x)
    parts = {"fake_diffusion": l_diffusion}
    total = l_diffusion
    if loss_cfg.fake_gan_weight > 0:
        z_k = add_noise(z_real.float(), sigma, eps)
        out_real = fake(z_k, sigma, cond, features_only=True)
        l_d = gan_discriminator_loss(out_fake.logits, out_real.logits)
        parts["fake_gan_d"] = l_d
        total = total + loss_cfg.fake_gan_weight * l_d
    parts["fake_total"] = total
    return total, {k: v.detach() for k, v in parts.items()}


def generator_loss(networks: Networks, x: torch.Tensor, z_real: torch.Tensor, cond: TextCond, uncond: TextCond,
                   cfg: SwdConfig, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Generator update (SWD.md section 4, loss 2) for the student's x0_hat `x` at scale i and the
    target latent `z_real` = z_i of the same size. `uncond`: the "" prompt, batch 1 or B.
    Gradients flow only into `x`: the teacher runs without grad (DMD) or with frozen weights
    (MMD features), the fake network with its parameters frozen by the caller, from before this call
    until after the optimiser step: `with frozen(networks.fake): loss = generator_loss(...);
    loss.backward(); optimizer.step()`."""
    trainable = [n for n, p in (networks.fake.named_parameters() if networks.fake is not None else ()) if p.requires_grad]
    if trainable:
        raise RuntimeError(f"generator_loss: the fake network has trainable parameters ({len(trainable)}, e.g. "
                           f"{trainable[0]}); call it inside `with frozen(networks.fake):` and keep that block open "
                           "through the backward and the optimiser step (gradient checkpointing recomputes F's "
                           "forward during the backward)")
    loss_cfg = cfg.loss
    grid = torch.tensor(cfg.schedule.grid, dtype=torch.float32)
    x = x.float()
    batch = x.shape[0]
    parts: dict[str, torch.Tensor] = {}
    total = x.new_zeros(())

    if loss_cfg.mode == "full":
        # DMD and GAN: k uniform in dmd_k_range, x_k = (1 - sigma_k) x + sigma_k eps.
        sigma, eps = _noise_at(grid, loss_cfg.dmd_k_range, x, generator)
        s = sigma.view(-1, 1, 1, 1)
        x_k = add_noise(x, sigma, eps)
        with torch.no_grad(), networks.teacher() as teacher:
            x0_real = x_k.detach() - s * guided_velocity(teacher, x_k.detach(), sigma, cond, uncond,
                                                          loss_cfg.guidance_scale)
        with torch.set_grad_enabled(torch.is_grad_enabled() and loss_cfg.gan_weight > 0):
            out = networks.fake(x_k, sigma, cond)          # one pass: velocity for DMD, logits for the GAN
            x0_fake = x_k.detach() - s * out.velocity.detach()  # no CFG for the fake score
            logits = out.logits
            del out
        l_dmd = dmd_loss(x, x0_real, x0_fake, loss_cfg.dmd_normaliser_min)
        l_gan = gan_generator_loss(logits)
        parts.update(dmd=l_dmd, gan_g=l_gan)
        total = total + loss_cfg.dmd_weight * l_dmd + loss_cfg.gan_weight * l_gan

    if loss_cfg.mode == "mmd_only" or loss_cfg.mmd_weight > 0:
        # MMD: k' uniform in mmd_k_range; the student sample and z_i noised with the same k' and eps.
        if loss_cfg.mmd_noise:
            sigma, eps = _noise_at(grid, loss_cfg.mmd_k_range, x, generator)
            x_n, z_n = add_noise(x, sigma, eps), add_noise(z_real.float(), sigma, eps)
        else:
            sigma = torch.zeros(batch, device=x.device)
            x_n, z_n = x, z_real.float()
        if loss_cfg.mmd_features == "teacher":
            with networks.teacher() as teacher:
                f_fake = transformer_features(teacher, x_n, sigma, cond, cfg.feature_block,
                                              cfg.stop_at_feature_block)[1]
                with torch.no_grad():
                    f_real = transformer_features(teacher, z_n, sigma, cond, cfg.feature_block,
                                                  cfg.stop_at_feature_block)[1]
        else:
            f_fake = networks.fake(x_n, sigma, cond, features_only=True).features
            with torch.no_grad():
                f_real = networks.fake(z_n, sigma, cond, features_only=True).features
        l_mmd = mmd_loss(f_real, f_fake, loss_cfg.mmd_kernel, loss_cfg.mmd_pooling, loss_cfg.huber_c,
                         loss_cfg.rbf_bandwidth)
        parts["mmd"] = l_mmd
        total = total + loss_cfg.mmd_weight * l_mmd

    parts["generator_total"] = total
    return total, {k: v.detach() for k, v in parts.items()}

