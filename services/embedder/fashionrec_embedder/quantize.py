"""Static int8 quantisation (QDQ) of the exported ONNX model, for VNNI CPUs.

ONNX Runtime's `quantize_static` inserts QuantizeLinear/DequantizeLinear pairs around the
convolutions (weights int8 per output channel, activations uint8 per tensor, ranges from
calibration images); ONNX Runtime and OpenVINO both run the QDQ graph with int8 kernels.

Calibration images are preprocessed exactly like serving (JPEG bytes → decode_image with draft →
image_to_array). They come from `calibration_dir` (a folder of shop images: best, they look like
what will be served) or, by default, from the synthetic garments of `fashionrec_cli.synthetic`
(deterministic; present wherever the CLI is installed, e.g. `fashionrec up`).

int8 vectors differ slightly from fp32 ones, so an int8 model serves its own model version
(`<fp32 version>-int8`, plus `-c<hash>` of the calibration images when they come from
`calibration_dir`): an index never mixes vectors of two numeric paths.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np

from fashionrec_embedder.preprocess import decode_image, image_to_array
from fashionrec_embedder.runtimes import atomic_path
from fashionrec_embedder.weights import WeightsError

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


def synthetic_jpegs(count: int, seed: int = SYNTHETIC_SEED, size: int = 512) -> list[bytes]:
    """JPEG bytes of synthetic garments and perturbed 'photos' of them (needs fashionrec_cli)."""
    try:
        from fashionrec_cli.synthetic import generate_catalog, make_garment, perturb
    except ImportError as exc:
        raise WeightsError(
            "precision int8 needs calibration images: set FASHIONREC_EMBEDDER_CALIBRATION_DIR "
            "to a folder of shop images (or install fashionrec-cli for synthetic ones)"
        ) from exc
    out: list[bytes] = []
    for i, spec in enumerate(generate_catalog(count, seed=seed, size=size)):
        img = make_garment(spec)
        if i % 2:
            img = perturb(img, seed + i)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def calibration_batch(
    image_size: int, count: int, directory: Path | None = None, max_pixels: int = 40_000_000
) -> np.ndarray:
    """(count, 3, S, S) float32 inputs, preprocessed exactly like served images."""
    if directory is not None:
        blobs = [p.read_bytes() for p in calibration_files(directory, count)]
    else:
        blobs = synthetic_jpegs(count)
    arrays = [
        image_to_array(decode_image(b, max_pixels=max_pixels, draft_size=image_size), image_size)
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

    from fashionrec_embedder.runtimes import INPUT_NAME

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
            op_types_to_quantize=["Conv", "Add", "Relu", "MaxPool", "GlobalAveragePool"],
        )
    int8_path.with_suffix(".pre.onnx").unlink(missing_ok=True)
    return int8_path
