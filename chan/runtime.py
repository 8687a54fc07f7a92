"""The frozen extraction networks (detector, backbone) run by ONNX Runtime on the CPU.

On this project's CPUs, ONNX Runtime runs YOLOv3-tiny about 2x and the EfficientNet-Lite trunk
about 4x faster than eager PyTorch (depthwise convolutions above all), with the same outputs up
to float rounding (`benchmarks/extraction.py` measures both). Each network is exported once from
its torch module (batch size dynamic, the spatial size fixed) and the file is cached under
`cache/`, keyed by the module's weights, the input size, and the torch and ONNX Runtime versions.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .store import CACHE_DIR

log = logging.getLogger(__name__)
RUNTIMES = ("onnx", "torch")


def _weights_digest(module: nn.Module) -> str:
    h = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class OnnxModule:
    """A frozen torch module, exported to ONNX and run by ONNX Runtime; called with and returning torch tensors."""

    def __init__(self, module: nn.Module, example: torch.Tensor, name: str, cache_dir: Path = CACHE_DIR,
                 threads: int | None = None):
        import onnxruntime

        key = hashlib.sha1(f"{_weights_digest(module)}|{tuple(example.shape[1:])}|{torch.__version__}|"
                           f"{onnxruntime.__version__}".encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"{name}-{key}.onnx"
        if not path.exists():
            log.info("exporting %s to ONNX (once; cached at %s)", name, path)
            buffer = io.BytesIO()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
                torch.onnx.export(module.eval(), example[:1], buffer, input_names=["input"], dynamo=False,
                                  dynamic_axes={"input": {0: "batch"}})
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes exporting at once never share it
            tmp.write_bytes(buffer.getvalue())
            tmp.replace(path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # no busy-waiting between calls: in the demo, searches share these cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_shape = tuple(example.shape[1:])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"this ONNX session takes inputs of shape (B, {self.input_shape}), got {tuple(x.shape)}")
        outputs = self.session.run(None, {"input": np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})
        return [torch.from_numpy(y) for y in outputs]
