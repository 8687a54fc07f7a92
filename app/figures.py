"""Figures for the inspector: Plotly heatmaps and bars (as Plotly JSON), photos with coloured boxes. Plain data in."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import plotly.graph_objects as go
from gradio.components.plot import PlotData
from PIL import Image, ImageDraw, ImageFont

from chan.pair import axis_region_names, word_colour, word_names


def _colorscale(name: str) -> list:
    """A named Plotly colorscale as Plotly's Python library resolves it (plotly.js names some scales differently)."""
    return [list(step) for step in go.Heatmap(colorscale=name).colorscale]


COLORSCALES = {name: _colorscale(name) for name in ("Greys", "Reds", "Viridis")}


def _plain(value):
    """JSON-ready: arrays as nested lists, NaN as null (what plotly.js reads as a gap)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def plotly_json(traces: list[dict], layout: dict) -> PlotData:
    """A Plotly figure for gr.Plot, written as JSON directly: plotly's figure objects validate every property
    in Python, which cost an inspection about 60 ms of the interpreter (and of every other request's share of it)."""
    data = [{k: _plain(v) for k, v in t.items()} for t in traces]
    return PlotData(type="plotly", plot=json.dumps({"data": data, "layout": layout}, allow_nan=False))


def _heatmap_layout(title: str, n_words: int) -> dict:
    return dict(
        # region names take about 170 px under the map; each word row gets 26 px, so 3 to 40 words stay readable
        title=dict(text=title), height=max(340, 230 + 26 * n_words), margin=dict(l=10, r=10, t=40, b=10),
        yaxis=dict(autorange="reversed", tickfont=dict(size=11), dtick=1, automargin=True),
        xaxis=dict(tickangle=-60, tickfont=dict(size=9), dtick=1, automargin=True),
        plot_bgcolor="white",
    )


def box_notes(boxes: np.ndarray | None, photo_size: tuple[int, int] | None, n_words: int) -> list[list[str]] | None:
    """Per heatmap cell, the region's box in words: 'box 12,30–140,200 px, 24% of the photo' (None without boxes)."""
    if boxes is None or not len(boxes) or not photo_size:
        return None
    area = max(photo_size[0] * photo_size[1], 1)
    notes = [f"box {x1:.0f},{y1:.0f}–{x2:.0f},{y2:.0f} px, {100 * (x2 - x1) * (y2 - y1) / area:.0f}% of the photo"
             for x1, y1, x2, y2 in boxes.tolist()]
    return [notes] * n_words


def hard_alignment_heatmap(cosine: np.ndarray, chosen: np.ndarray, words: list[str], labels: list[str],
                           boxes: np.ndarray | None = None, photo_size: tuple[int, int] | None = None) -> PlotData:
    """Words x regions cosines: each word's chosen region in colour and ringed, eliminated cells grey; hover names the box."""
    x, y = axis_region_names(labels), word_names(words)
    kept = np.full(cosine.shape, np.nan)
    kept[np.arange(len(chosen)), chosen] = cosine[np.arange(len(chosen)), chosen]
    notes = box_notes(boxes, photo_size, len(words))
    box = "" if notes is None else "<br>%{customdata}"
    traces = [
        dict(type="heatmap", z=cosine, x=x, y=y, colorscale=COLORSCALES["Greys"], showscale=False, opacity=0.45,
             name="eliminated", customdata=notes, hovertemplate=f"%{{y}} · %{{x}}<br>cos %{{z:.3f}} (eliminated){box}<extra></extra>"),
        dict(type="heatmap", z=kept, x=x, y=y, colorscale=COLORSCALES["Reds"], zmin=float(cosine.min()),
             zmax=float(cosine.max()), colorbar=dict(title=dict(text="cos")), name="kept", customdata=notes,
             hovertemplate=f"%{{y}} · %{{x}}<br>cos %{{z:.3f}} (kept){box}<extra></extra>"),
        dict(type="scatter", x=[x[k] for k in chosen.tolist()], y=y, mode="markers", name="chosen region",
             marker=dict(symbol="square-open", size=14, line=dict(width=3), color=[word_colour(i) for i in range(len(words))]),
             hoverinfo="skip", showlegend=False),
    ]
    return plotly_json(traces, _heatmap_layout("CHAN hard alignment (cosine; grey = eliminated)", len(words)))


def soft_attention_heatmap(attention: np.ndarray, words: list[str], labels: list[str],
                           boxes: np.ndarray | None = None, photo_size: tuple[int, int] | None = None) -> PlotData:
    """The SCAN attention weights of the same pair: every region gets some weight."""
    notes = box_notes(boxes, photo_size, len(words))
    box = "" if notes is None else "<br>%{customdata}"
    trace = dict(type="heatmap", z=attention, x=axis_region_names(labels), y=word_names(words),
                 colorscale=COLORSCALES["Viridis"], colorbar=dict(title=dict(text="weight")), customdata=notes,
                 hovertemplate=f"%{{y}} · %{{x}}<br>attention %{{z:.3f}}{box}<extra></extra>")
    return plotly_json([trace], _heatmap_layout("Soft cross-attention it replaces (SCAN weights)", len(words)))


def contribution_bars(contributions: np.ndarray, words: list[str], global_term: float = 0.0) -> PlotData:
    """Each word's share of the total score, and the global term's where the model has one."""
    names, colours = word_names(words), [word_colour(i) for i in range(len(words))]
    values = [float(v) for v in contributions]
    if global_term:
        names, colours, values = names + ["global term (mean word · mean region)"], colours + ["#888888"], values + [global_term]
    title = "Contribution of each word" + (" and of the global term" if global_term else "")
    trace = dict(type="bar", x=values, y=names, orientation="h", marker=dict(color=colours),
                 hovertemplate="%{y}: %{x:.4f}<extra></extra>")
    layout = dict(title=dict(text=f"{title} (total {sum(values):.3f})"), height=max(260, 60 + 20 * len(values)),
                  margin=dict(l=10, r=10, t=40, b=10), yaxis=dict(autorange="reversed", automargin=True),
                  plot_bgcolor="white")
    return plotly_json([trace], layout)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow
        return ImageFont.load_default()


def draw_boxes(photo: Image.Image, boxes: np.ndarray, captions: list[str], colours: list[str],
               widths: list[int] | None = None, max_side: int = 640) -> Image.Image:
    """The photo, scaled to fit `max_side`, with labelled boxes in the given colours."""
    scale = min(1.0, max_side / max(photo.size)) if max(photo.size) > max_side else max(1.0, 320 / max(photo.size))
    image = photo.convert("RGB").resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))))
    draw = ImageDraw.Draw(image)
    font = _font(max(11, image.width // 40))
    for i, (box, text, colour) in enumerate(zip(boxes, captions, colours)):
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        width = widths[i] if widths else 3
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        tx, ty = x1 + 2, max(0.0, y1 - font.size - 4) if y1 > font.size + 4 else y1 + 2
        left, top, right, bottom = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=colour)
        draw.text((tx, ty), text, fill="white", font=font)
    return image


def placeholder(photo_id: str, caption: str, size: tuple[int, int] = (300, 300)) -> Image.Image:
    """A card standing in for a photo the gallery has no file for (precomputed features): its id and first caption."""
    image = Image.new("RGB", size, "#eef0f4")
    draw = ImageDraw.Draw(image)
    title, body = _font(22), _font(15)
    draw.text((14, 12), photo_id, fill="#333366", font=title)
    draw.text((14, 46), "\n".join(textwrap.wrap(caption or "(no caption)", 28)[:10]), fill="#222222", font=body, spacing=4)
    return image
