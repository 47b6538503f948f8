"""ImageNet input pipeline: crops, flips, labels, sharding, resume, and the real reading path.

The real path is exercised end to end: the test writes a tiny TFDS dataset of JPEG-encoded images
as array_record with TFDS's own writer (``GeneratorBasedBuilder.download_and_prepare`` with
``file_format="array_record"`` — this works without TensorFlow when the images are given as
encoded JPEG bytes), then reads it back through ``tfds.data_source`` and grain.
"""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from experiments.imagenet import input_pipeline as ip

NUM_CLASSES = 4
# One flat colour per class: JPEG keeps flat colours almost exactly, so labels can be checked
# against decoded pixels.
COLOURS = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [240, 240, 240]], np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


class TinyImagenetLike(tfds.core.GeneratorBasedBuilder):
    """imagenet2012's features (JPEG image + ClassLabel), a dozen small images."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(12, 0),
            "validation": self._generate_examples(7, 1),
        }

    def _generate_examples(self, n, offset):
        for i in range(n):
            label = (i + offset) % NUM_CLASSES
            h, w = 40 + 3 * i, 56 - 2 * i  # varied sizes and aspect ratios
            pixels = np.broadcast_to(COLOURS[label], (h, w, 3)).copy()
            yield i, {"image": io.BytesIO(_jpeg(pixels)), "label": label}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    TinyImagenetLike(data_dir=str(path), file_format="array_record").download_and_prepare()
    return str(path)


def _label_of_pixels(image_SxSx3: np.ndarray) -> int:
    centre = image_SxSx3[image_SxSx3.shape[0] // 2, image_SxSx3.shape[1] // 2].astype(int)
    return int(np.argmin(np.abs(COLOURS.astype(int) - centre).sum(-1)))


# ---- fail fast -------------------------------------------------------------------------------


def test_missing_imagenet_fails_with_the_build_command(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        ip.data_source("imagenet2012", "train", str(tmp_path))
    message = str(info.value)
    assert "tfds build imagenet2012" in message
    assert "--manual_dir=" in message
    assert "--file_format=array_record" in message
    assert f"--data_dir={tmp_path}" in message
    assert not any(tmp_path.rglob("*.tar"))  # nothing was downloaded


# ---- the real reading path -------------------------------------------------------------------


def test_data_source_yields_jpeg_bytes_and_labels(data_dir):
    source = ip.data_source("tiny_imagenet_like", "train", data_dir)
    assert len(source) == 12
    example = source[0]
    assert isinstance(example["image"], bytes) and example["image"][:2] == b"\xff\xd8"  # JPEG
    decoded = np.asarray(ip.decode_image(example["image"]))
    assert decoded.shape[2] == 3
    assert int(example["label"]) == _label_of_pixels(decoded)


def test_train_batches_from_array_record(data_dir):
    source = ip.data_source("tiny_imagenet_like", "train", data_dir)
    it = ip.train_batches(source, batch_size=4, image_size=24, seed=3, num_threads=2)
    batches = [next(it) for _ in range(6)]  # 24 examples: two epochs of 12
    for batch in batches:
        assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32
        for image, label in zip(batch["image"], batch["label"], strict=True):
            assert _label_of_pixels(image) == label  # labels stay with their images
    epoch1 = np.concatenate([b["label"] for b in batches[:3]])
    epoch2 = np.concatenate([b["label"] for b in batches[3:]])
    expected = sorted(int(source[i]["label"]) for i in range(12))
    assert sorted(epoch1.tolist()) == expected and sorted(epoch2.tolist()) == expected


def test_train_batches_resume_exactly(data_dir):
    source = ip.data_source("tiny_imagenet_like", "train", data_dir)
    full = ip.train_batches(source, batch_size=4, image_size=16, seed=0, num_threads=2)
    full = [next(full) for _ in range(5)]
    resumed = ip.train_batches(
        source, batch_size=4, image_size=16, seed=0, start_step=3, num_threads=2
    )
    for expected in full[3:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])


def test_per_process_shards_are_disjoint(data_dir):
    source = ip.data_source("tiny_imagenet_like", "validation", data_dir)  # 7 examples
    seen = []
    for process in range(2):
        batches = list(
            ip.eval_batches(
                source,
                batch_size=3,
                image_size=16,
                process_index=process,
                process_count=2,
                num_threads=2,
            )
        )
        assert len(batches) == ip.num_eval_batches(7, 3, 2) == 2  # same count on every process
        for batch in batches:
            for image, label, mask in zip(
                batch["image"], batch["label"], batch["mask"], strict=True
            ):
                if mask:
                    seen.append(int(label))
                    assert _label_of_pixels(image) == label
                else:
                    assert not image.any() and label == 0  # padding
    assert sorted(seen) == sorted(int(source[i]["label"]) for i in range(7))


def test_train_batches_rejects_bad_batch(data_dir):
    source = ip.data_source("tiny_imagenet_like", "validation", data_dir)
    with pytest.raises(ValueError, match="batch_size"):
        ip.train_batches(source, batch_size=0, image_size=8, seed=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ip.train_batches(source, batch_size=8, image_size=8, seed=0)


# ---- crops and flips -------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(100, 100), (375, 500), (500, 333), (31, 47)])
def test_random_resized_crop_box_properties(height, width):
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = ip.random_resized_crop_box(height, width, rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        assert h >= 1 and w >= 1
        area = h * w / (height * width)
        assert 0.08 * 0.85 <= area <= 1.0  # rounding of h and w on small images
        assert 3 / 4 * 0.85 <= w / h <= 4 / 3 / 0.85


def test_random_resized_crop_box_falls_back_to_a_clamped_centre_crop():
    rng = np.random.default_rng(0)
    # A 1000×10 image: no box with aspect ratio in [3/4, 4/3] and area ≥ 8% fits.
    top, left, h, w = ip.random_resized_crop_box(1000, 10, rng)
    assert (w, h) == (10, round(10 / (3 / 4)))
    assert (top, left) == ((1000 - h) // 2, 0)


def test_center_crop_box_is_224_of_256():
    # Shorter side 256 → crop 224 centred.
    assert ip.center_crop_box(256, 320, 224, 256) == (16, 48, 224, 224)
    # Shorter side 512 → crop 448 in original pixels (resized to 224 afterwards).
    assert ip.center_crop_box(600, 512, 224, 256) == (76, 32, 448, 448)


def test_crop_and_resize_takes_the_box():
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, 20:40] = 255  # a white band in the middle third
    image = Image.fromarray(pixels)
    # Bicubic resampling looks a little past the box edge, so boxes keep a margin from the band.
    left = ip.crop_and_resize(image, (0, 0, 40, 14), 8)
    band = ip.crop_and_resize(image, (5, 24, 30, 12), 8)
    assert left.shape == (8, 8, 3) and left.max() == 0
    assert band.min() == 255


def test_preprocess_train_flips_half_the_time_exactly_as_drawn():
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:, :20] = 255  # white band on the left: a flip moves it to the right
    example = {"image": _jpeg(pixels), "label": np.int64(3)}
    flips = []
    for seed in range(24):
        out = ip.preprocess_train(example, np.random.default_rng(seed), 16)
        assert out["label"].dtype == np.int32 and int(out["label"]) == 3
        replay = np.random.default_rng(seed)  # the same draws, by hand
        image = ip.decode_image(example["image"])
        box = ip.random_resized_crop_box(image.height, image.width, replay)
        expected = ip.crop_and_resize(image, box, 16)
        flipped = replay.random() < 0.5
        np.testing.assert_array_equal(out["image"], expected[:, ::-1] if flipped else expected)
        flips.append(flipped)
    assert any(flips) and not all(flips)


def test_preprocess_eval_is_deterministic_centre_crop():
    pixels = np.zeros((64, 96, 3), np.uint8)
    pixels[:, 40:56] = 255  # a centred white stripe of width 16
    example = {"image": _jpeg(pixels), "label": 7}
    out = ip.preprocess_eval(example, 32, 64)  # keeps the central 32×32 of the original
    again = ip.preprocess_eval(example, 32, 64)
    np.testing.assert_array_equal(out["image"], again["image"])
    assert out["image"].shape == (32, 32, 3)
    assert out["image"][16, 16].min() > 200 and out["image"][16, 1].max() < 60
    assert int(out["label"]) == 7 and int(out["mask"]) == 1


def test_grayscale_jpeg_decodes_to_rgb():
    buf = io.BytesIO()
    Image.fromarray(np.full((10, 12), 128, np.uint8), mode="L").save(buf, format="JPEG")
    assert np.asarray(ip.decode_image(buf.getvalue())).shape == (10, 12, 3)


# ---- device side -----------------------------------------------------------------------------


def test_normalize_images():
    mean = np.round(np.array(ip.MEAN_RGB)).astype(np.uint8)
    images = np.broadcast_to(mean, (2, 4, 4, 3))
    out = ip.normalize_images(jnp.asarray(images), jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), 0.0, atol=0.02)
    white = ip.normalize_images(jnp.full((1, 1, 1, 3), 255, jnp.uint8))
    np.testing.assert_allclose(
        white[0, 0, 0], (255 - np.array(ip.MEAN_RGB)) / np.array(ip.STDDEV_RGB), rtol=1e-6
    )


def test_synthetic_batch():
    batch = ip.synthetic_batch(jax.random.key(0), 6, 8, 10)
    assert batch["image"].shape == (6, 8, 8, 3) and batch["image"].dtype == jnp.uint8
    assert batch["label"].shape == (6,) and batch["label"].dtype == jnp.int32
    assert 0 <= int(batch["label"].min()) and int(batch["label"].max()) < 10
    assert int(batch["image"].max()) > 200  # spans the pixel range


# ---- the trainer's iterators on the same files -------------------------------------------------


def test_trainer_iterators_read_the_tfds_dataset(data_dir):
    from configs.imagenet import tiny
    from experiments.common.mesh import make_data_mesh
    from experiments.imagenet import train

    config = tiny.get_config("0.8,0.5")
    config.data.name = "tiny_imagenet_like"
    config.data.path = data_dir
    config.image_size = 16
    config.batch_size = 4
    config.eval_batch_size = 4
    config.num_eval_examples = 5
    mesh = make_data_mesh()
    batch = next(train.train_iterator(config, mesh, start_step=0))
    assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (4, 16, 16, 3)
    images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
    assert [_label_of_pixels(x) for x in images] == labels.tolist()
    evals = list(train.eval_iterator(config, mesh))
    assert len(evals) == 2  # 5 examples of the 7, batches of 4
    assert int(sum(np.asarray(b["mask"]).sum() for b in evals)) == 5
