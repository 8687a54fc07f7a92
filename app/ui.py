"""The Gradio interface: three tabs over one gallery; each action has a stable api_name."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from chan.gallery import Comparison, Gallery

from .handlers import NO_COMPARISON, Handlers

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# System fonts only: the page requests nothing from the internet.
THEME = gr.themes.Soft(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
KEEP_QUERY_IN_URL = """(query, k) => {
  const url = new URL(window.location.href);
  url.searchParams.set("q", query || "");
  window.history.replaceState(null, "", url);
  return [query, k];
}"""
INTRO = """# CHAN · what a matching model retrieves, and why
Cross-modal Hard Aligning Network (Pan, Wu, Zhang, CVPR 2023): each word keeps only its single best
region; every other word-region alignment is eliminated. Search the gallery by caption, rank captions for
a photo, and inspect the alignment of any pair."""


MAX_UPLOAD = "10mb"
DRAWN_FORMAT = "jpeg"  # photos with boxes drawn: encoded in under 1 ms, where gradio's default WebP takes 10-20 ms
UPLOADS_KEPT_S = 900  # uploads and drawn images are deleted this long after they were written
SESSION_STATE_S = 1800  # an inspector's per-session state expires this long after its last use
SEARCH_BATCH = 8  # searches scored in one call at most
SESSIONS_KEPT = 200  # at most this many sessions' state in memory: API calls each open one, and memory stays bounded


def launch(demo: gr.Blocks, **kwargs) -> None:
    """Serve the demo locally: no share link, system fonts; the file route serves what `build_demo` made static."""
    demo.launch(share=False, theme=THEME, show_error=False, max_file_size=MAX_UPLOAD,
                state_session_capacity=SESSIONS_KEPT, **kwargs)


def indexing_report(gallery: Gallery, comparisons: list[Comparison]) -> str:
    """The main model's indexing state, then each comparison's while it is not done."""
    lines = [gallery.progress.describe()]
    for c in comparisons:
        if c.gallery is None or not (c.gallery.progress.done or c.gallery.progress.failed):
            lines.append(f"{c.label}: loaded and indexed after the main model (the same photos).")
        elif not c.gallery.progress.finished:
            lines.append(f"{c.label}: {c.gallery.progress.describe()}")
    return "  \n".join(lines)


def all_indexed(gallery: Gallery, comparisons: list[Comparison]) -> bool:
    everyone = [gallery] + [c.gallery for c in comparisons]
    return all(g is not None and (g.progress.finished or g.progress.failed is not None) for g in everyone)


def example_queries() -> list[str]:
    return [line.strip() for line in (ASSETS / "example_queries.txt").read_text().splitlines() if line.strip()]


def build_demo(gallery: Gallery, comparisons: list[Comparison] = ()) -> gr.Blocks:
    """The page over `gallery`; `comparisons` (other models on the same photos) can be shown beside its search."""
    h = Handlers(gallery, comparisons=comparisons)
    # the file route serves the gallery's photos and no other file: gradio's static path is the folder holding
    # exactly them (`served_photos`), so a result photo is served from there, not hashed and copied into its cache
    gr.set_static_paths(sorted({str(path.parent) for path in h.served.values()}))
    compare_choices = [NO_COMPARISON, *h.comparisons]
    photo_choices = list(gallery.all_photos)
    with gr.Blocks(title="CHAN demo", analytics_enabled=False, delete_cache=(UPLOADS_KEPT_S // 3, UPLOADS_KEPT_S)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(f"Gallery: {gallery.describe()}" + "".join(f"  \nCompared with: {c.label}" for c in comparisons))
        index_status = gr.Markdown(indexing_report(gallery, comparisons), elem_id="index-status")
        index_timer = gr.Timer(1.0)
        hit_ids = gr.State([], time_to_live=SESSION_STATE_S)
        with gr.Tabs() as tabs:
            with gr.Tab("Caption → images", id="search"):
                with gr.Row():
                    query = gr.Textbox(label="Caption", placeholder="a dog runs through the snow", scale=5, elem_id="query")
                    top_k = gr.Slider(1, 48, value=12, step=1, label="Photos", scale=1)
                    search_button = gr.Button("Search", variant="primary", scale=1, elem_id="search-button")
                with gr.Row():
                    gr.Examples(example_queries(), inputs=query)
                    compare_with = gr.Dropdown(compare_choices, value=compare_choices[min(1, len(compare_choices) - 1)],
                                               label="Compare with", visible=len(compare_choices) > 1, elem_id="compare-with")
                with gr.Row():
                    with gr.Column(scale=1):
                        search_status = gr.Markdown(elem_id="search-status")
                        results = gr.Gallery(label=f"Best matches by {gallery.label} (click one to inspect the pair)",
                                             columns=4, height="auto", object_fit="cover", elem_id="results")
                    with gr.Column(scale=1, visible=len(compare_choices) > 1) as compare_column:
                        compare_status = gr.Markdown(elem_id="compare-status")
                        compare_results = gr.Gallery(label="The same query, ranked by the model compared with", columns=4,
                                                     height="auto", object_fit="cover", elem_id="compare-results")
            with gr.Tab("Image → captions", id="rank"):
                with gr.Row():
                    with gr.Column():
                        upload = gr.Image(type="filepath", image_mode=None, label="Your photo", sources=["upload"], elem_id="upload")
                        pick = gr.Dropdown(photo_choices, label="…or a gallery photo", value=None, filterable=True)
                        own = gr.Textbox(label="Your candidate captions, one a line", lines=3, elem_id="own-captions")
                        rank_button = gr.Button("Rank captions", variant="primary", elem_id="rank-button")
                    with gr.Column():
                        rank_status = gr.Markdown(elem_id="rank-status")
                        regions_image = gr.Image(label="Detected regions", interactive=False, format=DRAWN_FORMAT)
                ranked = gr.Dataframe(headers=["rank", f"score ({gallery.label})", "caption (★ = written for this photo)",
                                               "source"], label="Ranked captions", elem_id="ranked", wrap=True)
                rank_photo_id = gr.Textbox(visible=False)
            with gr.Tab("Alignment inspector", id="inspect"):
                with gr.Row():
                    with gr.Column(scale=1):
                        inspect_image = gr.Image(type="filepath", image_mode=None, label="Photo", sources=["upload"])
                        inspect_photo_id = gr.Textbox(label="Gallery photo id (empty for an uploaded photo)")
                        inspect_caption = gr.Textbox(label="Caption", elem_id="inspect-caption")
                        inspect_button = gr.Button("Inspect", variant="primary", elem_id="inspect-button")
                    with gr.Column(scale=1):
                        inspect_status = gr.Markdown(elem_id="inspect-status")
                        aligned_image = gr.Image(label="Aligned regions (colours match the heatmap rings)", interactive=False,
                                                 format=DRAWN_FORMAT)
                        word = gr.Radio([], label="Choose a word to highlight its region")
                with gr.Row():
                    hard_plot = gr.Plot(label="Hard alignment", elem_id="hard-plot")
                    soft_plot = gr.Plot(label="Soft attention", elem_id="soft-plot")
                contrib_plot = gr.Plot(label="Contributions")
                inspection = gr.State(None, time_to_live=SESSION_STATE_S)

        search_inputs = [query, top_k]
        search_outputs = [results, hit_ids, search_status]
        # Searches are cheap and read-only: two batches at once. Photo work (regions, alignment) has its own queue.
        search = {"concurrency_id": "search", "concurrency_limit": 2}
        photo_work = {"concurrency_id": "photos", "concurrency_limit": 1}
        compare_inputs, compare_outputs = [query, top_k, compare_with], [compare_results, compare_status]
        # Searches queued together are scored together: one text-encoder call and one pass over the gallery.
        batched = {"batch": True, "max_batch_size": SEARCH_BATCH}
        search_button.click(h.search_batch, search_inputs, search_outputs, api_name="search_images", js=KEEP_QUERY_IN_URL,
                            **batched, **search).then(h.compare_images, compare_inputs, compare_outputs,
                                                      api_name="compare_images", **search)
        query.submit(h.search_batch, search_inputs, search_outputs, api_visibility="private", js=KEEP_QUERY_IN_URL,
                     **batched, **search).then(h.compare_images, compare_inputs, compare_outputs, api_visibility="private",
                                               **search)

        def switch_comparison(label: str, query_text: str, k: float):
            shown = label != NO_COMPARISON
            out = h.compare_images(query_text, k, label) if shown and (query_text or "").strip() else ([], "")
            return (gr.Column(visible=shown), *out)

        compare_with.change(switch_comparison, [compare_with, query, top_k], [compare_column, *compare_outputs],
                            api_visibility="private", **search)

        def open_hit(ids: list[str], caption: str, evt: gr.SelectData):
            photo_id = ids[evt.index]
            return h.shown_path(photo_id), photo_id, caption, gr.Tabs(selected="inspect")

        align_inputs = [inspect_image, inspect_caption, inspect_photo_id]
        align_outputs = [hard_plot, soft_plot, contrib_plot, aligned_image, word, inspection, inspect_status]

        def align_and_list_words(*args):
            r = h.align(*args)
            return r.hard, r.soft, r.contributions, r.drawn, gr.Radio(choices=r.words or [], value=None), r.state, r.status

        results.select(open_hit, [hit_ids, query], [inspect_image, inspect_photo_id, inspect_caption, tabs],
                       api_visibility="private").then(align_and_list_words, align_inputs, align_outputs,
                                                      api_visibility="private", preprocess=False, **photo_work)
        # preprocess=False: the handlers open uploads themselves (only gradio's uploads and gallery photos), so a
        # bad file gets our message, not gradio's error
        inspect_button.click(align_and_list_words, align_inputs, align_outputs, api_visibility="private", preprocess=False,
                             **photo_work)
        inspect_caption.submit(align_and_list_words, align_inputs, align_outputs, api_visibility="private",
                               preprocess=False, **photo_work)
        # the API: figures, the caption's tokens and the status message (no per-session state)
        align_words = gr.JSON(visible=False)

        def api_align(*args):
            r = h.align(*args)
            return r.hard, r.soft, r.contributions, r.drawn, r.words, r.status

        gr.Button(visible=False).click(api_align, align_inputs,
                                       [hard_plot, soft_plot, contrib_plot, aligned_image, align_words, inspect_status],
                                       api_name="align", preprocess=False, **photo_work)
        word.change(h.draw_alignment, [inspection, word], aligned_image, api_visibility="private")
        inspect_image.upload(lambda: "", None, inspect_photo_id, api_visibility="private")

        def pick_photo(photo_id: str | None):
            return h.shown_path(photo_id), photo_id or ""

        pick.change(pick_photo, pick, [upload, rank_photo_id], api_visibility="private")
        upload.upload(lambda: "", None, rank_photo_id, api_visibility="private")
        rank_button.click(h.rank_captions, [upload, own, rank_photo_id], [ranked, regions_image, rank_status],
                          api_name="rank_captions", preprocess=False, **photo_work)

        def from_address(request: gr.Request):
            q = (request.query_params.get("q") if request else None) or ""
            return (q, *h.search_images(q)) if q.strip() else (gr.skip(),) * 4

        def compare_from_address(q: str, k: float, label: str):
            return h.compare_images(q, k, label) if (q or "").strip() else (gr.skip(), gr.skip())

        demo.load(from_address, None, [query, *search_outputs], api_visibility="private").then(
            compare_from_address, compare_inputs, compare_outputs, api_visibility="private")

        def indexing_state():
            return indexing_report(gallery, comparisons), gr.Timer(active=not all_indexed(gallery, comparisons))

        index_timer.tick(indexing_state, None, [index_status, index_timer], api_visibility="private", queue=False,
                         show_progress="hidden")
    return demo
