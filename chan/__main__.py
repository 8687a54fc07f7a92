"""python -m chan <command>: inspect datasets, extract region features, train and evaluate CHAN."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .backbone import BACKBONES
from .data import DEFAULT_DATA
from .device import add_device_option, resolve_device
from .distributed import join
from .loss import LOSSES
from .similarity import POOLINGS, SCORERS


def detector_sizes(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated detector input sizes, checked as `RegionSettings` checks them."""
    from .region_settings import RegionSettings

    try:
        sizes = tuple(int(s) for s in text.split(","))
        RegionSettings(detector_sizes=sizes)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes in pixels separated by commas, e.g. 288,416 ({e})") from None
    return sizes


def weight_list(text: str) -> list[float]:
    """argparse type: comma-separated global-term weights, checked as the sweep checks them."""
    from .global_weight import check_weights

    try:
        return check_weights([float(w) for w in text.split(",")])
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: weights separated by commas, e.g. 0,0.1,0.2 ({e})") from None


def add_detector_options(p: argparse.ArgumentParser) -> None:
    """The objectness proposals' detector passes (ignored by the legacy regions)."""
    from .region_settings import DETECTOR_PRECISIONS, DETECTOR_SIZINGS, RegionSettings

    p.add_argument("--detector-sizing", choices=DETECTOR_SIZINGS, default=RegionSettings.detector_sizing,
                   help="fixed: a detector pass at every --detector-sizes; photo: one pass at the photo's short side "
                        "(down to a multiple of 32) within their range: faster, other proposals (default: %(default)s)")
    p.add_argument("--detector-sizes", type=detector_sizes, default=RegionSettings.detector_sizes, metavar="S,S",
                   help="detector input sizes, or the range of one chosen from the photo (default: "
                        f"{','.join(map(str, RegionSettings.detector_sizes))})")
    p.add_argument("--detector-precision", choices=DETECTOR_PRECISIONS, default=RegionSettings.detector_precision,
                   help="int8: the detector's convolutions quantized (ONNX Runtime): faster where the CPU has VNNI, "
                        "other proposals (default: %(default)s)")


def add_class_evidence_option(p: argparse.ArgumentParser) -> None:
    """Regions whose features carry what the detector saw in them (objectness proposals only)."""
    p.add_argument("--class-evidence", action=argparse.BooleanOptionalAction, default=False,
                   help="end each region's feature with the detector's 80 COCO class probabilities and its objectness "
                        "(zeros for grid cells); another feature cache (default: %(default)s)")


def add_detector_precision_override(p: argparse.ArgumentParser, note: str = "", auto: bool = False) -> None:
    """Read a checkpoint on its regions made with another detector precision (another region cache); with `auto`,
    the choice `auto` is offered and is the default."""
    from .region_settings import DETECTOR_PRECISIONS

    default = ("the checkpoint's" if not auto else
               "auto: int8 where the regions are extracted on a CPU with VNNI, else the checkpoint's")
    choices = DETECTOR_PRECISIONS + (("auto",) if auto else ())
    p.add_argument("--detector-precision", choices=choices, default="auto" if auto else None,
                   help="extract the regions with this detector precision instead of the checkpoint's: int8 is faster "
                        f"where the CPU has VNNI, at the cost of other proposals{note} (default: {default})")


def _cmd_info(args: argparse.Namespace) -> None:
    from .data import open_dataset

    print(open_dataset(args.data).summary())


def _cmd_extract(args: argparse.Namespace) -> None:
    from .data import open_dataset
    from .features import extract
    from .region_settings import LEGACY, RegionSettings

    dataset = open_dataset(args.data).split(args.split)
    legacy = {**LEGACY, "detector_sizing": "fixed"} if args.proposals == "legacy" else {}  # one pass at 416 px
    settings = RegionSettings(**{"detector_sizing": args.detector_sizing, "detector_sizes": args.detector_sizes,
                                 "detector_precision": args.detector_precision, "class_evidence": args.class_evidence,
                                 **legacy,
                                 "num_regions": args.regions, "backbone": args.backbone, "image_size": args.image_size})
    world, device = join(args.device)  # one process, or one of torchrun's
    if args.ray and world.size > 1:
        raise ValueError("--ray runs the extraction on a Ray cluster: start it once, not under torchrun")
    table = extract(dataset, args.out, settings, batch_size=args.batch_size, device=device, world=world, ray=args.ray)
    if not world.main:
        return
    print(f"{args.out}: {len(table.photo_ids)} photos x {table.features.shape[1]} regions x {table.features.shape[2]} dims")


