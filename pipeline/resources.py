"""What a stage asks of the cluster: GPUs per actor, the device and dtype that follow, and the
environment every Ray worker of ours runs with."""

from __future__ import annotations

# Idle OpenMP threads sleep instead of spinning (on shared CPU cores spinning made torch steps ~5x
# slower); tokenizers must not fork-parallelise inside Ray workers.
WORKER_ENV_VARS = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


class ResourceError(ValueError):
    """A dtype the chosen device cannot run, or a device this process cannot see."""


def worker_runtime_env() -> dict:
    """Ray `runtime_env` of every actor, task and Train worker the stages start."""
    return {"env_vars": dict(WORKER_ENV_VARS)}


def gpus_per_actor(configured: float | None, wanted: bool = True) -> float:
    """`configured` when given, else 1 GPU when the Ray cluster has any (and `wanted`), else 0."""
    if configured is not None:
        return configured
    import ray

    return 1.0 if wanted and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def actor_count(configured: int | None, gpus: float) -> int:
    """`configured` when given; else one actor per `gpus` of the Ray cluster's GPUs (a pool that
    fills the cluster), and 1 on a CPU-only cluster or for CPU actors."""
    if configured is not None:
        return configured
    if gpus <= 0:
        return 1
    import ray

    return max(1, int(ray.cluster_resources().get("GPU", 0) // gpus))


def actor_device(gpus: float) -> str:
    return "cuda" if gpus > 0 else "cpu"


def check_actor_dtype(dtype: str, gpus: float, what: str, gpus_key: str) -> None:
    """float16 needs a GPU: ResourceError naming `what` runs where and the key that gives it GPUs."""
    if dtype == "float16" and gpus == 0:
        raise ResourceError(f"teacher.dtype 'float16': the {what} run on the CPU here (no GPU in the Ray cluster, "
                            f"or {gpus_key}=0), where float16 is not supported; use float32 or bfloat16, or give "
                            f"the {what} GPUs")


# DeepSpeed's default ZeRO bucket (5e8 elements) is a 1 GB bf16 buffer per engine (ZeRO-2 allocates
# it in full), for engines that train at most ~211M parameters; a bucket of the engine's own trainable
# size moves its gradients in one collective with no larger buffer.
DEFAULT_BUCKET_ELEMENTS = 500_000_000
MIN_BUCKET_ELEMENTS = 1 << 20  # tiny engines: no point in many micro-collectives
BUCKET_ALIGNMENT = 16  # ZeRO-1/2 refuse an all-gather bucket that is not a multiple of NCCL's alignment (2)


def bucket_elements(trainable_params: int) -> int:
    """A DeepSpeed engine's ZeRO reduce / all-gather bucket: its trainable parameter count (an odd one
    with a GAN head's bias: rounded up to the alignment), within DeepSpeed's default and a 1M floor."""
    aligned = -(-int(trainable_params) // BUCKET_ALIGNMENT) * BUCKET_ALIGNMENT
    return int(min(DEFAULT_BUCKET_ELEMENTS, max(MIN_BUCKET_ELEMENTS, aligned)))
