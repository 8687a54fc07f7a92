"""Train CHAN on cached region features: triplet or InfoNCE loss (plus the detector's labels distilled into the words
 that name them, where asked), dev-RSUM model selection, resumable."""
from __future__ import annotations

import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .backbone import load_backbone
from .checkpoint import load_checkpoint, save_checkpoint
from .data import DEFAULT_DATA, open_dataset
from .device import autocast, bf16_pays
from .distributed import gather_rows, join
from .evaluate import evaluate
from .features import RegionTable, table_for
from .loss import LOSSES, contrastive_loss, triplet_loss
from .metrics import format_metrics
from .model import CHAN, DEFAULT_BERT, SPECIALS, ModelConfig, bert_path, tokenize_words
from .region_settings import LEGACY_SETTINGS, RegionSettings
from .weak_labels import EVIDENCE_START, label_distillation_loss, word_class_similarity

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: Path = DEFAULT_DATA
    out: Path = Path("checkpoints/chan.safetensors")
    text_encoder: str = "bert"
    similarity: str = "hard"
    pooling: str | None = None  # default: mean for bert, lse for bigru
    self_attention: bool | None = None  # default: off for bert, on for bigru
    epochs: int = 10
    batch_size: int = 128
    lr: float = 5e-4
    bert_lr_scale: float = 0.1
    lr_step: int = 6
    loss: str = "triplet"  # triplet: the hinge with hardest negatives (VSE++); infonce: softmax over the batch
    margin: float = 0.2
    temperature: float = 0.05  # infonce: scores are divided by it
    warmup_epochs: int = 1  # epochs with the sum over all negatives before the hardest negative takes over
    embed_dim: int = 512
    finetune_layers: int = 2
    bert_model: str = DEFAULT_BERT  # package name, local model folder or hub id
    grad_clip: float = 2.0
    region_dropout: float = 0.2
    token_mask: float = 0.2
    max_photos: int | None = None
    seed: int = 0
    regions: str = "proposals"  # proposals: objectness-ranked boxes, no whole photo; legacy: whole photo + grid + detections
    tune_backbone: bool = True  # tune the backbone's tail on cached trunk maps (needs the proposals regions)
    backbone: str = RegionSettings.backbone  # proposals: the EfficientNet-Lite whose maps the regions pool
    tune_from: int = RegionSettings.tail_start  # the tail's first block: its input map is what the cache keeps
    image_size: int = RegionSettings.image_size  # proposals: the backbone's input side
    detector_sizing: str = RegionSettings.detector_sizing  # proposals: fixed sizes, or one from the photo's size
    detector_sizes: tuple[int, ...] = RegionSettings.detector_sizes
    detector_precision: str = RegionSettings.detector_precision  # proposals: fp32, or int8 (ONNX Runtime)
    class_evidence: bool = False  # proposals: each region's feature ends with the detector's confidence in each class
    global_weight: float = 0.0  # >0: train with a global term in the score (W x cosine of the mean region and mean word)
    # >0 (needs class evidence): add this x the detector's labels distilled into the words that name them (weak_labels)
    grounding_weight: float = 0.0
    grounding_threshold: float = 0.3  # a word takes a class its photo shows when their cosine is at least this
    # keep the backbone's tuned tail as it is: its region features are computed once, and an epoch costs a fraction
    freeze_backbone: bool = False
    pooled_tokens: str = "content"  # content: no special tokens or punctuation in the max and the pooling; all
    init: Path | None = None  # start from this checkpoint's weights and continue its epochs (fresh optimizer state)
    device: str = "auto"  # auto: the GPU when CUDA is available, else the CPU
    precision: str = "auto"  # auto / bf16: bf16 autocast on a GPU, on the CPU the tail's where bf16 pays; fp32: none


def build_vocab(captions: list[str]) -> list[str]:
    words = sorted({w for c in captions for w in tokenize_words(c)})
    return SPECIALS + words


def _region_dropout(n: int, k: int, p: float) -> torch.Tensor:
    """Keep each region with prob 1-p; region 0 (the whole photo, or the top proposal) always stays."""
    mask = torch.rand(n, k) >= p
    mask[:, 0] = True
    return mask


