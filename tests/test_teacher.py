"""The teacher bundle: the embedded tiny bundle, the SD3 loader, prompt encoding, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import shapes, teacher, tiny

PROMPTS = ["a large red circle in the top left on a black background",
           "a small blue triangle in the centre on a white background", ""]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return tiny.build_bundle(tmp_path_factory.mktemp("tiny") / "bundle", seed=0)


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return teacher.load_bundle(bundle_dir)


def _stock(bundle_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(bundle_dir, text_encoder_3=None, tokenizer_3=None,
                                                    use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tokenizer_is_stock_clip_with_one_token_per_word(bundle):
    from transformers import CLIPTokenizer

    assert isinstance(bundle.tokenizer, CLIPTokenizer)
    for word in shapes.vocabulary():
        assert len(bundle.tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = bundle.tokenizer(PROMPTS[0]).input_ids
    assert len(ids) == len(PROMPTS[0].split()) + 2  # bos ... eos
    assert len(bundle.tokenizer("zebra", add_special_tokens=False).input_ids) > 1  # unseen word: letters, no unk


def test_round_trip_keeps_every_weight_and_factor(tmp_path):
    pipe = tiny.build_pipeline(seed=3)
    pipe.vae.register_to_config(shift_factor=0.1, scaling_factor=0.9)
    tiny.save_bundle(pipe, tmp_path / "b")
    assert sorted(p.suffix for p in (tmp_path / "b").rglob("*.safetensors"))  # safetensors only
    assert not list((tmp_path / "b").rglob("*.bin"))
    loaded = teacher.load_bundle(tmp_path / "b")
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert (loaded.shift_factor, loaded.scaling_factor) == (pytest.approx(0.1), pytest.approx(0.9))
    assert loaded.text_encoder_3 is None and loaded.max_sequence_length == 0
    assert not any(p.requires_grad for p in loaded.transformer.parameters())


def test_encode_prompt_equals_stock_diffusers(bundle, bundle_dir):
    stock = _stock(bundle_dir)
    for length in (0, 7):
        want, _, want_pooled, _ = stock.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None, device="cpu",
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=length)
        got, got_pooled = bundle.encode_prompt(PROMPTS, max_sequence_length=length)
        assert got.shape == (3, tiny.TEXT_MAX_LENGTH + length, 2 * tiny.TEXT_HIDDEN)
        assert torch.allclose(got, want) and torch.allclose(got_pooled, want_pooled)


def test_stock_pipeline_generates_from_the_bundle(bundle_dir):
    stock = _stock(bundle_dir)
    out = stock(prompt=PROMPTS[:2], num_inference_steps=2, guidance_scale=3.0, max_sequence_length=0,
                output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(out.images)).all()


def test_vae_encode_decode_shapes(bundle):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = bundle.encode_images(x)
        assert z.shape == (2, tiny.LATENT_CHANNELS, 16, 16)
        assert bundle.decode_latents(z).shape == (2, 3, 64, 64)


def test_missing_pretrained_directory(tmp_path):
    with pytest.raises(teacher.TeacherError, match="no such directory .*expected a diffusers directory"):
        teacher.load_bundle(tmp_path / "nope")
    with pytest.raises(teacher.TeacherError, match="not found in the local Hugging Face cache"):
        teacher.resolve_pretrained("nobody-here/no-such-model", local_files_only=True)


def test_non_sd3_directories(tmp_path, bundle_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(teacher.TeacherError, match="has no model_index.json; expected a diffusers directory"):
        teacher.load_bundle(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(teacher.TeacherError, match="is a file"):
        teacher.load_bundle(tmp_path / "file")
    sd15 = tmp_path / "sd15"
    sd15.mkdir()
    (sd15 / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "PNDMScheduler"]}))
    with pytest.raises(teacher.TeacherError, match=r"not an SD3-family diffusers directory: pipeline class "
                                                   r"'StableDiffusionPipeline' \(expected one of StableDiffusion3"):
        teacher.load_bundle(sd15)
    broken = tmp_path / "broken"
    broken.mkdir()
    index = json.loads((bundle_dir / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(teacher.TeacherError, match="transformer/ is missing"):
        teacher.load_bundle(broken)


def test_bad_dtype_and_device(bundle_dir):
    with pytest.raises(teacher.TeacherError, match="'float16' on device 'cpu' is not supported.*float32 or bfloat16"):
        teacher.load_bundle(bundle_dir, dtype="float16")
    with pytest.raises(teacher.TeacherError, match="dtype 'int8' is not supported; valid: float32, bfloat16, float16"):
        teacher.load_bundle(bundle_dir, dtype="int8")
    with pytest.raises(teacher.TeacherError, match="device 'tpu' is not supported; valid: cpu, cuda, cuda:N"):
        teacher.load_bundle(bundle_dir, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(teacher.TeacherError, match="'cuda': no CUDA GPU is visible"):
            teacher.load_bundle(bundle_dir, device="cuda")


def test_bfloat16_on_cpu_loads(bundle_dir):
    b = teacher.load_bundle(bundle_dir, dtype="bfloat16")
    assert b.dtype == torch.bfloat16
    embeds, pooled = b.encode_prompt(PROMPTS[:1])
    assert embeds.dtype == torch.bfloat16


def test_config_errors_name_key_value_and_valid():
    from pydantic import ValidationError

    from stages.teacher import Config

    with pytest.raises(ValidationError, match=r"device\n  Extra inputs are not permitted"):
        Config(device="cuda")  # removed: each stage puts the teacher where its GPUs are
    with pytest.raises(ValidationError, match=r"teacher.patch_size 3 is not supported; valid: 1, 2, 4"):
        Config(patch_size=3)
    with pytest.raises(ValidationError, match="dtype"):
        Config(dtype="float64")
    with pytest.raises(ValidationError, match="extra"):
        Config(num_stepz=3)
    with pytest.raises(ValidationError, match=r"teacher.multires_latent_sides: \[16, 9\] invalid: each side must be "
                                              r"below the native 16 and a multiple of teacher.patch_size \(2\)"):
        Config(multires_latent_sides=[8, 16, 9])
    assert Config(multires_latent_sides=[], multires_fraction=0.0).multires_latent_sides == []
    with pytest.raises(ValidationError, match=r"sample_num_steps\n  Extra inputs are not permitted"):
        Config(sample_num_steps=4)  # now teacher.sampler.num_steps (stages.RENAMED_KEYS names it)
    with pytest.raises(ValidationError, match=r"sampler.guidance_scale\n  Input should be greater than or equal to 1"):
        Config(sampler={"guidance_scale": 0.5})
    assert Config(sampler={"num_steps": 4}).sampler.guidance_scale == 3.0


def test_smaller_training_sides_are_area_downsampled_like_the_cache():
    import torch

    from pipeline.swd.inputs import area_downsample
    from pipeline.teacher_training import _downsample

    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    small = _downsample(images, 32)
    assert small.dtype == torch.uint8 and small.shape == (3, 3, 32, 32)
    assert torch.equal(small, area_downsample(images.float(), 32).round().to(torch.uint8))


def test_bundle_location_reads_the_stage_record(tmp_path):
    (tmp_path / "teacher.json").write_text(json.dumps({"source": "trained", "location": "bundle"}))
    assert teacher.bundle_location(tmp_path) == str(tmp_path / "bundle")
    (tmp_path / "teacher.json").write_text(json.dumps({"source": "pretrained", "location": "/x/sd35"}))
    assert teacher.bundle_location(tmp_path) == "/x/sd35"


SHIPPED = teacher.REPO_ROOT / "assets" / "tiny-teacher"


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="assets/tiny-teacher not shipped")
def test_shipped_tiny_teacher_loads_and_is_small():
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    b = teacher.load_bundle("assets/tiny-teacher")  # relative to the repository root
    assert b.vae.config.shift_factor != 0.0 and b.info["guidance_scale"] > 1
    out = b.pipeline(prompt=PROMPTS[:1], num_inference_steps=2, guidance_scale=b.info["guidance_scale"],
                     max_sequence_length=b.max_sequence_length, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
