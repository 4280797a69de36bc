"""`python pipeline/run.py plan [--config FILE ...] [--gpu h100|h200|a100-80g] [--mfu 0.4] [--json]
[key.sub=value ...]`: what a run will cost before it starts, from the config and the teacher's model
configs alone (no GPU, no weights; the transformer is built on the meta device for its shapes).

Steps: resolve the config (as the pipeline would) -> the teacher's model configs: its own
`transformer/config.json`, `vae/config.json`, text encoders and tokenizers when `teacher.pretrained` is
a local diffusers directory (or a hub id in the local Hugging Face cache), else the public configs
shipped under `assets/model-configs/<owner>--<name>/` -> three sections:
1. per-GPU peak memory of each phase (distill fake update, distill generator step, cache encoder,
   evaluate actor, synthesize actor): weights, LoRA and AdamW state under `distill.zero_stage`,
   DeepSpeed buffers, activations (with or without gradient checkpointing, early exit, MMD feature
   source), each against the GPU's memory with 10% headroom;
2. bytes: cache bytes per row and in total, what distill reads per step, checkpoint size;
3. a FLOP-based time per stage at the GPU's dense bf16 peak times `--mfu`.

Activations are not guessed: saved-tensor bytes per token per block (and the no-grad working set)
were measured once on the CPU on a reduced-depth SD3.5-Medium-width model
(`python -m pipeline.plan --measure`, which rewrites `assets/model-configs/activation-constants.json`);
the plan scales them by width, depth and tokens. Every figure is an estimate: allocator
fragmentation, NCCL buffers and kernel workspaces are covered by one fixed reserve
(`RESERVE_GIB`) and the 10% headroom.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.resources import bucket_elements

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = REPO_ROOT / "assets" / "model-configs"
CONSTANTS_FILE = MODEL_CONFIGS / "activation-constants.json"
EXIT_OK, EXIT_DOES_NOT_FIT, EXIT_CONFIG = 0, 1, 2
GIB = 1024 ** 3

# Dense (no sparsity) bf16 tensor-core peak of one GPU, FLOP/s, and its memory as nvidia-smi reports it.
GPUS: dict[str, dict] = {
    "h100": {"name": "H100 SXM 80GB", "peak_flops": 989e12, "memory_gib": 79.6},
    "h200": {"name": "H200 141GB", "peak_flops": 989e12, "memory_gib": 140.4},
    "a100-80g": {"name": "A100 SXM 80GB", "peak_flops": 312e12, "memory_gib": 80.0},
}
HEADROOM = 0.10            # a phase fits when its peak is at most 90% of the GPU's memory
RESERVE_GIB = 1.5          # CUDA context, cuBLAS / NCCL workspaces, allocator slack
# DeepSpeed's defaults where the distill stage's ds_config leaves them unset (elements).
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
               "stage3_param_persistence_threshold": 1e5}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ROWS_UNKNOWN = (100_000, 200_000)  # cache totals per 100K rows and for the released 200K images


# ----------------------------------------------------------------------------- the teacher's shapes


@dataclass
class TeacherShapes:
    """What the plan needs of a teacher, from its config files only."""
    source: str                      # where the configs came from
    transformer: dict                # transformer/config.json
    vae: dict                        # vae/config.json
    text_encoders: dict              # name -> {"params", "width", "tokens"}
    vae_params: int
    clip_tokens: int
    t5_tokens: int                   # T5 tokens of every prompt embedding (0 without T5)
    t5_loaded: bool
    dtype_bytes: int                 # teacher.dtype

    @property
    def text_tokens(self) -> int:
        return self.clip_tokens + self.t5_tokens

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae["latent_channels"])

    @property
    def width(self) -> int:
        return int(self.transformer["num_attention_heads"] * self.transformer["attention_head_dim"])

    @property
    def depth(self) -> int:
        return int(self.transformer["num_layers"])

    @property
    def dual_layers(self) -> list[int]:
        return list(self.transformer.get("dual_attention_layers") or [])

    @property
    def encoder_bytes(self) -> int:
        """VAE + the text encoders that are loaded, in the teacher's dtype."""
        loaded = [e for n, e in self.text_encoders.items() if n != "text_encoder_3" or self.t5_loaded]
        return (self.vae_params + sum(e["params"] for e in loaded)) * self.dtype_bytes


def hub_slug(spec: str) -> str:
    """`owner/name` -> the directory name under assets/model-configs/ (`owner--name`, as the HF cache)."""
    return spec.strip("/").replace("/", "--")


def teacher_shapes(teacher) -> TeacherShapes:
    """The teacher section -> its shapes: a local diffusers directory (or a hub id already in the local
    Hugging Face cache; never downloaded) is read itself, else the shipped public configs."""
    from pipeline.teacher import TeacherError, resolve_pretrained, text_settings

    dtype_bytes = DTYPE_BYTES[teacher.dtype]
    spec = teacher.pretrained
    if spec is None:  # the embedded default trains the tiny teacher: its shapes are the shipped tiny bundle's
        spec = "assets/tiny-teacher"
    try:
        directory = resolve_pretrained(spec, local_files_only=True)
    except TeacherError as e:
        shipped = MODEL_CONFIGS / hub_slug(spec)
        if not (shipped / "transformer" / "config.json").is_file():
            raise PlanError(f"teacher.pretrained {spec!r}: not a local directory, not in the local Hugging Face "
                            f"cache, and no shipped configs under {shipped} ({e})") from None
        return _shipped_shapes(shipped, teacher, dtype_bytes)
    text = text_settings(directory, teacher.load_t5, teacher.max_sequence_length)
    encoders = {}
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if (directory / name / "config.json").is_file():
            config = json.loads((directory / name / "config.json").read_text())
            width = config.get("hidden_size") or config.get("d_model")
            encoders[name] = {"params": safetensors_params(directory / name), "width": width,
                              "tokens": text["max_sequence_length"] if name == "text_encoder_3" else
                              _tokenizer_length(directory / name.replace("text_encoder", "tokenizer"), 77)}
    clip_tokens = _tokenizer_length(directory / "tokenizer", 77)
    return TeacherShapes(
        source=str(directory), transformer=_config(directory / "transformer"), vae=_config(directory / "vae"),
        text_encoders=encoders, vae_params=safetensors_params(directory / "vae"), clip_tokens=clip_tokens,
        t5_tokens=text["max_sequence_length"], t5_loaded=text["t5"], dtype_bytes=dtype_bytes)


