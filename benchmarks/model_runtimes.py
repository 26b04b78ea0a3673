"""Embedder inference runtimes on this machine: torch (NCHW, channels_last), ONNX Runtime and
OpenVINO in fp32, and static int8 (QDQ) on both; all measured in one run on the same inputs.

For each runtime: images/s at batch 1, 8 and 16 (median of timed calls), the minimum cosine of
its embeddings against torch default fp32, and the ratio to torch default / channels_last. Then
the decode/preprocess/inference time shares for 800x800 JPEGs through `Embedder.embed_bytes`
(decode overlapped or inline), and the int8 top-5 agreement on a synthetic catalogue: the index
is `--items` garments, the queries are perturbed photos of `--queries` of them, and

    agreement = mean over queries of |top5_int8 ∩ top5_fp32| / 5   (exact cosine search).

    .venv/bin/python benchmarks/model_runtimes.py [--weights random:0] [--size 224]

Prints a table and writes benchmarks/results/model_runtimes.json. Bounded: ~2-3 min on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from fashionrec_cli.synthetic import generate_catalog, make_garment, perturb
from fashionrec_embedder.model import Embedder
from fashionrec_embedder.preprocess import decode_image, image_to_array
from fashionrec_embedder.runtimes import OpenVinoRuntime, OrtRuntime, TorchRuntime, cpu_cores
from fashionrec_embedder.settings import EmbedderSettings
from PIL import Image

RESULTS = Path(__file__).parent / "results" / "model_runtimes.json"


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def throughput(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, budget_s: float) -> float:
    """Median images/s of `run(x)` over calls for about `budget_s` (at least 3 calls)."""
    run(x)  # warm-up
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - started < budget_s and len(times) < 50):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return len(x) / statistics.median(times)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1)))


def top5_agreement(index_a: np.ndarray, query_a: np.ndarray, index_b, query_b) -> float:
    top_a = np.argsort(-(query_a @ index_a.T), axis=1)[:, :5]
    top_b = np.argsort(-(query_b @ index_b.T), axis=1)[:, :5]
    return float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(top_a, top_b, strict=True)]))


def self_hit(index: np.ndarray, queries: np.ndarray) -> float:
    """Fraction of queries (a photo of item i) whose top 5 contains item i."""
    top = np.argsort(-(queries @ index.T), axis=1)[:, :5]
    return float(np.mean([i in row for i, row in enumerate(top)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--backbone", default="resnet50", help="see benchmarks/quality.py too")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--budget", type=float, default=1.5, help="seconds per measurement")
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = args.threads or cpu_cores()
    torch.set_num_threads(threads)
    bench_started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="fashionrec-rt-") as tmp:
        base = {
            "backbone": args.backbone,
            "weights": args.weights,
            "device": "cpu",
            "image_size": args.size,
        }
        base |= {"cache_dir": Path(tmp), "threads": threads, "batch_size": 16}
        fp32 = Embedder(EmbedderSettings(**base, runtime="onnxruntime"))
        int8 = Embedder(EmbedderSettings(**base, runtime="onnxruntime", precision="int8"))
        t = time.perf_counter()
        fp32_path = fp32.prepare()
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        int8_path = int8.prepare()
        quantize_s = time.perf_counter() - t
        assert fp32_path and int8_path
        size = fp32.image_size

        # The same 16 real (synthetic garment) inputs for every runtime.
        specs = generate_catalog(args.items, seed=11, size=256)
        inputs = np.stack(
            [
                image_to_array(decode_image(jpeg(make_garment(s)), draft_size=size), size)
                for s in specs[:16]
            ]
        )
        module = fp32.build_module()
        runtimes: dict[str, Callable[[np.ndarray], np.ndarray]] = {
            "torch default NCHW": TorchRuntime(module, torch.device("cpu"), channels_last=False),
        }
        reference = runtimes["torch default NCHW"](inputs)
        rows: list[dict[str, object]] = []

        def measure(name: str, run: Callable[[np.ndarray], np.ndarray], precision: str) -> None:
            speeds = {b: round(throughput(run, inputs[:b], args.budget), 1) for b in (1, 8, 16)}
            rows.append(
                {
                    "runtime": name,
                    "precision": precision,
                    "images_per_s": speeds,
                    "min_cosine_vs_torch": round(min_cosine(run(inputs), reference), 5),
                }
            )
            print(f"  measured {name}: {speeds}", flush=True)

        measure("torch default NCHW", runtimes["torch default NCHW"], "fp32")
        del runtimes
        measure("torch channels_last", TorchRuntime(module, torch.device("cpu")), "fp32")
        measure("onnxruntime", OrtRuntime(fp32_path, threads=threads), "fp32")
        ov_fp32 = OpenVinoRuntime(fp32_path, threads=threads)
        measure("openvino", ov_fp32, "fp32")
        ort_int8 = OrtRuntime(int8_path, threads=threads)
        measure("onnxruntime", ort_int8, "int8")
        ov_int8 = OpenVinoRuntime(int8_path, threads=threads)
        measure("openvino", ov_int8, "int8")
        del module

        torch_default = rows[0]["images_per_s"][16]  # type: ignore[index]
        torch_cl = rows[1]["images_per_s"][16]  # type: ignore[index]
        for row in rows:
            ips = row["images_per_s"][16]  # type: ignore[index]
            row["x_torch_default_b16"] = round(ips / torch_default, 2)
            row["x_channels_last_b16"] = round(ips / torch_cl, 2)

        # Stage shares: 800x800 JPEGs through the serving path (auto runtime), inline vs overlap.
        photos = [
            jpeg(perturb(make_garment(s), i).resize((800, 800)))
            for i, s in enumerate(generate_catalog(48, seed=5, size=800))
        ]
        stages: dict[str, object] = {}
        for decode_threads in (0, 1):
            model = Embedder(EmbedderSettings(**base, decode_threads=decode_threads))
            model.load()
            model.embed_bytes(photos[:16])
            model.reset_stages()
            t = time.perf_counter()
            out = model.embed_bytes(photos)
            wall = time.perf_counter() - t
            assert all(isinstance(v, np.ndarray) for v in out)
            stages[f"decode_threads={decode_threads}"] = {
                "runtime": model.runtime,
                "images_per_s": round(len(photos) / wall, 1),
                "seconds": {k: round(v, 3) for k, v in model.stage_seconds.items()},
                "shares": {k: round(v, 3) for k, v in model.stage_shares().items()},
            }

        # int8 top-5 agreement with fp32 (OpenVINO for both: the fastest pair).
        def embed_all(run: Callable[[np.ndarray], np.ndarray], arrays: np.ndarray) -> np.ndarray:
            return np.concatenate([run(arrays[i : i + 16]) for i in range(0, len(arrays), 16)])

        index_in = np.stack(
            [
                image_to_array(decode_image(jpeg(make_garment(s)), draft_size=size), size)
                for s in specs
            ]
        )
        query_in = np.stack(
            [
                image_to_array(
                    decode_image(jpeg(perturb(make_garment(s), 1000 + i)), draft_size=size), size
                )
                for i, s in enumerate(specs[: args.queries])
            ]
        )
        idx32, q32 = embed_all(ov_fp32, index_in), embed_all(ov_fp32, query_in)
        idx8, q8 = embed_all(ov_int8, index_in), embed_all(ov_int8, query_in)
        agreement = top5_agreement(idx32, q32, idx8, q8)
        hit32, hit8 = self_hit(idx32, q32), self_hit(idx8, q8)
        int8_cos = min(min_cosine(idx8, idx32), min_cosine(q8, q32))

    figures = {
        "weights": args.weights,
        "image_size": size,
        "threads": threads,
        "onnx_export_s": round(export_s, 1),
        "int8_quantize_s": round(quantize_s, 1),
        "runtimes": rows,
        "stages_800px_jpeg": stages,
        "int8_top5_agreement": round(agreement, 3),
        "int8_min_cosine_catalogue": round(int8_cos, 4),
        "top5_self_hit_fp32": round(hit32, 3),
        "top5_self_hit_int8": round(hit8, 3),
        "items": args.items,
        "queries": args.queries,
        "seconds": round(time.perf_counter() - bench_started, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")

    print(
        f"\n{args.backbone} {args.weights} {size}px, {threads} threads "
        f"(export {export_s:.1f}s, int8 quantise {quantize_s:.1f}s)"
    )
    header = f"{'runtime':<22}{'prec':<6}{'b1':>8}{'b8':>8}{'b16':>8}{'min cos':>10}"
    print(header + f"{'x default':>11}{'x ch_last':>11}")
    for row in rows:
        ips = row["images_per_s"]
        print(
            f"{row['runtime']:<22}{row['precision']:<6}{ips[1]:>8}{ips[8]:>8}{ips[16]:>8}"  # type: ignore[index]
            f"{row['min_cosine_vs_torch']:>10}{row['x_torch_default_b16']:>11}"
            f"{row['x_channels_last_b16']:>11}"
        )
    print("\n800x800 JPEG -> embedding via Embedder.embed_bytes (batch 16, 48 images):")
    for key, value in stages.items():
        shares = ", ".join(f"{k} {v:.0%}" for k, v in value["shares"].items())  # type: ignore[index]
        print(f"  {key:<17} {value['runtime']}: {value['images_per_s']} img/s; {shares}")  # type: ignore[index]
    print(
        f"\nint8 vs fp32 (OpenVINO), {args.items} garments, {args.queries} perturbed queries: "
        f"top-5 agreement {agreement:.3f}, min cosine {int8_cos:.4f}, "
        f"query->own item in top 5: fp32 {hit32:.2f}, int8 {hit8:.2f}"
    )
    print(f"total {figures['seconds']}s; wrote {RESULTS}")


if __name__ == "__main__":
    main()
