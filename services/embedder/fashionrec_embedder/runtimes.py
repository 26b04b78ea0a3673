"""Inference runtimes: the same model run by torch, ONNX Runtime or OpenVINO.

The torch module (backbone or trained artifact, L2-normalisation included) is exported to ONNX
once per model version and input size into `cache_dir/onnx/`, written atomically so concurrent
processes never read a half-written file. ONNX Runtime and OpenVINO then run that file; every
runtime returns L2-normalised float32 rows (renormalised in numpy, which costs nothing and keeps
int8 outputs exactly unit length).

Why these choices (measured by benchmarks/model_runtimes.py on the 2-core AVX-512 VNNI CPU):
- eager torch leaves most of the CPU idle on small batches; ONNX Runtime and OpenVINO fuse
  conv+BN+ReLU and use oneDNN/JIT kernels that run ResNet50 close to the fp32 arithmetic limit;
- OpenVINO picks bf16 by default on CPUs with AVX512_BF16: we pin f32 so its embeddings stay
  within cosine 0.999 of torch fp32 (the same model_version must mean the same vectors);
- on CUDA, torch with channels_last and fp16 autocast (cuDNN tensor cores) is simple and fast.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from fashionrec_shared.files import atomic_path
from torch import nn

log = logging.getLogger("fashionrec.embedder.runtimes")

RUNTIMES: tuple[str, ...] = ("torch", "onnxruntime", "openvino")
# Bump when the exported graph changes meaning (e.g. the exporter or the wrapper below).
ONNX_FORMAT = "v2"
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
OUTPUT_NAMES = [OUTPUT_NAME, "probabilities"]  # a trained model's graph has both


class RuntimeUnavailable(RuntimeError):
    """The requested runtime cannot run here (package missing, wrong device)."""


def cpu_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def installed(runtime: str) -> bool:
    if runtime == "torch":
        return True
    module = "onnxruntime" if runtime == "onnxruntime" else "openvino"
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def resolve_runtime(requested: str, device: torch.device, precision: str = "fp32") -> str:
    """The runtime `auto` stands for, or a clear error for one that cannot run here.

    CPU: OpenVINO first (fastest in fp32 and int8 on our benchmark), then ONNX Runtime, then
    torch for fp32. CUDA: torch (channels_last + fp16 autocast); ONNX Runtime's CUDA provider
    only when asked for explicitly.
    """
    if requested == "auto":
        if device.type == "cuda":
            if precision == "int8":
                raise RuntimeUnavailable("precision int8 runs on CPU only; use device=cpu")
            return "torch"
        for candidate in ("openvino", "onnxruntime"):
            if installed(candidate):
                return candidate
        if precision == "int8":
            raise RuntimeUnavailable("precision int8 needs onnxruntime or openvino installed")
        return "torch"
    if requested not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown runtime {requested!r}; use auto or one of {RUNTIMES}")
    if not installed(requested):
        raise RuntimeUnavailable(f"runtime {requested!r} is not installed in this environment")
    if precision == "int8" and requested == "torch":
        raise RuntimeUnavailable("precision int8 needs runtime onnxruntime or openvino")
    if device.type == "cuda":
        if requested == "openvino":
            raise RuntimeUnavailable("runtime openvino runs on CPU; use device=cpu")
        if precision == "int8":
            raise RuntimeUnavailable("precision int8 runs on CPU only; use device=cpu")
        if requested == "onnxruntime":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeUnavailable(
                    "runtime onnxruntime on CUDA needs onnxruntime-gpu (CUDAExecutionProvider)"
                )
    return requested


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


Outputs = tuple[np.ndarray, np.ndarray | None]


class Runtime:
    """Runs the served function: images → (unit embeddings, head probabilities or None)."""

    name: str

    def run(self, batch: np.ndarray) -> Outputs:
        """(N, 3, S, S) float32 normalised input → ((N, dim) unit vectors, (N, P) or None)."""
        raise NotImplementedError

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """The embeddings only."""
        return self.run(batch)[0]


def _outputs(values: list[np.ndarray]) -> Outputs:
    probs = np.asarray(values[1], dtype=np.float32) if len(values) > 1 else None
    return l2_normalise(values[0]), probs


# ---- torch --------------------------------------------------------------------------------


class TorchRuntime(Runtime):
    """Eager torch, channels_last (oneDNN/cuDNN pick their fast kernels); fp16 autocast on CUDA."""

    name = "torch"

    def __init__(
        self, module: nn.Module, device: torch.device, *, channels_last: bool = True
    ) -> None:
        self.device = device
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.module = module.to(device=device, memory_format=self.memory_format).eval()
        self.autocast = device.type == "cuda"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def run(self, batch: np.ndarray) -> Outputs:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast):
                out = self.module(x)
            values = list(out) if isinstance(out, tuple) else [out]
            values[0] = nn.functional.normalize(values[0].float(), p=2.0, dim=1)
            return _outputs([v.float().cpu().numpy() for v in values])


# ---- ONNX export --------------------------------------------------------------------------


class _Normalised(nn.Module):
    """The served function: images → L2-normalised embedding (a no-op for unit outputs), and
    the head probabilities when the module returns them too."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.module(x)
        if isinstance(out, tuple):
            return nn.functional.normalize(out[0].float(), p=2.0, dim=1), out[1].float()
        return nn.functional.normalize(out.float(), p=2.0, dim=1)


