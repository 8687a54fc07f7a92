"""The detector's labels as weak supervision for the words that name them (`train --grounding-weight`).

Which words name which class is read from the text encoder, never from a hand list: a word's vector is the
pretrained model's input embedding (with position and LayerNorm, the mean over its word pieces), a class's is the
same for its name, and their cosine is the similarity. In training, a word takes the class, among those the
detector saw in its photo (a region's objectness x class probability at least `PRESENT`), most similar to it, when
that similarity is at least the threshold. Its target is then the photo's regions weighted by the detector's
confidence in that class, and the loss is the cross-entropy of the word's softmax over its cosines with that target
(distillation of the detector's labels into the alignment, after Wang et al., CVPR 2021). On COCO dev captions,
with the classes present taken from the annotations, a threshold of 0.3 found 90% of the words the hand list names
(`chan.grounding`) and assigned 323 of the other 3,765 words, many of them rightly ("ball", "bear" for a teddy).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .backbone import BACKBONE_CHANNELS
from .grounding import COCO_CATEGORIES
from .region_settings import GEOMETRY_DIMS

PRESENT = 0.2  # the detector's own confidence threshold: a class counts as seen in a photo at or above it
ALIGNMENT_TEMPERATURE = 0.1  # the word's softmax over its cosines
EVIDENCE_START = BACKBONE_CHANNELS + GEOMETRY_DIMS  # where the class probabilities begin in a region's feature


@torch.no_grad()
def _word_vectors(bert, ids: torch.Tensor, mask: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """(B, L, H) each token's whole-word vector: the mean of its word's piece embeddings, L2-normalised."""
    emb = bert.embeddings(input_ids=ids)
    B, L, H = emb.shape
    word = torch.cumsum(~continuation[ids], 1) - 1  # word index of each token within its caption
    flat = (torch.arange(B)[:, None] * L + word).flatten()
    keep = mask.flatten().float()[:, None]
    sums = torch.zeros(B * L, H).index_add_(0, flat, emb.reshape(-1, H) * keep)
    counts = torch.zeros(B * L).index_add_(0, flat, keep[:, 0])
    means = sums / counts.clamp(min=1)[:, None]
    return F.normalize(means[flat].view(B, L, H), dim=-1)


@torch.no_grad()
def word_class_similarity(bert_path: str, ids: torch.Tensor, mask: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(N, L, 80) fp16: each token's (whole word's) cosine with each COCO class name, from the pretrained model."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bert_path)
    bert = AutoModel.from_pretrained(bert_path).eval()
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    continuation = torch.tensor([t.startswith("##") for t in tokens])
    names = tokenizer(list(COCO_CATEGORIES), padding=True, return_tensors="pt")
    name_mask = names["attention_mask"].bool()
    name_mask[:, 0] = False  # [CLS]
    name_mask[torch.arange(len(name_mask)), names["attention_mask"].sum(1) - 1] = False  # [SEP]
    emb = bert.embeddings(input_ids=names["input_ids"])
    classes = F.normalize((emb * name_mask[..., None]).sum(1) / name_mask.sum(1, keepdim=True), dim=-1)
    out = []
    for s in tqdm(range(0, len(ids), chunk), desc="word-class similarity", unit="chunk"):
        vectors = _word_vectors(bert, ids[s : s + chunk], mask[s : s + chunk], continuation)
        out.append((vectors @ classes.T).half())
    return torch.cat(out)


def label_distillation_loss(cosines: torch.Tensor, region_mask: torch.Tensor, word_mask: torch.Tensor,
                            similarity: torch.Tensor, evidence: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of each labelled word's softmax over its own photo's regions against the detector's.

    cosines (B, L, K): each caption's words against its own photo's regions; region_mask (B, K) the regions kept;
    word_mask (B, L) the pooled words; similarity (B, L, 80) word-class cosines; evidence (B, K, 81) the regions'
    class evidence (the detector's confidence in each class, objectness x class probability, then objectness). Returns the loss and how many words it covered.
    """
    confidence = evidence[..., :80] * region_mask[..., None]  # (B, K, 80)
    present = confidence.amax(1) >= PRESENT  # (B, 80)
    candidate = similarity.masked_fill(~present[:, None, :], -1.0)
    best, cls = candidate.max(-1)  # (B, L)
    labelled = word_mask & (best >= threshold)
    if not labelled.any():
        return cosines.sum() * 0.0, 0
    index = cls[..., None].expand(-1, -1, confidence.shape[1])
    target = torch.gather(confidence.transpose(1, 2), 1, index)  # (B, L, K): each word's class, region by region
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-8)
    logits = (cosines / ALIGNMENT_TEMPERATURE).masked_fill(~region_mask[:, None, :], float("-inf"))
    log_p = torch.log_softmax(logits, -1).masked_fill(~region_mask[:, None, :], 0.0)
    per_word = -(target * log_p).sum(-1)
    return per_word[labelled].sum(), int(labelled.sum())