def _shipped_shapes(directory: Path, teacher, dtype_bytes: int) -> TeacherShapes:
    text = json.loads((directory / "text_encoders.json").read_text())
    vae = _config(directory / "vae")
    t5 = teacher.load_t5 is not False and "text_encoder_3" in text["encoders"]
    t5_tokens = teacher.max_sequence_length if teacher.max_sequence_length is not None else text["t5_max_length"]
    return TeacherShapes(
        source=f"{directory.relative_to(REPO_ROOT)} (shipped public configs)", transformer=_config(directory / "transformer"),
        vae=vae, text_encoders=text["encoders"], vae_params=int(text["vae_params"]), clip_tokens=text["clip_tokens"],
        t5_tokens=int(t5_tokens), t5_loaded=t5, dtype_bytes=dtype_bytes)


def _config(directory: Path) -> dict:
    return {k: v for k, v in json.loads((directory / "config.json").read_text()).items() if not k.startswith("_")}


def _tokenizer_length(directory: Path, default: int) -> int:
    file = directory / "tokenizer_config.json"
    limit = json.loads(file.read_text()).get("model_max_length") if file.is_file() else None
    return int(limit) if isinstance(limit, (int, float)) and limit < 1e9 else default


def safetensors_params(directory: Path) -> int:
    """Elements in every safetensors file of a directory, from the headers alone (no weights read)."""
    total = 0
    for file in sorted(Path(directory).glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


# ----------------------------------------------------------------------------- transformer structure (meta device)


@dataclass
class TransformerCounts:
    """Parameter counts of an SD3 transformer by where they act (built on the meta device)."""
    total: int
    image_linear: int      # weights applied to every image token (attention, MLP, patch embed, proj_out)
    text_linear: int       # weights applied to every text token (context stream, context embedder)
    largest_block: int
    lora: dict = field(default_factory=dict)  # (targets, rank) -> (params, image-token params, text-token params)


@functools.lru_cache(maxsize=16)
def _counts(config_json: str) -> TransformerCounts:
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**json.loads(config_json))
    image = text = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or weight is None:
            continue
        stream = _stream(name)
        if stream == "image":
            image += weight.numel()
        elif stream == "text":
            text += weight.numel()
    blocks = max(sum(p.numel() for p in b.parameters()) for b in model.transformer_blocks)
    # persistent buffers (the position-embedding table) are weights too: in the checkpoint and on the GPU
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    counts = TransformerCounts(total, image, text, blocks)
    counts.lora = {"_linears": [(n, m.in_features, m.out_features, _stream(n)) for n, m in model.named_modules()
                                if isinstance(m, torch.nn.Linear)]}
    return counts


def _stream(name: str) -> str:
    """Which tokens a linear layer of SD3Transformer2DModel acts on: image, text, or once per sample."""
    if "norm" in name or name.startswith("time_text_embed"):
        return "sample"    # adaLN modulation and the timestep / pooled embedding
    if "context" in name or ".add_" in name or "to_add_out" in name:
        return "text"
    return "image"


def transformer_counts(config: dict) -> TransformerCounts:
    return _counts(json.dumps(config, sort_keys=True))


def lora_counts(counts: TransformerCounts, targets: list[str], rank: int) -> dict:
    """LoRA A and B on every Linear whose name ends with a target (PEFT's suffix rule): parameters, and
    per image / text token: parameters (for FLOPs) and input features (for the fp32 input copies)."""
    out = {"params": 0, "image": 0, "text": 0, "image_in": 0, "text_in": 0, "layers": 0}
    for name, fan_in, fan_out, stream in counts.lora["_linears"]:
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        p = rank * (fan_in + fan_out)
        out["params"] += p
        out["layers"] += 1
        if stream in ("image", "text"):
            out[stream] += p
            out[f"{stream}_in"] += fan_in + rank
    return out


# ----------------------------------------------------------------------------- measured constants


def constants() -> dict:
    return json.loads(CONSTANTS_FILE.read_text())


def block_saved_bytes(c: dict, mode: str, kind: str, width: int, t_img: float, t_txt: float) -> float:
    """Saved-tensor bytes of one block (bf16 activations, one sample) in a measured mode, scaled by width."""
    m = c["saved_bytes_per_token_per_width"][mode][kind]
    return width * (m["image"] * t_img + m["text"] * t_txt)


# ----------------------------------------------------------------------------- the plan


class PlanError(ValueError):
    pass


@dataclass
class Line:
    what: str
    gib: float


@dataclass
class Phase:
    name: str
    lines: list[Line]
    per: str = "GPU"

    @property
    def peak_gib(self) -> float:
        return sum(x.gib for x in self.lines)


def plan(cfg, gpu: str = "h100", mfu: float = 0.4) -> dict:
    """The whole plan as plain data (what --json prints)."""
    if gpu not in GPUS:
        raise PlanError(f"--gpu: {gpu!r} is not a known GPU; valid: {', '.join(GPUS)}")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu: {mfu} must be in (0, 1]")
    t = teacher_shapes(cfg.teacher)
    m = Model(cfg, t)
    g = GPUS[gpu]
    limit = g["memory_gib"] * (1 - HEADROOM)
    phases = [m.distill_phase("fake"), m.distill_phase("generator"), m.cache_phase(),
              m.evaluate_phase()] + ([m.synthesize_phase()] if m.synthesize_enabled else [])
    for p in phases:
        p.lines.append(Line("reserve (CUDA context, cuBLAS / NCCL workspaces, allocator slack)", RESERVE_GIB))
    memory = {p.name: {"peak_gib": round(p.peak_gib, 2), "fits": p.peak_gib <= limit,
                       "lines": {x.what: round(x.gib, 3) for x in p.lines}} for p in phases}
    return {
        "gpu": {"key": gpu, **g, "limit_gib": round(limit, 2), "headroom": HEADROOM},
        "mfu": mfu,
        "teacher": {"source": t.source, "params": m.counts.total, "width": t.width, "depth": t.depth,
                    "text_tokens": t.text_tokens, "t5_loaded": t.t5_loaded,
                    "largest_image_tokens": m.t_img(max(m.scales))},
        "distill": m.distill_summary(),
        "memory": memory,
        "fits": all(v["fits"] for v in memory.values()),
        "bytes": m.bytes_section(),
        "time": m.time_section(g["peak_flops"] * mfu),
    }


