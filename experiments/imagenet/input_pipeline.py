"""ImageNet input: TFDS ``imagenet2012`` as array_record, read with ``tfds.data_source`` and grain.

No TensorFlow at run time: ``tfds.data_source`` reads the prepared array_record files and parses
the examples with NumPy; images stay JPEG bytes (``tfds.decode.SkipDecoding``) and are decoded and
augmented here with Pillow, inside grain (threads, optionally worker processes).

Per example (host, uint8):

* train: random-resized-crop (area ∈ [8%, 100%] of the image, aspect ratio ∈ [3/4, 4/3], 10
  attempts, else a central crop with the ratio clamped), resized to ``image_size``² (bicubic), then
  a horizontal flip with probability 1/2;
* eval: the central ``image_size/resize_size`` (224/256) of the shorter side, resized to
  ``image_size``² — the same pixels as "resize the shorter side to 256, centre-crop 224", in one
  resampling.

Batches are ``{"image": uint8[b, S, S, 3], "label": int32[b]}`` (+ ``"mask"`` for eval, 0 on
padding) per process; the mean/std normalisation (:func:`normalize_images`) and the optional cast to
bfloat16 run on the device inside the jitted step, so only uint8 crosses the host→device link.

Sharding: process ``i`` of ``n`` reads examples ``i, i + n, i + 2n, ...`` of the split; the train
stream is a deterministic function of (seed, step), so resuming at step ``s`` starts at batch ``s``
and reproduces the uninterrupted run.

``data.name = "synthetic"`` bypasses all of this: :func:`synthetic_batch` draws uniform random
uint8 images and labels on the device (throughput runs and tests).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

#: Per-channel RGB mean and standard deviation of ImageNet, in [0, 255] pixel units.
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

TFDS_NAME = "imagenet2012"
NUM_CLASSES = 1000

Batch = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------------
# Locating the data (fail fast, never download).
# --------------------------------------------------------------------------------------------------


def prepare_command(name: str, data_dir: str | None) -> str:
    """The command that prepares ``name`` as array_record under ``data_dir``."""
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    manual = "<dir with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar>"
    return (
        f"tfds build {name} --manual_dir={manual} --file_format=array_record --data_dir={data_dir}"
    )


def find_prepared(name: str, data_dir: str | None) -> Any:
    """Returns the TFDS builder of a prepared array_record dataset, or fails within seconds.

    Only the local ``data_dir`` is inspected: nothing is downloaded and GCS is not consulted.

    Args:
      name: TFDS name, e.g. "imagenet2012".
      data_dir: TFDS data directory (``None``: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

    Raises:
      FileNotFoundError: the dataset is not prepared there; the message holds the ``tfds build``
        command (imagenet2012 needs the manually downloaded tars, and TensorFlow only for this
        preparation step).
      ValueError: it is prepared in another file format than array_record.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    if not (builder.data_path / "dataset_info.json").exists():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_path}. Prepare it once (this "
            "step needs `pip install tensorflow`; training does not):\n  "
            + prepare_command(name, data_dir)
        )
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format != "array_record":
        raise ValueError(
            f"TFDS dataset {name!r} in {builder.data_path} is stored as {file_format!r}; random "
            "access needs array_record. Re-prepare it with:\n  " + prepare_command(name, data_dir)
        )
    return builder


def data_source(name: str, split: str, data_dir: str | None) -> Sequence[Mapping[str, Any]]:
    """Random-access source of ``{"image": jpeg bytes, "label": int}`` examples.

    Raises:
      FileNotFoundError / ValueError: see :func:`find_prepared`.
    """
    import tensorflow_datasets as tfds

    find_prepared(name, data_dir)
    return tfds.data_source(
        name,
        split=split,
        data_dir=data_dir,
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )


# --------------------------------------------------------------------------------------------------
# Per-example preprocessing (host, numpy / Pillow).
# --------------------------------------------------------------------------------------------------


def decode_image(image_bytes: bytes) -> Image.Image:
    """Decodes JPEG (or PNG) bytes to an RGB Pillow image (grayscale / CMYK are converted)."""
    image = Image.open(io.BytesIO(image_bytes))
    return image.convert("RGB") if image.mode != "RGB" else image


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Samples an Inception-style crop box (top, left, crop_height, crop_width).

    Each attempt draws an area fraction a ~ U(scale) and an aspect ratio r (w/h) log-uniform in
    ``ratio``, i.e. w = round(sqrt(a·H·W·r)), h = round(sqrt(a·H·W / r)); the first box that fits
    is placed uniformly. After ``attempts`` failures the crop is central, the whole image with its
    aspect ratio clamped into ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(
    height: int, width: int, image_size: int, resize_size: int
) -> tuple[int, int, int, int]:
    """The box (top, left, h, w) that "resize shorter side to ``resize_size``, centre-crop
    ``image_size``" keeps, in original pixel coordinates: a centred square of side
    ``round(min(H, W) · image_size / resize_size)``."""
    side = max(1, round(min(height, width) * image_size / resize_size))
    return (height - side) // 2, (width - side) // 2, side, side


def crop_and_resize(
    image: Image.Image, box: tuple[int, int, int, int], image_size: int
) -> np.ndarray:
    """Crops ``box`` = (top, left, h, w) and resizes it to image_size² (bicubic): uint8[S, S, 3]."""
    top, left, h, w = box
    resized = image.resize(
        (image_size, image_size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)
    )
    return np.asarray(resized, dtype=np.uint8)


