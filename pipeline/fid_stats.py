"""FID reference statistics from your own images: `mu` and `sigma` of pool3 features, in the `.npz`
format pytorch-fid and the released SwD evaluation read, plus how they were made (`protocol_json`).

  python -m pipeline.fid_stats --weights /mnt/swd/eval/fid_inception_v3.safetensors \\
      --shards '/mnt/swd/data/coco-val-{000000..000009}.tar' --image-side-px 256 --out coco256.npz
  python -m pipeline.fid_stats --weights W.safetensors --folder ./val_images --image-side-px 256 --out ref.npz

Steps: every image of the WebDataset shards (the tolerant reader every stage shares: bad members are
counted, not fatal) or of the folder (png/jpg/jpeg/webp, sorted by name) -> upright RGB -> the released
evaluation's resize to `--image-side-px` (PIL Lanczos of the short side, centre crop; `eval_protocol.bring_to_side`)
-> the FID Inception (`pipeline.fid_inception`, `--resize` pytorch_fid or clean_fid) -> float64 mean and
(N - 1) covariance. Use the same side, resize rule and weights in `evaluate.fid_image_side_px`,
`evaluate.fid_resize` and `evaluate.inception_weights`; the evaluate stage checks the weights digest.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def iter_images(shards: list[str] | None = None, folder: str | None = None, max_images: int | None = None):
    """uint8 RGB images [H, W, 3] (upright), from shards or a folder, at most `max_images`."""
    from PIL import Image, ImageOps

    count = 0
    if shards:
        from pipeline.data import expand_shards
        from pipeline.samples import read_shards

        urls = [e["url"] for e in expand_shards(shards, "--shards")]
        reads = read_shards(urls, max_samples=max_images)
        if reads.rejects:
            print(f"[fid_stats] {len(reads.rejects)} bad sample(s) skipped", file=sys.stderr)
        for s in reads.samples:
            with Image.open(io.BytesIO(s["image"])) as im:
                yield np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        return
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for p in files:
        if max_images is not None and count >= max_images:
            return
        with Image.open(p) as im:
            yield np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        count += 1


def compute(images, weights: str, image_side_px: int | None, resize_rule: str = "pytorch_fid",
            batch_size: int = 50, device: str = "cpu", source: str = "") -> dict:
    """{"mu", "sigma", "protocol"} of pool3 features of `images` (an iterable of uint8 [H, W, 3])."""
    from pipeline import fid_inception
    from pipeline.eval_protocol import bring_to_side
    from pipeline.metrics import feature_statistics

    extractor = fid_inception.InceptionFeatures(weights, resize_rule, device, key="--weights")
    features, batch = [], []
    for im in images:
        batch.append(bring_to_side(im[None], image_side_px)[0])
        if len(batch) == batch_size:
            features.append(extractor(np.stack(batch)))
            batch = []
    if batch:
        features.append(extractor(np.stack(batch)))
    if not features or sum(len(f) for f in features) < 2:
        raise SystemExit("fid_stats: fewer than 2 images found; nothing to compute statistics of")
    feats = np.concatenate(features)
    mu, sigma = feature_statistics(feats)
    protocol = {"extractor": fid_inception.EXTRACTOR, "weights_sha256": fid_inception.file_digest(weights),
                "resize_rule": resize_rule, "image_side_px": image_side_px, "num_images": int(len(feats)),
                "source": source}
    return {"mu": mu, "sigma": sigma, "protocol": protocol}


def save(path: str | Path, stats: dict) -> None:
    """mu, sigma (float64) and protocol_json (a plain string array: loads with allow_pickle=False)."""
    np.savez(path, mu=stats["mu"], sigma=stats["sigma"], protocol_json=np.asarray(json.dumps(stats["protocol"])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.fid_stats", description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", nargs="+", help="WebDataset tars (paths, globs, brace patterns)")
    src.add_argument("--folder", help="a folder of png/jpg/jpeg/webp images (searched recursively)")
    parser.add_argument("--weights", required=True, help="FID Inception safetensors (python -m pipeline.fid_inception convert)")
    parser.add_argument("--image-side-px", type=int, default=256,
                        help="side images are brought to first (Lanczos + centre crop), as evaluate.fid_image_side_px; "
                             "0: as stored (default 256, the released statistics')")
    parser.add_argument("--resize", choices=("pytorch_fid", "clean_fid"), default="pytorch_fid",
                        help="the resize rule to the network's 299 px (as evaluate.fid_resize)")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, help="the .npz to write")
    args = parser.parse_args(argv)
    source = " ".join(args.shards) if args.shards else str(args.folder)
    stats = compute(iter_images(args.shards, args.folder, args.max_images), args.weights, args.image_side_px or None,
                    args.resize, args.batch_size, args.device, source)
    save(args.out, stats)
    p = stats["protocol"]
    print(f"wrote {args.out}: {p['num_images']} images at {p['image_side_px'] or 'stored'} px, resize {p['resize_rule']}, "
          f"weights sha256 {p['weights_sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
