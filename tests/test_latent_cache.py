"""The latent cache's format 2 (pipeline/latent_cache.py) reads back exactly what format 1 stored:
no z_im1_i where it equals z_i, prompt_embeds packed (CLIP block at its own width, T5 block only with
T5), for the tiny bundle (no T5, CLIP = joint width) and the SD3.5-structured miniature (T5, two
CLIPs of different widths, zero-padded); the prompt "" once; bytes per row from the layout."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers.shards import good_shard, image_bytes, prompt
from pipeline import latent_cache, miniature, tiny
from pipeline.swd.inputs import scale_images
from stages.cache import encoder, rounds, shard_keys

SCALES = [8, 10, 12, 16]


@pytest.fixture(scope="module")
def mini_bundle(tmp_path_factory):
    return miniature.build_bundle(tmp_path_factory.mktemp("mini") / "sd35-miniature")


def _spec(bundle, factor: int, dtype: str = "float32", storage: str | None = None, scales=SCALES):
    return shard_keys.EncoderSpec(location=str(bundle), dtype=dtype, device="cpu", load_t5="auto",
                                  local_files_only=True, posterior="mode", seed=0, storage_dtype=storage or dtype,
                                  scales=list(scales), vae_scale_factor=factor)


def _decoded(tmp_path, side: int, n: int = 3):
    """Decoded rows as the decode tasks hand them to the encoders (two image sizes: a ragged column)."""
    from helpers.shards import write_tar

    members = []
    for i in range(n):
        members += [(f"m{i:04d}.png", image_bytes(side + 8 * (i % 2), side + 8 * (i % 2) + 4, 900 + i)),
                    (f"m{i:04d}.txt", prompt(900 + i).encode())]
    path = write_tar(tmp_path / f"m{side}.tar", members)
    rows = [r for chunk, _ in rounds.read_shard(str(path), "k") for r in chunk]
    return rows, pa.Table.from_pylist(rows, schema=rounds.sample_schema())


def format1_tensors(bundle, rows, spec) -> dict:
    """What the format-1 code stored for these rows, written out: I_i and I_im1 of every scale from the
    [-1, 1] crop, z_i and z_im1_i (z_im1_i := z_i where s[i-1] == s[i]), encode_prompt's embeddings."""
    dtype = getattr(torch, spec.dtype)
    images = [encoder.image_tensor(r["image"]) for r in rows]
    out = {}
    with torch.inference_mode():
        for i in range(len(spec.scales)):
            pairs = [scale_images(x, spec.scales, i, spec.vae_scale_factor) for x in images]
            # format 1 moved each image as a contiguous array in the encoder dtype (to_numpy) and stacked them
            stack = lambda k: torch.stack([p[k][0].to(dtype).contiguous() for p in pairs])  # noqa: E731
            out[f"z_{i}"] = bundle.encode_images(stack(0))
            same = spec.scales[max(i - 1, 0)] == spec.scales[i]
            out[f"z_im1_{i}"] = out[f"z_{i}"] if same else bundle.encode_images(stack(1))
        out["prompt_embeds"], out["pooled_prompt_embeds"] = bundle.encode_prompt([r["prompt"] for r in rows])
    return out


@pytest.mark.parametrize("which,storage", [("tiny", "float32"), ("miniature", "float32"), ("miniature", "bfloat16")])
def test_format2_reads_back_what_format1_stored_bit_for_bit(which, storage, tiny_bundle, mini_bundle, tmp_path):
    bundle_dir, factor = (tiny_bundle, 4) if which == "tiny" else (mini_bundle, miniature.VAE_SCALE_FACTOR)
    spec = _spec(bundle_dir, factor, storage=storage)
    rows, table = _decoded(tmp_path, max(spec.pixel_sides))
    decoded = encoder.decode_images(table, spec)
    assert decoded["image"].dtype == object and decoded["image"][0].dtype == np.uint8  # two sizes: ragged
    actor = encoder.TeacherEncoder(spec)
    new_table = actor(decoded)

    old = {k: v.to(getattr(torch, storage)) for k, v in format1_tensors(actor.bundle, rows, spec).items()}
    keys = [r["key"] for r in rows]
    old_table = latent_cache.rows_table(keys, [r["prompt"] for r in rows], ["k"] * len(keys), old,
                                        latent_cache.tensor_names(len(SCALES)))  # format 1: every column, dense
    assert "z_im1_0" in old_table.column_names and "z_im1_0" not in new_table.column_names
    assert [c for c in new_table.column_names if not c.endswith(("_shape", "_dtype"))] == \
        ["key", "prompt", "shard_key", *latent_cache.stored_columns(SCALES)]

    new, before = latent_cache.decode_batch(new_table), latent_cache.decode_batch(old_table)
    assert sorted(new) == sorted(before)
    for name in latent_cache.tensor_names(len(SCALES)):
        assert new[name].dtype == before[name].dtype and torch.equal(new[name], before[name]), name
    assert new["z_im1_0"] is new["z_0"] and all(a is b for a, b in zip(new["z"], [new[f"z_{i}"] for i in range(4)]))

    layout = latent_cache.text_layout(actor.bundle, new["prompt_embeds"].shape)
    element = 2 if storage == "bfloat16" else 4
    row = new_table.slice(0, 1).to_pylist()[0]
    if which == "tiny":  # no T5 (max_sequence_length 0), the two CLIP widths fill the joint width
        assert layout == latent_cache.TextLayout(clip_tokens=16, clip_width=128, t5_tokens=0, width=128, t5=False)
    else:  # CLIP 32 + 48 wide zero-padded to T5's 128, then 32 T5 tokens
        assert layout == latent_cache.TextLayout(clip_tokens=16, clip_width=80, t5_tokens=32, width=128, t5=True)
        assert len(row["prompt_embeds"]) == (16 * 80 + 32 * 128) * element < len(old_table["prompt_embeds"][0].as_py())
    assert row["prompt_embeds_shape"] == layout.shape
    # a single row decodes the same
    one = latent_cache.decode_row(row)
    assert torch.equal(one["prompt_embeds"], before["prompt_embeds"][0]) and one["z_im1_0"] is one["z_0"]


