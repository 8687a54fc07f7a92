"""Import the authors' released CHAN checkpoints into this project's format (`python -m chan import-official`).

The released file is a `torch.save` pickle: `{epoch, model, best_rsum, opt, Eiters}` with
`model = [image_encoder_state, text_encoder_state, {}, {}]` and `opt` an argparse Namespace.
Unpickling can run code, so it happens only on request (`trust_pickle`), through torch's
weights-only unpickler with the smallest set of extra classes such a file needs. The result is
a safetensors checkpoint (fp32, so scores are reproduced exactly) that loads without pickle and
reads the same precomputed bottom-up-attention features (`<split>_ims.npy`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .checkpoint import save_checkpoint
from .model import CHAN, ModelConfig
from .region_settings import PrecomputedSettings
from .similarity import LSE_TEMPERATURE

# What a released checkpoint holds besides tensors and builtins: the options Namespace, and numpy
# scalars (best_rsum) under their numpy 1.x and 2.x names.
ALLOWED_GLOBALS = [
    argparse.Namespace,
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    np._core.multiarray.scalar,
    np.dtype,
    np.dtypes.Float64DType,
    np.dtypes.Float32DType,
]
IGNORED_KEYS = {"bert.embeddings.position_ids", "bert.embeddings.token_type_ids"}  # buffers some transformers versions saved


class ReleaseError(ValueError):
    """A file that is not a CHAN release we can convert; the message says why."""


def read_release(path: Path, trust_pickle: bool) -> dict:
    """The released checkpoint dict, unpickled with the allow-list only (and only when trusted)."""
    path = Path(path)
    if not trust_pickle:
        raise ReleaseError(f"{path} is a pickle, and unpickling a file can run code. If you trust where it came "
                           "from, pass --trust-pickle (only allow-listed classes are accepted even then).")
    if not path.is_file():
        raise ReleaseError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            release = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler raises UnpicklingError, RuntimeError, ...
        raise ReleaseError(f"{path}: not a loadable CHAN release ({e})") from e
    if not isinstance(release, dict) or not {"model", "opt"} <= set(release):
        raise ReleaseError(f"{path}: expected a dict with 'model' and 'opt' (found {type(release).__name__})")
    if not isinstance(release["opt"], argparse.Namespace) or len(release["model"]) < 2:
        raise ReleaseError(f"{path}: 'opt' must be the argparse options and 'model' [image state, text state, ...]")
    return release


def _vocabulary(opt: argparse.Namespace, vocab_json: Path | None) -> list[str]:
    """Words by index from the SCAN vocabulary json (or the word2idx the options carry), '<mask>' appended."""
    if vocab_json is not None:
        word2idx = json.loads(Path(vocab_json).read_text())["word2idx"]
    elif getattr(opt, "word2idx", None):
        word2idx = opt.word2idx
    else:
        raise ReleaseError("a BiGRU model needs its vocabulary: pass --vocab with the SCAN vocabulary json "
                           "(e.g. f30k_precomp_vocab.json)")
    words = [None] * len(word2idx)
    for word, i in word2idx.items():
        if not 0 <= int(i) < len(words) or words[int(i)] is not None:
            raise ReleaseError("the vocabulary's word2idx is not a permutation of 0..V-1")
        words[int(i)] = word
    return words + ([] if "<mask>" in word2idx else ["<mask>"])


def _config(opt: argparse.Namespace, image: dict, text: dict, vocab_json: Path | None, bert: Path | None) -> ModelConfig:
    """Our model description of the release, refusing what the authors' code allows but we do not implement."""
    coding, pooling = getattr(opt, "coding_type", "VHACoding"), getattr(opt, "pooling_type", None)
    if coding != "VHACoding":
        raise ReleaseError(f"coding_type {coding!r}: only CHAN's hard assignment (VHACoding) is supported")
    poolings = {"MeanPooling": "mean", "LSEPooling": "lse_raw"}
    if pooling not in poolings:
        raise ReleaseError(f"pooling_type {pooling!r}: supported are {sorted(poolings)}")
    if pooling == "LSEPooling" and abs(float(getattr(opt, "belta", LSE_TEMPERATURE)) - LSE_TEMPERATURE) > 1e-9:
        raise ReleaseError(f"LSE temperature {opt.belta}: only {LSE_TEMPERATURE} is supported")
    if getattr(opt, "no_imgnorm", False) or getattr(opt, "no_txtnorm", False):
        raise ReleaseError("models trained without L2-normalised embeddings are not supported")
    enc = getattr(opt, "precomp_enc_type", "basic")
    if enc not in ("basic", "selfattention"):
        raise ReleaseError(f"precomp_enc_type {enc!r}: supported are 'basic' and 'selfattention'")
    embed_dim, feature_dim = image["fc.weight"].shape
    config = ModelConfig(feature_dim=feature_dim, embed_dim=embed_dim, similarity="hard", pooling=poolings[pooling],
                         self_attention=enc == "selfattention")
    kind = getattr(opt, "text_enc_type", "bigru")
    if kind == "bigru":
        if getattr(opt, "num_layers", 1) != 1:
            raise ReleaseError(f"num_layers {opt.num_layers}: only one GRU layer is supported")
        config.text_encoder, config.word_tokenizer = "bigru", "treebank"
        config.vocab = _vocabulary(opt, vocab_json)
        config.word_dim = text["embed.weight"].shape[1]
    elif kind == "bert":
        if bert is None or not Path(bert).is_dir():
            raise ReleaseError("a BERT model needs the bert-base-uncased folder it was trained from (config, vocab "
                               "and weights, as transformers saves them): pass --bert DIR")
        config.text_encoder, config.bert_model, config.finetune_layers = "bert", str(Path(bert).resolve()), -1
    else:
        raise ReleaseError(f"text_enc_type {kind!r}: supported are 'bigru' and 'bert'")
    return config


