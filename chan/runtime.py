"""Frozen networks run by ONNX Runtime on the CPU: the extraction networks (detector, backbone), and, where the
demo serves queries, a trained text encoder, a tuned backbone tail and the hard assignment's product of words and regions.

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
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .similarity import NEG
from .store import CACHE_DIR

log = logging.getLogger(__name__)
RUNTIMES = ("onnx", "torch")


def _weights_digest(module: nn.Module) -> str:
    h = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cpu_session(model: str | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session of a model file or serialised model: `threads` (default torch's) in one operator
    at a time, and no busy-waiting between calls (in the demo, searches share these cores)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OnnxModule:
    """A frozen torch module, exported to ONNX and run by ONNX Runtime; called with and returning torch tensors.

    `example` is one example input, or a tuple of them; each input's first axis (the batch) is dynamic,
    and so is its second where `dynamic_length` (token sequences); the other axes are fixed. `transform` turns
    the exported file into the one the session runs (e.g. a quantized copy); `path` stays the exported one.
    """

    def __init__(self, module: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], name: str,
                 cache_dir: Path = CACHE_DIR, threads: int | None = None, dynamic_length: bool = False,
                 transform: Callable[[Path], Path] | None = None):
        import onnxruntime

        examples = example if isinstance(example, tuple) else (example,)
        self.names = ["input"] if len(examples) == 1 else [f"input{i}" for i in range(len(examples))]
        self.skip = 2 if dynamic_length else 1  # the leading axes that may vary
        self.fixed = [tuple(x.shape[self.skip:]) for x in examples]
        shapes = "|".join(str(shape) for shape in self.fixed)
        key = hashlib.sha1(f"{_weights_digest(module)}|{shapes}|{torch.__version__}|"
                           f"{onnxruntime.__version__}".encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"{name}-{key}.onnx"
        if not path.exists():
            log.info("exporting %s to ONNX (once; cached at %s)", name, path)
            axes = {0: "batch", 1: "length"} if dynamic_length else {0: "batch"}
            buffer = io.BytesIO()
            was_training = module.training
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
                torch.onnx.export(module.eval(), tuple(x[:1] for x in examples), buffer, input_names=self.names,
                                  dynamo=False, dynamic_axes={n: axes for n in self.names})
            module.train(was_training)
            path.parent.mkdir(parents=True, exist_ok=True)
            # processes (and threads) exporting at once never share it
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(buffer.getvalue())
            tmp.replace(path)
        self.path = path
        self.session = cpu_session(str(transform(path) if transform else path), threads)

    def __call__(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        if [tuple(x.shape[self.skip:]) for x in xs] != self.fixed:
            raise ValueError(f"this ONNX session takes inputs of shapes (B, ..., {self.fixed}), got "
                             f"{[tuple(x.shape) for x in xs]}")
        feed = {n: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32 if x.is_floating_point() else None)
                for n, x in zip(self.names, xs)}
        return [torch.from_numpy(y) for y in self.session.run(None, feed)]


class _TextForExport(nn.Module):
    """A BERT-style text encoder's eval forward in ops that export faithfully at any batch and length: explicit
    positions and an additive attention mask, where the transformers forward picks its mask code by the input."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.bert, self.linear = encoder.bert, encoder.linear

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        states = self.bert.embeddings(input_ids=ids, position_ids=positions, token_type_ids=torch.zeros_like(ids))
        additive = (~mask[:, None, None, :]).float() * -1e4
        for layer in self.bert.encoder.layer:
            states = layer(states, additive)
        return nn.functional.normalize(self.linear(states), dim=-1)


class OnnxTextEncoder:
    """A trained BERT-style text encoder (`chan.model.BertEncoder`) for serving: token ids and mask -> word embeddings,
    by ONNX Runtime (about 3x faster than eager PyTorch for one query on this project's CPUs, the same outputs up
    to float rounding); exported once per checkpoint and cached like the extraction networks."""

    def __init__(self, encoder: nn.Module, name: str = "text-encoder", cache_dir: Path = CACHE_DIR):
        ids, mask, _ = encoder.tokenize(["a dog runs", "two children play on the beach"])
        self.session = OnnxModule(_TextForExport(encoder), (ids, mask), name, cache_dir, dynamic_length=True)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.session(ids, mask)[0]


class OnnxRegionCosines:
    """`chan.similarity.best_region_cosines` for one block of float32 images, by ONNX Runtime: each word's highest
    cosine over each image's valid regions, (W, n). Serving only (no autograd). A query has a few words, and
    for such thin products ONNX Runtime's matrix product is 2-3x faster than torch's on this project's AVX2
    CPUs (10 words against 1,000 photos of 36 regions: 9 ms against 29 ms on two threads); the same values up
    to float rounding. The graph is small and built here, not exported."""

    def __init__(self, dim: int, threads: int | None = None):
        import onnx
        from onnx import TensorProto, helper

        def tensor(name, shape):
            return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

        nodes = [helper.make_node("Transpose", ["words"], ["columns"], perm=[1, 0]),
                 helper.make_node("MatMul", ["regions", "columns"], ["cosines"]),  # (n, K, W)
                 helper.make_node("Add", ["cosines", "penalty"], ["allowed"]),  # NEG on padded regions
                 helper.make_node("ReduceMax", ["allowed"], ["best"], axes=[1], keepdims=0),
                 helper.make_node("Transpose", ["best"], ["out"], perm=[1, 0])]
        graph = helper.make_graph(nodes, "best_region_cosines",
                                  [tensor("regions", ["n", "K", dim]), tensor("words", ["W", dim]),
                                   tensor("penalty", ["n", "K", 1])], [tensor("out", ["W", "n"])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        onnx.checker.check_model(model)
        self.session = cpu_session(model.SerializeToString(), threads)

    def __call__(self, images: torch.Tensor, image_mask: torch.Tensor | None, words: torch.Tensor) -> torch.Tensor:
        """images (n, K, D), their mask (n, K) or None where every region is valid, words (W, D) -> (W, n)."""
        penalty = (torch.zeros(images.shape[:2]) if image_mask is None
                   else (~image_mask.bool()).float() * NEG)[..., None]
        feed = {"regions": np.ascontiguousarray(images.detach().numpy(), dtype=np.float32),
                "words": np.ascontiguousarray(words.detach().numpy(), dtype=np.float32),
                "penalty": penalty.numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])
