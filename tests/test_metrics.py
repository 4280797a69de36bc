"""Evaluation metrics: the Frechet distance against a direct scipy computation of the formula, the
EfficientNet-Lite0 extractor on the packaged weights, the CLIP score on a tiny random CLIP, the
Inception FID hook on a tiny TorchScript stand-in, oracle adherence on known images, latency timing."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from helpers.tiny_metrics import tiny_clip, tiny_inception
from pipeline import metrics, shapes

ALL = (shapes.SHAPES, list(shapes.COLOURS_RGB), list(shapes.SIZES_CELL_FRACTION), list(shapes.BACKGROUNDS_RGB))


def sample(index: int) -> dict:
    return shapes.make_sample(0, "eval", index, 64, *ALL)


# ----------------------------------------------------------------------------- Frechet distance


def direct_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The formula written out with scipy: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * covmean))


@pytest.mark.parametrize("n, d", [(200, 8), (64, 32), (40, 16)])
def test_frechet_distance_matches_the_direct_formula(n, d):
    rng = np.random.default_rng(n + d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(loc=0.5, size=(n, d)) @ rng.normal(size=(d, d)) + 1.0
    ours, theirs = metrics.frechet_distance_of(a, b), direct_fd(a, b)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-8)
    assert metrics.frechet_distance_of(b, a) == pytest.approx(ours, rel=1e-8)  # symmetric


def test_frechet_distance_rank_deficient_covariances_match_scipy():
    """Fewer samples than dimensions (as with few eval prompts and 1280-d features)."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 24)), rng.normal(size=(10, 24)) * 1.5
    assert metrics.frechet_distance_of(a, b) == pytest.approx(direct_fd(a, b), rel=1e-5)


def test_frechet_distance_special_cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(100, 6))
    assert metrics.frechet_distance_of(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.arange(6.0)
    assert metrics.frechet_distance_of(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    # 1-d Gaussians: (mu1 - mu2)^2 + (s1 - s2)^2
    assert metrics.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) \
        == pytest.approx(4.0 + 1.0)
    with pytest.raises(ValueError, match=r"shapes differ"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"need \[N >= 2, D\] features"):
        metrics.feature_statistics(np.zeros((1, 4)))


# ----------------------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def extractor():
    return metrics.EfficientNetFeatures(side_px=96)  # smaller than the native 224: fast, same weights


def test_efficientnet_lite0_matches_every_packaged_weight():
    state = torch.load(metrics.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = metrics.load_efficientnet_lite0()  # strict load: every key and shape of the state dict
    assert set(model.state_dict()) == set(state)
    torch.testing.assert_close(model._blocks[15]._project_conv.weight, state["_blocks.15._project_conv.weight"])
    assert len(model._blocks) == 16 and model._fc.out_features == 1000
    # A 224 px input ends at 7 x 7 (TF "SAME" padding: ceil(i / s) per stride-2 layer).
    with torch.inference_mode():
        x = torch.zeros(1, 3, 224, 224)
        x = torch.nn.functional.relu6(model._bn0(model._conv_stem(x)))
        for block in model._blocks:
            x = block(x)
    assert x.shape == (1, 320, 7, 7)


def test_efficientnet_features_are_deterministic_and_tell_images_apart(extractor):
    images = np.stack([np.asarray(Image.open(io.BytesIO(sample(i)["png"])).convert("RGB"))
                       for i in range(4)])
    f1, f2 = extractor(images), extractor(images)
    assert f1.shape == (4, metrics.FD_FEATURE_DIM) and f1.dtype == np.float32
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-5)
    assert (f1 >= 0).all() and (f1 <= 6).all()  # after ReLU6, before the classifier
    assert np.abs(f1[0] - f1[1]).max() > 1e-2


def test_tensorflow_same_padding_puts_the_extra_pixel_right_and_bottom():
    model = metrics.load_efficientnet_lite0()
    conv = model._conv_stem  # 3x3, stride 2
    x = torch.randn(1, 3, 8, 8)
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, [0, 1, 0, 1]), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), expected)


# ----------------------------------------------------------------------------- CLIP score


