"""The batched scorers against naive per-pair loops written straight from the paper's definitions."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chan.similarity import align, global_scores, hard_scores, soft_scores


def _random_batch(seed=0, N=5, K=7, M=6, L=9, D=16, holes=False):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(N, K, D, generator=g), dim=-1)
    captions = F.normalize(torch.randn(M, L, D, generator=g), dim=-1)
    image_mask = torch.ones(N, K, dtype=torch.bool)
    caption_mask = torch.ones(M, L, dtype=torch.bool)
    for n in range(N):
        image_mask[n, K - n % 4 :] = False  # 0..3 padded regions
    for m in range(M):
        caption_mask[m, L - 2 * (m % 3) :] = False  # 0, 2, 4 padded words
        if holes:  # content-word pooling: [CLS] and a punctuation mark inside the caption are left out
            caption_mask[m, 0] = caption_mask[m, 1 + m % 3] = False
    # padded slots hold large values: they must never matter
    images[~image_mask] = 5.0
    captions[~caption_mask] = 5.0
    return images, image_mask, captions, caption_mask


def _pool(values, pooling):
    if pooling == "mean":
        return sum(values) / len(values)
    return 0.1 * math.log(sum(math.exp(v / 0.1) for v in values))


def _naive_hard(images, image_mask, captions, caption_mask, pooling):
    out = torch.zeros(len(images), len(captions))
    for n in range(len(images)):
        regions = [images[n, k] for k in range(images.shape[1]) if image_mask[n, k]]
        for m in range(len(captions)):
            words = [captions[m, i] for i in range(captions.shape[1]) if caption_mask[m, i]]
            best = [max(float(w @ v) for v in regions) for w in words]
            out[n, m] = _pool(best, pooling)
    return out


def _naive_scan(images, image_mask, captions, caption_mask, pooling):
    out = torch.zeros(len(images), len(captions))
    for n in range(len(images)):
        V = images[n][image_mask[n]]
        for m in range(len(captions)):
            W = captions[m][caption_mask[m]]
            S = W @ V.T  # words x regions
            S = F.leaky_relu(S, 0.1)
            S = S / S.norm(dim=0, keepdim=True).clamp(min=1e-8)  # L2 over words
            alpha = torch.softmax(9.0 * S, dim=1)
            scores = [float(F.cosine_similarity(W[i], alpha[i] @ V, dim=0)) for i in range(len(W))]
            out[n, m] = _pool(scores, pooling)
    return out


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("pooling", ["mean", "lse"])
def test_hard_alignment_matches_naive_loop(pooling, holes):
    batch = _random_batch(holes=holes)
    expected = _naive_hard(*batch, pooling)
    torch.testing.assert_close(hard_scores(*batch, pooling=pooling), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hard_scores(*batch, pooling=pooling, chunk=2), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("pooling", ["mean", "lse"])
def test_scan_soft_attention_matches_naive_loop(pooling, holes):
    batch = _random_batch(seed=1, holes=holes)
    expected = _naive_scan(*batch, pooling)
    torch.testing.assert_close(soft_scores(*batch, pooling=pooling, chunk=4), expected, atol=1e-5, rtol=1e-4)


def test_global_scores_ignore_padding():
    images, image_mask, captions, caption_mask = _random_batch(seed=2)
    got = global_scores(images, image_mask, captions, caption_mask)
    n, m = 3, 2
    v = F.normalize(images[n][image_mask[n]].mean(0), dim=0)
    w = F.normalize(captions[m][caption_mask[m]].mean(0), dim=0)
    assert abs(float(got[n, m]) - float(v @ w)) < 1e-5


@pytest.mark.parametrize("pooling", ["mean", "lse"])
def test_align_one_pair(pooling):
    images, _, captions, _ = _random_batch(seed=3, N=1, M=1)
    regions, words = images[0], captions[0]
    a = align(regions, words, pooling)
    full = torch.ones(1, len(regions), dtype=torch.bool), torch.ones(1, len(words), dtype=torch.bool)
    assert a.cosine.shape == (len(words), len(regions))
    naive = np.array([[float(w @ r) for r in regions] for w in words])  # one dot product per word-region pair
    np.testing.assert_allclose(a.cosine, naive, atol=1e-5)
    assert list(a.chosen) == [int(np.argmax(row)) for row in naive]
    assert abs(a.contributions.sum() - a.score) < 1e-5 and a.global_term == 0
    assert abs(a.score - float(hard_scores(images, full[0], captions, full[1], pooling)[0, 0])) < 1e-5
    # a model trained with a global term: both scores add it, and the words' shares plus it make the score
    g = align(regions, words, pooling, global_weight=0.5)
    assert g.global_term == pytest.approx(0.5 * float(global_scores(images, full[0], captions, full[1])[0, 0]), abs=1e-6)
    assert g.score == pytest.approx(a.score + g.global_term, abs=1e-6) and g.global_term != 0
    assert g.soft_score == pytest.approx(a.soft_score + g.global_term, abs=1e-6)
    assert g.contributions.sum() + g.global_term == pytest.approx(g.score, abs=1e-5)
    # SCAN t2i written out from its definition: attention over regions, attended vector, cosine, pooled
    leaky = np.where(naive > 0, naive, 0.1 * naive)
    normed = leaky / np.linalg.norm(leaky, axis=0, keepdims=True)
    alpha = np.exp(9 * normed) / np.exp(9 * normed).sum(1, keepdims=True)
    attended = alpha @ regions.numpy()
    per_word = [float(w @ v) / float(np.linalg.norm(v)) for w, v in zip(words.numpy(), attended)]
    pooled = np.mean(per_word) if pooling == "mean" else 0.1 * np.log(np.sum(np.exp(np.array(per_word) / 0.1)))
    assert abs(a.soft_score - pooled) < 1e-4
    np.testing.assert_allclose(a.soft_attention, alpha, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(a.soft_attention).sum(1), torch.ones(len(words)))


@pytest.mark.parametrize("served", [False, True])
@pytest.mark.parametrize("padded", [True, False])
def test_blocked_hard_scores_match_across_block_boundaries_and_in_bf16(padded, served):
    """Blocked products equal one block and the naive loop, by torch and by the served runtime (ONNX Runtime)."""
    from chan.runtime import OnnxRegionCosines
    from chan.similarity import best_region_cosines

    images, image_mask, captions, caption_mask = _random_batch(seed=3, N=11)
    if not padded:
        image_mask[:] = True
        images = F.normalize(images, dim=-1)
    runtime = OnnxRegionCosines(images.shape[-1]) if served else None
    words = captions[caption_mask]
    whole = best_region_cosines(images, image_mask, words, block_elements=1 << 30)  # one block, by torch
    for block in (1, 60, 200, 1 << 30):  # one photo per block, then uneven blocks, then one
        blocked = best_region_cosines(images, image_mask, words, block_elements=block, runtime=runtime)
        torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=1e-6)
    naive = _naive_hard(images, image_mask, captions, caption_mask, "mean")
    scores = hard_scores(images, image_mask, captions, caption_mask, runtime=runtime)
    torch.testing.assert_close(scores, naive, atol=1e-5, rtol=1e-5)
    bf16 = hard_scores(images.bfloat16(), image_mask, captions, caption_mask, runtime=runtime)
    assert bf16.dtype == torch.float32 and (bf16 - naive).abs().max() < 2e-2
    # a bfloat16 gallery is scored by torch, the runtime left aside
    assert torch.equal(bf16, hard_scores(images.bfloat16(), image_mask, captions, caption_mask))
