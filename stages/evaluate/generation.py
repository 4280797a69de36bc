"""Step 2 of `evaluate`: every generator's images of the eval chunks, through one Ray Data actor pool.
The images stay in Ray's object store as lossless PNG rows; the driver takes only what it needs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.generate import Generator, GeneratorSpec, decode_png, encode_png
from pipeline.resources import worker_runtime_env

if TYPE_CHECKING:
    from stages.evaluate import Config


class GenerateActor:
    """Ray Data callable class: loads the teacher bundle once and each generator on first use (sharing
    the bundle's text encoders and VAE); one chunk row per call -> one output row per image."""

    def __init__(self, specs: list[GeneratorSpec]):
        from pipeline.teacher import load_bundle

        self.specs = {s.name: s for s in specs}
        first = specs[0]
        self.bundle = load_bundle(first.location, first.dtype, first.device, first.local_files_only, first.load_t5,
                                  first.max_sequence_length)
        self.generators: dict[str, Generator] = {}

    def generator(self, name: str) -> Generator:
        if name not in self.generators:
            self.generators[name] = Generator(self.specs[name], self.bundle)
        return self.generators[name]

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        names, index, prompts, images = [], [], [], []
        for i in range(len(batch["chunk"])):
            chunk_prompts = [str(p) for p in batch["prompt"][i]]
            images.append(self.generator(str(batch["generator"][i]))(chunk_prompts, int(batch["seed"][i])))
            names += [str(batch["generator"][i])] * len(chunk_prompts)
            index += [int(j) for j in batch["index"][i]]
            prompts += chunk_prompts
        return {"generator": np.asarray(names, dtype=object), "index": np.asarray(index, dtype=np.int64),
                "prompt": np.asarray(prompts, dtype=object),
                "image_bytes": np.asarray([encode_png(im) for im in np.concatenate(images)], dtype=object)}


def generate(chunks: list[dict], specs: list[GeneratorSpec], cfg: Config, gpus: float, num_actors: int):
    """Every chunk of every generator through one `GenerateActor` pool -> a materialized dataset of
    rows (generator, index, prompt, image_bytes: lossless PNG). Rows go in generator by generator, so
    an actor mostly runs one generator at a time."""
    import ray

    items = [{"generator": spec.name, **chunk} for spec in specs for chunk in chunks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(GenerateActor, batch_size=1, batch_format="numpy", fn_constructor_kwargs={"specs": specs},
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
                        num_cpus=cfg.num_cpus_per_actor, num_gpus=gpus, runtime_env=worker_runtime_env())
    return ds.materialize()


def collect_images(ds, names: list[str], max_index: int | None = None) -> dict:
    """{generator: uint8 images [N, H, W, 3] in prompt order} from generated rows (index < max_index)."""
    import numpy as np

    if max_index is not None:
        ds = ds.filter(lambda row: row["index"] < max_index)
    rows = ds.take_all()
    out = {}
    for name in names:
        mine = sorted((r for r in rows if r["generator"] == name), key=lambda r: int(r["index"]))
        out[name] = np.stack([decode_png(r["image_bytes"]) for r in mine])
    return out
