"""Event handlers: turn user input into the gallery's plain data, then into figures and messages.

Every handler returns a friendly message instead of raising: no traceback reaches the page.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from gradio.components.plot import PlotData
from gradio.utils import get_upload_folder
from PIL import Image

from chan.gallery import Comparison, Gallery, PairAlignment, QueryError
from chan.photos import PhotoError, load_photo
from chan.regions import region_names

from . import figures
from .priority import in_photo_lane
from .served_photos import served_photos

log = logging.getLogger(__name__)


class SearchResult(NamedTuple):
    items: list | None  # (photo or placeholder card, label) pairs for a gr.Gallery
    photo_ids: list[str] | None
    status: str


class CompareResult(NamedTuple):
    items: list | None
    status: str


class RankResult(NamedTuple):
    rows: list[list] | None  # rank, score, caption, source
    drawn: Image.Image | None  # the photo with its detected regions
    status: str


class AlignResult(NamedTuple):
    hard: PlotData | None
    soft: PlotData | None
    contributions: PlotData | None
    drawn: Image.Image | None
    words: list[str] | None  # the rows' names, for the word picker
    state: Inspection | None
    status: str


SOMETHING_WENT_WRONG = "⚠️ Something went wrong on our side while handling that; the error was logged."


def friendly(result: type[NamedTuple]):
    """Wrap a handler so that bad input (or a bug) becomes a `result` holding only the message, in its status."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (QueryError, PhotoError) as e:
                message = f"⚠️ {e}"
            except Exception:  # a bug must not kill the server or show a traceback
                log.exception("handler %s failed", fn.__name__)
                message = SOMETHING_WENT_WRONG
            return result(*([None] * (len(result._fields) - 1)), message)

        return inner

    return wrap


SIMILARITY_NAMES = {"hard": "hard alignment", "soft": "soft attention", "global": "global cosine"}
NO_COMPARISON = "none"
# Bounds on one request's work; the README lists them.
MAX_PHOTOS_SHOWN = 48
MAX_OWN_CAPTIONS = 50
MAX_OWN_CAPTION_CHARS = 300
NOT_AN_UPLOAD = "Use a photo uploaded through this page, or pick a gallery photo."


def top_k(k) -> int:
    """The number of photos to show, from a client: a whole number from 1 to MAX_PHOTOS_SHOWN."""
    if k is None or k == "":
        return 12
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k != int(k) \
            or not 1 <= k <= MAX_PHOTOS_SHOWN:
        raise QueryError(f"The number of photos must be a whole number from 1 to {MAX_PHOTOS_SHOWN}.")
    return int(k)


def with_notes(status: str, notes: list[str]) -> str:
    """A status line with each note the user should see below it."""
    return "  \n".join([status] + [f"⚠️ {n}" for n in notes])


def rank_change(rank: int, main_rank: int | None, main: str, k: int) -> str:
    """How a photo's rank here compares with the main model's: '▲2 (CHAN #5)', '= CHAN', 'not in CHAN's top 12'."""
    if main_rank is None:
        return f"not in {main}'s top {k}"
    if main_rank == rank:
        return f"= {main}"
    return f"{'▲' if rank < main_rank else '▼'}{abs(main_rank - rank)} ({main} #{main_rank})"


def pooled_over(gallery: Gallery, n_tokens: int) -> str:
    """What the hard-alignment score pools: which tokens, and how."""
    c = gallery.model.config
    how = "the mean" if c.pooling == "mean" else "a log-sum-exp (soft maximum)"
    which = ("special tokens and punctuation are left out" if c.pooled_tokens == "content"
             else "special tokens and punctuation are included, as this model was trained")
    score = "The words' part of the score" if c.global_weight else "The score"
    return (f"{score} is {how} of each row's kept cosine over these {n_tokens} tokens: {which}, and a word split "
            "into pieces keeps one row per piece, named with its whole word.")


def photo_id_text(photo_id) -> str | None:
    if photo_id in (None, ""):
        return None
    if not isinstance(photo_id, str):
        raise QueryError("A gallery photo id is the photo's file name, as text.")
    return photo_id


def own_caption_lines(text) -> list[str]:
    if not isinstance(text, (str, type(None))):
        raise QueryError("Your captions must be text, one a line.")
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(lines) > MAX_OWN_CAPTIONS:
        raise QueryError(f"That is {len(lines)} captions; rank at most {MAX_OWN_CAPTIONS} at a time.")
    if any(len(line) > MAX_OWN_CAPTION_CHARS for line in lines):
        raise QueryError(f"Keep each of your captions under {MAX_OWN_CAPTION_CHARS} characters.")
    return lines


@dataclass
class Inspection:
    """What the inspector shows for one pair, kept so that choosing a word only redraws the photo."""

    pair: PairAlignment
    photo: Image.Image | None


