"""Do words point at their objects? The pointing game on photos with ground-truth boxes (`python -m chan grounding`).

A trial is a caption word that names a COCO category present in its photo's instance annotations ("dog",
"man" -> person). A row hits when its chosen box's centre lies inside a ground-truth box of that category
(the pointing game, Zhang et al., ECCV 2016); the stricter test asks IoU >= 0.5 with such a box. Rows:

- hard: CHAN's hard alignment, the word's argmax of cosine over its photo's regions (the alignment the demo shows);
- soft: the comparison model's SCAN attention argmax;
- whole_photo, largest, most_confident, label_match, random: rules without learning, the references to beat.

A word split into pieces ("skate", "##board") counts once: its row of cosines (or attention) is the mean of its
pieces' rows. Words name categories through `CATEGORY_WORDS`, a hand table used for measuring only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import Dataset, DatasetError
from .encoding import encode_captions, encode_table
from .evaluate import protocol_pairs
from .features import RegionTable
from .model import CHAN
from .pair import word_spans
from .similarity import _scan_attention

# COCO category -> the caption words that name it. For measuring only: training finds its words through the text
# encoder (`chan.label_prior`), never through this table. Each one-word category name and its plural, the person words
# below, and a few synonyms (a two-word category is named only by the synonyms listed for it: "table" for dining
# table, "light" for traffic light). Ambiguous parts of two-word names ("sign", "ball", "glass") are left out.
PERSON_WORDS = ("person", "people", "man", "men", "woman", "women", "boy", "boys", "girl", "girls", "child", "children",
                "kid", "kids", "player", "skier", "surfer", "lady", "guy", "rider", "skateboarder")
SYNONYMS = {"bicycle": ("bike", "bikes"), "airplane": ("plane", "planes", "jet", "jets"), "couch": ("sofa", "sofas"),
            "tv": ("television", "televisions"), "laptop": ("computer", "computers"), "refrigerator": ("fridge", "fridges"),
            "cow": ("cattle",), "dog": ("puppy", "puppies"), "cat": ("kitten", "kittens"),
            "motorcycle": ("motorbike", "motorbikes"), "dining table": ("table", "tables"),
            "traffic light": ("light", "lights"), "fire hydrant": ("hydrant", "hydrants"), "teddy bear": ("teddy",)}
IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis",
                     "scissors": "scissors", "broccoli": "broccoli"}
COCO_CATEGORIES = (  # in COCO's id order, which is the order of the detector's 80 classes
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")


def _plural(word: str) -> str:
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    return word + "es" if word.endswith(("s", "sh", "ch", "x")) else word + "s"


CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    name: tuple(dict.fromkeys(((name, _plural(name)) if " " not in name else ()) + SYNONYMS.get(name, ())
                              + (PERSON_WORDS if name == "person" else ())))
    for name in COCO_CATEGORIES
}
WORD_CATEGORY = {word: category for category, words in CATEGORY_WORDS.items() for word in words}
ROWS = ("hard", "soft", "whole_photo", "largest", "most_confident", "label_match", "random")
ROW_TITLES = {
    "hard": "CHAN's hard alignment", "soft": "the SCAN twin's attention argmax", "whole_photo": "a box over the whole photo",
    "largest": "the largest region", "most_confident": "the detector's most confident box, whatever the word",
    "label_match": "the detector's most confident box labelled with the word's category (no learning)",
    "random": "a random region",
}


@dataclass
class GroundTruth:
    """Each photo's instance boxes (x1, y1, x2, y2 in pixels) by category name."""

    boxes: dict[str, dict[str, np.ndarray]]  # photo id -> category -> (n, 4)


def read_instances(dataset: Dataset, split: str) -> GroundTruth:
    """`annotations/instances_<split>.json` of a COCO-layout folder, keyed by the dataset's photo ids."""
    path = Path(dataset.root) / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise DatasetError(f"{path}: not found; grounding needs a COCO-layout folder with instance boxes")
    try:
        ann = json.loads(path.read_bytes())
        names = {c["id"]: c["name"] for c in ann["categories"]}
        files = {im["id"]: f"{split}/{im['file_name']}" for im in ann["images"]}
        out: dict[str, dict[str, list]] = {}
        for a in ann["annotations"]:
            x, y, w, h = (float(v) for v in a["bbox"])
            out.setdefault(files[a["image_id"]], {}).setdefault(names[a["category_id"]], []).append((x, y, x + w, y + h))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from e
    return GroundTruth({pid: {c: np.asarray(b, dtype=np.float32) for c, b in cats.items()} for pid, cats in out.items()})


