"""Importing the authors' CHAN releases: files made here in exactly the published format (random weights,
the real key names and shapes, a real argparse Namespace), scored by our code and by an independent
re-implementation of the authors' forward pass written below."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from nltk.tokenize import NLTKWordTokenizer
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from chan.__main__ import main
from chan.checkpoint import load_checkpoint
from chan.data import open_dataset
from chan.evaluate import split_scores
from chan.features import FeatureMismatchError, table_for
from chan.metrics import fold_metrics
from chan.official import ReleaseError, import_official
from tests.conftest import plot_traces

EMBED, IMG_DIM, WORD_DIM, N_IMAGES, REGIONS = 1024, 2048, 300, 8, 36
WORDS = "a the dog dogs man woman child runs jumps sits on in through grass snow water ball red blue black white".split()


# ---- the authors' forward pass, re-implemented from their published code (not from ours) ----

def l2norm(x, dim=-1, eps=1e-8):
    return x / (torch.norm(x, p=2, dim=dim, keepdim=True) + eps)


class AuthorsSelfAttention(nn.Module):
    def __init__(self, d, heads=8):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        h = self.ln(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


class AuthorsImageEncoder(nn.Module):
    def __init__(self, self_attention):
        super().__init__()
        self.fc = nn.Linear(IMG_DIM, EMBED)
        self.feedforward = AuthorsSelfAttention(EMBED) if self_attention else nn.Identity()

    def forward(self, images):
        return l2norm(self.feedforward(self.fc(images)))


class AuthorsBiGRU(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, WORD_DIM)
        self.rnn = nn.GRU(WORD_DIM, EMBED, 1, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(EMBED, EMBED)  # present in the releases, unused

    def forward(self, ids, lengths):
        packed = pack_padded_sequence(self.embed(ids), torch.tensor(lengths), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        return l2norm((out[:, :, : EMBED] + out[:, :, EMBED:]) / 2)


class AuthorsBert(nn.Module):
    def __init__(self, folder):
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel.from_pretrained(folder)
        self.linear = nn.Linear(768, EMBED)

    def forward(self, ids, lengths):
        return l2norm(self.linear(self.bert(ids, (ids != 0).float())[0]))


def authors_sims(images, captions, cap_lens, pooling):
    """VHACoding (max over regions, padding -1) then MeanPooling or LSEPooling(0.1), as in lib/coding.py."""
    n_i, n_r, d = images.shape
    n_c, n_w, _ = captions.shape
    sims = (images.reshape(-1, d) @ captions.reshape(-1, d).T).reshape(n_i, n_r, n_c, n_w).permute(0, 2, 1, 3)
    word_mask = (torch.arange(n_w)[None] < torch.tensor(cap_lens)[:, None]).float()  # (n_c, n_w)
    sims = sims.masked_fill(word_mask[None, :, None, :] == 0, -1).max(dim=-2)[0]  # (n_i, n_c, n_w)
    if pooling == "MeanPooling":
        lens = (sims != -1).sum(-1)
        return sims.masked_fill(sims == -1, 0).sum(-1) / lens
    return torch.logsumexp(sims.masked_fill(sims == -1, -torch.inf) / 0.1, dim=-1)


def authors_recalls(sims):
    """i2t / t2i R@1,5,10 as in lib/evaluation.py (5 captions per image, in order)."""
    npts = sims.shape[0]
    i2t = np.array([min(np.where(np.argsort(sims[i])[::-1] == j)[0][0] for j in range(5 * i, 5 * i + 5))
                    for i in range(npts)])
    t2i = np.array([np.where(np.argsort(sims.T[j])[::-1] == j // 5)[0][0] for j in range(5 * npts)])
    return [100.0 * (r < k).mean() for r in (i2t, t2i) for k in (1, 5, 10)]


# ---- files in the published format ----

def caption_texts(n_images, seed):
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(5 * n_images):
        words = rng.choice(WORDS + ["zebra-like", "isn't", "."], size=rng.integers(3, 12))
        texts.append(" ".join(words).capitalize() + rng.choice(["", " .", "!"]))
    return texts


@pytest.fixture(scope="module")
def precomp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("f30k_precomp")
    rng = np.random.default_rng(0)
    np.save(folder / "test_ims.npy", rng.standard_normal((N_IMAGES, REGIONS, IMG_DIM)).astype(np.float32))
    (folder / "test_caps.txt").write_text("\n".join(caption_texts(N_IMAGES, 1)) + "\n")
    return folder


def options(**kw):
    base = dict(data_name="f30k_precomp", embed_size=EMBED, img_dim=IMG_DIM, word_dim=WORD_DIM, num_layers=1,
                precomp_enc_type="basic", text_enc_type="bigru", coding_type="VHACoding", pooling_type="MeanPooling",
                alpha=None, belta=0.1, no_imgnorm=False, no_txtnorm=False, margin=0.2, wemb_type="glove", word2idx=None)
    base.update(kw)
    return argparse.Namespace(**base)


def save_release(path, image_encoder, text_encoder, opt):
    torch.save({"epoch": 24, "model": [image_encoder.state_dict(), text_encoder.state_dict(), {}, {}],
                "best_rsum": np.float64(512.3), "opt": opt, "Eiters": 12345}, path)


@pytest.fixture(scope="module")
def bigru_release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bigru")
    torch.manual_seed(0)
    words = ["<pad>", "<start>", "<end>", "<unk>"] + WORDS + [".", "is", "n't"]
    word2idx = {w: i for i, w in enumerate(words)}
    (folder / "f30k_precomp_vocab.json").write_text(json.dumps(
        {"word2idx": word2idx, "idx2word": {str(i): w for w, i in word2idx.items()}, "idx": len(words)}))
    image, text = AuthorsImageEncoder(self_attention=True), AuthorsBiGRU(len(words) + 1)  # + <mask>
    opt = options(precomp_enc_type="selfattention", pooling_type="LSEPooling", vocab_size=len(words) + 1, word2idx=word2idx)
    save_release(folder / "model_best.pth.tar", image, text, opt)
    return folder, image.eval(), text.eval(), word2idx


@pytest.fixture(scope="module")
def bert_release(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("bert")
    base = folder / "bert-base-uncased"
    base.mkdir()
    (base / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "'", "-"]
                                              + WORDS + ["##s", "zebra", "like", "isn", "t"]) + "\n")
    BertTokenizer(str(base / "vocab.txt")).save_pretrained(base)
    torch.manual_seed(1)
    config = BertConfig(vocab_size=len((base / "vocab.txt").read_text().split()), hidden_size=768, num_hidden_layers=2,
                        num_attention_heads=12, intermediate_size=256)
    BertModel(config).save_pretrained(base)
    image, text = AuthorsImageEncoder(self_attention=False), AuthorsBert(str(base))
    for p in text.bert.parameters():  # the authors fine-tune all of BERT: the release differs from the base
        p.data += 0.02 * torch.randn_like(p)
    save_release(folder / "model_best.pth.tar", image, text, options(text_enc_type="bert", vocab_size=config.vocab_size))
    return folder, base, image.eval(), text.eval()


def authors_scores(image, text, texts, ids_of, pooling, precomp):
    images = torch.from_numpy(np.load(precomp / "test_ims.npy"))
    ids = [ids_of(t) for t in texts]
    lengths = [len(i) for i in ids]
    padded = torch.zeros(len(ids), max(lengths), dtype=torch.long)
    for row, i in enumerate(ids):
        padded[row, : len(i)] = torch.tensor(i)
    with torch.no_grad():
        return authors_sims(image(images), text(padded, lengths), lengths, pooling)


def our_scores(checkpoint, precomp):
    model, settings, _ = load_checkpoint(checkpoint)
    dataset = open_dataset(precomp).split("test")
    scores, owner = split_scores(model, dataset, table_for(dataset, settings))
    return scores, owner


# ---- the tests ----

def test_bigru_release_scores_match_the_authors_forward(bigru_release, precomp, tmp_path):
    folder, image, text, word2idx = bigru_release
    out = tmp_path / "chan-bigru-f30k.safetensors"
    assert main(["import-official", str(folder / "model_best.pth.tar"), "--out", str(out),
                 "--vocab", str(folder / "f30k_precomp_vocab.json"), "--trust-pickle"]) == 0
    texts = (precomp / "test_caps.txt").read_text().splitlines()

    def ids_of(t):  # lib/datasets/image_caption_bigru.py: word_tokenize(caption.lower()) between <start> and <end>
        return [1] + [word2idx.get(w, 3) for w in NLTKWordTokenizer().tokenize(t.lower())] + [2]

    expected = authors_scores(image, text, texts, ids_of, "LSEPooling", precomp)
    ours, owner = our_scores(out, precomp)
    assert torch.equal(owner, torch.arange(N_IMAGES).repeat_interleave(5))
    assert ours.shape == expected.shape == (N_IMAGES, 5 * N_IMAGES)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)
    assert expected.std() > 0.1  # the comparison is not between two constants

    metrics_file = tmp_path / "metrics.json"
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(precomp), "--split", "test",
                 "--json", str(metrics_file)]) == 0
    metrics = json.loads(metrics_file.read_text())
    got = [metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    np.testing.assert_allclose(got, authors_recalls(expected.numpy()), atol=1e-6)


def test_bert_release_scores_match_the_authors_forward(bert_release, precomp, tmp_path):
    folder, base, image, text = bert_release
    out = tmp_path / "chan-bert-f30k.safetensors"
    import_official(folder / "model_best.pth.tar", out, bert=base, trust_pickle=True)
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    # lib/datasets/image_caption_bert.py: BERT's basic tokenizer, then word pieces, between [CLS] and [SEP]
    pieces = Tokenizer(models.WordPiece.from_file(str(base / "vocab.txt"), unk_token="[UNK]"))
    pieces.normalizer = normalizers.BertNormalizer(lowercase=True)
    pieces.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = pieces.token_to_id("[CLS]"), pieces.token_to_id("[SEP]")
    texts = (precomp / "test_caps.txt").read_text().splitlines()

    def ids_of(t):
        return [cls] + pieces.encode(t).ids + [sep]

    expected = authors_scores(image, text, texts, ids_of, "MeanPooling", precomp)
    ours, _ = our_scores(out, precomp)
    torch.testing.assert_close(ours, expected, atol=2e-6, rtol=1e-5)
    assert expected.std() > 1e-3  # 500x the tolerance: the comparison is not between two constants


def test_import_refuses_without_trust_and_on_mismatches(bigru_release, tmp_path, capsys):
    folder = bigru_release[0]
    release, out = folder / "model_best.pth.tar", tmp_path / "x.safetensors"
    assert main(["import-official", str(release), "--out", str(out)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ReleaseError, match="embed.weight has shape"):  # a vocabulary of another size
        bad_vocab = tmp_path / "vocab.json"
        bad_vocab.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(["<pad>", "<start>", "<end>", "<unk>", "x"])}}))
        import_official(release, out, vocab_json=bad_vocab, trust_pickle=True)
    evil = tmp_path / "evil.pth.tar"
    torch.save({"model": [{}, {}], "opt": argparse.Namespace(), "payload": tmp_path}, evil)  # a PosixPath is not allow-listed
    with pytest.raises(ReleaseError, match="not a loadable CHAN release"):
        import_official(evil, out, trust_pickle=True)


def test_precomputed_features_are_refused_by_a_photo_model_and_vice_versa(bigru_release, precomp, small_flickr, tmp_path):
    from chan.checkpoint import DEFAULT_CHECKPOINT

    model, settings, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    with pytest.raises(FeatureMismatchError, match="holds precomputed 2048-d"):
        table_for(open_dataset(precomp).split("test"), settings)
    out = tmp_path / "imported.safetensors"
    folder = bigru_release[0]
    import_official(folder / "model_best.pth.tar", out, vocab_json=folder / "f30k_precomp_vocab.json", trust_pickle=True)
    _, imported_settings, info = load_checkpoint(out)
    assert info["epoch"] == 24 and info["best_rsum"] == pytest.approx(512.3)
    with pytest.raises(FeatureMismatchError, match="cannot be computed from the photos"):
        table_for(open_dataset(small_flickr).split("test"), imported_settings)


def test_repeated_image_rows_are_one_photo(tmp_path):
    rng = np.random.default_rng(3)
    rows = np.repeat(rng.standard_normal((4, 3, 8)).astype(np.float32), 5, axis=0)  # one row per caption
    np.save(tmp_path / "dev_ims.npy", rows)
    (tmp_path / "dev_caps.txt").write_text("\n".join(f"caption {i}" for i in range(20)) + "\n")
    dataset = open_dataset(tmp_path)
    assert dataset.layout == "precomputed" and len(dataset.photos) == 4 and len(dataset.captions) == 20
    assert dataset.captions_by_photo()["dev/2"] == [f"caption {i}" for i in range(10, 15)]
    from chan.region_settings import PrecomputedSettings

    table = table_for(dataset, PrecomputedSettings(feature_dim=8, num_regions=3))
    assert torch.equal(table.features[2], torch.from_numpy(rows[10]))


def test_five_fold_protocol_matches_the_authors_slicing():
    rng = np.random.default_rng(4)
    n = 50  # 5 folds of 10 photos and their 50 captions
    owner = torch.arange(n).repeat_interleave(5)
    scores = torch.from_numpy(rng.standard_normal((n, 5 * n))) + 3.0 * (owner[None] == torch.arange(n)[:, None])
    ours = fold_metrics(scores, owner)
    per_fold = [authors_recalls(scores[i * 10:(i + 1) * 10, i * 50:(i + 1) * 50].numpy()) for i in range(5)]
    expected = np.mean(per_fold, axis=0)
    np.testing.assert_allclose([ours[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)], expected, atol=1e-9)
    assert 0 < ours["rsum"] < 600


def test_the_demo_serves_an_imported_model_on_its_precomputed_folder(bigru_release, precomp, tmp_path):
    from app.handlers import Handlers
    from chan.gallery import open_gallery

    folder = bigru_release[0]
    out = tmp_path / "imported.safetensors"
    import_official(folder / "model_best.pth.tar", out, vocab_json=folder / "f30k_precomp_vocab.json", trust_pickle=True)
    gallery = open_gallery(precomp, out, "test", progress=False)
    assert gallery.precomputed and "precomputed region features" in gallery.describe()
    h = Handlers(gallery, upload_folder=tmp_path)

    items, ids, status = h.search_images("a dog runs through the snow", 3)
    assert len(ids) == 3 and all(i.startswith("test/") for i in ids)
    assert items[0][0].size == (300, 300)  # a card with the photo id and caption stands in for the missing photo
    hard, soft, bars, drawn, words, state, status = h.align(None, "a dog runs through the snow", ids[0])
    assert drawn is None and words[1] == "1:a" and "named by index (r0–r35)" in status
    assert "r0" in plot_traces(hard)[0].x and len(plot_traces(hard)[0].x) == REGIONS
    rows, drawn, status = h.rank_captions(None, "a red ball", ids[0])
    assert len(rows) == 21 and drawn is None and "precomputed regions" in status
    photo = tmp_path / "photo.png"
    __import__("PIL.Image").Image.new("RGB", (64, 48), "red").save(photo)
    *_, message = h.rank_captions(str(photo), "", "")
    assert "cannot be computed for a new photo here" in message


def test_an_imported_model_draws_real_boxes_on_a_tsv_gallery(bigru_release, tmp_path):
    """The authors' features as their extractor writes them, with the photos beside: search, inspector and figure
    draw the boxes."""
    from app.handlers import Handlers
    from chan.figure import figure_command
    from chan.gallery import open_gallery
    from tests.conftest import butd_line

    folder = bigru_release[0]
    out = tmp_path / "imported.safetensors"
    import_official(folder / "model_best.pth.tar", out, vocab_json=folder / "f30k_precomp_vocab.json", trust_pickle=True)
    tsv = tmp_path / "tsv"
    tsv.mkdir()
    rng = np.random.default_rng(5)
    lines = []
    for i in range(4):
        image_id, w, h = str(1000092795 + i), 120, 90
        x1, y1 = rng.uniform(0, 60, REGIONS), rng.uniform(0, 45, REGIONS)
        boxes = np.stack([x1, y1, x1 + 30, y1 + 20], 1)
        lines.append(butd_line(image_id, w, h, boxes, rng.standard_normal((REGIONS, IMG_DIM))))
        __import__("PIL.Image").Image.new("RGB", (w, h), "blue").save(tsv / f"{image_id}.jpg")
    (tsv / "test.tsv").write_text("\n".join(lines) + "\n")
    gallery = open_gallery(tsv, out, progress=False)
    assert gallery.precomputed and "bottom-up-attention TSV" in gallery.describe()
    h = Handlers(gallery, upload_folder=tmp_path)
    items, ids, status = h.search_images("a dog runs through the snow", 3)
    assert len(ids) == 3 and str(items[0][0]).endswith(".jpg")  # the photo itself, not a stand-in card
    r = h.align(None, "a dog runs through the snow", ids[0])
    assert r.drawn is not None and plot_traces(r.hard)[0].x[0].startswith("r0 box") and "named by index" not in r.status
    fig_path = tmp_path / "fig.svg"
    fig = figure_command("a dog runs through the snow", fig_path, out, gallery=tsv, photo_id=ids[0])
    photo_ax = next(ax for ax in fig.axes if ax.get_label() == "photo")
    assert fig_path.is_file() and len(photo_ax.patches) == len(r.words)
