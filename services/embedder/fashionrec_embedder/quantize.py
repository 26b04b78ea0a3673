"""Static int8 quantisation (QDQ) of the exported ONNX model, for VNNI CPUs.

ONNX Runtime's `quantize_static` inserts QuantizeLinear/DequantizeLinear pairs around the
convolutions (weights int8 per output channel, activations uint8 per tensor, ranges from
calibration images); ONNX Runtime and OpenVINO both run the QDQ graph with int8 kernels.

Calibration images are preprocessed exactly like serving (JPEG bytes → decode_image with draft →
image_to_array with the backbone's normalisation). They come from `calibration_dir` (a folder of
shop images: best, they look like what will be served) or, by default, from `synthetic_jpegs`:
simple garment-like drawings made here (deterministic, so every machine builds the same model).

int8 vectors differ slightly from fp32 ones, so an int8 model serves its own model version
(`<fp32 version>-int8`, plus `-c<hash>` of the calibration images when they come from
`calibration_dir`): an index never mixes vectors of two numeric paths.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from pathlib import Path

import numpy as np
from fashionrec_shared.files import atomic_path
from PIL import Image, ImageDraw, ImageFilter

from fashionrec_embedder.backbones import WeightsError
from fashionrec_embedder.preprocess import (
    DEFAULT_MAX_PIXELS,
    Normalisation,
    decode_image,
    image_to_array,
)
from fashionrec_embedder.runtimes import INPUT_NAME

log = logging.getLogger("fashionrec.embedder.quantize")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SYNTHETIC_SEED = 20_240_611  # fixed: the same calibration (so the same int8 model) everywhere


def calibration_files(directory: Path, count: int) -> list[Path]:
    files = sorted(
        p for p in Path(directory).expanduser().rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise WeightsError(f"calibration_dir {directory} holds no images ({IMAGE_SUFFIXES})")
    step = max(1, len(files) // count)  # spread over the folder, not its first files
    return files[::step][:count]


def calibration_tag(directory: Path | None, count: int) -> str:
    """The model-version suffix of an int8 model calibrated this way."""
    if directory is None:
        return "-int8"
    digest = hashlib.sha256()
    for path in calibration_files(directory, count):
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return f"-int8-c{digest.hexdigest()[:8]}"


def _garment(rnd: random.Random, size: int) -> Image.Image:
    """A garment-like drawing: a patterned silhouette (top or bottom) on a light background."""
    bg = tuple(rnd.randint(215, 250) for _ in range(3))
    colour = tuple(rnd.randint(20, 235) for _ in range(3))
    accent = tuple(255 - c for c in colour)
    img = Image.new("RGB", (size, size), bg)
    # The pattern, then the silhouette as a mask over it.
    pattern = Image.new("RGB", (size, size), colour)
    paint = ImageDraw.Draw(pattern)
    step = rnd.randint(size // 24, size // 8)
    kind = rnd.choice(("plain", "stripes", "dots", "checks"))
    for i in range(0, size, step * 2):
        if kind in ("stripes", "checks"):
            paint.rectangle((0, i, size, i + step // 2), fill=accent)
        if kind == "checks":
            paint.rectangle((i, 0, i + step // 2, size), fill=accent)
        if kind == "dots":
            for j in range(0, size, step * 2):
                paint.ellipse((i, j, i + step // 2, j + step // 2), fill=accent)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    s = size
    if rnd.random() < 0.5:  # a top with sleeves
        sleeve = rnd.uniform(0.08, 0.2) * s
        draw.polygon(
            [(0.3 * s, 0.2 * s), (0.7 * s, 0.2 * s), (0.72 * s, 0.85 * s), (0.28 * s, 0.85 * s)],
            fill=255,
        )
        draw.polygon(
            [
                (0.3 * s, 0.2 * s),
                (0.3 * s - sleeve, 0.55 * s),
                (0.3 * s - sleeve / 2, 0.58 * s),
                (0.31 * s, 0.35 * s),
            ],
            fill=255,
        )
        draw.polygon(
            [
                (0.7 * s, 0.2 * s),
                (0.7 * s + sleeve, 0.55 * s),
                (0.7 * s + sleeve / 2, 0.58 * s),
                (0.69 * s, 0.35 * s),
            ],
            fill=255,
        )
    else:  # trousers or a skirt
        flare = rnd.uniform(0.0, 0.2) * s
        draw.polygon(
            [
                (0.35 * s, 0.15 * s),
                (0.65 * s, 0.15 * s),
                (0.68 * s + flare, 0.9 * s),
                (0.32 * s - flare, 0.9 * s),
            ],
            fill=255,
        )
        if rnd.random() < 0.5:
            draw.polygon(
                [
                    (0.48 * s, 0.4 * s),
                    (0.52 * s, 0.4 * s),
                    (0.53 * s, 0.9 * s),
                    (0.47 * s, 0.9 * s),
                ],
                fill=0,
            )
    img.paste(pattern, (0, 0), mask.filter(ImageFilter.GaussianBlur(1)))
    angle = rnd.uniform(-8, 8)
    return img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=bg)


def synthetic_jpegs(count: int, seed: int = SYNTHETIC_SEED, size: int = 384) -> list[bytes]:
    """JPEG bytes of `count` deterministic garment-like drawings (the default calibration)."""
    rnd = random.Random(seed)
    out: list[bytes] = []
    for _ in range(count):
        buf = io.BytesIO()
        _garment(rnd, size).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def calibration_batch(
    image_size: int,
    norm: Normalisation,
    count: int,
    directory: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """(count, 3, S, S) float32 inputs, preprocessed exactly like served images."""
    if directory is not None:
        blobs = [p.read_bytes() for p in calibration_files(directory, count)]
    else:
        blobs = synthetic_jpegs(count)
    arrays = [
        image_to_array(
            decode_image(b, max_pixels=max_pixels, draft_size=image_size), image_size, norm=norm
        )
        for b in blobs
    ]
    return np.stack(arrays)


def quantize_onnx(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> Path:
    """Write the static QDQ int8 model of `fp32_path` to `int8_path` (atomically)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        """The calibration batch in chunks of 8 images."""

        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._chunks, None)

        def rewind(self) -> None:
            self._chunks = iter(
                {INPUT_NAME: calibration[i : i + 8]} for i in range(0, len(calibration), 8)
            )

    with atomic_path(int8_path) as tmp, atomic_path(int8_path.with_suffix(".pre.onnx")) as pre:
        # Shape inference + graph optimisation (folds BatchNorm into the convolutions) first, so
        # the quantised convolutions are the fused ones the runtimes execute.
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(tmp),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # The small embedding heads (Gemm/MatMul) and the normalisation stay float: they
            # cost nothing and keep the head embedding closest to fp32.
            # Clip: EfficientNet-Lite's ReLU6.
            op_types_to_quantize=[
                "Conv",
                "Add",
                "Relu",
                "Clip",
                "MaxPool",
                "GlobalAveragePool",
                "ReduceMean",
            ],
        )
    int8_path.with_suffix(".pre.onnx").unlink(missing_ok=True)
    return int8_path