def test_the_unconditional_embedding_equals_encode_prompt_of_the_empty_prompt(tiny_bundle, mini_bundle):
    from pipeline.teacher import load_bundle

    for bundle_dir, factor in ((tiny_bundle, 4), (mini_bundle, 8)):
        out = encoder.encode_uncond(_spec(bundle_dir, factor))
        with torch.no_grad():
            direct = load_bundle(bundle_dir).encode_prompt([""])  # the whole teacher, as distill loaded it
        assert torch.equal(out["prompt_embeds"], direct[0]) and torch.equal(out["pooled_prompt_embeds"], direct[1])
        assert out["prompt_embeds"].shape[0] == 1 and out["text_layout"]["t5"] == (bundle_dir == mini_bundle)


def test_encoder_actors_load_the_vae_and_text_encoders_only(tiny_bundle, mini_bundle):
    for bundle_dir, factor in ((tiny_bundle, 4), (mini_bundle, 8)):
        actor = encoder.TeacherEncoder(_spec(bundle_dir, factor))
        b = actor.bundle
        assert b.transformer is None and not isinstance(b.pipeline.transformer, torch.nn.Module)
        assert b.vae is not None and b.text_encoder is not None and b.text_encoder_2 is not None
        assert (b.text_encoder_3 is not None) == (bundle_dir == mini_bundle)
        modules = {n for n, m in b.pipeline.components.items() if isinstance(m, torch.nn.Module)}
        assert modules == {"vae", "text_encoder", "text_encoder_2"} | ({"text_encoder_3"} if bundle_dir == mini_bundle else set())
    from pipeline.teacher import TeacherError, load_bundle

    with pytest.raises(TeacherError, match=r"load_bundle components \['unet'\]: valid are one or more of "
                                           r"\['transformer', 'vae', 'text'\]"):
        load_bundle(tiny_bundle, components=("unet",))


def test_implied_and_stored_columns():
    assert latent_cache.implied_columns([8, 10, 12, 16]) == {"z_im1_0": "z_0"}
    assert latent_cache.implied_columns([16, 16, 16]) == {"z_im1_0": "z_0", "z_im1_1": "z_1", "z_im1_2": "z_2"}
    assert latent_cache.stored_columns([8, 8, 16]) == ["z_0", "z_1", "z_2", "z_im1_2", "prompt_embeds",
                                                       "pooled_prompt_embeds"]
    manifest = {"columns": latent_cache.stored_columns([8, 10]), "implied_columns": latent_cache.implied_columns([8, 10])}
    assert latent_cache.stored_names(["key", "z_im1_0", "z_im1_0_shape", "z_0", "z_im1_1_dtype"], manifest) == \
        ["key", "z_0", "z_0_shape", "z_im1_1_dtype"]
    assert latent_cache.stored_names(["z_im1_0"], {}) == ["z_im1_0"]  # format 1: stored as it is


def test_decode_batch_fills_implied_latents_only_where_they_are_implied():
    z = {i: torch.randn(2, 4, s, s) for i, s in enumerate([8, 8, 12])}
    table = latent_cache.rows_table(["a", "b"], ["p", "q"], ["k", "k"], {f"z_{i}": t for i, t in z.items()},
                                    ["z_0", "z_1", "z_2"])
    out = latent_cache.decode_batch(table)
    assert out["z_im1_0"] is out["z_0"] and out["z_im1_1"] is out["z_1"]  # s[0] == s[1]
    assert "z_im1_2" not in out and "z_im1" not in out  # 8 -> 12: stored when wanted, never guessed
    pruned = latent_cache.decode_batch(table.select(["key", "z_1", "z_1_shape", "z_1_dtype"]))
    assert "z_im1_1" not in pruned  # z_0 not read: whether s[0] == s[1] is not known ...
    known = latent_cache.decode_batch(table.select(["key", "z_1", "z_1_shape", "z_1_dtype"]), scales=[8, 8, 12])
    assert known["z_im1_1"] is known["z_1"]  # ... unless the manifest's scales are given
    # distill's scale-0 read (z_0 and the text): nothing added to what it asked for, as with format 1
    alone = latent_cache.decode_batch(table.select(["key", "z_0", "z_0_shape", "z_0_dtype"]))
    assert sorted(alone) == ["key", "z", "z_0"]
    assert latent_cache.decode_batch(table.select(["z_0", "z_0_shape", "z_0_dtype"]), scales=[8, 8, 12])["z_im1_0"] is not None