class Model:
    """The config and the teacher's shapes, and every formula of the plan."""

    def __init__(self, cfg, t: TeacherShapes):
        self.cfg, self.t = cfg, t
        self.c = constants()
        self.counts = transformer_counts(t.transformer)
        swd, d = cfg.swd, cfg.distill
        self.scales = list(swd.schedule.scales)
        self.patch = int(t.transformer["patch_size"])
        self.full = swd.loss.mode == "full"
        self.world = d.num_workers
        self.precision = d.precision if d.precision != "auto" else ("bf16" if d.use_gpu else "fp32")
        self.base_bytes = t.dtype_bytes if self.precision in ("bf16", "bf16-mixed") else 4
        self.act_scale = self.base_bytes / 2   # measured in bf16
        self.train_bytes = 2 if self.precision == "bf16" else 4
        student, fake = swd.student, swd.fake
        self.lora_s = lora_counts(self.counts, student.target_modules, student.lora_rank)
        self.lora_f = lora_counts(self.counts, fake.target_modules, fake.lora_rank) if self.full else None
        w = t.width
        dims = [round(w + (1 - w) * j / fake.gan_head_num_layers) for j in range(fake.gan_head_num_layers + 1)]
        self.gan_params = sum(2 * a + a * b + b for a, b in zip(dims, dims[1:])) if self.full else 0
        self.trainable_student = self.counts.total if student.full_finetune else self.lora_s["params"]
        self.trainable_fake = (self.lora_f["params"] + self.gan_params) if self.full else 0
        self.synthesize_enabled = cfg.data.train_shards is not None or cfg.data.prompts is not None

    # ------------------------------------------------------------------ shapes

    def t_img(self, side: int) -> int:
        return (side // self.patch) ** 2

    @property
    def feature_depth(self) -> int:
        """Blocks a feature-only forward runs (the early exit ends it after the feature block)."""
        return self.cfg.swd.feature_block + 1 if self.cfg.swd.stop_at_feature_block else self.t.depth

    def kinds(self, depth: int) -> list[str]:
        dual = set(self.t.dual_layers)
        return ["dual" if j in dual else "single" for j in range(depth)]

    # ------------------------------------------------------------------ memory: weights and optimiser

    def engine_lines(self, name: str, trainable: int, frozen: int) -> list[Line]:
        """One DeepSpeed engine on one GPU: frozen base weights, trained weights, gradients, AdamW state,
        buckets, under ZeRO `distill.zero_stage` over `num_workers` GPUs."""
        z, n, bt = self.cfg.distill.zero_stage, self.world, self.train_bytes
        master = 4 if self.precision == "bf16" else 0    # fp32 master copies where the weights are bf16
        bucket = bucket_elements(trainable)  # what stages/distill's ds_config sets
        lines = []
        if z == 3:
            persistent = self.small_params(name)
            lines.append(Line(f"{name}: frozen base weights (ZeRO-3: 1/{n})", frozen * self.base_bytes / n / GIB))
            lines.append(Line(f"{name}: trained weights (ZeRO-3: 1/{n}, small ones replicated)",
                              ((trainable - persistent) / n + persistent) * bt / GIB))
            lines.append(Line(f"{name}: gathered block + prefetch (ZeRO-3)",
                              (2 * self.counts.largest_block * self.base_bytes
                               + self.ds("stage3_prefetch_bucket_size") * self.base_bytes) / GIB))
            lines.append(Line(f"{name}: gradients (1/{n}) + AdamW m, v (+ master) (1/{n})",
                              trainable * (4 + 8 + master) / n / GIB))
            lines.append(Line(f"{name}: reduce bucket ({bucket:.0e} elements)", bucket * bt / GIB))
            return lines
        lines.append(Line(f"{name}: frozen base weights", frozen * self.base_bytes / GIB))
        lines.append(Line(f"{name}: trained weights", trainable * bt / GIB))
        grads = trainable * bt if z < 2 else trainable * 4 / n
        states = trainable * (8 + master + (4 if z >= 1 else 0)) / (n if z >= 1 else 1)  # ZeRO-1/2: an fp32 partition
        lines.append(Line(f"{name}: gradients" + (f" (ZeRO-2: 1/{n})" if z == 2 else ""), grads / GIB))
        lines.append(Line(f"{name}: AdamW m, v + fp32 partition" + (f" (1/{n})" if z >= 1 else ""), states / GIB))
        if z >= 1:
            lines.append(Line(f"{name}: reduce bucket ({bucket:.0e} elements: the engine's trainable parameters)",
                              bucket * bt / GIB))
        return lines

    def ds(self, key: str) -> float:
        """A DeepSpeed setting: the distill section's own key where it has one, else DeepSpeed's default."""
        value = getattr(self.cfg.distill, key, None)
        return float(value) if value is not None else DS_DEFAULTS[key]

    def small_params(self, name: str) -> int:
        """Trained parameters under ZeRO-3's persistence threshold (kept whole on every rank): LoRA
        matrices of rank x width below 1e5 elements."""
        threshold = self.ds("stage3_param_persistence_threshold")
        lora = self.lora_s if name == "student" else self.lora_f
        if lora is None:
            return 0
        rank = self.cfg.swd.student.lora_rank if name == "student" else self.cfg.swd.fake.lora_rank
        small = 0
        for _, fan_in, fan_out, _ in self.counts.lora["_linears"]:
            for size in (rank * fan_in, rank * fan_out):
                small += size if size < threshold else 0
        return min(small, lora["params"])

    def weight_lines(self) -> list[Line]:
        lines = self.engine_lines("student", self.trainable_student,
                                  0 if self.cfg.swd.student.full_finetune else self.counts.total)
        if self.cfg.swd.student.full_finetune:
            lines.append(Line("frozen teacher copy (full fine-tune)", self.counts.total * self.base_bytes / GIB))
        if self.full:
            lines += self.engine_lines("fake", self.trainable_fake, self.counts.total)
        if self.cfg.distill.zero_stage == 3:  # the student and the fake network gather in turn, not together
            gathered = [x for x in lines if "gathered" in x.what]
            for x in gathered[1:]:
                lines.remove(x)
        return lines

    # ------------------------------------------------------------------ memory: activations

    def graph_bytes(self, mode: str, side: int, depth: int, checkpointed: bool, lora=None) -> float:
        """Saved tensors of one forward kept for the backward (batch 1), over its first `depth` blocks:
        every block's own (no checkpointing), or only each block's inputs (checkpointed)."""
        c, w = self.c, self.t.width
        ti, tt = self.t_img(side), self.t.text_tokens
        base = "frozen_checkpointed" if checkpointed else "frozen"
        total = sum(block_saved_bytes(c, base, k, w, ti, tt) for k in self.kinds(depth))
        if lora is not None and not checkpointed:   # the fp32 copies of every LoRA input (bf16-mixed)
            per_layer = lora_overhead(c, self.precision)
            total += per_layer * (lora["image_in"] * ti + lora["text_in"] * tt) * depth / self.t.depth
        outer = c["outer_bytes_per_token_per_width"]
        total += w * (outer["image"] * ti + outer["text"] * tt)
        return total * self.act_scale

    def recompute_bytes(self, side: int, lora) -> float:
        """Under checkpointing the backward recomputes one block at a time: its full saved set is live."""
        if not self.cfg.distill.gradient_checkpointing:
            return 0.0
        return self.graph_bytes("frozen", side, 1, False, lora)

    def inference_bytes(self, side: int, batch: int) -> float:
        """The no-grad working set of one forward (a block's transient tensors, inputs and output)."""
        w, c = self.t.width, self.c["inference_bytes_per_token_per_width"]
        return batch * w * (c * (self.t_img(side) + self.t.text_tokens)) * self.act_scale

    def distill_phase(self, which: str) -> Phase:
        d, swd = self.cfg.distill, self.cfg.swd
        b, side, gc = d.batch_size_per_worker, max(self.scales), d.gradient_checkpointing
        lines = self.weight_lines()
        depth = self.t.depth
        if which == "fake" and self.full:
            # F's full forward (velocity + features, LoRA trained) and D on the real features, both held for one backward
            held = self.graph_bytes("lora", side, depth, gc, self.lora_f)
            lines.append(Line(f"F forward on x0_hat (fake LoRA trained{', checkpointed' if gc else ''})", b * held / GIB))
            if swd.loss.fake_gan_weight > 0:
                real = self.graph_bytes("lora", side, self.feature_depth, gc, self.lora_f)
                lines.append(Line(f"F features of real z ({self.feature_depth} blocks)", b * real / GIB))
            before = self.inference_bytes(side, b)
            lines.append(Line("backward working set (recomputed block / no-grad student forward)",
                              b * max(self.recompute_bytes(side, self.lora_f), before / b) / GIB))
            return Phase("distill fake update", lines)
        if which == "fake":
            return Phase("distill fake update (none: mmd_only)", lines)
        student = self.graph_bytes("lora", side, depth, gc, None if swd.student.full_finetune else self.lora_s)
        lines.append(Line(f"G forward (student LoRA trained{', checkpointed' if gc else ''})", b * student / GIB))
        held = 0.0
        if self.full and swd.loss.gan_weight > 0:
            held = self.graph_bytes("frozen", side, depth, gc)
            lines.append(Line("F forward on x_k, frozen, grad to x (DMD + GAN)", b * held / GIB))
        if swd.loss.mode == "mmd_only" or swd.loss.mmd_weight > 0:
            teacher = swd.loss.mmd_features == "teacher"
            # the teacher runs with checkpointing switched off (Networks.teacher), the fake network with it
            mmd = self.graph_bytes("frozen", side, self.feature_depth, gc and not teacher)
            lines.append(Line(f"MMD features of the student sample ({swd.loss.mmd_features}, "
                              f"{self.feature_depth} blocks{', checkpointed' if gc and not teacher else ''})", b * mmd / GIB))
        cfg_batch = 2 * b if swd.loss.guidance_scale != 1.0 else b
        lines.append(Line(f"working set (teacher CFG forward of {cfg_batch} / recomputed block)",
                          max(self.inference_bytes(side, cfg_batch), b * self.recompute_bytes(side, self.lora_s)) / GIB))
        return Phase("distill generator step", lines)

    def vae_bytes(self, pixels: int, batch: int, part: str) -> float:
        per_px = self.c["vae"][f"{part}_bytes_per_pixel"] * (self.t.dtype_bytes / 2)
        width = self.t.vae["block_out_channels"][0] / self.c["vae"]["measured_block_out_channels"][0]
        return batch * per_px * width * pixels ** 2

    def cache_phase(self) -> Phase:
        cache, t = self.cfg.cache, self.t
        px = max(self.scales) * t.vae_scale_factor
        b = cache.batch_size
        # the encoder actors load the VAE and the text encoders only (load_bundle components)
        lines = [Line("VAE + text encoders (teacher dtype)", t.encoder_bytes / GIB),
                 Line(f"VAE encode of {b} images at {px} px", self.vae_bytes(px, b, "encode") / GIB),
                 Line(f"pixels: {b} uint8 squares in (host), every scale's pair on the GPU (teacher dtype)",
                      b * 3 * (px ** 2 + sum((s * t.vae_scale_factor) ** 2 for s in self.scales) * 2 * t.dtype_bytes)
                      / GIB)]
        if t.t5_loaded and "text_encoder_3" in t.text_encoders:
            width = t.text_encoders["text_encoder_3"]["width"]
            lines.append(Line(f"T5 forward of {b} prompts", b * t.t5_tokens * width * 2.5 * 4 * t.dtype_bytes / GIB))
        return Phase("cache encoder", lines, per="actor")

    def generation_lines(self, batch: int, side: int, transformers: int, cfg_scale: float) -> list[Line]:
        t = self.t
        px = side * t.vae_scale_factor
        cfg_batch = 2 * batch if cfg_scale != 1.0 else batch
        return [Line("VAE + text encoders", t.encoder_bytes / GIB),
                Line(f"transformer x {transformers}", transformers * self.counts.total * t.dtype_bytes / GIB),
                Line(f"transformer forward of {cfg_batch} (CFG) at {px} px", self.inference_bytes(side, cfg_batch) / GIB),
                Line(f"VAE decode of {batch} images at {px} px", self.vae_bytes(px, batch, "decode") / GIB)]

    def evaluate_phase(self) -> Phase:
        e = self.cfg.evaluate
        copies = 2 + (1 if e.baseline else 0)  # the teacher's; each student gets its own copy
        return Phase("evaluate actor", self.generation_lines(e.batch_size, max(self.scales), copies,
                                                             e.teacher_sampler.guidance_scale), per="actor")

    def synthesize_side(self) -> int:
        s = self.cfg.synthesize
        native = int(self.t.transformer["sample_size"])
        return native if s.image_side_px is None else s.image_side_px // self.t.vae_scale_factor

    def synthesize_phase(self) -> Phase:
        s = self.cfg.synthesize
        return Phase("synthesize actor", self.generation_lines(s.batch_size, self.synthesize_side(), 1,
                                                               s.teacher_sampler.guidance_scale), per="actor")

    def distill_summary(self) -> dict:
        d = self.cfg.distill
        return {"zero_stage": d.zero_stage, "num_workers": d.num_workers, "batch_size_per_worker": d.batch_size_per_worker,
                "precision": self.precision, "gradient_checkpointing": d.gradient_checkpointing,
                "stop_at_feature_block": self.cfg.swd.stop_at_feature_block, "feature_block": self.cfg.swd.feature_block,
                "mmd_features": self.cfg.swd.loss.mmd_features, "mode": self.cfg.swd.loss.mode,
                "trainable_student": self.trainable_student, "trainable_fake": self.trainable_fake,
                "gan_head_params": self.gan_params}

    # ------------------------------------------------------------------ bytes

    def row_tensors(self) -> dict[str, int]:
        """Bytes of every tensor part of one cache row, as the cache stores it (pipeline.latent_cache:
        implied z_im1 columns not stored, CLIP text at its own width, no T5 zeros)."""
        from pipeline.latent_cache import row_bytes

        t = self.t
        clip_width = sum(int(e["width"] or 0) for name, e in t.text_encoders.items() if name != "text_encoder_3")
        joint = int(t.transformer["joint_attention_dim"])
        storage = self.cfg.cache.storage_dtype or self.cfg.teacher.dtype
        parts = row_bytes(self.scales, t.latent_channels, t.clip_tokens, clip_width or joint, t.t5_tokens, joint,
                          int(t.transformer["pooled_projection_dim"]), storage, t5=t.t5_loaded)
        parts.pop("total")
        return parts

    def latent_bytes_of_scale(self, i: int) -> int:
        """z_i and z_im1_i of scale index i as stored (z_im1_i is implied when the previous side is the same)."""
        from pipeline.latent_cache import DTYPE_BYTES as CACHE_DTYPE_BYTES, implied_columns

        storage = self.cfg.cache.storage_dtype or self.cfg.teacher.dtype
        c, s = self.t.latent_channels, self.scales
        z_im1 = 0 if f"z_im1_{i}" in implied_columns(s) else c * s[max(i - 1, 0)] ** 2
        return (c * s[i] ** 2 + z_im1) * CACHE_DTYPE_BYTES[storage]

    def rows(self) -> int | None:
        data = self.cfg.data
        return data.generator.num_train_samples if data.train_shards is None else None

    def bytes_section(self) -> dict:
        storage = self.cfg.cache.storage_dtype or self.cfg.teacher.dtype
        tensors = self.row_tensors()
        row = sum(tensors.values())
        text = tensors["prompt_embeds"] + tensors["pooled_prompt_embeds"]
        rows = self.rows()
        totals = {str(rows): rows * row} if rows else {str(n): n * row for n in ROWS_UNKNOWN}
        d = self.cfg.distill
        # a step reads the text and the latents of the one scale it trains (one dataset per scale)
        per_scale = [self.latent_bytes_of_scale(i) + text for i in range(len(self.scales))]
        read = used = sum(per_scale) / len(per_scale)
        rows_per_step = (1 + (d.fake_updates_per_step if self.full else 0)) * d.batch_size_per_worker * d.num_workers
        trained = self.trainable_student + self.trainable_fake
        state = trained * (4 + 12)  # fp32 weights + AdamW m, v and the fp32 master partition, summed over ranks
        return {
            "storage_dtype": storage,
            "row_bytes": row, "row_text_bytes": text, "row_latent_bytes": row - text,
            "row_tensors": tensors,
            "rows": rows, "total_bytes": totals,
            "distill_rows_per_step": rows_per_step,
            "distill_read_bytes_per_step": rows_per_step * read,
            "distill_used_bytes_per_step": rows_per_step * used,
            "checkpoint_bytes": state,
            "checkpoints_kept_bytes": state * d.num_checkpoints_to_keep,
            "student_export_bytes": self.trainable_student * 4,
        }

    # ------------------------------------------------------------------ time

    def forward_flops(self, side: int, depth: int | None = None, lora=None) -> tuple[float, float]:
        """(linear FLOPs, attention FLOPs) of one forward of one sample at latent `side` over `depth` blocks:
        2 x params per token x tokens per stream, 4 x tokens^2 x width per block of joint attention over
        image + text tokens (+ image-only attention in dual-attention blocks)."""
        depth = self.t.depth if depth is None else depth
        ti, tt, w = self.t_img(side), self.t.text_tokens, self.t.width
        frac = depth / self.t.depth
        lin = 2 * (self.counts.image_linear * ti + self.counts.text_linear * tt) * frac
        if lora is not None:
            lin += 2 * (lora["image"] * ti + lora["text"] * tt) * frac
        dual = sum(1 for j in self.t.dual_layers if j < depth)
        attn = 4 * (ti + tt) ** 2 * w * depth + 4 * ti ** 2 * w * dual
        return lin, attn

    def fwd(self, side, depth=None, lora=None) -> float:
        return sum(self.forward_flops(side, depth, lora))

    def bwd(self, side, depth=None, lora=None) -> float:
        """Backward to the inputs (frozen base: no weight gradients, LoRA's are small): the linear
        FLOPs once, attention twice."""
        lin, attn = self.forward_flops(side, depth, lora)
        return lin + 2 * attn

    def distill_step_flops(self, side: int) -> float:
        """FLOPs of one generator step (with its fake updates) of one worker at latent `side`."""
        d, swd = self.cfg.distill, self.cfg.swd
        gc, fd, b = d.gradient_checkpointing, self.feature_depth, d.batch_size_per_worker
        ls, lf = self.lora_s, self.lora_f
        total = 0.0
        if self.full:
            per = self.fwd(side, None, ls) + self.fwd(side, None, lf) + self.bwd(side, None, lf)
            if swd.loss.fake_gan_weight > 0:
                per += self.fwd(side, fd, lf) + self.bwd(side, fd, lf) + (self.fwd(side, fd, lf) if gc else 0)
            per += self.fwd(side, None, lf) if gc else 0
            total += d.fake_updates_per_step * per
        gen = self.fwd(side, None, ls) + self.bwd(side, None, ls) + (self.fwd(side, None, ls) if gc else 0)
        if self.full:
            gen += (2 if swd.loss.guidance_scale != 1.0 else 1) * self.fwd(side)             # teacher, CFG
            gen += self.fwd(side, None, lf) + self.bwd(side, None, lf) + (self.fwd(side, None, lf) if gc else 0)
        if swd.loss.mode == "mmd_only" or swd.loss.mmd_weight > 0:
            feat = None if swd.loss.mmd_features == "teacher" else lf
            gen += 2 * self.fwd(side, fd, feat) + self.bwd(side, fd, feat)
            gen += self.fwd(side, fd, feat) if gc and feat is not None else 0
        return b * (total + gen)

    def vae_flops(self, pixels: int, part: str) -> float:
        ch = self.t.vae["block_out_channels"][0] / self.c["vae"]["measured_block_out_channels"][0]
        return self.c["vae"][f"{part}_flops_per_pixel"] * ch ** 2 * pixels ** 2

    def text_flops(self) -> float:
        t = self.t
        return sum(2 * e["params"] * e["tokens"] for n, e in t.text_encoders.items() if n != "text_encoder_3" or t.t5_loaded)

    def time_section(self, flops_per_s: float) -> dict:
        cfg, t = self.cfg, self.t
        vsf = t.vae_scale_factor
        out: dict[str, Any] = {}
        d = cfg.distill
        rows = self.rows()
        n_rows = rows or ROWS_UNKNOWN[0]
        # cache: every scale's image encoded (z_im1 too, except where it repeats z_i), the prompt once
        encodes = [s for s in self.scales] + [self.scales[i - 1] for i in range(1, len(self.scales)) if self.scales[i - 1] != self.scales[i]]
        per_row = sum(self.vae_flops(s * vsf, "encode") for s in encodes) + self.text_flops()
        out["cache"] = _stage_time(per_row * n_rows, cfg.cache.num_encoders, flops_per_s,
                                   f"{n_rows} rows" + ("" if rows else " (per 100K rows: shard sample count unknown)"))
        if self.synthesize_enabled:
            s = cfg.synthesize
            side = self.synthesize_side()
            steps = s.teacher_sampler.num_steps * (2 if s.teacher_sampler.guidance_scale != 1.0 else 1)
            per_image = steps * self.fwd(side) + self.vae_flops(side * vsf, "decode") + self.text_flops()
            # null: one actor per GPU of the cluster; the plan takes the distill workers' GPUs as the cluster's
            actors = s.num_actors or cfg.ray.num_gpus or d.num_workers
            out["synthesize"] = _stage_time(per_image * ROWS_UNKNOWN[1], actors, flops_per_s,
                                            f"per {ROWS_UNKNOWN[1] // 1000}K images at {side * vsf} px "
                                            f"({s.teacher_sampler.num_steps} steps, CFG)"
                                            + ("" if s.num_actors else ", one actor per GPU"))
        d = cfg.distill
        per_step = sum(self.distill_step_flops(side) for side in self.scales) / len(self.scales)
        step_s = per_step / flops_per_s
        out["distill"] = {"flops_per_step_per_gpu": per_step, "s_per_step": step_s, "steps": d.num_steps,
                          "hours": d.num_steps * step_s / 3600, "gpus": d.num_workers,
                          "what": f"{d.num_steps} generator steps, {d.num_workers} GPU(s) in parallel"}
        e = cfg.evaluate
        prompts = e.max_prompts or 1000
        side = max(self.scales)
        student = sum(self.fwd(s) for s in self.scales)
        teacher = e.teacher_sampler.num_steps * (2 if e.teacher_sampler.guidance_scale != 1.0 else 1) * self.fwd(side)
        baseline = len(self.scales) * self.fwd(side) if e.baseline else 0.0
        decode = (2 + (1 if e.baseline else 0)) * self.vae_flops(side * vsf, "decode")
        per_prompt = student + teacher + baseline + decode + self.text_flops()
        generators = 3 if e.baseline else 2
        per_prompt += scoring_flops_per_image(e) * (generators + (0 if e.prompts else 1))  # + the reference images
        where = f"prompt set {Path(e.prompts).name}" if e.prompts else "eval shards"
        # null: one actor per GPU of the cluster; the plan takes the distill workers' GPUs as the cluster's
        out["evaluate"] = _stage_time(per_prompt * prompts, e.num_actors or cfg.ray.num_gpus or d.num_workers, flops_per_s,
                                      f"{prompts} prompts ({where}) x (student, teacher{', baseline' if e.baseline else ''})"
                                      f", generation + scoring")
        out["total_hours"] = sum(v["hours"] for v in out.values() if isinstance(v, dict))
        out["student_full_resolution_forwards"] = student / self.fwd(side)
        return out


# Scoring FLOPs per image (forward, 2 x multiply-adds): pytorch-fid's Inception-v3 at 299 px (5.7 GMACs),
# EfficientNet-Lite0 at 224 (0.4 GMACs), and a CLIP ViT-H/14 (image tower 632M parameters x 257 tokens,
# text tower 354M x 77 tokens: 2 x params x tokens), once for CLIP and once for PickScore (same architecture).
INCEPTION_FLOPS = 2 * 5.7e9
EFFICIENTNET_FLOPS = 2 * 0.4e9
CLIP_H14_FLOPS = 2 * (632e6 * 257 + 354e6 * 77)


def scoring_flops_per_image(e) -> float:
    """The configured scorers' FLOPs for one image (`evaluate.*`; the CLIP models counted as ViT-H/14)."""
    return ((0 if e.prompts else EFFICIENTNET_FLOPS) + (INCEPTION_FLOPS if e.inception_weights else 0)
            + CLIP_H14_FLOPS * ((1 if e.clip_model else 0) + (1 if e.pickscore_model else 0)))


def lora_overhead(c: dict, precision: str) -> float:
    """Saved bytes per LoRA input feature per token: the fp32 copy of the input (bf16-mixed), measured."""
    key = "bf16-mixed" if precision == "bf16-mixed" else "other"
    return c["lora_saved_bytes_per_input_feature"][key]


def _stage_time(flops: float, workers: int, flops_per_s: float, what: str) -> dict:
    seconds = flops / max(workers, 1) / flops_per_s
    return {"flops": flops, "gpus": workers, "hours": seconds / 3600, "what": what}


# ----------------------------------------------------------------------------- output


def render(p: dict) -> str:
    from pipeline.compare import format_table

    g = p["gpu"]
    out = [f"# plan: {g['name']} ({g['memory_gib']} GiB; fits = peak <= {g['limit_gib']} GiB, {g['headroom']:.0%} "
           f"headroom), MFU {p['mfu']}",
           f"teacher: {p['teacher']['source']}: {p['teacher']['params'] / 1e9:.2f}B parameters, width "
           f"{p['teacher']['width']}, {p['teacher']['depth']} blocks; tokens at the largest scale: "
           f"{p['teacher']['largest_image_tokens']} image + {p['teacher']['text_tokens']} text",
           "distill: " + ", ".join(f"{k} {v}" for k, v in p["distill"].items()), "", "## memory per GPU (GiB)"]
    rows = [[name, f"{v['peak_gib']:.1f}", "yes" if v["fits"] else "NO"] for name, v in p["memory"].items()]
    out.append(format_table(["phase", "peak GiB", "fits"], rows))
    for name, v in p["memory"].items():
        out.append(f"\n{name}:")
        out += [f"  {gib:8.2f}  {what}" for what, gib in v["lines"].items()]
    b = p["bytes"]
    out += ["", "## bytes", format_table(["what", "size"], [
        [f"cache row ({b['storage_dtype']})", f"{_mb(b['row_bytes'])} (text {_mb(b['row_text_bytes'])}, latents "
                                                f"{_mb(b['row_latent_bytes'])})"],
        *[[f"cache total, {int(n):,} rows", _gb(v)] for n, v in b["total_bytes"].items()],
        [f"distill reads per step ({b['distill_rows_per_step']} rows)", f"{_mb(b['distill_read_bytes_per_step'])} "
         f"(the step's scale uses {_mb(b['distill_used_bytes_per_step'])})"],
        ["checkpoint (LoRA + GAN head + AdamW, all ranks)", _mb(b["checkpoint_bytes"])],
        ["checkpoints kept", _mb(b["checkpoints_kept_bytes"])],
        ["student export (LoRA, fp32)", _mb(b["student_export_bytes"])]])]
    t = p["time"]
    rows = [[stage, f"{v['hours']:.2f}", str(v["gpus"]), v["what"]] for stage, v in t.items() if isinstance(v, dict)]
    out += ["", f"## time ({g['name']} at MFU {p['mfu']})", format_table(["stage", "hours", "GPUs", "for"], rows),
            f"distill: {t['distill']['s_per_step']:.2f} s per generator step; student sampling = "
            f"{t['student_full_resolution_forwards']:.2f} full-resolution forwards"]
    out.append("" if p["fits"] else "\nNOT every phase fits: see the rows marked NO")
    return "\n".join(out)


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n < 1e12 else f"{n / 1e12:.2f} TB"


def main(argv: list[str], load_config: Callable) -> int:
    """`load_config(config_files, overrides)`: the tree's loader (`stages.load_config`, from run.py)."""
    from pipeline import config as config_mod

    args = _parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = plan(cfg, args.gpu, args.mfu)
    except (config_mod.ConfigError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(result, indent=1) if args.json else render(result))
    return EXIT_OK if result["fits"] else EXIT_DOES_NOT_FIT


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], help="config file layered on pipeline.yaml (repeatable)")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="the GPU each worker / actor gets")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed for times")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- measuring the constants (once, on CPU)


