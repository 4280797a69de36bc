"""The published evaluation protocol (issue 17) without Ray: pytorch-fid's FID Inception in pure torch
(random weights, checked against direct computations), its preprocessing, the .pth -> safetensors
conversion, `python -m pipeline.fid_stats`, reference statistics and prompt files with their bad inputs,
the pre-flight check, CLIP score and PickScore on a tiny random CLIP, compare's protocol refusal, and the
labelled grids."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers.eval_protocol import image_folder, random_inception
from helpers.tiny_metrics import tiny_clip
from pipeline import eval_protocol as P
from pipeline import fid_inception, fid_stats
from pipeline import metrics as M


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_inception(tmp_path_factory.mktemp("inception") / "fid_inception_v3.safetensors")


def _bn_relu(conv, x):
    """BasicConv2d computed directly: conv (no bias) -> batch norm (eval, eps 1e-3) -> ReLU."""
    c, bn = conv.conv, conv.bn
    y = F.conv2d(x, c.weight, None, c.stride, c.padding)
    y = (y - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + 1e-3)
    return F.relu(y * bn.weight[None, :, None, None] + bn.bias[None, :, None, None])


def test_the_fid_inception_matches_pytorch_fids_architecture(weights):
    model = fid_inception.load(weights)
    state = model.state_dict()
    # torchvision's names and shapes (what pt_inception-2015-12-05-6726825d.pth holds), 1008 classes, no aux head
    for key, shape in {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
                       "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_6e.branch7x7dbl_5.conv.weight":
                       (192, 192, 1, 7), "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
                       "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "fc.weight": (1008, 2048)}.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)
    x = torch.randn(1, 192, 9, 9)
    with torch.no_grad():
        # FIDInceptionA: the pool branch averages without counting the zero padding (TF's pool)
        a = model.Mixed_5b
        pool = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        direct = torch.cat([_bn_relu(a.branch1x1, x), _bn_relu(a.branch5x5_2, _bn_relu(a.branch5x5_1, x)),
                            _bn_relu(a.branch3x3dbl_3, _bn_relu(a.branch3x3dbl_2, _bn_relu(a.branch3x3dbl_1, x))),
                            _bn_relu(a.branch_pool, pool)], 1)
        torch.testing.assert_close(a(x), direct, rtol=1e-4, atol=1e-4)
        # FIDInceptionE_2 (Mixed_7c) max-pools; E_1 (Mixed_7b) average-pools without the padding
        e, x2 = model.Mixed_7c, torch.randn(1, 2048, 4, 4)
        out = e(x2)
        torch.testing.assert_close(out[:, -192:], _bn_relu(e.branch_pool, F.max_pool2d(x2, 3, 1, 1)), rtol=1e-4, atol=1e-4)
        # FIDInceptionC (Mixed_6b-e) likewise average-pools without the padding
        c, x4 = model.Mixed_6b, torch.randn(1, 768, 5, 5)
        torch.testing.assert_close(c(x4)[:, -192:], _bn_relu(c.branch_pool, F.avg_pool2d(x4, 3, 1, 1,
                                   count_include_pad=False)), rtol=1e-4, atol=1e-4)
        x3 = torch.randn(1, 1280, 4, 4)
        torch.testing.assert_close(model.Mixed_7b(x3)[:, -192:], _bn_relu(model.Mixed_7b.branch_pool,
                                   F.avg_pool2d(x3, 3, 1, 1, count_include_pad=False)), rtol=1e-4, atol=1e-4)
        # pool3: 2048-d, the spatial mean of Mixed_7c's output (8 x 8 at 299 px)
        images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
        inp = fid_inception.preprocess(images, "pytorch_fid")
        feats = fid_inception.InceptionFeatures(weights)(images)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    h = inp
    with torch.no_grad():
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            h = getattr(model, name)(h)
        h = F.max_pool2d(h, 3, 2)
        h = model.Conv2d_4a_3x3(model.Conv2d_3b_1x1(h))
        h = F.max_pool2d(h, 3, 2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            h = getattr(model, name)(h)
    assert h.shape[1:] == (2048, 8, 8)
    np.testing.assert_allclose(feats, h.mean((2, 3)).numpy(), rtol=1e-4, atol=1e-5)


def test_preprocessing_rules():
    images = np.random.default_rng(1).integers(0, 256, (2, 37, 37, 3), dtype=np.uint8)
    x = fid_inception.preprocess(images, "pytorch_fid")
    direct = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, size=(299, 299),
                           mode="bilinear", align_corners=False) * 2 - 1
    assert x.shape == (2, 3, 299, 299)
    torch.testing.assert_close(x, direct)
    from PIL import Image

    clean = fid_inception.preprocess(images, "clean_fid")
    channel = np.asarray(Image.fromarray(images[1, :, :, 2].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
    # clean-fid's normalisation (cleanfid/inception_torchscript.py): (x - 128) / 128
    np.testing.assert_allclose(clean[1, 2].numpy(), (np.clip(channel, 0, 255) - 128) / 128, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="resize rule 'area'"):
        fid_inception.preprocess(images, "area")
    # the released evaluation's step before FID: Lanczos of the short side + centre crop
    side = P.bring_to_side(np.zeros((1, 40, 60, 3), np.uint8), 32)
    assert side.shape == (1, 32, 32, 3)


def test_pth_conversion_reads_tensors_only_and_round_trips(tmp_path, weights):
    from safetensors.torch import load_file

    pth = tmp_path / "pt_inception.pth"
    torch.save({k: v for k, v in load_file(str(weights)).items() if not k.endswith("num_batches_tracked")}, pth)
    out = tmp_path / "converted.safetensors"
    assert fid_inception.main(["convert", str(pth), str(out)]) == 0
    images = np.random.default_rng(2).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(fid_inception.InceptionFeatures(out)(images),
                               fid_inception.InceptionFeatures(weights)(images), rtol=1e-6)
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(SystemExit, match="not pytorch-fid's FID Inception-v3 weights"):
        fid_inception.convert(tmp_path / "other.pth", tmp_path / "x.safetensors")


def test_fid_stats_command_folder_and_shards_and_the_reference_checks(tmp_path, weights):
    from helpers.shards import write_tar

    folder = image_folder(tmp_path / "images", 3)
    out = tmp_path / "ref.npz"
    assert fid_stats.main(["--weights", str(weights), "--folder", str(folder), "--image-side-px", "32",
                           "--out", str(out)]) == 0
    ref = P.load_reference_stats(str(out), 2048, fid_inception.file_digest(weights))
    assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
    assert ref["protocol"]["num_images"] == 3 and ref["protocol"]["image_side_px"] == 32
    assert ref["protocol"]["resize_rule"] == "pytorch_fid" and ref["protocol"]["extractor"] == fid_inception.EXTRACTOR
    # the statistics are those of the extractor's features of the resized images, computed directly
    from PIL import Image

    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])
    mu, sigma = M.feature_statistics(fid_inception.InceptionFeatures(weights)(P.bring_to_side(images, 32)))
    np.testing.assert_allclose(ref["mu"], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-4, atol=1e-6)
    # WebDataset shards
    import io

    members = []
    for i, im in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        members += [(f"s{i:03d}.png", buf.getvalue()), (f"s{i:03d}.txt", b"a prompt")]
    shard = tmp_path / "ref-000000.tar"
    write_tar(shard, members)
    out2 = tmp_path / "ref2.npz"
    assert fid_stats.main(["--weights", str(weights), "--shards", str(shard), "--image-side-px", "32",
                           "--out", str(out2)]) == 0
    np.testing.assert_allclose(np.load(out2)["mu"], ref["mu"], rtol=1e-5, atol=1e-6)

    # bad reference files, each naming the key
    np.savez(tmp_path / "nomu.npz", mean=np.zeros(3))
    with pytest.raises(P.ProtocolError, match=r"evaluate\.fid_reference_stats: .*nomu\.npz.* not 'mu' and 'sigma'"):
        P.load_reference_stats(str(tmp_path / "nomu.npz"), 2048)
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(P.ProtocolError, match=r"evaluate\.fid_reference_stats: .*64-d statistics but the FID "
                                              r"extractor gives 2048-d"):
        P.load_reference_stats(str(tmp_path / "small.npz"), 2048)
    with pytest.raises(P.ProtocolError, match=r"was made with Inception weights sha256 .* but "
                                              r"evaluate\.inception_weights has"):
        P.load_reference_stats(str(out), 2048, "0" * 64)
    # the recorded preprocessing must be the configured one
    with pytest.raises(P.ProtocolError, match=r"made with image_side_px 32, but evaluate\.fid_image_side_px is "
                                              r"256; set evaluate\.fid_image_side_px: 32"):
        P.load_reference_stats(str(out), 2048, preprocessing={"resize_rule": "pytorch_fid", "image_side_px": 256})
    with pytest.raises(P.ProtocolError, match=r"made with resize_rule 'pytorch_fid', but evaluate\.fid_resize is "
                                              r"'clean_fid'"):
        P.load_reference_stats(str(out), 2048, preprocessing={"resize_rule": "clean_fid"})
    # ... and all of it is checked before Ray: the pre-flight names the key
    from stages import evaluate

    cfg = evaluate.Config(fid_reference_stats=str(out), inception_weights=str(weights), fid_image_side_px=32)
    assert evaluate.file_problems(cfg) == []
    other = random_inception(tmp_path / "other.safetensors", seed=1)
    problems = evaluate.file_problems(cfg.model_copy(update={"inception_weights": str(other)}))
    assert len(problems) == 1 and problems[0].startswith("evaluate.fid_reference_stats: ") and "sha256" in problems[0]
    problems = evaluate.file_problems(cfg.model_copy(update={"fid_image_side_px": None}))
    assert len(problems) == 1 and "evaluate.fid_image_side_px is None" in problems[0]


def test_prompt_files_and_their_bad_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    assert P.read_prompts(str(tmp_path / "p.txt"), "caption") == ["a cat", "a dog"]
    (tmp_path / "p.csv").write_text(",file_name,caption\n0,a.jpg,a red bus\n1,b.jpg,two cats\n")
    assert P.read_prompts(str(tmp_path / "p.csv"), "caption") == ["a red bus", "two cats"]
    pq.write_table(pa.table({"text": ["x", "y"]}), tmp_path / "p.parquet")
    assert P.read_prompts(str(tmp_path / "p.parquet"), "text") == ["x", "y"]
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(P.ProtocolError, match=r"evaluate\.prompts: .*empty\.txt' holds no prompt"):
        P.read_prompts(str(tmp_path / "empty.txt"), "caption")
    with pytest.raises(P.ProtocolError, match=r"evaluate\.prompt_column: 'prompt' is not a column of .*p\.csv"):
        P.read_prompts(str(tmp_path / "p.csv"), "prompt")
    (tmp_path / "hole.txt").write_text("a\n\nb\n")
    with pytest.raises(P.ProtocolError, match=r"1 empty prompt\(s\) \(rows \[1\]"):
        P.read_prompts(str(tmp_path / "hole.txt"), "caption")
    with pytest.raises(P.ProtocolError, match=r"evaluate\.prompts: .*\.json'.*unknown format"):
        P.read_prompts(str(tmp_path / "p.json"), "caption")
    with pytest.raises(P.ProtocolError, match=r"evaluate\.prompts: .*missing\.csv' cannot be read"):
        P.read_prompts(str(tmp_path / "missing.csv"), "caption")


def test_preflight_names_every_missing_file_unless_optional(tmp_path):
    from pipeline.config import ConfigError
    from stages import evaluate, load_config

    cfg = evaluate.Config(prompts=str(tmp_path / "coco.csv"), fid_reference_stats=str(tmp_path / "ref.npz"),
                          inception_weights=str(tmp_path / "inc.safetensors"), clip_model=str(tmp_path / "clip"),
                          pickscore_model=str(tmp_path / "pick"))
    problems = evaluate.file_problems(cfg)
    assert [p.split(" ")[0].rstrip(":") for p in problems] == ["evaluate.prompts", "evaluate.fid_reference_stats",
                                                               "evaluate.inception_weights", "evaluate.clip_model",
                                                               "evaluate.pickscore_model"]
    assert "pickscore_optional=true" in problems[-1]
    optional = cfg.model_copy(update={"inception_optional": True, "clip_optional": True, "pickscore_optional": True})
    assert [p.split(":")[0] for p in evaluate.file_problems(optional)] == ["evaluate.prompts"]
    # before any Ray work: the graph's plan raises a ConfigError naming the keys
    with pytest.raises(ConfigError, match=r"evaluate\.prompts: .*coco\.csv' cannot be read"):
        evaluate.external_fingerprint({"evaluate": cfg})
    assert evaluate.external_fingerprint({"evaluate": evaluate.Config()}) == []
    # config-level problems are config errors too
    with pytest.raises(ConfigError, match=r"evaluate\.fid_reference_stats: set without evaluate\.inception_weights"):
        load_config(overrides=["evaluate.fid_reference_stats=ref.npz"])
    with pytest.raises(ConfigError, match=r"evaluate\.fid_reference_stats: null with evaluate\.prompts and "
                                          r"evaluate\.inception_weights set"):
        load_config(overrides=["evaluate.prompts=p.csv", "evaluate.inception_weights=w.safetensors"])
    with pytest.raises(ConfigError, match=r"evaluate\.published\.student_fidd: not a metric the stage logs"):
        load_config(overrides=["evaluate.published={student_fidd: 1}"])


def test_clip_score_definitions_and_pickscore_on_a_tiny_random_clip(tmp_path):
    directory = tiny_clip(tmp_path / "clip")
    scorer = M.ClipScorer(str(directory))
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    cos = scorer.cosines(images, prompts)
    # direct: the processor's tensors through the projection heads, normalised, dot product
    inputs = scorer.processor(text=prompts, images=list(images), return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        img = scorer.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = scorer.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    direct = F.cosine_similarity(img, txt, dim=-1).numpy()
    np.testing.assert_allclose(cos, direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scorer(images, prompts), 100 * np.clip(direct, 0, None), rtol=1e-4, atol=1e-3)
    # torchmetrics' CLIPScore of a set clamps the mean (CLIPScore.compute), not each image
    assert M.clip_score_torchmetrics([0.3, -0.1]) == pytest.approx(10.0)
    assert M.clip_score_torchmetrics([-0.3, 0.1]) == 0.0
    scale = float(scorer.model.logit_scale.exp())
    np.testing.assert_allclose(M.pickscore(cos, scorer.logit_scale), scale * cos, rtol=1e-6)
    with pytest.raises(M.MetricError, match=r"evaluate\.pickscore_model .*no such directory.*pickscore_optional=true"):
        M.resolve_clip(str(tmp_path / "none"), "evaluate.pickscore_model")


def _run(run_id: str, metrics: dict) -> types.SimpleNamespace:
    return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id, start_time=0, status="FINISHED"),
                                 data=types.SimpleNamespace(metrics=metrics, params={}))


def test_compare_shows_intervals_and_refuses_fids_of_different_protocols():
    from pipeline import compare

    a = _run("aaaaaaaa1", {"student_fid": 20.0, "fid_protocol_id": 1.0, "student_adherence": 0.7,
                           "student_adherence_ci95_low": 0.6, "student_adherence_ci95_high": 0.8,
                           "student_minus_teacher_adherence_ci95_low": -0.2,
                           "student_minus_teacher_adherence_ci95_high": -0.05})
    b = _run("bbbbbbbb2", {"student_fid": 25.0, "fid_protocol_id": 2.0, "student_adherence": 0.72})
    out = compare.render([a, b])
    assert "student_fid" not in out.split("refused")[0]  # no FID column when the protocols differ
    assert "refused: student_fid not compared: the runs measured it under different FID protocols (aaaaaaaa 1, bbbbbbbb 2)" in out
    assert "0.7 [0.6, 0.8]" in out and "[-0.2, -0.05] real" in out
    same = compare.render([a, _run("cccccccc3", {"student_fid": 21.0, "fid_protocol_id": 1.0})])
    assert "refused" not in same and "| 21 " in same and "| 20 " in same


def test_labelled_and_ablation_grids():
    from pipeline.image_grid import ablation_grid, labelled_grid

    ims = np.zeros((2, 16, 16, 3), np.uint8)
    grid = labelled_grid([ims, ims + 255], ["student", "teacher"], ["a red circle", "a blue square"], 64)
    assert grid.size == (220 + 2 * (64 + 2), 18 + 2 * (64 + 2))
    assert np.asarray(grid)[18 + 10, 220 + 66 + 10].tolist() == [255, 255, 255]  # teacher's white, upscaled
    assert np.asarray(grid)[18 + 10, 220 + 10].tolist() == [0, 0, 0]
    g2 = ablation_grid({"swd": ims, "no_mmd": ims, "nearest": ims}, ["p1", "p2"], 32)
    assert g2.size == (220 + 3 * 34, 18 + 2 * 34)
    with pytest.raises(ValueError, match="same prompts"):
        labelled_grid([ims, ims[:1]], ["a", "b"])
    assert json.dumps(P.fid_protocol("x", "d", "pytorch_fid", 256, 5008, {"kind": "stats", "sha256": "s"}))
