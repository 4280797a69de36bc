"""What the distill driver checks and reads before any Ray work: the cache holds the schedule's
scales and was made with this teacher's text settings, the schedule fits the teacher, Ray Data keeps
a CPU; and the prompts of the sample grid."""

from __future__ import annotations

import json
from pathlib import Path


def cache_columns(scales: list[int], cache_scales: list[int]) -> list[tuple[str, str]]:
    """Per step i of the schedule: the cache columns of z_i (side s[i]) and z_im1 (E of the image at
    s[i] downsampled to s[i-1]). A cache made for another schedule serves when it holds the same
    sides, e.g. the full-resolution baseline (all scales equal) from a scale-wise cache holding its side."""
    out, missing = [], []
    for i, side in enumerate(scales):
        prev = scales[max(i - 1, 0)]
        j = next((j for j, s in enumerate(cache_scales) if s == side and (prev == side or cache_scales[max(j - 1, 0)] == prev)), None)
        if j is None:
            missing.append(f"step {i}: side {side}" + (f" after {prev}" if prev != side else ""))
            continue
        out.append((f"z_{j}", f"z_{j}" if prev == side else f"z_im1_{j}"))
    if missing:
        raise ValueError(f"distill: the latent cache holds scales {list(cache_scales)}, which lack what swd scales "
                         f"{list(scales)} need ({'; '.join(missing)}); re-run the cache stage with this swd schedule "
                         f"(or choose scales the cache holds)")
    return out


TEXT_COLUMNS = ("prompt_embeds", "pooled_prompt_embeds")


def scale_datasets(columns: list) -> list[str]:
    """Per scale index, the name of the Ray dataset its batches come from: `scale_<j>`, j the first
    scale index that reads the same cache columns (`cache_columns`), so a step reads only its own
    scale's latents and a full-resolution baseline (every step the same columns) reads one dataset."""
    first: dict[tuple, int] = {}
    return [f"scale_{first.setdefault(tuple(pair), i)}" for i, pair in enumerate(columns)]


def dataset_columns(pair) -> list[str]:
    """The stored columns one scale's dataset reads: its z_i and z_im1_i (`cache_columns`), the text
    embeddings, each as bytes, shape and dtype (the rest of the row is never read)."""
    names = [*dict.fromkeys(pair), *TEXT_COLUMNS]
    return [f"{c}{s}" for c in names for s in ("", "_shape", "_dtype")]


def check_cache_text(manifest: dict, directory: Path, teacher) -> dict:
    """The cache's prompt embeddings were made as this teacher config makes them: the same text encoders
    (files), T5 loaded or not, the same T5 length (the cache's "" embedding for CFG, `read_uncond`, was
    made by the same encoders). Returns the text settings; ValueError naming the key otherwise."""
    from pipeline.latent_cache import encoder_digest
    from pipeline.teacher import text_settings

    expected = {**text_settings(directory, teacher.load_t5, teacher.max_sequence_length),
                "encoder_digest": encoder_digest(directory)}
    cached = manifest.get("text")
    if cached is None:
        raise ValueError("distill: the latent cache records no text settings (made by an older version of the "
                         "cache stage); re-run the cache stage")
    keys = {"t5": "teacher.load_t5", "max_sequence_length": "teacher.max_sequence_length",
            "encoder_digest": "teacher.pretrained (its text encoder / tokenizer / VAE files)"}
    differ = [f"{keys[k]}: the cache has {cached.get(k)!r}, this config's teacher gives {expected[k]!r}"
              for k in keys if cached.get(k) != expected[k]]
    if differ:
        raise ValueError("distill: the latent cache's prompt embeddings were made with other text settings than "
                         "the distill stage expects: " + "; ".join(differ) + "; re-run the cache stage with this "
                         "teacher config, or set the teacher keys to the cache's")
    return expected


def check_teacher(swd, directory: Path) -> None:
    """The schedule against the teacher's transformer config (patch size, latent side, blocks)."""
    from pipeline.swd.config import check_against_teacher

    config = json.loads((Path(directory) / "transformer" / "config.json").read_text())
    check_against_teacher(swd, config["patch_size"], config["sample_size"], config["num_layers"])


def check_data_cpus(cfg) -> None:
    """Ray Data reads the cache with the CPUs the workers leave: say so when there are none (a fixed-size
    cluster would then stall on its first batch; an autoscaling one may still add nodes)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    taken = cfg.num_workers * cfg.num_cpus_per_worker
    if total - taken < 1:
        print(f"[distill] warning: the workers reserve {taken:g} of the cluster's {total:g} CPUs, which leaves less "
              f"than one for Ray Data to read the cache; lower distill.num_cpus_per_worker or distill.num_workers "
              f"unless the cluster scales up", flush=True)


def sample_prompts(cache_dir: str | Path, n: int) -> dict:
    """The first n rows of the cache: prompts and their embeddings (rows of the sample grid)."""
    import pyarrow.dataset as pads

    from pipeline.latent_cache import decode_batch, read_manifest

    manifest = read_manifest(cache_dir)
    dirs = [e["dir"] for e in manifest["shards"] if e["rows"]]
    names = [f"{c}{s}" for c in ("prompt_embeds", "pooled_prompt_embeds") for s in ("", "_shape", "_dtype")]
    table = pads.dataset(dirs[0], format="parquet").head(n, columns=["prompt", *names])
    batch = decode_batch(table)
    return {"prompts": batch["prompt"], "prompt_embeds": batch["prompt_embeds"].float().numpy(),
            "pooled_prompt_embeds": batch["pooled_prompt_embeds"].float().numpy()}