def measure() -> dict:
    """Saved-tensor bytes per token per block of a reduced-depth SD3.5-Medium-width transformer on the CPU
    in bf16 (torch.autograd.graph.saved_tensors_hooks, storages counted once, weights excluded), in
    three modes: frozen (input needs grad: F or T in the generator step), lora (student / fake LoRA
    trained, fp32 over bf16 as bf16-mixed), frozen_checkpointed; fitted per block kind (dual / single
    attention) to a * image tokens + b * text tokens at three token counts. Plus the no-grad working set
    per token, and the SD3.5 VAE's peak bytes and FLOPs per pixel (meta device)."""
    import time

    import torch

    from pipeline.bench_models import SD35_MEDIUM, build_transformer
    from pipeline.swd.config import RELEASED_TARGET_MODULES
    from pipeline.swd.networks import add_lora

    started = time.time()
    torch.manual_seed(0)
    config = {**SD35_MEDIUM, "num_layers": 3, "dual_attention_layers": [0], "pos_embed_max_size": 32}
    width = config["num_attention_heads"] * config["attention_head_dim"]
    shapes = [(16, 8), (32, 8), (16, 40)]   # (latent side, text tokens)
    check = (24, 24)
    results: dict[str, dict] = {}
    for mode in ("frozen", "frozen_checkpointed", "lora"):
        model = build_transformer(config, dtype=torch.bfloat16)
        if mode == "lora":
            add_lora(model, 64, 64.0, RELEASED_TARGET_MODULES, "m", init="gaussian")
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if mode.endswith("checkpointed"):
            model.enable_gradient_checkpointing()
            model.train()
        results[mode] = {s: _saved_per_block(model, *s, input_grad=mode != "lora") for s in shapes + [check]}
        if mode == "frozen":
            inference = _inference_per_token(model, width)
        del model
    fitted = {mode: _fit(per, shapes) for mode, per in results.items()}
    # Under checkpointing each block's inputs are saved by the checkpoint call just outside the block (so
    # counted as "outer" here): the per-block share is the outer excess over the frozen mode's outer.
    gc, blocks = fitted["frozen_checkpointed"], config["num_layers"]
    share = {k: (gc["outer"][k] - fitted["frozen"]["outer"][k]) / blocks for k in ("image", "text", "const")}
    for kind in ("dual", "single", "last"):
        gc[kind] = {k: gc[kind][k] + share[k] for k in share}
    gc["outer"] = dict(fitted["frozen"]["outer"])
    for s in shapes + [check]:
        results["frozen_checkpointed"][s] = {**results["frozen_checkpointed"][s],
                                             "dual": sum(results["frozen_checkpointed"][s].values())
                                             - results["frozen"][s]["outer"], "single": 0, "last": 0}
    per_block = {m: {k: {"image": v[k]["image"] / width, "text": v[k]["text"] / width} for k in ("dual", "single")}
                 for m, v in fitted.items()}
    outer = {"image": fitted["lora"]["outer"]["image"] / width, "text": fitted["lora"]["outer"]["text"] / width}
    # the LoRA part: (lora - frozen) per token over the LoRA inputs' features per token (released targets, rank 64)
    counts = lora_counts(transformer_counts(config), RELEASED_TARGET_MODULES, 64)
    extra = sum((fitted["lora"][k]["image"] - fitted["frozen"][k]["image"]) for k in ("dual", "single", "last"))
    lora_per_feature = extra / counts["image_in"]
    # check point: the fit against a fourth shape
    side, txt = check
    ti = (side // 2) ** 2
    predicted = {m: sum(fitted[m][k]["image"] * ti + fitted[m][k]["text"] * txt + fitted[m][k]["const"]
                        for k in ("dual", "single", "last")) for m in fitted}
    measured = {m: sum(results[m][check][k] for k in ("dual", "single", "last")) for m in fitted}
    return {
        "_what": "Activation constants of pipeline/plan.py, measured once on the CPU (bf16); regenerate with the command.",
        "command": "python -m pipeline.plan --measure > assets/model-configs/activation-constants.json",
        "measured_on": {"model": "pipeline.bench_models.SD35_MEDIUM with num_layers=3, dual_attention_layers=[0] "
                                 "(block 0 dual, 1 single, 2 last), bf16, batch 1",
                        "shapes": [{"latent_side": s, "image_tokens": (s // 2) ** 2, "text_tokens": t} for s, t in shapes],
                        "width": width, "torch": torch.__version__, "seconds": round(time.time() - started, 1)},
        "saved_bytes_per_token_per_width": per_block,
        "outer_bytes_per_token_per_width": outer,
        "lora_saved_bytes_per_input_feature": {"bf16-mixed": lora_per_feature, "other": 0.0},
        "inference_bytes_per_token_per_width": inference,
        "fit_check": {"shape": {"latent_side": side, "text_tokens": txt},
                      "predicted_over_measured": {m: round(predicted[m] / measured[m], 4) for m in fitted}},
        "raw_block_fits_bytes_per_token": fitted,
        "vae": _vae_constants(),
    }


def _saved_per_block(model, side: int, text_tokens: int, input_grad: bool) -> dict:
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()} | \
              {b.untyped_storage().data_ptr() for b in model.buffers()}
    names = {0: "dual", 1: "single", 2: "last"}
    where, seen = ["outer"], {}
    hooks = []
    for j, block in enumerate(model.transformer_blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, j=j: where.__setitem__(0, names[j])))
        hooks.append(block.register_forward_hook(lambda m, a, o: where.__setitem__(0, "outer")))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and ptr not in seen:
            seen[ptr] = (where[0], t.untyped_storage().nbytes(), t)
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, side, side, generator=g).to(torch.bfloat16).requires_grad_(input_grad)
    enc = torch.randn(1, text_tokens, 4096, generator=g).to(torch.bfloat16)
    pooled = torch.randn(1, 2048, generator=g).to(torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                    timestep=torch.tensor([500.0]), return_dict=False)[0]
    totals = {"outer": 0, "dual": 0, "single": 0, "last": 0}
    for kind, nbytes, _ in seen.values():
        totals[kind] += nbytes
    for h in hooks:
        h.remove()
    del out, seen
    return totals


def _fit(per: dict, shapes: list) -> dict:
    """bytes = a * image tokens + b * text tokens + c per block kind, from three shapes (exact solve)."""
    import numpy as np

    a = np.array([[(s // 2) ** 2, t, 1.0] for s, t in shapes])
    out = {}
    for kind in ("dual", "single", "last", "outer"):
        coef = np.linalg.solve(a, np.array([per[s][kind] for s in shapes], dtype=float))
        out[kind] = {"image": float(coef[0]), "text": float(coef[1]), "const": float(coef[2])}
    return out


class _LiveBytes:
    """A dispatch mode that tracks the bytes of live tensors made inside it (outputs that alias an input
    allocate nothing) and their peak: the working set of a no-grad forward."""

    def __new__(cls):
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.live = self.peak = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not any(r.alias_info is not None for r in func._schema.returns):
                    for t in tree_flatten(out)[0]:
                        if isinstance(t, torch.Tensor):
                            n = t.untyped_storage().nbytes()
                            self.live += n
                            self.peak = max(self.peak, self.live)
                            weakref.finalize(t, self._free, n)
                return out

            def _free(self, n):
                self.live -= n

        return Mode()


def _inference_per_token(model, width: int) -> float:
    """Peak live bytes of a no-grad forward on the CPU (bf16; SDPA's flash kernel, as on the GPU: no
    tokens^2 matrix) per token per width: the slope between two token counts."""
    import torch

    peaks = []
    for side, text in ((16, 8), (32, 40)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, side, side, generator=g).to(torch.bfloat16)
        enc = torch.randn(1, text, 4096, generator=g).to(torch.bfloat16)
        pooled = torch.randn(1, 2048, generator=g).to(torch.bfloat16)
        mode = _LiveBytes()
        with torch.no_grad(), mode:
            model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                  timestep=torch.tensor([500.0]), return_dict=False)
        peaks.append((mode.peak, (side // 2) ** 2 + text))
    (p0, t0), (p1, t1) = peaks
    return (p1 - p0) / (t1 - t0) / width


def _vae_constants() -> dict:
    """SD3.5's VAE (public config, assets/model-configs) on the meta device in bf16: peak live bytes and
    FLOPs per output / input pixel of one image's encode and decode, at 512 px (where the convolutions,
    not the mid-block attention, set the peak; on the GPU the attention is memory-efficient SDPA)."""
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    config = _config(MODEL_CONFIGS / "stabilityai--stable-diffusion-3.5-medium" / "vae")
    with torch.device("meta"):
        vae = AutoencoderKL(**config).to(torch.bfloat16)
    px = 512
    x = torch.empty(1, 3, px, px, device="meta", dtype=torch.bfloat16)
    z = torch.empty(1, config["latent_channels"], px // 8, px // 8, device="meta", dtype=torch.bfloat16)
    out = {"measured_block_out_channels": config["block_out_channels"], "measured_at_px": px}
    for part, fn in (("encode", lambda: vae.encode(x).latent_dist.mode()), ("decode", lambda: vae.decode(z).sample)):
        mode = _LiveBytes()
        with torch.no_grad(), mode:
            fn()
        flops = FlopCounterMode(display=False)
        with torch.no_grad(), flops:
            fn()
        out[f"{part}_bytes_per_pixel"] = mode.peak / px ** 2
        out[f"{part}_flops_per_pixel"] = flops.get_total_flops() / px ** 2
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--measure"]:
        print(json.dumps(measure(), indent=1))
        sys.exit(0)
    sys.exit("usage: python -m pipeline.plan --measure  (the plan itself: python pipeline/run.py plan ...)")
