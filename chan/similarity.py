"""Image-caption similarity from region and word embeddings (all L2-normalised).

- `hard_scores`: CHAN. Each word keeps only its best region (max over regions); the
  per-word maxima are pooled by mean or log-sum-exp.
- `soft_scores`: SCAN text-to-image attention, the baseline CHAN replaces.
- `global_scores`: one pooled vector per side, cosine; the coarse baseline.
- `align`: one pair as plain arrays, for the app.
Shapes: images (N, K, D) with mask (N, K); captions (M, L, D) with mask (M, L); scores (N, M).
Padded regions never win a max; padded words never enter the pooling.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

LSE_TEMPERATURE = 0.1
SCAN_LAMBDA = 9.0
NEG = -1e4  # below any cosine: padded regions never win


POOLINGS = ("mean", "lse", "lse_raw")


def pool_words(word_scores: torch.Tensor, word_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool (..., L) per-word scores over the valid words.

    mean; lse = lambda * logsumexp(s / lambda), on the cosines' scale; lse_raw = logsumexp(s / lambda)
    as in the authors' code (the same ranking, 1/lambda times larger).
    """
    mask = word_mask.to(word_scores.dtype)
    if pooling == "mean":
        return (word_scores * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    if pooling in ("lse", "lse_raw"):
        masked = word_scores.masked_fill(~word_mask.bool(), float("-inf"))
        pooled = torch.logsumexp(masked / LSE_TEMPERATURE, -1)
        return LSE_TEMPERATURE * pooled if pooling == "lse" else pooled
    raise ValueError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")


def _cosines(images: torch.Tensor, image_mask: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """(M, L, N, K) cosines, padded regions set to NEG: one matrix product for all pairs."""
    N, K, D = images.shape
    M, L, _ = captions.shape
    sims = (captions.reshape(M * L, D) @ images.reshape(N * K, D).T).view(M, L, N, K)
    return sims.masked_fill(~image_mask.bool().view(1, 1, N, K), NEG)


def _length_chunks(caption_mask: torch.Tensor, chunk: int):
    """Caption indices in chunks of similar extent, and each chunk's longest extent (no wasted padding).

    A caption's extent is one past its last pooled token, not its count of pooled tokens: a mask that
    leaves out [CLS], punctuation or deleted tokens has holes, and cutting it at the count would drop
    the caption's last words.
    """
    positions = torch.arange(1, caption_mask.shape[1] + 1, device=caption_mask.device)
    lengths = (caption_mask.bool() * positions).amax(1)
    order = torch.argsort(lengths, stable=True)
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        yield idx, int(lengths[idx].max())


def _by_caption(captions, caption_mask, chunk: int, score_chunk) -> torch.Tensor:
    """Apply `score_chunk(caps, cmask) -> (m, N)` over length-sorted chunks; returns (N, M)."""
    out = None
    for idx, L in _length_chunks(caption_mask, chunk):
        part = score_chunk(captions[idx, :L], caption_mask[idx, :L])
        if out is None:
            out = part.new_empty(captions.shape[0], part.shape[1])
        out[idx] = part
    return out.T


def best_region_cosines(images: torch.Tensor, image_mask: torch.Tensor, words: torch.Tensor,
                        block_elements: int = 1 << 19, runtime=None) -> torch.Tensor:
    """(W, N): each word's highest cosine over each image's valid regions (the hard assignment).

    Images are taken a block at a time, so each block of cosines is reduced while it is still in
    cache (a fused matmul + max); masking is skipped when every region is valid. Computed in the
    images' dtype (a bfloat16 gallery halves memory and is faster where the CPU has bf16 units).
    `runtime` (serving only: `chan.runtime.OnnxRegionCosines`) computes float32 blocks without autograd.
    """
    N, K, D = images.shape
    W = words.shape[0]
    words = words.to(images.dtype)
    masked = not bool(image_mask.all())
    per_block = max(1, block_elements // max(1, W * K))
    blocks = []
    for start in range(0, N, per_block):
        stop = min(N, start + per_block)
        block_mask = image_mask[start:stop].bool() if masked else None
        if runtime is not None and images.dtype == torch.float32 and images.device.type == "cpu":
            blocks.append(runtime(images[start:stop], block_mask, words))
            continue
        sims = (words @ images[start:stop].reshape(-1, D).T).view(W, stop - start, K)
        if masked:
            sims = sims.masked_fill(~block_mask.view(1, stop - start, K), NEG)
        blocks.append(sims.amax(-1))
    return torch.cat(blocks, 1)


def hard_scores(images, image_mask, captions, caption_mask, pooling: str = "mean", chunk: int = 128,
                runtime=None) -> torch.Tensor:
    """CHAN hard-assignment scores (N, M), float32; captions are processed `chunk` at a time to bound memory
    (`runtime`: see `best_region_cosines`)."""

    def score_chunk(caps, cmask):
        m, L, D = caps.shape
        best = best_region_cosines(images, image_mask, caps.reshape(m * L, D), runtime=runtime).float().view(m, L, -1)
        return pool_words(best.transpose(1, 2), cmask[:, None, :], pooling)  # (m, N)

    return _by_caption(captions, caption_mask, chunk, score_chunk)


def _scan_attention(sims: torch.Tensor, caption_mask: torch.Tensor) -> torch.Tensor:
    """SCAN t2i weights alpha (M, L, N, K) from cosines: leaky ReLU, L2 over words, softmax over regions."""
    wmask = caption_mask.bool()[:, :, None, None]
    normed = F.leaky_relu(sims, 0.1).masked_fill(~wmask, 0.0)
    normed = normed / normed.norm(dim=1, keepdim=True).clamp(min=1e-8)
    return torch.softmax((SCAN_LAMBDA * normed).masked_fill(sims <= NEG, float("-inf")), -1)


def soft_scores(images, image_mask, captions, caption_mask, pooling: str = "mean", chunk: int = 64) -> torch.Tensor:
    """SCAN text-to-image scores (N, M): s_i = cos(w_i, sum_k alpha_ik v_k), pooled like CHAN.

    Exact and cheap: with unit vectors, <w_i, a_i> = sum_k alpha_ik S_ik and
    |a_i|^2 = alpha_i^T G alpha_i with G = V V^T the region Gram matrix, so no (word, image, D)
    tensor is ever built.
    """
    gram = images @ images.transpose(1, 2)  # (N, K, K)

    def score_chunk(caps, cmask):
        sims = _cosines(images, image_mask, caps)
        alpha = _scan_attention(sims, cmask)
        dot = (alpha * sims.clamp(min=-1.0)).sum(-1)  # (m, L, N)
        sq_norm = torch.einsum("mlnk,nkj,mlnj->mln", alpha, gram, alpha)
        word_scores = dot / sq_norm.clamp(min=1e-12).sqrt()
        return pool_words(word_scores.transpose(1, 2), cmask[:, None, :], pooling)

    return _by_caption(captions, caption_mask, chunk, score_chunk)


def global_vectors(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of fragment embeddings, L2-normalised: one vector per image or caption."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return F.normalize((x * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def global_scores(images, image_mask, captions, caption_mask, pooling: str = "mean") -> torch.Tensor:
    """Cosine of pooled vectors (N, M); `pooling` is ignored (there are no words to pool)."""
    return global_vectors(images, image_mask) @ global_vectors(captions, caption_mask).T


SCORERS = {"hard": hard_scores, "soft": soft_scores, "global": global_scores}


@dataclass
class Alignment:
    """One image-caption pair as plain data for drawing."""

    cosine: np.ndarray  # (L, K) word x region cosines
    chosen: np.ndarray  # (L,) the region each word hard-aligned to
    word_scores: np.ndarray  # (L,) each word's max cosine
    contributions: np.ndarray  # (L,) each word's share of the pooled score (with `global_term`, sums to `score`)
    score: float  # the CHAN score of the pair
    soft_attention: np.ndarray  # (L, K) SCAN weights of the same pair (rows sum to 1)
    soft_score: float
    global_term: float = 0.0  # w x cos(mean region, mean word), for a model trained with a global term


def align(regions: torch.Tensor, words: torch.Tensor, pooling: str = "mean", global_weight: float = 0.0) -> Alignment:
    """Hard and soft alignment of one pair: regions (K, D) and words (L, D), no padding; `global_weight` adds the
    model's global term to both scores."""
    sims = words @ regions.T
    best, chosen = sims.max(-1)
    L = len(words)
    if pooling == "mean":
        contributions = best / L
    else:  # log-sum-exp pooling splits exactly by softmax weights: sum_i w_i * score = score
        contributions = torch.softmax(best / LSE_TEMPERATURE, 0) * pool_words(best, torch.ones(L, dtype=torch.bool), pooling)
    ones_r, ones_w = torch.ones(1, len(regions), dtype=torch.bool), torch.ones(1, L, dtype=torch.bool)
    alpha = _scan_attention(_cosines(regions[None], ones_r, words[None]), ones_w)[0, :, 0]
    soft = soft_scores(regions[None], ones_r, words[None], ones_w, pooling)[0, 0]
    term = global_weight * float(global_scores(regions[None], ones_r, words[None], ones_w)[0, 0]) if global_weight else 0.0
    return Alignment(
        cosine=sims.numpy(), chosen=chosen.numpy(), word_scores=best.numpy(), contributions=contributions.numpy(),
        score=float(pool_words(best, torch.ones(L, dtype=torch.bool), pooling)) + term, soft_attention=alpha.numpy(),
        soft_score=float(soft) + term, global_term=term,
    )