def onnx_path(cache_dir: Path, model_version: str, image_size: int, variant: str = "") -> Path:
    """Where the ONNX file of `model_version` at `image_size` lives (variant: '' or '-int8…')."""
    name = f"{model_version}-px{image_size}{variant}.onnx"
    return Path(cache_dir).expanduser() / "onnx" / ONNX_FORMAT / name


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints progress and logs every optimisation pass: keep the worker log clean."""
    names = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(module: nn.Module, path: Path, image_size: int) -> Path:
    """Export `module` (eval mode, CPU) with a dynamic batch axis to `path`, atomically."""
    wrapper = _Normalised(module).eval().to("cpu", memory_format=torch.contiguous_format)
    example = torch.zeros(2, 3, image_size, image_size)
    with torch.no_grad():
        outputs = [OUTPUT_NAME] if isinstance(wrapper(example), torch.Tensor) else OUTPUT_NAMES
    with atomic_path(path) as tmp, _quiet_exporter(), torch.no_grad():
        # The dynamo exporter (the legacy TorchScript one is deprecated); opset 18 is its native
        # opset, so no version conversion runs. One self-contained file (ResNet50 < 2 GB).
        torch.onnx.export(
            wrapper,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
            opset_version=18,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return path


def ensure_onnx(
    path: Path, build_module: Callable[[], nn.Module], image_size: int
) -> tuple[Path, bool]:
    """The cached ONNX file, exported first when missing; returns (path, exported_now)."""
    if path.is_file():
        return path, False
    log.info("exporting the model to ONNX: %s (once per model version and size)", path)
    export_onnx(build_module(), path, image_size)
    return path, True


# ---- ONNX Runtime ---------------------------------------------------------------------------


class OrtRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, path: Path, *, threads: int, cuda: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if cuda:
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> Outputs:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return _outputs(self.session.run(None, {self.input: x}))


# ---- OpenVINO -------------------------------------------------------------------------------


class OpenVinoRuntime(Runtime):
    name = "openvino"

    def __init__(self, path: Path, *, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        config = {
            # This CPU has AVX512_BF16, where OpenVINO defaults to bf16: pin f32 so the vectors
            # match torch fp32 (int8 QDQ models stay int8: the hint only governs float layers).
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
        }
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.request = self.compiled.create_infer_request()

    def run(self, batch: np.ndarray) -> Outputs:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        out = self.request.infer({0: x}, share_inputs=True)
        return _outputs([np.array(out[port], copy=True) for port in self.compiled.outputs])


def onnx_runtime(name: str, path: Path, *, threads: int, device: torch.device) -> Runtime:
    if name == "onnxruntime":
        return OrtRuntime(path, threads=threads, cuda=device.type == "cuda")
    if name == "openvino":
        return OpenVinoRuntime(path, threads=threads)
    raise RuntimeUnavailable(f"{name!r} does not run ONNX files")