def test_packed_prompt_embeds_round_trip_and_refuse_to_drop_non_zeros():
    layout = latent_cache.TextLayout(clip_tokens=3, clip_width=5, t5_tokens=4, width=8, t5=True)
    x = torch.randn(2, 7, 8).to(torch.bfloat16)
    x[:, :3, 5:] = 0
    data, _, dtype = latent_cache.tensor_bytes(latent_cache.pack_prompt_embeds(x, layout))
    assert len(data[0]) == (3 * 5 + 4 * 8) * 2
    back = torch.stack([latent_cache.decode_column("prompt_embeds", d, layout.shape, dtype) for d in data])
    assert torch.equal(back.view(torch.int16), x.view(torch.int16))
    no_t5 = latent_cache.TextLayout(clip_tokens=3, clip_width=5, t5_tokens=4, width=8, t5=False)
    y = x.clone()
    y[:, 3:] = 0
    data, _, dtype = latent_cache.tensor_bytes(latent_cache.pack_prompt_embeds(y, no_t5))
    assert len(data[0]) == 3 * 5 * 2
    assert torch.equal(latent_cache.decode_column("prompt_embeds", data[1], no_t5.shape, dtype).view(torch.int16),
                       y[1].view(torch.int16))
    y[0, 5, 2] = -0.0  # not zero bit for bit: leaving it out would change the read-back
    with pytest.raises(ValueError, match="leaves out .* is not all zeros"):
        latent_cache.pack_prompt_embeds(y, no_t5)
    with pytest.raises(ValueError, match="do not fit the text layout"):
        latent_cache.pack_prompt_embeds(torch.zeros(1, 6, 8), layout)


def test_row_bytes_before_and_after():
    # tiny default: 4 scales up to 16, 4 channels, float32; 16 CLIP tokens at the joint width 128, no T5
    before = latent_cache.row_bytes(SCALES, 4, 16, 128, 0, 128, 128, "float32", t5=False, format_version=1)
    after = latent_cache.row_bytes(SCALES, 4, 16, 128, 0, 128, 128, "float32", t5=False)
    assert before["total"] == 23_680 and after["total"] == 22_656
    assert before["z_im1"] - after["z_im1"] == 4 * 8 * 8 * 4  # z_im1_0
    # SD3.5-Medium 4-step: latent sides 64..128 x 16 channels bf16; 77 CLIP tokens 2048 wide + 256 T5 tokens 4096
    args = ([64, 80, 96, 128], 16, 77, 2048, 256, 4096, 2048, "bfloat16")
    before, after = latent_cache.row_bytes(*args, format_version=1), latent_cache.row_bytes(*args)
    assert before["total"] == 4_648_960 and before["prompt_embeds"] == 333 * 4096 * 2
    assert after["total"] == 4_202_496 and after["prompt_embeds"] == (77 * 2048 + 256 * 4096) * 2
    spec = _spec("", 8, "bfloat16", scales=[64, 80, 96, 128])
    assert encoder.transport_bytes_per_row(spec, format_version=1) == 23_003_136  # every scale's I_i, I_im1 in bf16
    assert encoder.transport_bytes_per_row(spec, 1024) == 3 * 1024 * 1024  # the uint8 crop


def test_synthetic_cache_is_in_the_format(tiny_bundle, tmp_path):
    import pyarrow.parquet as pq

    root = tiny.synthetic_cache(tmp_path / "cache", tiny_bundle, 5, SCALES)
    manifest = latent_cache.read_manifest(root)
    table = pq.read_table(manifest["shards"][0]["dir"])
    assert "z_im1_0" not in table.column_names and manifest["columns"] == latent_cache.stored_columns(SCALES)
    batch = latent_cache.decode_batch(table)
    assert batch["z_im1"][0] is batch["z"][0] and batch["prompt_embeds"].shape == (5, 16, 128)
    from pipeline.teacher import load_bundle

    with torch.no_grad():
        direct = load_bundle(tiny_bundle).encode_prompt([""])
    assert all(torch.equal(a, b) for a, b in zip(latent_cache.read_uncond(root), direct))
    json.dumps(manifest)  # plain JSON


def test_read_uncond_names_an_old_cache(tmp_path):
    (tmp_path / latent_cache.CACHE_FILE).write_text(json.dumps({"shards": []}))
    with pytest.raises(ValueError, match=r"no unconditional embedding recorded \(format 1, made by an older cache "
                                         r"stage\); re-run the cache stage"):
        latent_cache.read_uncond(tmp_path)