class Handlers:
    def __init__(self, gallery: Gallery, upload_folder: str | Path | None = None, comparisons: list[Comparison] = ()):
        self.gallery = gallery
        self.comparisons = {c.label: c for c in comparisons}
        self.upload_folder = Path(upload_folder or get_upload_folder()).resolve()
        self.served = served_photos(gallery)
        self.gallery_files = {str(p.path.resolve()) for p in gallery.all_photos.values() if p.path} | {
            str(p) for p in self.served.values()}

    def shown_path(self, photo_id) -> str | None:
        """A gallery photo's file as the page shows it (in the served folder); None for other ids."""
        path = self.served.get(photo_id) if isinstance(photo_id, str) else None
        return str(path) if path else None

    def upload_path(self, image: str | dict | None) -> str | None:
        """The file behind an Image input, only if gradio received it as an upload or it is a gallery photo.

        Raw (preprocess=False) inputs carry any path a client writes, so every other path is refused,
        with one message whether or not it exists.
        """
        path = image.get("path") if isinstance(image, dict) else image
        if path in (None, ""):
            return None
        try:
            resolved = Path(path).resolve()
            allowed = str(resolved) in self.gallery_files or (resolved.is_relative_to(self.upload_folder) and resolved.is_file())
        except (TypeError, ValueError, OSError, RuntimeError):
            allowed = False
        if not allowed:
            raise QueryError(NOT_AN_UPLOAD)
        return str(resolved)

    @staticmethod
    def _scored_by(gallery: Gallery) -> str:
        return f"scores: {gallery.label}, {SIMILARITY_NAMES[gallery.model.config.similarity]}"

    def search_images(self, query: str, k: float = 12) -> SearchResult:
        """Caption -> the top-k gallery photos with rank and score."""
        return SearchResult(*(out[0] for out in self.search_batch([query], [k])))

    def search_batch(self, queries: list, ks: list) -> tuple[list, list, list]:
        """Several clients' searches at once (Gradio's batch=True): one text-encoder call and one scoring call.
        Returns a list per output, each caption's answer or message in its place."""
        g = self.gallery
        results: list[SearchResult | None] = [None] * len(queries)
        wanted = {}
        for i, k in enumerate(ks):
            try:
                wanted[i] = top_k(k)
            except QueryError as e:
                results[i] = SearchResult(None, None, f"⚠️ {e}")
        try:
            found = g.search_many([queries[i] for i in wanted], list(wanted.values()))
        except Exception:  # a bug must not kill the server or show a traceback
            log.exception("search_batch failed")
            found = [None] * len(wanted)
        for i, answer in zip(wanted, found):
            if answer is None:
                results[i] = SearchResult(None, None, SOMETHING_WENT_WRONG)
            elif isinstance(answer, QueryError):
                results[i] = SearchResult(None, None, f"⚠️ {answer}")
            else:
                hits, notes, ms = answer
                items = [(self.shown_path(h.photo_id) or figures.placeholder(h.photo_id, h.caption),
                          f"#{h.rank} · {h.score:.3f} ({g.model_name}) · {h.caption}") for h in hits]
                status = f"Top {len(hits)} of {g.search_scope()} in {ms:.0f} ms · {self._scored_by(g)}."
                results[i] = SearchResult(items, [h.photo_id for h in hits], with_notes(status, notes))
        return tuple(list(column) for column in zip(*results))

    @friendly(CompareResult)
    def compare_images(self, query: str, k: float = 12, label: str = NO_COMPARISON):
        """The same search by another model, each photo marked with its rank change against the main model's."""
        if label in (None, "", NO_COMPARISON):
            return CompareResult([], "")
        comparison = self.comparisons.get(label) if isinstance(label, str) else None
        if comparison is None:
            raise QueryError(f"Choose a model to compare with: {', '.join(self.comparisons) or 'none is loaded'}.")
        other = comparison.gallery
        if other is None:
            raise QueryError(f"{label} is loaded after the main model's gallery is indexed; try again in a moment.")
        k = top_k(k)
        main_rank = {h.photo_id: h.rank for h in self.gallery.search_images(query, k)[0]}
        hits, notes, ms = other.search_images(query, k)
        main = self.gallery.model_name
        items = [(self.shown_path(h.photo_id) or figures.placeholder(h.photo_id, h.caption),
                  f"#{h.rank} {rank_change(h.rank, main_rank.get(h.photo_id), main, k)} · {h.score:.3f} ({other.model_name})")
                 for h in hits]
        status = (f"Top {len(hits)} of {len(other.photos)} photos in {ms:.0f} ms · {self._scored_by(other)}. "
                  f"Marks: this photo's rank by {main} (▲ {other.model_name} ranks it higher, ▼ lower).")
        return CompareResult(items, with_notes(status, notes))

    @friendly(RankResult)
    @in_photo_lane
    def rank_captions(self, image_path: str | dict | None, own_captions: str = "", photo_id: str = ""):
        """Photo -> gallery captions and your own, ranked; the photo with its regions drawn."""
        image_path, photo_id = self.upload_path(image_path), photo_id_text(photo_id)
        own = own_caption_lines(own_captions)
        regions = self.gallery.photo_regions(image_path, photo_id)
        ranked = self.gallery.rank_captions(regions, own, photo_id or None)
        rows = [[r.rank, round(r.score, 4), ("★ " if r.matches_photo else "") + r.text,
                 "your caption" if r.source == "yours" else r.source] for r in ranked]
        photo = self._photo(image_path, photo_id)
        drawn = None
        if photo is not None and regions.boxes is not None:
            colours = [figures.word_colour(i) if d else "#888888" for i, d in enumerate(regions.detected)]
            keep = [i for i, d in enumerate(regions.detected) if d] or [0]
            names = region_names(regions)  # what the detector saw, each box told apart
            drawn = figures.draw_boxes(photo, regions.boxes[keep], [names[i] for i in keep], [colours[i] for i in keep])
        if regions.boxes is None:
            status = f"{len(rows)} captions ranked · {len(regions.labels)} precomputed regions (this gallery has no photos or boxes to draw)."
        else:
            names = region_names(regions)
            n_det, n_whole = int(regions.detected.sum()), names.count("whole photo")
            others = [f"{len(names) - n_det - n_whole} grid cells"] + (["the whole photo"] if n_whole else [])
            status = (f"{len(rows)} captions ranked · {n_det} detected regions (drawn), {' and '.join(others)}: "
                      f"{len(names)} in all.")
        if own:
            status += f" Yours: {', '.join(f'#{r.rank}' for r in ranked if r.source == 'yours')}."
        status = with_notes(status, self.gallery.partial_note(self.gallery.index))
        return RankResult(rows, drawn, status)

    def _photo(self, image_path: str | None, photo_id: str | None) -> Image.Image | None:
        if photo_id and photo_id in self.gallery.all_photos:
            path = self.gallery.photo_path(photo_id)
            return load_photo(path) if path else None
        return load_photo(image_path) if image_path else None

    @friendly(AlignResult)
    @in_photo_lane
    def align(self, image_path: str | dict | None, caption: str, photo_id: str = ""):
        """Pair -> hard-alignment heatmap, soft-attention heatmap, contributions, boxes, word choices."""
        image_path, photo_id = self.upload_path(image_path), photo_id_text(photo_id)
        regions = self.gallery.photo_regions(image_path, photo_id)
        pair = self.gallery.align(regions, caption)
        a = pair.alignment
        state = Inspection(pair, self._photo(image_path, photo_id))
        size = state.photo.size if state.photo is not None else None
        words = pair.row_names
        g = self.gallery
        status = (f"Hard-alignment score (CHAN) {a.score:.3f} · soft-attention score (SCAN) {a.soft_score:.3f}, both "
                  f"from {g.label}'s embeddings, which ranks by {SIMILARITY_NAMES[g.model.config.similarity]}. "
                  f"{len(set(a.chosen.tolist()))} distinct regions chosen by {len(pair.words)} tokens; "
                  f"{a.cosine.size - len(pair.words)} alignments eliminated.  \n{pooled_over(g, len(pair.words))}")
        if a.global_term:
            status += (f"  \nBoth scores include this model's global term, {a.global_term:.3f} "
                       f"({g.model.config.global_weight:g} x the cosine of the mean word and the mean region).")
        if pair.boxes is None:
            status += ("  \nThis gallery holds precomputed region features (the authors' bottom-up-attention files) "
                       f"without photos or boxes, so regions are named by index (r0–r{len(pair.region_labels) - 1}) "
                       "and none can be drawn.")
        return AlignResult(
            figures.hard_alignment_heatmap(a.cosine, a.chosen, pair.words, pair.region_labels, pair.boxes, size),
            figures.soft_attention_heatmap(a.soft_attention, pair.words, pair.region_labels, pair.boxes, size),
            figures.contribution_bars(a.contributions, pair.words, a.global_term),
            self.draw_alignment(state, None),
            words,
            state,
            status,
        )

    @staticmethod
    def draw_alignment(state: Inspection | None, word: str | None) -> Image.Image | None:
        """The photo with each word's chosen region in the word's colour; a chosen word stands out."""
        if state is None or state.photo is None or state.pair.boxes is None:
            return None
        pair, a = state.pair, state.pair.alignment
        names = pair.row_names
        focus = names.index(word) if word in names else None
        words = [focus] if focus is not None else range(len(pair.words))
        boxes, texts, colours = [], [], []
        for i in words:
            k = int(a.chosen[i])
            boxes.append(pair.boxes[k])
            texts.append(f"{pair.words[i]}: r{k} {pair.region_labels[k]}")  # ASCII: the default PIL font has no arrows
            colours.append(figures.word_colour(i))
        widths = [5 if focus is not None else 3] * len(boxes)
        return figures.draw_boxes(state.photo, boxes, texts, colours, widths)