def _cmd_train(args: argparse.Namespace) -> None:
    from .train import TrainConfig, train

    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})
    train(config)


def _cmd_index(args: argparse.Namespace) -> None:
    from .search import index_command

    index_command(args.gallery, args.checkpoint, args.qdrant, args.collection, args.split, resolve_device(args.device))


def _cmd_search(args: argparse.Namespace) -> None:
    from .search import search_command

    search_command(args.caption, args.gallery, args.checkpoint, args.qdrant, args.collection, args.k, args.prefetch,
                   args.split, args.json, resolve_device(args.device))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    evaluate_command(args.checkpoint, args.data, args.split, args.json, args.similarity, resolve_device(args.device),
                     args.global_weight, args.detector_precision)


def _cmd_global_weight(args: argparse.Namespace) -> None:
    from .global_weight import global_weight_command

    global_weight_command(args.checkpoint, args.out, args.data, args.split, args.weights, resolve_device(args.device))


def _cmd_alignments(args: argparse.Namespace) -> None:
    from .locality import alignments_command

    alignments_command(args.checkpoint, args.data, args.split, args.json, resolve_device(args.device))


def _cmd_grounding(args: argparse.Namespace) -> None:
    from .grounding import grounding_command

    grounding_command(args.data, args.checkpoint, args.comparison, args.split, args.json, resolve_device(args.device),
                      args.record)


def _cmd_label_prior(args: argparse.Namespace) -> None:
    from .label_prior import label_prior_command

    label_prior_command(args.checkpoint, args.out, args.data, args.grounding_data, args.scales, args.max_rsum_drop,
                        resolve_device(args.device), args.scale)


def _cmd_figure(args: argparse.Namespace) -> None:
    from .checkpoint import DEFAULT_CHECKPOINT
    from .figure import figure_command

    figure_command(args.caption, args.out, args.checkpoint or DEFAULT_CHECKPOINT, args.photo, args.gallery, args.photo_id,
                   args.split, args.top)
    print(f"wrote {args.out}")


def _cmd_table(args: argparse.Namespace) -> None:
    table_command(args.checkpoints, args.data, args.split)


def _cmd_import_official(args: argparse.Namespace) -> None:
    from .official import import_official

    model = import_official(args.path, args.out, args.vocab, args.bert, args.trust_pickle)
    c = model.config
    print(f"{args.out}: CHAN {c.text_encoder} ({c.pooling} pooling, D={c.embed_dim}, {c.feature_dim}-d precomputed regions"
          f"{', region self-attention' if c.self_attention else ''}). Evaluate it with:\n"
          f"  python -m chan evaluate --checkpoint {args.out} --data DIR_WITH_test_ims.npy --split test")


def evaluate_command(checkpoints: list[Path] | None, data: Path, split: str | None, json_path: Path | None,
                     similarity: str | None = None, device: torch.device | str = "cpu", global_weight: float = 0.0,
                     detector_precision: str | None = None) -> dict:
    """Evaluate a checkpoint (default: the app's), or the mean score of several (an ensemble).

    A split of 5,000 photos (COCO 5K) is also reported with the 5-fold 1K protocol (keys `fold5_*`).
    """
    from .checkpoint import DEFAULT_CHECKPOINT
    from .evaluate import COCO_5K, ensemble_scores, open_split
    from .metrics import fold_metrics, format_metrics, recall_metrics

    dataset, split = open_split(data, split)
    checkpoints = checkpoints or [DEFAULT_CHECKPOINT]
    scores, owner = ensemble_scores(checkpoints, dataset, similarity, device, global_weight, detector_precision)
    metrics = recall_metrics(scores, owner)
    print(f"{scores.shape[0]} photos, {scores.shape[1]} captions, split {split or '(all photos)'}"
          + (f", mean score of {len(checkpoints)} models" if len(checkpoints) > 1 else ""))
    if scores.shape[0] == COCO_5K:
        fold = fold_metrics(scores, owner)
        print("5-fold 1K (mean of the folds): " + format_metrics(fold))
        print("full 5K: " + format_metrics(metrics))
        metrics.update({f"fold5_{k}": v for k, v in fold.items()})
    else:
        print(format_metrics(metrics))
    if json_path:
        Path(json_path).write_text(json.dumps(metrics, indent=2))
    return metrics


