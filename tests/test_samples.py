"""One reading of the data (`pipeline/samples.py`): the key, caption and image rules on their own,
then the same tricky inputs through every stage's reader (cache, evaluate, teacher, synthesize),
which must agree: an EXIF-rotated JPEG decodes upright, dots in directory names do not split the
key, a non-UTF-8 caption is the same counted reject. The tricky-sample builders below are shared
with the stage tests (test_synthesize, test_evaluate, test_teacher_stage)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.shards import good_shard, image_bytes, write_tar
from pipeline import samples
from pipeline.teacher_training import read_samples as teacher_read_samples
from stages import evaluate, synthesize
from stages.cache.encoder import image_tensor
from stages.cache.rounds import read_shard

# ----------------------------------------------------------------------------- tricky-sample builders

DOTTED = "a.b/c.d/"  # dots in directory names: the key is directory + basename up to its first dot
NOT_UTF8 = b"a red \xff\xfe circle"  # not UTF-8: a `bad_caption` reject everywhere


def exif_jpeg(width: int = 96, height: int = 64, seed: int = 0, orientation: int = 6) -> bytes:
    """A JPEG stored `width` x `height` whose EXIF orientation says how to show it (6: rotate 90
    degrees clockwise, as phone cameras write portraits)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95, exif=exif)
    return out.getvalue()


def upright_square(jpeg: bytes) -> np.ndarray:
    """What every reader must make of `exif_jpeg(orientation=6)`: the stored pixels rotated 90
    degrees clockwise, then the centred square."""
    with Image.open(io.BytesIO(jpeg)) as im:
        stored = np.asarray(im.convert("RGB"))  # decoded without looking at the EXIF orientation
    upright = np.rot90(stored, k=-1)
    h, w = upright.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return np.ascontiguousarray(upright[top:top + s, left:left + s])


def tricky_image_shard(path: Path) -> Path:
    """An image shard under dotted directories: an EXIF-rotated JPEG, a non-UTF-8 caption, two good samples."""
    members = [(f"{DOTTED}000001.jpg", exif_jpeg()), (f"{DOTTED}000001.txt", b"a red circle"),
               (f"{DOTTED}000001.json", b'{"seed": 1}'),
               (f"{DOTTED}000002.png", image_bytes(64, 64, 2)), (f"{DOTTED}000002.txt", NOT_UTF8),
               (f"{DOTTED}000003.png", image_bytes(64, 64, 3)), (f"{DOTTED}000003.txt", b"  a blue square \n")]
    return write_tar(path, members)


def tricky_prompt_shard(path: Path) -> Path:
    """The same keys and captions as `tricky_image_shard`, without images (a synthesize input)."""
    members = [(f"{DOTTED}000001.txt", b"a red circle"), (f"{DOTTED}000001.json", b"{}"),
               (f"{DOTTED}000002.txt", NOT_UTF8), (f"{DOTTED}000003.txt", b"  a blue square \n")]
    return write_tar(path, members)


def random_tar(path: Path, size: int = 4096, seed: int = 0) -> Path:
    """Random bytes named like a shard: not a tar at all."""
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


GOOD_KEYS = [f"{DOTTED}000001", f"{DOTTED}000003"]
REJECTED = {f"{DOTTED}000002": "bad_caption"}


# ----------------------------------------------------------------------------- the rules on their own


def test_webdataset_key_rule():
    import webdataset.tariterators as wt

    names = ["000001.txt", "a.b/c.d/000001.txt", "a.b/c.d/000001.seg.PNG", "dir/x.tar.gz", "a.b/noext",
             "a/.hidden", "plain"]
    for name in names:
        base, ext = wt.base_plus_ext(name)
        assert samples.split_member(name) == ((base, ext.lower()) if base is not None else None), name
    assert samples.split_member("a.b/c.d/000001.seg.PNG") == ("a.b/c.d/000001", "seg.png")


def test_caption_rule():
    assert samples.read_caption(b"  a red circle \n") == ("a red circle", None, "")
    assert samples.read_caption(" \u00e9t\u00e9 ".encode()) == ("\u00e9t\u00e9", None, "")
    assert samples.read_caption(b" \n\t ")[:2] == (None, "empty_caption")
    assert samples.read_caption(b"")[:2] == (None, "empty_caption")
    prompt, reason, detail = samples.read_caption(NOT_UTF8)
    assert prompt is None and reason == "bad_caption" and "utf-8" in detail


def test_image_rule_upright_centre_square_then_resize():
    jpeg = exif_jpeg()
    expected = upright_square(jpeg)
    assert expected.shape == (64, 64, 3)
    assert np.array_equal(samples.decode_image(jpeg), expected)
    assert np.array_equal(np.asarray(samples.square_image(jpeg)), expected)
    resized = np.asarray(Image.fromarray(expected).resize((32, 32), Image.BICUBIC))
    assert np.array_equal(samples.decode_image(jpeg, 32), resized)
    with pytest.raises(Exception):
        samples.decode_image(b"not an image")


def test_bad_fraction_counts_an_unreadable_shard_as_an_average_shard():
    unreadable = [{"url": "u", "key": "u", "reason": "unreadable_shard", "detail": "x"}]
    assert samples.bad_fraction(199, unreadable, 199) == pytest.approx(1 / 200)  # 1 of 200 one-sample shards
    assert samples.bad_data_problem("s", "samples", 0.005, 0.01, unreadable, "s.max_bad_fraction") is None
    problem = samples.bad_data_problem("s", "samples", 0.5, 0.01, unreadable, "s.max_bad_fraction")
    assert "more than s.max_bad_fraction=0.01" in problem and "u (unreadable: x)" in problem
    assert "raise s.max_bad_fraction" in problem


# ----------------------------------------------------------------------------- the same reading in every stage


