"""Oracle scores of a teacher bundle on the eval prompts of the shapes dataset.

    python scripts/eval_teacher.py assets/tiny-teacher --num-prompts 256 --guidance-scale 2,3,4

Eval prompts are the `eval` split of `make_sample(data_seed, "eval", i, ...)` (what the shards
stage writes for the same grammar); images from the stock StableDiffusion3Pipeline of the bundle
(`pipeline.teacher.load_bundle`), `--steps` Euler steps with CFG, one fixed seed; the defaults are the
teacher sampler's (`pipeline.teacher.TeacherSampler`, as `teacher.sampler` draws the stage's grid).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning threads thrash on shared cores


def main() -> None:
    from pipeline.teacher import TeacherSampler

    sampler = TeacherSampler()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--steps", type=int, default=sampler.num_steps)
    parser.add_argument("--guidance-scale", default=f"{sampler.guidance_scale:g}", help="comma-separated list to sweep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--shapes", default="circle,square,triangle")
    parser.add_argument("--colours", default="red,green,blue,yellow,purple,orange")
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--backgrounds", default="black,white")
    parser.add_argument("--sides", default="64", help="comma-separated image sides in px to sweep (below the native "
                        "64: SwD's smaller scales; images are upsampled bicubically to 64 for the oracle)")
    parser.add_argument("--by", default=None, help="also report accuracy split by this attribute (e.g. size)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from pipeline import oracle, shapes
    from pipeline.teacher import load_bundle

    torch.set_num_threads(2)
    grammar = [getattr(args, k).split(",") for k in ("shapes", "colours", "sizes", "backgrounds")]
    samples = [shapes.make_sample(args.data_seed, "eval", i, 64, *grammar) for i in range(args.num_prompts)]
    prompts = [s["txt"] for s in samples]
    targets = [json.loads(s["json"]) for s in samples]
    bundle = load_bundle(args.bundle)
    for side, guidance in [(int(s), float(g)) for s in args.sides.split(",") for g in args.guidance_scale.split(",")]:
        gen = torch.Generator().manual_seed(args.seed)
        started, images = time.monotonic(), []
        for i in range(0, len(prompts), 32):
            images.extend(bundle.pipeline(prompt=prompts[i:i + 32], num_inference_steps=args.steps,
                                          guidance_scale=guidance, max_sequence_length=bundle.max_sequence_length,
                                          height=side, width=side, generator=gen, output_type="np").images)
        elapsed = time.monotonic() - started
        if side != 64:
            from PIL import Image

            images = [np.asarray(Image.fromarray((im * 255).round().astype(np.uint8)).resize((64, 64), Image.BICUBIC))
                      for im in images]
        result = {"side_px": side, "guidance_scale": guidance, "steps": args.steps, "num_prompts": len(prompts),
                  "s_per_image": round(elapsed / len(prompts), 4),
                  **{k: round(v, 4) for k, v in oracle.score(images, targets).items()}}
        if args.by:
            for value in sorted({t[args.by] for t in targets}):
                keep = [i for i, t in enumerate(targets) if t[args.by] == value]
                sub = oracle.score([images[i] for i in keep], [targets[i] for i in keep])
                result[f"{args.by}={value}"] = {k: round(v, 3) for k, v in sub.items()}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
