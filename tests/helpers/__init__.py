"""Shared test helpers (importable as `helpers.*`: pytest puts tests/ on sys.path).

- `context`: `stage_context()`, a StageContext for calling a stage's `run` directly;
  `pretrained_teacher_stages()`, the default graph with a teacher that only records a bundle.
- `shards`: WebDataset shard writers (good, broken and odd shards) and test images.
- `exports`: a teacher stage output and a student export made in code.
- `stock_diffusers`: checks an export loads in stock diffusers.
- `toy_stages`: a toy stage graph for the graph tests.
"""