def preprocess_train(
    example: Mapping[str, Any], rng: np.random.Generator, image_size: int
) -> dict[str, np.ndarray]:
    """Train augmentation of one ``{"image": bytes, "label": int}`` example.

    Returns:
      ``{"image": uint8[S, S, 3], "label": int32[]}``: random-resized crop, random horizontal flip.
    """
    image = decode_image(example["image"])
    box = random_resized_crop_box(image.height, image.width, rng)
    pixels_SxSx3 = crop_and_resize(image, box, image_size)
    if rng.random() < 0.5:
        pixels_SxSx3 = pixels_SxSx3[:, ::-1]
    return {"image": np.ascontiguousarray(pixels_SxSx3), "label": _label(example["label"])}


def preprocess_eval(
    example: Mapping[str, Any], image_size: int, resize_size: int
) -> dict[str, np.ndarray]:
    """Eval transform of one example: centre crop as :func:`center_crop_box`, no randomness."""
    image = decode_image(example["image"])
    box = center_crop_box(image.height, image.width, image_size, resize_size)
    return {
        "image": crop_and_resize(image, box, image_size),
        "label": _label(example["label"]),
        "mask": np.asarray(1, np.int32),
    }


def _label(label: Any) -> np.ndarray:
    return np.asarray(label, dtype=np.int32)


# --------------------------------------------------------------------------------------------------
# Datasets (grain).
# --------------------------------------------------------------------------------------------------


def _read_options(num_threads: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)


def _maybe_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    if num_workers > 0:
        return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds


def train_batches(
    source: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
    num_threads: int = 16,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """Endless, reshuffled-every-epoch stream of augmented train batches for this process.

    Batch ``k`` of the stream is a pure function of (seed, k, process_index, process_count), so
    ``start_step = s`` resumes exactly.

    Args:
      source: random-access examples (e.g. :func:`data_source`).
      batch_size: per-process batch size b (global batch / process_count).
      image_size: crop side S.
      seed: shuffling and augmentation seed.
      process_index, process_count: this process's shard of the examples.
      start_step: index of the first batch to yield.
      num_threads: grain reader threads.
      num_workers: grain worker processes (0: none).

    Yields:
      ``{"image": uint8[b, S, S, 3], "label": int32[b]}``.

    Raises:
      ValueError: non-positive ``batch_size``, or a shard smaller than one batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) < batch_size:
        raise ValueError(
            f"process shard has {len(ds)} examples, fewer than one batch (batch_size={batch_size})"
        )
    ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds.random_map(lambda ex, rng: preprocess_train(ex, rng, image_size), seed=seed + 1)
    ds = ds.batch(batch_size, drop_remainder=True)[start_step:]
    it = _maybe_workers(ds.to_iter_dataset(_read_options(num_threads)), num_workers)
    return iter(it)


def num_eval_batches(num_examples: int, batch_size: int, process_count: int = 1) -> int:
    """Batches per process that cover ``num_examples`` once: ceil(N / (b · processes))."""
    return -(-num_examples // (batch_size * process_count))


def eval_batches(
    source: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    image_size: int,
    resize_size: int = 256,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 16,
    num_examples: int | None = None,
) -> Iterator[Batch]:
    """One pass over the split (or its first ``num_examples``), each example once over processes.

    Every process yields the same number of batches (:func:`num_eval_batches`); the shards are
    padded with ``mask = 0`` examples (zero image, label 0) so the last batch is full.

    Yields:
      ``{"image": uint8[b, S, S, 3], "label": int32[b], "mask": int32[b]}``.
    """
    total = len(source) if num_examples is None else min(len(source), num_examples)
    shard = grain.MapDataset.source(source)[:total][process_index::process_count]
    padded = num_eval_batches(total, batch_size, process_count) * batch_size
    pad = {
        "image": np.zeros((image_size, image_size, 3), np.uint8),
        "label": np.asarray(0, np.int32),
        "mask": np.asarray(0, np.int32),
    }

    def load(i: int) -> dict[str, np.ndarray]:
        return preprocess_eval(shard[i], image_size, resize_size) if i < len(shard) else pad

    ds = grain.MapDataset.range(padded).map(load).batch(batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset(_read_options(num_threads)))


# --------------------------------------------------------------------------------------------------
# Device side.
# --------------------------------------------------------------------------------------------------


def normalize_images(images_BxSxSx3: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """(pixels − mean) / std per channel, in ``dtype`` (float32 or bfloat16)."""
    mean = jnp.asarray(MEAN_RGB, jnp.float32)
    std = jnp.asarray(STDDEV_RGB, jnp.float32)
    return ((images_BxSxSx3.astype(jnp.float32) - mean) / std).astype(dtype)


def synthetic_batch(
    key: jax.Array, batch_size: int, image_size: int, num_classes: int
) -> dict[str, jax.Array]:
    """Random uint8 images and labels, made on the device (jit it with an output sharding).

    Returns:
      ``{"image": uint8[B, S, S, 3], "label": int32[B]}``.
    """
    key_image, key_label = jax.random.split(key)
    images = jax.random.randint(key_image, (batch_size, image_size, image_size, 3), 0, 256)
    labels = jax.random.randint(key_label, (batch_size,), 0, num_classes)
    return {"image": images.astype(jnp.uint8), "label": labels.astype(jnp.int32)}