def _our_names(image: dict, text: dict, kind: str) -> dict[str, torch.Tensor]:
    """The release's tensors under our parameter names (the BiGRU's unused fc is dropped)."""
    out = {}
    for k, v in image.items():
        out["image_encoder." + k.removeprefix("feedforward.")] = v
    for k, v in text.items():
        if k in IGNORED_KEYS or (kind == "bigru" and k.startswith("fc.")):
            continue
        out["text_encoder." + k] = v
    return out


def convert(release: dict, vocab_json: Path | None = None, bert: Path | None = None) -> CHAN:
    """The release as our model, every tensor checked by name and shape."""
    opt = release["opt"]
    image, text = dict(release["model"][0]), dict(release["model"][1])
    if "fc.weight" not in image:
        raise ReleaseError("the image encoder state has no fc.weight; is this a precomputed-feature CHAN model?")
    config = _config(opt, image, text, vocab_json, bert)
    model = CHAN(config)
    tensors = _our_names(image, text, config.text_encoder)
    expected = model.trainable_state()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ReleaseError(f"the release's tensors do not match the model its options describe: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    for k, v in tensors.items():
        if expected[k].shape != v.shape:
            hint = " (does the vocabulary match the model?)" if k.endswith("embed.weight") else ""
            raise ReleaseError(f"{k} has shape {tuple(v.shape)}; the model wants {tuple(expected[k].shape)}{hint}")
    model.load_state_dict(tensors, strict=False)
    return model.eval()


def import_official(path: Path, out: Path, vocab_json: Path | None = None, bert: Path | None = None,
                    trust_pickle: bool = False) -> CHAN:
    """Convert a released checkpoint into `out` (safetensors, fp32, no pickle)."""
    release = read_release(path, trust_pickle)
    model = convert(release, vocab_json, bert)
    opt = release["opt"]
    info = {"imported_from": Path(path).name, "epoch": release.get("epoch"), "best_rsum": _plain(release.get("best_rsum")),
            "data_name": getattr(opt, "data_name", None), "options": {k: _plain(v) for k, v in vars(opt).items() if k != "word2idx"}}
    settings = PrecomputedSettings(feature_dim=model.config.feature_dim, source="the release's precomputed <split>_ims.npy "
                                   "(bottom-up attention for the published models)")
    save_checkpoint(model, settings, out, info, dtype=torch.float32)
    return model


def _plain(value):
    """JSON-safe copy of an option value (numpy scalars become floats, anything else its text)."""
    if isinstance(value, (np.generic,)):
        return value.item()
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)