def box_hits(box: np.ndarray, truth: np.ndarray) -> tuple[bool, float]:
    """Whether the box's centre lies in one of the true boxes, and its best IoU with them."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    inside = bool(((truth[:, 0] <= cx) & (cx <= truth[:, 2]) & (truth[:, 1] <= cy) & (cy <= truth[:, 3])).any())
    ix = np.clip(np.minimum(box[2], truth[:, 2]) - np.maximum(box[0], truth[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], truth[:, 3]) - np.maximum(box[1], truth[:, 1]), 0, None)
    inter = ix * iy
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inside, float((inter / np.maximum(area(box) + area(truth) - inter, 1e-9)).max())


def _word_rows(model: CHAN, table: RegionTable, dataset: Dataset,
               attention: bool = False) -> list[tuple[str, str, torch.Tensor]]:
    """(photo id, word, the word's (K,) row) for every whole word of every caption, against its own photo: the row is
    its cosines over the photo's regions, or with `attention` its SCAN attention weights."""
    ids, texts, owner = protocol_pairs(dataset)
    images = encode_table(model, table, ids).embeddings
    captions = encode_captions(model, texts)
    out = []
    for c, photo in enumerate(owner.tolist()):
        n = int(captions.mask[c].sum())
        rows = captions.embeddings[c][captions.mask[c]] @ images[photo].T  # (n, K): the pooled tokens only
        if attention:
            rows = _scan_attention(rows[None, :, None, :], torch.ones(1, n, dtype=torch.bool))[0, :, 0]
        out += [(ids[photo], word.lower(), rows[pieces].mean(0)) for word, pieces in word_spans(captions.words[c][:n])]
    return out


@torch.no_grad()
def pointing_game(model: CHAN, table: RegionTable, dataset: Dataset, truth: GroundTruth,
                  comparison: tuple[CHAN, RegionTable] | None = None, seed: int = 0) -> dict:
    """Pointing and IoU >= 0.5 of each row over every caption word that names a category present in its photo."""
    model.eval()
    words = _word_rows(model, table, dataset)
    attention = _word_rows(comparison[0].eval(), comparison[1], dataset, attention=True) if comparison else None
    coco_names = dict(enumerate(COCO_CATEGORIES))  # label ids below 80 are the detector's classes
    rng = np.random.default_rng(seed)
    sizes = {p.id: Image.open(p.path).size for p in dataset.photos}  # the header only
    hits = {row: [] for row in ROWS if row != "soft" or comparison}
    for n, (photo, word, cosines) in enumerate(words):
        category = WORD_CATEGORY.get(word)
        true_boxes = truth.boxes.get(photo, {}).get(category) if category else None
        if true_boxes is None:
            continue
        i = table.index[photo]
        boxes, scores, detected = table.boxes[i].numpy(), table.scores[i].float().numpy(), table.detected[i].numpy()
        labels = [coco_names.get(j) for j in table.label_ids[i].tolist()]
        width, height = sizes[photo]
        confident = np.where(detected, scores, -1.0)
        named = np.where(detected & np.array([label == category for label in labels]), scores, -1.0)
        choices = {
            "hard": boxes[int(cosines.argmax())],
            "whole_photo": np.array([0, 0, width, height], dtype=np.float32),
            "largest": boxes[int(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).argmax())],
            "most_confident": boxes[int(confident.argmax())],
            "label_match": boxes[int((named if named.max() >= 0 else confident).argmax())],
            "random": boxes[int(rng.integers(len(boxes)))],
        }
        if attention is not None:
            comparison_boxes = comparison[1].boxes[comparison[1].index[photo]].numpy()
            choices["soft"] = comparison_boxes[int(attention[n][2].argmax())]
        for row, box in choices.items():
            hits[row].append((*box_hits(box, true_boxes), word))
    out: dict = {"words": len(hits["hard"])}
    for row, results in hits.items():
        out[f"{row}_pointing"] = float(np.mean([r[0] for r in results])) if results else 0.0
        out[f"{row}_iou50"] = float(np.mean([r[1] >= 0.5 for r in results])) if results else 0.0
        out[f"{row}_mean_iou"] = float(np.mean([r[1] for r in results])) if results else 0.0
    return out


def format_table(result: dict) -> str:
    """The rows as a markdown table, best pointing first."""
    rows = [r for r in ROWS if f"{r}_pointing" in result]
    lines = [f"{result['words']} words that name a category present in their photo", "",
             "| where the word points | pointing | IoU >= 0.5 | mean IoU |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {ROW_TITLES[r]} | {result[f'{r}_pointing']:.3f} | {result[f'{r}_iou50']:.3f} | "
                     f"{result[f'{r}_mean_iou']:.3f} |")
    return "\n".join(lines)


def grounding_command(data: Path, checkpoint: Path | None, comparison: Path | None, split: str | None,
                      json_path: Path | None, device: torch.device | str = "cpu", record: bool = False) -> dict:
    """Run the pointing game for a checkpoint (and its SCAN comparison) on a COCO-layout split; print the table.
    With `record`, the figures also go into the checkpoint's info (the demo's header shows them)."""
    from .checkpoint import DEFAULT_CHECKPOINT, DEFAULT_COMPARISON, load_checkpoint, write_copy
    from .data import open_dataset
    from .features import table_for

    dataset = open_dataset(data)
    split = split or (dataset.splits[0] if len(dataset.splits) == 1 else None)
    if split is None:
        raise DatasetError(f"{data}: give --split, one of {dataset.splits}")
    dataset = dataset.split(split)
    truth = read_instances(dataset, split)
    checkpoint = checkpoint or DEFAULT_CHECKPOINT
    model, settings, info = load_checkpoint(checkpoint)
    table = table_for(dataset, settings, device=device)
    if table.boxes is None:
        raise DatasetError("grounding needs regions with boxes: this checkpoint reads precomputed features")
    other = None
    if comparison != Path("none"):
        scan, scan_settings, _ = load_checkpoint(comparison or DEFAULT_COMPARISON)
        other = (scan.to(device), table if scan_settings == settings else table_for(dataset, scan_settings, device=device))
    result = pointing_game(model.to(device), table, dataset, truth, other)
    print(format_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if record:
        recorded = {"data": Path(data).name, "split": split, **{k: v for k, v in result.items() if k.startswith("hard_")},
                    "words": result["words"]}
        write_copy(checkpoint, checkpoint, {}, {**info, "grounding": recorded})
        print(f"recorded in {checkpoint}")
    return result