def test_clip_score_of_a_tiny_random_clip(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    directory = tiny_clip(tmp_path / "clip")
    scorer = metrics.ClipScorer(str(directory))
    images = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    prompts = ["a large red circle in the top on a black background", "a small blue square in the left on a "
               "white background", "a large green triangle in the centre on a black background"]
    got = scorer(images, prompts)
    assert got.shape == (3,) and ((got >= 0) & (got <= 100)).all()
    # Direct: 100 * max(cos(image, text), 0) with the model's projections.
    model, processor = CLIPModel.from_pretrained(directory), CLIPProcessor.from_pretrained(directory)
    inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img, txt = [getattr(t, "pooler_output", t) for t in (img, txt)]
    expected = (100 * torch.nn.functional.cosine_similarity(img, txt).clamp(min=0)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_missing_clip_model_is_a_clear_error(tmp_path):
    with pytest.raises(metrics.MetricError, match=r"evaluate\.clip_model .*no-such-clip.*no such directory.*"
                                                  r"local Hugging Face cache.*clip_optional"):
        metrics.ClipScorer(str(tmp_path / "no-such-clip"))
    with pytest.raises(metrics.MetricError, match=r"evaluate\.clip_model 'nobody/no-such-clip'.*not a hub id in the "
                                                  r"local Hugging Face cache"):
        metrics.resolve_clip("nobody/no-such-clip")
    (tmp_path / "file").write_text("x")
    with pytest.raises(metrics.MetricError, match=r"is a file; expected a transformers CLIP directory"):
        metrics.resolve_clip(str(tmp_path / "file"))


# ----------------------------------------------------------------------------- Inception FID hook


def test_inception_hook_loads_torchscript_and_extracts_features(tmp_path):
    features = metrics.InceptionFeatures(tiny_inception(tmp_path / "inception.pt"))
    images = np.random.default_rng(1).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    f = features(images)
    assert f.shape == (5, 12) and np.isfinite(f).all()
    assert np.isfinite(metrics.frechet_distance_of(f, features(images[::-1].copy() // 2)))


def test_missing_or_bad_inception_weights_are_clear_errors(tmp_path):
    with pytest.raises(metrics.MetricError, match=r"evaluate\.inception_weights .*nope\.pt.*no such file.*"
                                                  r"inception_optional=true"):
        metrics.InceptionFeatures(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not torchscript")
    with pytest.raises(metrics.MetricError, match=r"not a TorchScript Inception-v3"):
        metrics.InceptionFeatures(tmp_path / "bad.pt")


# ----------------------------------------------------------------------------- adherence, latency


def test_oracle_adherence_on_known_images():
    samples = [sample(i) for i in range(12)]
    images = [np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")) for s in samples]
    attrs = [json.loads(s["json"]) for s in samples]
    prompts = [s["txt"] for s in samples]
    right = metrics.adherence(images, prompts)
    assert right["all"] == 1.0 and right["colour"] == 1.0 and right["shape"] == 1.0
    assert metrics.adherence(images, attrs) == right
    # The same images against other prompts: adherence falls with what no longer matches.
    wrong = metrics.adherence(images, prompts[1:] + prompts[:1])
    assert wrong["all"] < 0.5
    blank = np.zeros((64, 64, 3), np.uint8) + 25
    assert metrics.adherence([blank], prompts[:1])["all"] == 0.0
    # The same numbers as the oracle's own score, from readings taken elsewhere.
    from pipeline import oracle

    mixed = images[:6] + [blank] * 2
    assert metrics.adherence(mixed, prompts[:8]) == oracle.score(mixed, prompts[:8])
    readings = [json.loads(json.dumps(oracle.recover(im).__dict__)) for im in mixed]
    assert metrics.adherence_of(readings, attrs[:8]) == oracle.score(mixed, prompts[:8])


def test_time_batches_is_the_median_after_warmup():
    import time

    sleeps = [0.3, 0.001, 0.02, 0.005]  # the warm-up call is the slow one
    calls = []

    def fn():
        calls.append(1)
        time.sleep(sleeps[len(calls) - 1])

    result = metrics.time_batches(fn, num_warmup=1, num_repeats=3)
    assert len(calls) == 4 and len(result["times_s"]) == 3
    assert result["median_s"] == sorted(result["times_s"])[1]
    assert max(result["times_s"]) < 0.3  # the warm-up is not timed
    with pytest.raises(ValueError, match="num_repeats"):
        metrics.time_batches(fn, 0, 0)
