"""How the page looks: the app's CSS (tables, images, plots, the phone layout) and the tables' column shares.

Kept apart from the layout so the rules that make scores visible at any width, hide empty outputs and keep every
tab in view on a phone are read in one place.
"""

# Column widths as shares of the table's width, so the score columns fit whatever the caption length (the caption
# column, last, wraps at words).
CANDIDATE_WIDTHS = ["8%", "17%", "19%", "19%", "37%"]  # #, CLIP score, chosen, sample, caption
NEIGHBOUR_WIDTHS = ["8%", "19%", "18%", "55%"]  # #, cosine, store, neighbour caption
CSS = """
.capdemo-caption textarea { font-size: 1.1rem !important; font-weight: 600; }
/* Tables: headers break only between words ("CLIP score"), captions wrap at words, never mid-word. */
.capdemo-table th, .capdemo-table th span { word-break: keep-all !important; overflow-wrap: normal !important;
  hyphens: none !important; }
.capdemo-table [role=gridcell], .capdemo-table [role=gridcell] span { word-break: normal !important;
  overflow-wrap: normal !important; white-space: nowrap !important; }
.capdemo-table [role=gridcell]:last-child, .capdemo-table [role=gridcell]:last-child span,
.capdemo-wrap-all [role=gridcell], .capdemo-wrap-all [role=gridcell] span {
  white-space: normal !important; overflow-wrap: break-word !important; }
/* Small inputs (the shapes world is 32 px) fill their box with crisp pixels instead of sitting tiny in it. */
#image-input img, .capdemo-heatmap img { image-rendering: pixelated; }
#image-input img { width: 100% !important; height: 100% !important; object-fit: contain; }
/* The input's label is a row of its own above the picture (Gradio floats it over the picture's top, where it hid
   the top of every example); the buttons, placed against the input's top right, share that row. */
#image-input { display: flex !important; flex-direction: column; }
#image-input > label.float { position: static; flex: none; align-self: flex-start; max-width: calc(100% - 64px);
  margin: var(--block-label-margin); }
#image-input > .image-container { flex: 1 1 0; min-height: 0; height: auto; }
/* The examples in two rows of four, as wide as the column: Gradio's 82 px thumbnails fill three rows (3, 3, 2), and on
   a phone that third row took the height the picture needs to show larger than its thumbnail with every tab still on
   the first screen. (The thumbnail's own box is a .gallery too, hence :not(.container).) */
#examples .gallery:not(.container) { display: grid !important; grid-template-columns: repeat(4, minmax(0, 1fr)); }
#examples .gallery-item > span { display: block; }
#examples .gallery-item, #examples .gallery-item .container, #examples .gallery-item img { width: 100% !important;
  max-width: none !important; height: auto !important; aspect-ratio: 1; }
/* The Ask tab's example questions as a compact list (a small picture beside each question), so the answer they
   produce shows without scrolling on a desktop. */
#example-questions td { padding: 2px 8px !important; }
#example-questions td .container, #example-questions td img { width: 40px !important; height: 40px !important; }
#example-questions td.textbox { max-width: none !important; width: 100%; text-align: left; }
/* Plots: the figures are transparent; their text follows the page's theme. */
.dark .js-plotly-plot .main-svg text { fill: #e5e7eb !important; }
.capdemo-notice p { margin: 0.2rem 0; }
/* Nothing empty on the page: a table without rows, an image output without an image are not drawn. */
/* (td: the table's hidden sizing copy of its rows, drawn even while the table is hidden; the visible rows are
   virtual and only drawn once it shows) */
.capdemo-table:not(:has(td)), .capdemo-heatmap:not(:has(img)) { display: none !important; }
.capdemo-table th, .capdemo-table [role=gridcell] { padding: 6px !important; }
.capdemo-table th, .capdemo-table th * { font-size: 12px !important; }
.capdemo-table th .cell-wrap { padding: 0 !important; }
@media (max-width: 640px) {
  .capdemo-intro { display: none; }
  /* Every tab on the first screen of a small phone too (360x640): a two-line title, the domain line in small
     print, and the picture gets the height the title, the examples and the tabs leave of the first screen (448 px
     on a 360 px wide phone), at most 300 px (a 390x844 phone shows the picture at 200 px). */
  .capdemo-header h1 { font-size: 1.05rem !important; margin-bottom: 0.3rem !important; }
  .capdemo-header p { font-size: 0.8rem !important; line-height: 1.3 !important; margin: 0 !important; }
  #image-input { max-height: clamp(160px, calc(100svh - 448px), 300px); }
  .capdemo-queue { display: none; }
  /* Every tab in view: Gradio folds the tabs that do not fit into a "..." menu, measuring them in a hidden copy
     of the row; shrunk there, they all count as fitting, and the real row wraps onto a second line instead. */
  .tab-container.visually-hidden button { padding: 0 !important; font-size: 1px !important; min-width: 0 !important; }
  .tab-wrapper { height: auto !important; padding-bottom: 0 !important; }
  .tab-container[role=tablist] { flex-wrap: wrap !important; height: auto !important; row-gap: 2px; }
  .tab-container[role=tablist] button { padding: 4px 10px !important; }
  .overflow-menu { display: none !important; }
  .capdemo-table th, .capdemo-table [role=gridcell] { padding: 3px !important; }
  .capdemo-table [role=grid], .capdemo-table [role=grid] * { font-size: 12px !important; }
  /* the Batch table's many columns: laid out 640 px wide and scrolled sideways, rather than squeezed */
  .capdemo-wrap-all .table-wrap { overflow-x: auto !important; }
  .capdemo-wrap-all .table-wrap > * { min-width: 640px; }
}
"""


__all__ = ["CANDIDATE_WIDTHS", "CSS", "NEIGHBOUR_WIDTHS"]