def _inner_tokens(mask: torch.Tensor, p: float) -> torch.Tensor:
    """A random fraction p of the real tokens, never the first or last (the augmentation's targets)."""
    lengths = mask.sum(1, keepdim=True)
    pos = torch.arange(mask.shape[1])[None]
    inner = (pos > 0) & (pos < lengths - 1)
    return inner & (torch.rand(mask.shape) < p)


def _mask_tokens(ids: torch.Tensor, mask: torch.Tensor, mask_id: int, p: float) -> torch.Tensor:
    """Replace a fraction p of the real tokens (never the first or last) by the mask token."""
    return ids.masked_fill(_inner_tokens(mask, p), mask_id)


def _delete_tokens(mask: torch.Tensor, p: float) -> torch.Tensor:
    """Drop a fraction p of the real tokens (never the first or last) from the mask: token deletion."""
    return mask & ~_inner_tokens(mask, p)


class FrozenCaptionStates:
    """Every training caption's token states after the text model's frozen layers, computed once (fp16).

    Training then runs only the tuned layers: about three times cheaper per batch with MiniLM-L6 and
    two tuned layers. Augmentation becomes token deletion (tokens leave the attention and the pooling).
    """

    def __init__(self, model: CHAN, texts: list[str], chunk: int = 256):
        encoder = model.text_encoder
        parts = []
        was_training = encoder.training
        encoder.eval()
        for s in tqdm(range(0, len(texts), chunk), desc="frozen text layers", unit="chunk"):
            ids, mask, _ = encoder.tokenize(texts[s : s + chunk])
            parts.append((ids, mask, encoder.frozen_states(ids.to(model.device), mask.to(model.device)).half().cpu()))
        encoder.train(was_training)
        L = max(i.shape[1] for i, _, _ in parts)
        pad = torch.nn.functional.pad
        self.ids = torch.cat([pad(i, (0, L - i.shape[1])) for i, _, _ in parts])
        self.mask = torch.cat([pad(m, (0, L - m.shape[1])) for _, m, _ in parts])
        self.states = torch.cat([pad(x, (0, 0, 0, L - x.shape[1])) for _, _, x in parts])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids, mask and float states of these captions, trimmed to their longest."""
        L = int(self.mask[idx].sum(1).max())
        return self.ids[idx, :L], self.mask[idx, :L], self.states[idx, :L].float()


def _schedule_from(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.StepLR, epoch: int,
                   lr_step: int) -> None:
    """Continue the step schedule after `epoch` epochs with the command line's step (lr x0.1 every lr_step epochs)."""
    scheduler.step_size = lr_step
    scheduler.last_epoch = epoch
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * scheduler.gamma ** (epoch // lr_step)


def _comparable(config: dict) -> dict:
    """A model description less what a warm start may change: the global weight and where the tuned tail starts."""
    return {k: v for k, v in config.items() if k not in ("global_weight", "tail_start")}


def _tail_shifted(name: str, shift: int) -> str:
    """A tuned-tail weight's name in a tail that starts `shift` blocks earlier."""
    match = re.fullmatch(r"(.*\btail\.blocks\.)(\d+)(\..+)", name)
    return f"{match[1]}{int(match[2]) + shift}{match[3]}" if match else name


def _warm_start(model: CHAN, settings: RegionSettings, init: Path) -> tuple[int, list[dict]]:
    """Load a trained checkpoint's weights into `model`; returns the epochs it ran and their history (if kept beside it).

    The checkpoint may have tuned fewer backbone blocks (a later tail start): its blocks go to the end of
    this model's tail, and the blocks before them start from the backbone's ImageNet weights.
    """
    trained, regions, info = load_checkpoint(init)
    ours, theirs = model.describe()["tail_start"], trained.describe()["tail_start"]
    shift = theirs - ours
    untailed = [replace(r, tail_start=0) if isinstance(r, RegionSettings) else r for r in (regions, settings)]
    if (_comparable(trained.describe()) != _comparable(model.describe()) or untailed[0] != untailed[1]
            or shift < 0 or bool(ours) != bool(theirs)):
        raise ValueError(f"--init {init} was trained with another model or other regions (see its metadata); "
                         "give the options it was trained with (--tune-from may only start earlier than its)")
    model.load_state_dict({**model.state_dict(), **{_tail_shifted(k, shift): v for k, v in trained.trainable_state().items()}})
    epochs = int(info.get("epoch", 0))
    history_path = Path(init).with_suffix(".history.json")
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    log.info("starting from %s after its epoch %d (fresh optimizer state%s)", init, epochs,
             f"; backbone blocks {ours}-{theirs - 1} from ImageNet" if shift else "")
    return epochs, [h for h in history if h["epoch"] <= epochs]


class _Encoders(nn.Module):
    """The part of a training step that DistributedDataParallel wraps: both encoders, on this process's rows."""

    def __init__(self, model: CHAN):
        super().__init__()
        self.model = model

    def forward(self, features, region_mask, maps, token_mask, tokens=None, frozen_states=None, seen=False):
        """`seen`: `features` are already as the model sees them (the tail's output precomputed: `--freeze-backbone`)."""
        if seen:
            device = self.model.device
            regions = self.model.image_encoder.project(features.to(device).float(), region_mask.to(device))
        else:
            regions, _ = self.model.encode_images(features, region_mask, maps)
        if frozen_states is not None:
            return regions, self.model.text_encoder.tuned_forward(frozen_states, token_mask)
        return regions, self.model.text_encoder(tokens, token_mask)


@torch.no_grad()
def frozen_tail_features(model: CHAN, table: RegionTable, rows: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Region features as the model's (frozen) tail gives them, fp16, once for the photos of these rows; and a map from
    a table row to its row of the result. Training then never runs the tail: its weights stay as they are."""
    encoder = model.image_encoder
    was_training = encoder.training
    encoder.eval()
    photos = torch.unique(rows)
    out = []
    for s in tqdm(range(0, len(photos), chunk), desc="backbone tail (frozen)", unit="chunk"):
        features, maps = table.model_inputs(photos[s : s + chunk])
        out.append(encoder.region_features(features.to(model.device), maps.to(model.device)).half().cpu())
    encoder.train(was_training)
    where = torch.full((len(table.photo_ids),), -1, dtype=torch.long)
    where[photos] = torch.arange(len(photos))
    return torch.cat(out), where


def _end_epoch(c: TrainConfig, model: CHAN, settings, dev_set, table: RegionTable, optimizer, scheduler, epoch: int,
               losses: list[float], best: float, history: list[dict], started: float) -> float:
    """Evaluate on dev, keep the best checkpoint, save the run state and the curves; returns the best dev RSUM."""
    out = Path(c.out)
    metrics = evaluate(model, dev_set, table)
    history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **metrics, "minutes": (time.time() - started) / 60})
    log.info("epoch %d dev: %s", epoch + 1, format_metrics(metrics))
    if metrics["rsum"] > best:
        best = metrics["rsum"]
        info = {"train": {k: str(v) for k, v in asdict(c).items()}, "epoch": epoch + 1, "dev": metrics}
        save_checkpoint(model, settings, out, info)
    torch.save({"model": {k: v.cpu() for k, v in model.trainable_state().items()}, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch + 1,
                "best": best, "history": json.dumps(history), "config": json.dumps(model.describe())},
               out.with_suffix(".state.pt"))
    out.with_suffix(".history.json").write_text(json.dumps(history, indent=1))
    _plot_curves(history, out.with_suffix(".png"))
    return best


def _plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(epochs, [h["loss"] for h in history], "o-")
    a.set(xlabel="epoch", ylabel="mean triplet loss per batch", title="training loss")
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        b.plot(epochs, [h[key] for h in history], "o-", label=key)
    b.set(xlabel="epoch", ylabel="recall (%)", title="dev R@K")
    b.legend(fontsize=7, ncol=2)
    for axis in (a, b):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(c: TrainConfig) -> dict:
    """Run (or resume) one training; the best dev-RSUM epoch is saved at `c.out`."""
    out = Path(c.out)
    state_path = out.with_suffix(".state.pt")
    bigru = c.text_encoder == "bigru"
    pooling = c.pooling or ("lse" if bigru else "mean")
    self_attention = bigru if c.self_attention is None else c.self_attention

    if c.global_weight < 0:
        raise ValueError(f"--global-weight {c.global_weight}: give a weight of 0 or more")
    if c.loss not in LOSSES:
        raise ValueError(f"--loss {c.loss!r}: give {' or '.join(LOSSES)}")
    if not 0 < c.temperature <= 1:
        raise ValueError(f"--temperature {c.temperature}: give a value in (0, 1]")
    if c.grounding_weight < 0:
        raise ValueError(f"--grounding-weight {c.grounding_weight}: give a weight of 0 or more")
    if c.grounding_weight and not (c.class_evidence and c.regions == "proposals" and c.text_encoder == "bert"):
        raise ValueError("--grounding-weight needs --class-evidence regions (proposals) and the bert text encoder")
    world, device = join(c.device)
    dataset = open_dataset(c.data)
    train_set, dev_set = dataset.split("train"), dataset.split("dev")
    if c.max_photos:
        keep = {p.id for p in train_set.photos[: c.max_photos]}
        train_set.photos = [p for p in train_set.photos if p.id in keep]
        train_set.captions = [x for x in train_set.captions if x.photo_id in keep]
    settings = (RegionSettings(backbone=c.backbone, tail_start=c.tune_from, image_size=c.image_size,
                               detector_sizing=c.detector_sizing, detector_sizes=tuple(c.detector_sizes),
                               detector_precision=c.detector_precision, class_evidence=c.class_evidence)
                if c.regions == "proposals" else LEGACY_SETTINGS)
    if c.tune_backbone and not settings.tail_start:
        raise ValueError(f"--tune-backbone needs regions that keep the backbone's trunk maps; {c.regions!r} regions do not")
    blocks = len(load_backbone(settings.backbone)._blocks) if c.tune_backbone else 0
    if c.tune_backbone and not 0 < c.tune_from < blocks:
        raise ValueError(f"--tune-from {c.tune_from}: {settings.backbone} has blocks 0-{blocks - 1}; give one of 1-{blocks - 1}")
    table: RegionTable = table_for(dataset, settings, device=device, world=world)  # sharded under torchrun
    torch.manual_seed(c.seed)  # after the region cache: extracting it (or not) must not change the run
    random.seed(c.seed)
    np.random.seed(c.seed)

    config = ModelConfig(
        feature_dim=settings.feature_dim, embed_dim=c.embed_dim, text_encoder=c.text_encoder,
        similarity=c.similarity, pooling=pooling, self_attention=self_attention,
        finetune_layers=c.finetune_layers, bert_model=c.bert_model, vocab=build_vocab([x.text for x in train_set.captions]) if bigru else [],
        pooled_tokens=c.pooled_tokens, tail_start=settings.tail_start if c.tune_backbone else 0,
        backbone=settings.backbone, roi_size=settings.roi_size, global_weight=c.global_weight,
    )
    model = CHAN(config).to(device)
    encoder = model.image_encoder
    encoder.tail_bf16 = c.precision != "fp32"
    if encoder.tail is not None:
        log.info("the backbone's tail trains in %s", "bf16 autocast" if encoder.tail_bf16 and bf16_pays(device) else "fp32")
    if bigru:
        log.info("GloVe vectors for %d of %d words", model.text_encoder.init_from_glove(), len(config.vocab))

    def pretrained(name: str) -> bool:  # BERT layers and the backbone's tail learn at bert_lr_scale x lr
        return ".bert." in name or ".tail." in name

    base = [p for n, p in model.named_parameters() if p.requires_grad and not pretrained(n)]
    tuned = [p for n, p in model.named_parameters() if p.requires_grad and pretrained(n)]
    optimizer = torch.optim.AdamW([{"params": base, "lr": c.lr}, {"params": tuned, "lr": c.lr * c.bert_lr_scale}])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=c.lr_step, gamma=0.1)

    start, best, history = 0, -1.0, []
    if state_path.exists():
        state = torch.load(state_path, weights_only=True, map_location="cpu")
        expected = set(model.trainable_state())
        stored = asdict(ModelConfig(**json.loads(state["config"]))) if "config" in state else None  # older states: defaults filled
        if stored is not None and stored != json.loads(json.dumps(model.describe())):
            raise ValueError(f"{state_path} was trained with another model configuration (see its checkpoint's metadata); "
                             "resume with the same options, use another --out, or delete it to start over")
        if set(state["model"]) != expected:
            raise ValueError(f"{state_path} holds the weights of another model (e.g. {sorted(set(state['model']) ^ expected)[:3]}); "
                             "use another --out, or delete it to start over")
        model.load_state_dict({**model.state_dict(), **state["model"]})  # strict: every key is checked
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _schedule_from(optimizer, scheduler, scheduler.last_epoch, c.lr_step)  # the command line wins from here on
        torch.set_rng_state(state["rng"])
        start, best, history = state["epoch"], state["best"], json.loads(state["history"])
        log.info("resuming %s after epoch %d (best dev RSUM %.1f)", out, start, best)
    elif c.init:
        start, history = _warm_start(model, settings, Path(c.init))
        _schedule_from(optimizer, scheduler, start, c.lr_step)

    photo_index = table.rows([x.photo_id for x in train_set.captions])
    seen, seen_row = (frozen_tail_features(model, table, photo_index) if c.freeze_backbone and encoder.tail is not None
                      else (None, None))
    texts = [x.text for x in train_set.captions]
    frozen = FrozenCaptionStates(model, texts) if c.text_encoder == "bert" else None
    word_classes = (word_class_similarity(bert_path(c.bert_model), frozen.ids, frozen.mask)
                    if c.grounding_weight else None)
    started = time.time() - 60 * (history[-1]["minutes"] if history else 0)  # minutes count across resumes
    step = _Encoders(model)
    if world.size > 1:  # gradients averaged over the processes; each scores the whole global batch
        step = DistributedDataParallel(step, device_ids=[device] if device.type == "cuda" else None)
    for epoch in range(start, c.epochs):
        step.train()
        order = torch.randperm(len(texts))
        losses = []
        bar = tqdm(range(0, len(order), c.batch_size), desc=f"epoch {epoch + 1}/{c.epochs}", unit="batch",
                   disable=not world.main)
        for s in bar:
            idx = order[s : s + c.batch_size]  # the global batch; this process encodes its `mine` rows of it
            rows, mine = photo_index[idx], world.shard(len(idx))
            region_mask = _region_dropout(len(rows), table.features.shape[1], c.region_dropout)
            if frozen is not None:
                ids, tmask, states = frozen.batch(idx)
                kept = _delete_tokens(tmask, c.token_mask)
                text = {"token_mask": kept[mine].to(device), "frozen_states": states[mine].to(device)}
            else:
                ids, tmask, _ = model.text_encoder.tokenize([texts[i] for i in idx])
                kept = tmask
                masked = _mask_tokens(ids, tmask, model.text_encoder.mask_id, c.token_mask)
                text = {"token_mask": tmask[mine].to(device), "tokens": masked[mine].to(device)}
            if seen is not None:
                feats, maps = seen[seen_row[rows[mine]]], None
            else:
                feats, maps = table.model_inputs(rows[mine])
            with autocast(device, c.precision):
                regions, words = step(feats, region_mask[mine], maps, seen=seen is not None, **text)
                regions, words = gather_rows(regions, world, len(idx)), gather_rows(words, world, len(idx))
                pooled = model.pooled_mask(ids.to(device), kept.to(device))
                scores = model.scores(regions, region_mask.to(device), words, pooled).float()
            same_photo = rows[:, None] == rows[None, :]
            loss = (contrastive_loss(scores, same_photo, c.temperature) if c.loss == "infonce"
                    else triplet_loss(scores, same_photo, c.margin, hardest=epoch >= c.warmup_epochs))
            if word_classes is not None:  # each caption's words against its own photo's regions
                cosines = torch.einsum("bld,bkd->blk", words.float(), regions.float())
                evidence = table.features[rows, :, EVIDENCE_START:].float().to(device)
                distilled, _ = label_distillation_loss(cosines, region_mask.to(device), pooled,
                                                       word_classes[idx, : words.shape[1]].float().to(device), evidence,
                                                       c.grounding_threshold)
                loss = loss + c.grounding_weight * distilled
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], c.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        scheduler.step()
        if world.main:  # one process evaluates, logs and saves; the others wait for it
            best = _end_epoch(c, model, settings, dev_set, table, optimizer, scheduler, epoch, losses, best, history,
                              started)
        world.barrier()
    log.info("best dev RSUM %.1f; checkpoint %s", best, out)
    return {"best_dev_rsum": best, "history": history}
