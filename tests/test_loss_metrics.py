import pytest
import torch

from chan.loss import contrastive_loss, triplet_loss
from chan.metrics import recall_metrics

S = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.6, 0.2], [0.0, 0.7, 0.3]])
NONE_SHARED = torch.zeros(3, 3, dtype=torch.bool)


def test_sum_of_all_negatives():
    # caption side (rows): row0: [0, .8-.9+.2=.1->.1? ] computed by hand below, margin 0.2
    # row 0 pos .9: negs .5 -> 0, .1 -> 0 ; row 1 pos .6: .8 -> .4, .2 -> 0 ; row 2 pos .3: 0 -> 0, .7 -> .6
    # column side: col 0 pos .9: .8 -> .1, 0 -> 0 ; col 1 pos .6: .5 -> .1, .7 -> .3 ; col 2 pos .3: .1 -> 0, .2 -> .1
    assert triplet_loss(S, NONE_SHARED, 0.2, hardest=False).item() == pytest.approx(0.4 + 0.6 + 0.1 + 0.1 + 0.3 + 0.1)


def test_hardest_negative_only():
    # rows: max(0, .4, .6) ; columns: max(.1, .3, .1)
    assert triplet_loss(S, NONE_SHARED, 0.2, hardest=True).item() == pytest.approx(0.4 + 0.6 + 0.1 + 0.3 + 0.1)


def test_same_photo_pairs_are_not_negatives():
    shared = NONE_SHARED.clone()
    shared[1, 0] = shared[0, 1] = True  # pairs 0 and 1 show the same photo
    # row 1 loses its .4 (column 0), column 0 loses .1 (row 1), column 1 loses .1 (row 0)
    assert triplet_loss(S, shared, 0.2, hardest=False).item() == pytest.approx(0.6 + 0.3 + 0.1)


def _softmax_cost(logits: list[float], target: int) -> float:
    """-log softmax(logits)[target], written out."""
    return -logits[target] + torch.tensor(logits).exp().sum().log().item()


def test_infonce_is_cross_entropy_both_ways():
    t = 0.1
    rows = sum(_softmax_cost([x / t for x in S[i].tolist()], i) for i in range(3))
    columns = sum(_softmax_cost([x / t for x in S[:, j].tolist()], j) for j in range(3))
    assert contrastive_loss(S, NONE_SHARED, t).item() == pytest.approx(rows + columns, rel=1e-5)


def test_infonce_leaves_same_photo_pairs_out_of_the_softmax():
    t = 0.1
    shared = NONE_SHARED.clone()
    shared[1, 0] = shared[0, 1] = True  # pairs 0 and 1 show the same photo
    rows = (_softmax_cost([S[0, 0] / t, S[0, 2] / t], 0) + _softmax_cost([S[1, 1] / t, S[1, 2] / t], 0)
            + _softmax_cost([x / t for x in S[2].tolist()], 2))
    columns = (_softmax_cost([S[0, 0] / t, S[2, 0] / t], 0) + _softmax_cost([S[1, 1] / t, S[2, 1] / t], 0)
               + _softmax_cost([x / t for x in S[:, 2].tolist()], 2))
    assert contrastive_loss(S, shared, t).item() == pytest.approx(float(rows + columns), rel=1e-5)
    # a higher true-pair score lowers it; a sharper temperature punishes a negative above the positive more
    better = S.clone()
    better[2, 2] = 0.9
    assert contrastive_loss(better, shared, t) < contrastive_loss(S, shared, t)
    assert contrastive_loss(S, shared, 0.01) > contrastive_loss(S, shared, t)


def test_recall_with_known_ranks():
    # 2 images, 4 captions (2 each). caption -> image: [0, 0, 1, 1]
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.5, 0.4, 0.3, 0.6]])
    owner = torch.tensor([0, 0, 1, 1])
    m = recall_metrics(scores, owner)
    # i2t: image 0 best own caption .9 ranks 1; image 1 best own .6 ranks 1
    assert m["i2t_r1"] == 100.0
    # t2i ranks: cap0 (.9 vs .5) 1; cap1 (.1 vs .4) 2; cap2 (.3 vs .8) 2; cap3 (.6 vs .2) 1
    assert m["t2i_r1"] == 50.0 and m["t2i_r5"] == 100.0
    assert m["t2i_medr"] == 1.0 and m["t2i_meanr"] == 1.5
    assert m["rsum"] == pytest.approx(100 * 3 + 50 + 100 + 100)


def test_ties_count_against_the_true_match():
    scores = torch.zeros(3, 3)
    m = recall_metrics(scores, torch.arange(3))
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0
    assert m["t2i_meanr"] == 3.0 and m["i2t_r5"] == 100.0