def table_command(rows: list[str], data: Path, split: str | None) -> str:
    """A markdown accuracy table, one row per checkpoint (its file name and model description).

    A row written `a.safetensors+b.safetensors` scores the mean of those checkpoints (an ensemble). Each
    checkpoint is scored once, however many rows name it.
    """
    from functools import cache

    from .checkpoint import read_metadata
    from .evaluate import checkpoint_scores, mean_scores, open_split
    from .metrics import markdown_cells, recall_metrics

    dataset, split = open_split(data, split)
    scores_of = cache(lambda resolved: checkpoint_scores(resolved, dataset))
    lines = ["| model | similarity | text | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        paths = [Path(p) for p in row.split("+")]
        configs = [read_metadata(p)["config"] for p in paths]
        m = recall_metrics(*mean_scores([scores_of(p.resolve()) for p in paths]))
        similarity = " + ".join(f"{c['similarity']} ({c['pooling']})" for c in configs)
        lines.append(f"| {' + '.join(p.stem for p in paths)} | {similarity} | {' + '.join(c['text_encoder'] for c in configs)} | "
                     + markdown_cells(m) + " |")
    table = "\n".join(lines)
    print(table)
    return table


def build_parser() -> argparse.ArgumentParser:
    from .checkpoint import DEFAULT_CHECKPOINT
    from .gallery import DEFAULT_GALLERY
    from .global_weight import DEFAULT_WEIGHTS
    from .region_settings import RegionSettings
    from .search import add_qdrant_options, positive_count
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="python -m chan", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print photos and captions per split and the dataset's quirks")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("extract", help="region features for a dataset (resumable, fp16)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    p.add_argument("--split", help="only this split (default: every photo)")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors feature file to write or complete")
    p.add_argument("--regions", type=int, default=36, help="regions per photo (default: %(default)s)")
    p.add_argument("--proposals", choices=["objectness", "legacy"], default="objectness",
                   help="objectness: detector boxes at several sizes ranked by objectness, no whole-photo region; "
                        "legacy: the whole photo, up to 20 confident detections and grid cells (default: %(default)s)")
    p.add_argument("--backbone", default=RegionSettings.backbone, choices=BACKBONES)
    p.add_argument("--image-size", type=int, default=RegionSettings.image_size,
                   help="backbone input side in pixels (default: %(default)s)")
    add_detector_options(p)
    add_class_evidence_option(p)
    p.add_argument("--batch-size", type=int, default=4, help="photos per batch (default: %(default)s)")
    add_device_option(p)
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="map the extraction over a Ray cluster with Ray Data: a local Ray when no address is given, else "
                        "a running cluster's (auto, ray://HOST:10001), whose nodes have this project installed and the "
                        "photos at the same paths; writes the same feature file")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("index", help="push a gallery's region embeddings to a Qdrant collection (resumable)",
                       description="Encode every photo of a gallery with a CHAN checkpoint and upsert it into a Qdrant "
                                   "collection (a multivector of region embeddings for exact MaxSim, and their mean for "
                                   "a two-stage search), in batches with a progress bar. Photos already in the "
                                   "collection are skipped, so an interrupted push resumes; a collection built by "
                                   "another checkpoint is refused.")
    p.add_argument("--gallery", type=Path, default=DEFAULT_GALLERY, help="gallery folder, any dataset layout (default: %(default)s)")
    p.add_argument("--split", default=None, help="gallery split (default: test where there is one, else every photo)")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="CHAN checkpoint (default: %(default)s)")
    add_qdrant_options(p, push=True)
    add_device_option(p)
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("search", help="rank a gallery's photos for a caption, in process or on Qdrant",
                       description="Print the top k photos for a caption and optionally write them as JSON "
                                   "({query, backend, hits: [{rank, photo_id, score}]}), the same from either backend.")
    p.add_argument("caption")
    p.add_argument("--gallery", type=Path, default=DEFAULT_GALLERY, help="gallery folder (default: %(default)s)")
    p.add_argument("--split", default=None, help="gallery split, in process (default: test where there is one)")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="CHAN checkpoint (default: %(default)s)")
    add_qdrant_options(p)
    p.add_argument("--k", type=positive_count, default=10, help="photos to return (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write the hits as JSON")
    add_device_option(p)
    p.set_defaults(func=_cmd_search)

    d = TrainConfig()
    p = sub.add_parser("train", help="train CHAN (or the SCAN / global baselines) with dev-RSUM model selection")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset with train and dev splits (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint path (.safetensors); resumes if its run state exists")
    p.add_argument("--text-encoder", choices=["bert", "bigru"], default=d.text_encoder)
    p.add_argument("--similarity", choices=list(SCORERS), default=d.similarity,
                   help="hard: CHAN; soft: SCAN t2i attention; global: pooled-vector baseline (default: %(default)s)")
    p.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="word pooling (default: mean for bert, lse for bigru; lse_raw: the authors' unscaled log-sum-exp)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--lr-step", type=int, default=d.lr_step, help="epoch at which lr drops x0.1 (default: %(default)s)")
    p.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="triplet: the hinge with hardest negatives (VSE++); infonce: each true pair against every "
                        "negative of the batch in a softmax, both ways (default: %(default)s)")
    p.add_argument("--margin", type=float, default=d.margin, help="triplet margin (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="infonce: the softmax's temperature on the scores (default: %(default)s)")
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs,
                   help="triplet: epochs summing the loss over all negatives before only the hardest counts "
                        "(default: %(default)s)")
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help="joint space D (default: %(default)s)")
    p.add_argument("--finetune-layers", type=int, default=d.finetune_layers,
                   help="top BERT layers trained; -1 trains all of them (default: %(default)s)")
    p.add_argument("--bert-model", default=d.bert_model,
                   help="BERT-style text model: the bundled package name, a local folder, or a hub id (default: %(default)s)")
    p.add_argument("--self-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="region self-attention block (default: on for bigru, off for bert)")
    p.add_argument("--regions", choices=["proposals", "legacy"], default=d.regions,
                   help="proposals: objectness-ranked detector boxes, no whole-photo region; legacy: the whole photo, "
                        "up to 20 confident detections and grid cells (default: %(default)s)")
    p.add_argument("--tune-backbone", action=argparse.BooleanOptionalAction, default=d.tune_backbone,
                   help="tune the backbone's last blocks and head on cached trunk maps (default: %(default)s)")
    p.add_argument("--tune-from", type=int, default=d.tune_from, metavar="BLOCK",
                   help="with --tune-backbone, the first tuned backbone block; the cache keeps its input map, so "
                        "another block means another feature cache (default: %(default)s)")
    p.add_argument("--backbone", default=d.backbone, choices=BACKBONES,
                   help="with proposals, the ImageNet EfficientNet-Lite under the regions; another backbone means "
                        "another feature cache, and its blocks are numbered its own way (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help="with proposals, the backbone's input side in pixels (default: %(default)s)")
    add_detector_options(p)
    add_class_evidence_option(p)
    p.add_argument("--pooled-tokens", choices=["content", "all"], default=d.pooled_tokens,
                   help="content: special tokens and punctuation never align or pool; all: every token (default: %(default)s)")
    p.add_argument("--global-weight", type=float, default=d.global_weight, metavar="W",
                   help="score = the similarity + W x the cosine of the mean region and the mean pooled word, trained "
                        "together and kept in the checkpoint (default: %(default)s, none)")
    p.add_argument("--grounding-weight", type=float, default=d.grounding_weight, metavar="W",
                   help="with --class-evidence: add W x the detector's labels distilled into the words that name them "
                        "(chan/weak_labels.py; words found by the text encoder's similarity to the class names) "
                        "(default: %(default)s, none)")
    p.add_argument("--grounding-threshold", type=float, default=d.grounding_threshold,
                   help="a word takes a class its photo shows when their cosine is at least this (default: %(default)s)")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="keep the tuned backbone tail (of --init) as it is: its region features are computed once, so "
                        "an epoch costs a fraction of one that tunes it; the checkpoint still holds the tail")
    p.add_argument("--max-photos", type=int, default=None, help="use only the first N train photos (quick runs)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--init", type=Path, default=None,
                   help="start from this trained checkpoint (same options and regions; its global weight and a "
                        "later --tune-from may differ, the blocks it did not tune starting from ImageNet): its "
                        "weights, the epoch they are from (its best on dev) and its history up to it (fresh optimizer "
                        "state); --epochs counts those epochs too")
    add_device_option(p)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision,
                   help="auto and bf16: bf16 autocast on a GPU; on the CPU only the tuned backbone tail runs in bf16 "
                        "autocast, and only where the CPU computes bf16 natively. fp32: none, the tail included, so a run "
                        "on such a CPU repeats one made where bf16 did not pay (default: %(default)s)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="R@1/5/10 both ways, RSUM, median and mean rank")
    p.add_argument("--checkpoint", type=Path, action="append", default=None,
                   help="default: the checkpoint the app loads; repeat it to evaluate the mean score of several (an ensemble)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="dataset folder: Flickr8k or COCO layout, or precomputed <split>_ims.npy + <split>_caps.txt (default: %(default)s)")
    p.add_argument("--split", default=None,
                   help="default: test where the dataset has one, else every photo; a 5,000-photo split (COCO testall) "
                        "is also reported with the 5-fold 1K protocol")
    p.add_argument("--json", type=Path, default=None, help="also write the metrics as flat JSON")
    p.add_argument("--similarity", choices=list(SCORERS), default=None,
                   help="score with this similarity instead of the one the model was trained with")
    p.add_argument("--global-weight", type=float, default=0.0, metavar="W",
                   help="add W x the cosine of the mean region and the mean word embedding to each score: a global "
                        "term beside the model's own, read without retraining (default: %(default)s, none)")
    add_detector_precision_override(p)
    add_device_option(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("global-weight", help="choose the global term's serving weight on dev; write a checkpoint scoring with it",
                       description="Score the split once, then rank with the similarity plus w x the global term "
                                   "(the cosine of the mean region and the mean word) for each w, print the table, "
                                   "and write a copy of the checkpoint that scores with the w of the highest RSUM "
                                   "(the same tensors; its info keeps the trained weight and the sweep). Words align "
                                   "to the same regions whatever w. Refuses the test split.")
    p.add_argument("--checkpoint", type=Path, required=True, help="the trained checkpoint")
    p.add_argument("--out", type=Path, required=True, help="the reweighted checkpoint to write")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    p.add_argument("--split", default="dev", help="the split the weight is chosen on (default: %(default)s)")
    p.add_argument("--weights", type=weight_list, default=list(DEFAULT_WEIGHTS), metavar="W,W",
                   help="the weights tried (default: " + ",".join(f"{w:g}" for w in DEFAULT_WEIGHTS) + ")")
    add_device_option(p)
    p.set_defaults(func=_cmd_global_weight)

    p = sub.add_parser("alignments", help="where words hard-align: whole photo, detections or grid cells, over a split",
                       description="Pair every caption of the split with its own photo, and report where its words "
                                   "hard-align: the share of content words (and of stopwords) on the whole photo, on "
                                   "detector boxes and on grid cells, distinct regions per caption, the chosen box's "
                                   "area, and the split's RSUM. Special tokens and punctuation are left out.")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the checkpoint the app loads")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    p.add_argument("--split", default=None, help="default: test where the dataset has one, else every photo")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as flat JSON")
    add_device_option(p)
    p.set_defaults(func=_cmd_alignments)

    p = sub.add_parser("grounding", help="the pointing game: do words that name an object align to a box on it?",
                       description="On a COCO-layout folder with annotations/instances_<split>.json, every caption "
                                   "word that names a category present in its photo (through the synonym table in "
                                   "chan/grounding.py: man, woman, boy -> person, bike -> bicycle) is a trial. A row "
                                   "hits when its box's centre lies in a true box of that category; stricter, IoU >= "
                                   "0.5. Prints CHAN's hard alignment, the SCAN comparison's attention argmax and "
                                   "rules without learning (whole photo, largest region, most confident box, the "
                                   "detector's label match, a random region) from one run.")
    p.add_argument("--data", type=Path, required=True, help="COCO-layout folder with instance annotations")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the checkpoint the app loads")
    p.add_argument("--comparison", type=Path, default=None,
                   help="the SCAN model whose attention argmax is a row (default: the demo's comparison; 'none': no row)")
    p.add_argument("--split", default=None, help="the annotations' split, e.g. train2017 (default: the only one there is)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write flat JSON: <row>_pointing, <row>_iou50, <row>_mean_iou and words")
    p.add_argument("--record", action="store_true",
                   help="also store the hard alignment's figures in the checkpoint's info (the demo's header shows them)")
    add_device_option(p)
    p.set_defaults(func=_cmd_grounding)

    p = sub.add_parser("label-prior", help="give a checkpoint the detector's class evidence, its labels' names as a prior",
                       description="Copy a checkpoint trained without class evidence into one that reads it: each "
                                   "class's new input column starts as a scale x the model's own text embedding of the "
                                   "class name (chan/label_prior.py). Sweeps the scale, printing Flickr8k dev RSUM and "
                                   "the pointing game on a COCO-layout dev set for each, and writes the copy with the "
                                   "best dev pointing whose dev RSUM is within --max-rsum-drop of scale 0's.")
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint on objectness proposals")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint to write")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset with a dev split (default: %(default)s)")
    p.add_argument("--grounding-data", type=Path, default=None, help="COCO-layout dev folder with instance boxes")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--scales", type=weight_list, default=[0.0, 0.5, 1.0, 2.0, 4.0], metavar="S,S",
                     help="scales tried, in units of the mean norm of a region's projection (default: 0,0.5,1,2,4)")
    how.add_argument("--scale", type=float, default=None,
                     help="no sweep: write the copy with this scale (e.g. the one chosen for the model's twin)")
    p.add_argument("--max-rsum-drop", type=float, default=1.0,
                   help="the dev RSUM a scale may lose against scale 0 (default: %(default)s)")
    add_device_option(p)
    p.set_defaults(func=_cmd_label_prior)

    p = sub.add_parser("figure", help="a publication figure of one caption's word-region alignment (pdf, svg or png)",
                       description="Draw one pair as the papers do: the photo with each word's chosen region boxed "
                                   "in the word's colour, the caption in those colours, the hard-alignment matrix "
                                   "with the eliminated cells greyed out, and the soft attention it replaces. Vector "
                                   "output for .pdf and .svg (the photo itself stays a bitmap).")
    p.add_argument("--caption", required=True)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--photo", type=Path, help="any photo file")
    where.add_argument("--photo-id", help="a gallery photo, by its file name (with --gallery)")
    p.add_argument("--gallery", type=Path, default=None, help="gallery folder for --photo-id and --top (any dataset layout)")
    p.add_argument("--split", default=None, help="gallery split (default: test where there is one)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the checkpoint the app loads")
    p.add_argument("--top", type=int, default=0, help="add the caption's N best gallery photos in a row (needs --gallery)")
    p.add_argument("--out", type=Path, required=True, help="fig.pdf, fig.svg or fig.png")
    p.set_defaults(func=_cmd_figure)

    p = sub.add_parser("import-official", help="convert an authors' released CHAN checkpoint (.pth.tar) into this project's format",
                       description="Convert a checkpoint released with the CHAN paper (precomputed bottom-up-attention "
                                   "features, BiGRU or BERT text encoder) into a safetensors checkpoint that evaluate and "
                                   "the demo open, with a folder of <split>_ims.npy + <split>_caps.txt as data.")
    p.add_argument("path", type=Path, help="the released checkpoint (a torch.save pickle)")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors checkpoint to write")
    p.add_argument("--vocab", type=Path, default=None, help="BiGRU models: the SCAN vocabulary json (e.g. f30k_precomp_vocab.json)")
    p.add_argument("--bert", type=Path, default=None, help="BERT models: the local bert-base-uncased folder they were trained from")
    p.add_argument("--trust-pickle", action="store_true",
                   help="required: the release is a pickle, and unpickling can run code (only allow-listed classes are accepted)")
    p.set_defaults(func=_cmd_import_official)

    p = sub.add_parser("table", help="evaluate several checkpoints and print a markdown accuracy table")
    p.add_argument("checkpoints", nargs="+",
                   help="checkpoint files, one table row each; A+B makes one row of their mean score (an ensemble)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    p.add_argument("--split", default=None, help="default: test where the dataset has one, else every photo")
    p.set_defaults(func=_cmd_table)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # our errors are ValueErrors with a message for the user
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
