"""The standard FID feature extractor in pure torch: pytorch-fid's FID Inception-v3 (no torchvision).

Architecture: torchvision's Inception3 (aux_logits off, 1008-class fc) with pytorch-fid's patched blocks
(`pytorch_fid/inception.py` `fid_inception_v3`, the port of the TF 2015-12-05 graph that FID was
defined with): `FIDInceptionA` (Mixed_5b/c/d) and `FIDInceptionC` (Mixed_6b-e) average-pool without
counting the zero padding, `FIDInceptionE_1` (Mixed_7b) likewise, `FIDInceptionE_2` (Mixed_7c) max-pools.
Module names are torchvision's, so the pytorch-fid weights (`pt_inception-2015-12-05-6726825d.pth`)
load strictly once converted to safetensors (`convert`). Features: pool3, the 2048-d global average
pool after Mixed_7c.

Preprocessing (`preprocess`), uint8 RGB [B, H, W, 3] ->
- `pytorch_fid`: x / 255 in [0, 1] -> `F.interpolate(size=299, mode="bilinear", align_corners=False)`
  (no antialiasing) -> 2x - 1, exactly pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`;
  what the released SwD evaluation and its reference statistics use.
- `clean_fid`: clean-fid's `clean` mode (Parmar et al. 2022; `cleanfid/resize.py` `make_resizer("PIL",
  False, "bicubic", (299, 299))`): each channel resized to 299 as a float32 PIL image by bicubic
  (antialiased), clipped to [0, 255], never quantised; then clean-fid's normalisation (x - 128) / 128
  (`cleanfid/inception_torchscript.py`, the TF graph's own). clean-fid runs these inputs through its
  TorchScript port of the same TF graph; this is the pytorch-fid port, so reference statistics for this
  rule are made with `python -m pipeline.fid_stats --resize clean_fid`, not taken from clean-fid's files.

Commands:
  python -m pipeline.fid_inception convert pt_inception-2015-12-05-6726825d.pth fid_inception_v3.safetensors
  (reads the .pth with torch.load(weights_only=True): tensors only, no pickled code)
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

FEATURE_DIM = 2048
INPUT_SIDE_PX = 299
NUM_CLASSES = 1008  # the TF graph's 1008-way classifier
RESIZE_RULES = ("pytorch_fid", "clean_fid")
EXTRACTOR = "inception_v3_pytorch_fid_pool3"


def build():
    """The FID Inception-v3 with random (PyTorch default) weights, in eval mode."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class BasicConv2d(nn.Module):
        def __init__(self, c_in, c_out, **kw):
            super().__init__()
            self.conv = nn.Conv2d(c_in, c_out, bias=False, **kw)
            self.bn = nn.BatchNorm2d(c_out, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg_pool(x):  # TF's average pool ignores the padded zeros
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class FIDInceptionA(nn.Module):
        def __init__(self, c_in, pool_features):
            super().__init__()
            self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
            self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
            self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
            self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

        def forward(self, x):
            return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                              self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                              self.branch_pool(avg_pool(x))], 1)

    class InceptionB(nn.Module):  # Mixed_6a (unpatched)
        def __init__(self, c_in):
            super().__init__()
            self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                              F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class FIDInceptionC(nn.Module):
        def __init__(self, c_in, c7):
            super().__init__()
            self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
            self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
            self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
            self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                          self.branch7x7dbl_5):
                d = layer(d)
            return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg_pool(x))], 1)

    class InceptionD(nn.Module):  # Mixed_7a (unpatched)
        def __init__(self, c_in):
            super().__init__()
            self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
            self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
            self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class FIDInceptionE(nn.Module):
        def __init__(self, c_in, max_pool: bool):
            super().__init__()
            self.max_pool = max_pool  # Mixed_7c (FIDInceptionE_2) max-pools, Mixed_7b (E_1) average-pools
            self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
            self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
            self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg_pool(x)
            return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)

    class FIDInceptionV3(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
            self.Mixed_5b = FIDInceptionA(192, 32)
            self.Mixed_5c = FIDInceptionA(256, 64)
            self.Mixed_5d = FIDInceptionA(288, 64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b = FIDInceptionC(768, 128)
            self.Mixed_6c = FIDInceptionC(768, 160)
            self.Mixed_6d = FIDInceptionC(768, 160)
            self.Mixed_6e = FIDInceptionC(768, 192)
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
            self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
            self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # unused for features; kept so the weights load strictly

        def features(self, x):
            """x in [-1, 1], [B, 3, 299, 299] -> pool3 [B, 2048] (pytorch-fid's blocks 0-3)."""
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                         "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
                x = getattr(self, name)(x)
            return x.mean(dim=(2, 3))

        def forward(self, x):
            return self.features(x)

    return FIDInceptionV3().eval()


def file_digest(path: str | Path) -> str:
    """sha256 of a weights file (hex): the extractor's identity in every FID protocol."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(path: str | Path, device: str = "cpu", key: str = "evaluate.inception_weights"):
    """The FID Inception with weights from a safetensors file (strict: every key and shape must match)."""
    from safetensors.torch import load_file

    from pipeline.metrics import MetricError

    model = build()
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 -- a header that is not safetensors
        raise MetricError(f"{key} {str(path)!r}: not a safetensors file ({e}); convert pytorch-fid's weights with "
                          f"`python -m pipeline.fid_inception convert IN.pth OUT.safetensors`") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise MetricError(f"{key} {str(path)!r}: not pytorch-fid's FID Inception-v3: missing keys {missing[:5]}, "
                          f"unexpected keys {unexpected[:5]}")
    return model.requires_grad_(False).to(device)


def preprocess(images, resize_rule: str):
    """uint8 [B, H, W, 3] -> float32 [B, 3, 299, 299] in about [-1, 1] by the named rule (module docstring)."""
    import torch
    import torch.nn.functional as F

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
    if resize_rule == "pytorch_fid":
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(INPUT_SIDE_PX, INPUT_SIDE_PX), mode="bilinear", align_corners=False)
        return 2 * x - 1
    if resize_rule == "clean_fid":
        x = torch.from_numpy(np.stack([clean_resize(im, INPUT_SIDE_PX) for im in images])).permute(0, 3, 1, 2)
        return (x - 128) / 128
    raise ValueError(f"resize rule {resize_rule!r}: expected one of {', '.join(RESIZE_RULES)}")


def clean_resize(image: np.ndarray, side: int) -> np.ndarray:
    """clean-fid's resize: each channel as a float32 PIL image, bicubic to side x side, clipped to [0, 255]."""
    from PIL import Image

    channels = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F")
                           .resize((side, side), resample=Image.BICUBIC)) for c in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.float32)


class InceptionFeatures:
    """Pool3 features of uint8 images with a loaded FID Inception (state: the model on its device)."""

    def __init__(self, path: str | Path, resize_rule: str = "pytorch_fid", device: str = "cpu",
                 key: str = "evaluate.inception_weights"):
        self.model, self.resize_rule, self.device = load(path, device, key), resize_rule, device

    def __call__(self, images) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model.features(preprocess(images, self.resize_rule).to(self.device)).float().cpu().numpy()


def convert(pth: str | Path, out: str | Path) -> str:
    """pytorch-fid's .pth state dict -> safetensors (tensors only); returns the new file's sha256."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(str(pth), map_location="cpu", weights_only=True)  # tensors only: no pickled code runs
    state = {k: v.contiguous() for k, v in state.items() if not k.startswith("AuxLogits")}
    missing, unexpected = build().load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"{pth}: not pytorch-fid's FID Inception-v3 weights: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    save_file(state, str(out))
    return file_digest(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.fid_inception", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="pytorch-fid .pth -> safetensors (torch.load(weights_only=True))")
    c.add_argument("pth")
    c.add_argument("out")
    args = parser.parse_args(argv)
    digest = convert(args.pth, args.out)
    print(f"wrote {args.out} (sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
