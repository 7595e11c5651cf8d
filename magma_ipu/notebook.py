"""The widget UI that magma_interactive.ipynb displays: pick an image, type a prompt, move the
sampling sliders, press Run, read the caption as it streams; then see why each token came out:
its top candidates before and after the sampling filters, and where in the image it looked.
It only calls the public API; the model is loaded once, outside, and never rebuilt here. Moving a
sampling slider after a run re-filters the same logits: the model is not run again."""

from __future__ import annotations

import html
import io
from pathlib import Path

import ipywidgets as widgets
from PIL import Image

from .errors import MagmaError
from .explain import TokenExplanation
from .images import center_crop
from .sampling import SamplingSettings
from .session import Generation, Magma

DEMO_IMAGES = Path(__file__).resolve().parent / "assets" / "demo_images"  # linked as demo_example_images/
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class CaptionApp:
    def __init__(self, magma: Magma, image_dir: Path = DEMO_IMAGES, prompt: str = "A picture of",
                 image: str | None = None):
        self.magma = magma
        cfg = magma.config
        names = sorted(p.name for p in Path(image_dir).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self.image_dir = Path(image_dir)
        style = {"description_width": "110px"}
        wide = widgets.Layout(width="520px")
        self.image_choice = widgets.Dropdown(options=names, value=image if image in names else (names or [None])[0],
                                             description="Demo image", style=style, layout=wide)
        self.image_url = widgets.Text(placeholder="https://... or /path/to/picture.jpg (overrides the demo image)",
                                      description="URL or path", style=style, layout=wide)
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="Upload")
        self.prompt = widgets.Text(value=prompt, description="Prompt", style=style, layout=wide)
        self.seed = widgets.IntSlider(value=cfg.seed, min=0, max=300, description="seed", style=style)
        self.top_p = widgets.FloatSlider(value=cfg.top_p, min=0.0, max=1.0, step=0.01, description="top_p", style=style)
        self.top_k = widgets.IntSlider(value=cfg.top_k, min=0, max=50, description="top_k", style=style)
        self.temperature = widgets.FloatSlider(value=cfg.temperature, min=0.0, max=1.5, step=0.05,
                                               description="temperature", style=style)
        self.max_out_tokens = widgets.IntSlider(value=cfg.max_out_tokens, min=1, max=min(356, cfg.sequence_length),
                                                description="max_out_tokens", style=style)
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.picture = widgets.Image(format="png", layout=widgets.Layout(max_width="384px"))
        self.caption = widgets.HTML(layout=widgets.Layout(min_height="2em"))
        self.status = widgets.HTML()
        self.explanations: list[TokenExplanation] = []
        self.seen_image: Image.Image | None = None
        self.token_choice = widgets.IntSlider(value=0, min=0, max=0, description="token", style=style,
                                              disabled=True)
        self.token_label = widgets.HTML()
        self.layer_choice = widgets.Dropdown(options=[("all layers", -1)] + [(f"layer {i}", i) for i in
                                             range(cfg.model.n_layer)], value=-1, description="attention",
                                             style=style)
        self.chart = widgets.Image(format="png", layout=widgets.Layout(max_width="480px"))
        self.heatmap = widgets.Image(format="png", layout=widgets.Layout(max_width="320px"))
        for widget, name in ((self.caption, "caption"), (self.status, "status"), (self.chart, "chart"),
                             (self.heatmap, "heatmap"), (self.picture, "picture")):
            widget.add_class(f"magma-{name}")  # stable handles for browser tests and custom CSS
        self.run_button.on_click(lambda _button: self.run())
        for control in (self.temperature, self.top_p, self.top_k, self.token_choice):
            control.observe(lambda _change: self.draw_chart(), names="value")
        for control in (self.token_choice, self.layer_choice):
            control.observe(lambda _change: self.draw_heatmap(), names="value")
        self.image_choice.observe(self._on_choice, names="value")
        self.upload.observe(self._on_upload, names="value")
        self.runs = 0
        self.widget = widgets.VBox([
            widgets.HBox([widgets.VBox([self.image_choice, self.image_url, self.upload, self.prompt]),
                          widgets.VBox([self.seed, self.top_p, self.top_k, self.temperature, self.max_out_tokens])]),
            self.run_button,
            widgets.HBox([self.picture, widgets.VBox([self.caption, self.status])]),
            widgets.HTML("<b>Why this token?</b> Bars: the top candidates, the model's own probability (light) "
                         "and after temperature / top-k / top-p (dark; grey = filtered out; orange = drawn). "
                         "Heatmap: where the token looked in the image."),
            widgets.HBox([self.token_choice, self.token_label, self.layer_choice]),
            widgets.HBox([self.chart, self.heatmap]),
        ])

    def _on_choice(self, _change) -> None:
        self.image_url.value = ""
        self.upload.value = ()

    def _on_upload(self, change) -> None:
        if change["new"]:
            self.image_url.value = ""

    def selected_source(self):
        """What the next run reads: the typed URL or path, else an upload, else the demo image."""
        if self.image_url.value.strip():
            return self.image_url.value.strip()
        if self.upload.value:
            try:
                return Image.open(io.BytesIO(bytes(self.upload.value[0]["content"])))
            except Exception as e:  # Pillow raises several types for bad uploads
                raise MagmaError(f"uploaded file {self.upload.value[0]['name']!r} is not a readable image: {e}") from None
        if self.image_choice.value is None:
            raise MagmaError("no image chosen: pick a demo image, type a URL or path, or upload a file")
        return self.image_dir / self.image_choice.value

    def run(self) -> Generation | None:
        """Generate for the current widget values, streaming into the caption; errors become one line."""
        self.runs += 1
        self.status.value = ""
        self.caption.value = ""
        try:
            image = self.magma.open_image(self.selected_source())
            buffer = io.BytesIO()  # shown as PNG, which cannot hold every mode the image may keep (CMYK, ...)
            image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buffer, format="PNG")
            self.picture.value = buffer.getvalue()
            settings = dict(seed=self.seed.value, top_p=self.top_p.value, top_k=self.top_k.value,
                            temperature=self.temperature.value, max_out_tokens=self.max_out_tokens.value)
            text, stats, explanations = "", None, []
            self.seen_image = center_crop(image, self.magma.config.model.image_resolution)
            for piece, stats in self.magma.stream_with_stats(self.prompt.value, image=image, explain=explanations,
                                                             **settings):
                text += piece
                self.caption.value = f"<b>{html.escape(self.prompt.value)}</b>{html.escape(text)}"
            self.explanations = explanations
            self.token_choice.disabled = not explanations
            self.token_choice.max = max(0, len(explanations) - 1)
            self.token_choice.value = 0
            self.draw_chart()
            self.draw_heatmap()
            self.status.value = (
                f"<span style='color:#555'>run {self.runs} · {stats.new_tokens} tokens · first token after "
                f"{stats.time_to_first_token * 1000:.0f} ms · {stats.tokens_per_second:.1f} tokens/s</span>"
            )
            eos = self.magma.tokenizer.eos_id
            ids = [e.token_id for e in explanations]
            return Generation(text, [i for i in ids if i != eos], "eos" if eos in ids else "length", stats,
                              explanations)
        except MagmaError as e:
            self.status.value = f"<span style='color:#b00020'>⚠ {html.escape(str(e))}</span>"
            return None

    def current_settings(self) -> SamplingSettings:
        return SamplingSettings(seed=self.seed.value, top_p=self.top_p.value, top_k=self.top_k.value,
                                temperature=self.temperature.value, max_out_tokens=self.max_out_tokens.value)

    def _token_text(self, token_id: int) -> str:
        return self.magma.tokenizer.backend.decode([token_id], skip_special_tokens=False)

    def draw_chart(self) -> None:
        """Bars for the selected token's candidates under the current slider settings."""
        if not self.explanations:
            return
        step = self.explanations[self.token_choice.value]
        self.token_label.value = f"&nbsp;drawn: <code>{html.escape(repr(self._token_text(step.token_id)))}</code>"
        rows = step.candidates(self.current_settings(), n=10)[::-1]
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.2, 3.2), dpi=90)
        ax = fig.add_subplot()
        labels = [repr(self._token_text(r["id"])) for r in rows]
        y = range(len(rows))
        ax.barh(y, [r["p_model"] for r in rows], color="#c6d4ea", label="model (T = 1, no filter)")
        colours = ["#f28e2b" if r["drawn"] else ("#4e79a7" if r["kept"] else "#bbbbbb") for r in rows]
        ax.barh(y, [r["p_final"] for r in rows], height=0.45, color=colours, label="after the filters")
        for i, r in zip(y, rows):
            ax.text(min(max(r["p_model"], r["p_final"]) + 0.01, 0.86), i, f"{100 * r['p_final']:.1f}%",
                    va="center", fontsize=7)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability")
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        self.chart.value = _png(fig)

    def draw_heatmap(self) -> None:
        """The picture the model saw with the selected token's attention over it."""
        if not self.explanations or self.seen_image is None:
            return
        step = self.explanations[self.token_choice.value]
        if step.image_attention is None:
            return
        layers = None if self.layer_choice.value == -1 else [self.layer_choice.value]
        grid = step.attention_map(layers).numpy()
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3.4, 3.4), dpi=90)
        ax = fig.add_subplot()
        size = self.seen_image.size[0]
        ax.imshow(self.seen_image)
        # bicubic upsampling of the grid cells onto the picture (cell (r, c) covers row r, column c)
        ax.imshow(grid, cmap="inferno", alpha=0.55, interpolation="bicubic", extent=(0, size, size, 0))
        ax.set_axis_off()
        fig.tight_layout(pad=0.2)
        self.heatmap.value = _png(fig)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