def _teacher_read(urls: list[str], side: int, **kw):
    out = teacher_read_samples(urls, side, **kw)
    return out[0], out[3]  # images, what was read


def test_an_exif_rotated_jpeg_decodes_upright_the_same_in_every_stage(tmp_path):
    jpeg = exif_jpeg()
    expected = upright_square(jpeg)  # 64 x 64: no reader resizes it
    shard = write_tar(tmp_path / "exif.tar", [(f"{DOTTED}000001.jpg", jpeg), (f"{DOTTED}000001.txt", b"a red circle")])

    got = {"cache": ((image_tensor(jpeg)[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8),
           "evaluate": evaluate.decode_reference(jpeg, 64),
           "teacher": teacher_read_samples([str(shard)], 64)[0][0].permute(1, 2, 0).numpy()}
    synthesize.save_sample_grid(tmp_path / "grid.png", [synthesize.PlannedShard(shard, "s", [])])
    got["synthesize"] = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    for stage, image in got.items():
        assert image.shape == (64, 64, 3) and np.array_equal(image, expected), stage


def test_dots_in_directory_names_give_the_same_key_in_every_stage(tmp_path):
    images = tricky_image_shard(tmp_path / "images.tar")
    prompts = tricky_prompt_shard(tmp_path / "prompts.tar")

    cached = [r["key"] for rows, _ in read_shard(str(images), "k") for r in rows]
    evaluated = [s["key"] for s in evaluate.read_eval_samples([str(images)], None, max_bad_fraction=1.0)[0]]
    trained = [s["key"] for s in _teacher_read([str(images)], 64, max_bad_fraction=1.0)[1].samples]
    assert synthesize.shard_kind(str(prompts)) == ("prompts", [])
    assert synthesize.shard_kind(str(images)) == ("images", [])
    synthesized = [p.key for p in synthesize.read_prompt_shard(str(prompts))[0]]
    for stage, keys in {"cache": cached, "evaluate": evaluated, "teacher": trained, "synthesize": synthesized}.items():
        assert keys == GOOD_KEYS, stage


def test_a_non_utf8_caption_is_the_same_counted_reject_in_every_stage(tmp_path):
    images = str(tricky_image_shard(tmp_path / "images.tar"))
    prompts = str(tricky_prompt_shard(tmp_path / "prompts.tar"))

    def judged(rejects: list[dict]) -> dict[str, str]:
        return {e["key"]: e["reason"] for e in rejects}

    cached = judged([e for _, rejects in read_shard(images, "k") for e in rejects])
    kept, reads = evaluate.read_eval_samples([images], None, max_bad_fraction=1.0)
    evaluated = judged(reads.rejects)
    assert [s["prompt"] for s in kept] == ["a red circle", "a blue square"]
    _, reads = _teacher_read([images], 64, max_bad_fraction=1.0)
    trained = judged(reads.rejects)
    assert [s["prompt"] for s in reads.samples] == ["a red circle", "a blue square"]
    kept, rejects = synthesize.read_prompt_shard(prompts)
    synthesized = judged(rejects)
    assert [p.text for p in kept] == ["a red circle", "a blue square"]  # no U+FFFD prompt
    for stage, got in {"cache": cached, "evaluate": evaluated, "teacher": trained, "synthesize": synthesized}.items():
        assert got == REJECTED, stage
    # and each stage with its default limit (1%) refuses a shard that is one third bad, naming it
    with pytest.raises(evaluate.EvaluateError, match=r"evaluate: 33\.33% of the eval samples read are bad, more than "
                                                     r"evaluate\.max_bad_fraction=0\.01 .*images\.tar \(1 rejected"):
        evaluate.read_eval_samples([images], None)
    with pytest.raises(ValueError, match=r"teacher: 33\.33% of the train samples are bad, more than the allowed "
                                         r"0\.01 .*images\.tar \(1 rejected"):
        teacher_read_samples([images], 64)


def test_a_random_bytes_shard_and_a_vanished_one_are_the_same_rejects_in_every_stage(tmp_path):
    """Among good shards: a tar of random bytes is one `corrupt_tar` reject (as the cache has always
    counted it), a shard that cannot be opened one `unreadable_shard` (weighing as an average shard);
    no reader raises while the fraction allows them."""
    bad, gone = str(random_tar(tmp_path / "random.tar")), str(tmp_path / "vanished.tar")
    good = [str(good_shard(tmp_path / f"good-{i}.tar", f"g{i}", 3, seed=10 * i)) for i in range(3)]
    expected = {bad: [(f"{bad}@0", "corrupt_tar")], gone: [(gone, "unreadable_shard")]}
    for url in (bad, gone):
        def judged(rejects: list[dict]) -> list[tuple[str, str]]:
            return [(e["key"], e["reason"]) for e in rejects if e["url"] == url]

        got = {"cache": judged([e for _, rejects in read_shard(url, "k") for e in rejects])}
        kept, reads = evaluate.read_eval_samples([url, *good], None, max_bad_fraction=0.25)
        assert len(kept) == 9
        got["evaluate"] = judged(reads.rejects)
        images, reads = _teacher_read([url, *good], 64, max_bad_fraction=0.25)
        assert images.shape == (9, 3, 64, 64)
        got["teacher"] = judged(reads.rejects)
        kind, rejects = synthesize.shard_kind(url)
        assert kind == "unreadable"
        got["synthesize"] = judged(rejects)
        for stage, entries in got.items():
            assert entries == expected[url], (stage, url)
        # 1 bad sample of 10, or an unreadable shard counted as an average one (3 of 12)
        assert reads.bad_fraction == pytest.approx(0.1 if url == bad else 0.25)
        assert reads.metrics("train_")["train_unreadable_shards"] == (url == gone)
