"""The Gradio page that puts the base model and the fine-tuned model side by side.

    llava-lora demo --model MODEL_DIR --adapter RUN_DIR --data DATA      # then open http://127.0.0.1:7860

Tab 1 answers a data-set sample with both models and checks each answer against the reference; tab 2 answers
an uploaded image and a typed question. One model is in memory: the fine-tuned answer comes with the adapter
on, the base answer from the same model under peft's ``disable_adapter()``, in the checkpoint's own dtype; the
frozen vision tower runs once per image for both. Answers stream token by token.

Safe by default: it binds 127.0.0.1 and makes no share link unless ``--share``, which needs ``--auth`` (or,
loudly, ``--share-without-auth``); the queue is the only way to the model (no direct REST route), it runs one
generation at a time and turns away what does not fit ``--queue-size``; uploads are refused over a byte size or a
pixel count, both checked before the image is decoded, and deleted from Gradio's cache; max new tokens is capped;
a typed control token (``<|im_end|>``, ``<image>``) is refused; a visitor sees a short message, the log the
detail.

Endpoints for ``gradio_client`` (the settings are ``demo_checks.PANEL``: max_new_tokens, greedy, temperature, top_p,
top_k, repetition_penalty; the page's sliders start at the command line's generation flags):
    /show_sample (index) -> image, question, reference, info
    /compare_sample (index, *settings) -> base answer, base match, fine-tuned answer, fine-tuned match, status
    /compare_upload (image, question, *settings, more_images=None) -> base answer, fine-tuned answer, status

Tab 2 takes further images (``more_images``, a list of files): each stands where an ``<image>`` stands in the question
(as many as there are images), else all before it, as ``generate`` puts them.
"""

from __future__ import annotations

import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..chat import prompts
from ..config import device_field, field, image_dir_field, model_field, split_field
from ..data.records import IMAGE_PLACEHOLDER, load_records, resolve_data
from ..errors import UsageError
from ..model.load import load_model
from ..model.parts import format_param_stats, param_stats
from ..model.precision import load_dtype_field
from .demo_checks import (MAX_UPLOAD_IMAGES, PANEL, SLIDERS, RequestError, Samples, check_pixels, checked_question,
                          control_tokens, page_settings, upload_images, visitor_text)
from .engine import GenerationSettings, SideBySideEngine
from .metrics import exact_match_normalised

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger(__name__)

# Endpoint names: gradio_client callers and the tests depend on them.
API_SHOW_SAMPLE = "show_sample"
API_COMPARE_SAMPLE = "compare_sample"
API_COMPARE_UPLOAD = "compare_upload"
# Both generating events share one concurrency group of size 1: the adapter switch is model-wide state.
MODEL_GROUP = "model"
# Where the temperature slider starts when the page opens greedy (--temperature 0): a usual sampling value.
SAMPLING_TEMPERATURE = 0.7
# Gradio's delete_cache: every 5 minutes, uploads (and other cached files) older than 10 minutes are deleted.
DELETE_CACHE = (300, 600)
FAILED = "generation failed; the server's log has the details"  # what a visitor sees of an unexpected error


@dataclass(kw_only=True)
class DemoConfig(GenerationSettings):
    """The page's command line; the generation flags (``GenerationSettings``) are where its settings sliders start."""

    model: str = model_field()
    adapter: str | None = field(None, help="RUN_DIR (or a checkpoint folder) holding a trained adapter; "
                                           "without it the page shows the base model alone")
    data: str | None = field(None, help="data in any format `data check` reads (a JSON/JSONL file, a folder holding "
                                       "chat.json, parquet, shards), for tab 1")
    split: str | None = split_field()
    image_dir: str | None = image_dir_field()
    host: str = field("127.0.0.1", help="address to bind; 0.0.0.0 exposes the page to the network")
    port: int = field(7860, help="port to listen on")
    share: bool = field(False, help="ask Gradio for a public share link (off: the page stays local); needs --auth")
    auth: str | None = field(None, help="USER:PASSWORD the page asks for (or a file holding that line)")
    share_without_auth: bool = field(False, help="--share with no --auth: anyone with the link uses the model")
    device: str | None = device_field()
    dtype: str = load_dtype_field()
    max_new_tokens_cap: int = field(256, help="the most new tokens a request may ask for")
    max_upload_mb: float = field(10.0, help="uploads larger than this many megabytes are refused")
    max_upload_pixels: int = field(16_000_000, help="uploads with more pixels than this are refused undecoded")
    max_question_chars: int = field(2000, help="longest question accepted")
    queue_size: int = field(32, help="requests that may wait in the queue; more are turned away")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port {self.port}: expected 0..65535")
        if self.max_new_tokens_cap < 1 or not 1 <= self.max_new_tokens <= self.max_new_tokens_cap:
            raise UsageError(f"--max-new-tokens {self.max_new_tokens} must lie in 1..--max-new-tokens-cap "
                             f"({self.max_new_tokens_cap})")
        if self.max_upload_mb <= 0 or self.max_upload_pixels < 1 or self.max_question_chars < 1:
            raise UsageError("--max-upload-mb, --max-upload-pixels and --max-question-chars must be positive")
        if self.queue_size < 1:
            raise UsageError(f"--queue-size {self.queue_size}: expected at least 1")
        for name, (low, high, _) in SLIDERS.items():  # where the page's sliders start: inside their range
            value = getattr(self, name)
            if not (low <= value <= high or (name == "temperature" and value == 0)):
                raise UsageError(f"--{name.replace('_', '-')} {value}: the page takes {low}..{high}"
                                 + (" (or 0: greedy)" if name == "temperature" else ""))
        if self.num_beams != 1:
            raise UsageError("--num-beams: the page streams its answers, which beam search cannot; use 1")
        if self.share and not self.auth and not self.share_without_auth:
            raise UsageError("--share makes a public link: give --auth USER:PASSWORD (or --share-without-auth to "
                             "open the model to anyone who has the link)")
        if self.auth is not None:
            self.credentials()

    def credentials(self) -> tuple[str, str] | None:
        """(user, password) of --auth: given as USER:PASSWORD, or the first line of a file holding it."""
        if self.auth is None:
            return None
        text = Path(self.auth).read_text().splitlines()[0] if Path(self.auth).is_file() else self.auth
        user, sep, password = text.strip().partition(":")
        if not (sep and user and password):
            raise UsageError("--auth: expected USER:PASSWORD (or a file holding that line)")
        return user, password

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def load_samples(cfg: DemoConfig) -> Samples | None:
    if cfg.data is None:
        return None
    file, root = resolve_data(cfg.data, cfg.split, cfg.image_dir)
    records, bad = load_records(file)
    if not records:
        raise UsageError(f"{file}: no usable record ({len(bad)} rejected; `llava-lora data check` says why)")
    return Samples(records, root, str(file), len(bad))


# ---------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------

CSS = """
#header h1 { margin-bottom: 0.2em; }
#header p { margin: 0.1em 0; color: var(--body-text-color-subdued); }
.match { min-height: 1.8em; }
.em { display: inline-block; padding: 0.15em 0.7em; border-radius: 999px; font-weight: 600; font-size: 0.9em; }
.em-yes { background: #dcfce7; color: #166534; }
.em-no { background: #fee2e2; color: #991b1b; }
#sample-image img { width: 100%; height: 100%; object-fit: contain; }
.status { color: var(--body-text-color-subdued); font-size: 0.9em; min-height: 1.4em; }
.answer textarea { font-size: 1.05em; }
footer { display: none !important; }
"""


def _adapter_parameters(model) -> int:
    """Parameters the adapter brings: LoRA matrices and the trained copies of ``modules_to_save`` (projector)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or ".modules_to_save." in n)


def header_markdown(cfg: DemoConfig, engine: SideBySideEngine) -> str:
    rows = param_stats(engine.model)
    total = rows[-1]["total"]
    if engine.has_adapter:
        n = _adapter_parameters(engine.model)
        adapter = (f"**Adapter** `{cfg.adapter}`: {n:,} parameters (LoRA and projector), "
                   f"{100 * n / total:.2f}% of {total:,}")
    else:
        adapter = f"**Adapter** none: the base model alone ({total:,} parameters); pass `--adapter RUN_DIR` to compare"
    return f"# LLaVA-LoRA: base vs fine-tuned\n\n**Model** `{cfg.model}`\n\n{adapter}"


def match_badge(prediction: str, reference: str) -> str:
    """HTML badge saying whether ``prediction`` matches ``reference`` (exact match after SQuAD normalisation,
    as eval's ``exact_match_normalised``)."""
    if exact_match_normalised(prediction, reference):
        return '<span class="em em-yes">✓ exact match</span>'
    return '<span class="em em-no">✗ no exact match</span>'


def _gradio():
    try:
        import gradio
    except ImportError:
        raise UsageError("the demo needs Gradio: pip install 'llava-lora[demo]'") from None
    return gradio


def _labels(engine: SideBySideEngine) -> tuple[str, str]:
    """(base answer's label, fine-tuned answer's label)."""
    return ("Base (adapter off)" if engine.has_adapter else "Base model"), "Fine-tuned (adapter on)"


def _settings_panel(gr, cfg: DemoConfig) -> list:
    """The generation settings both tabs share, starting at the command line's (``cfg``): their components in
    ``PANEL`` order, the order the handlers read their values in."""
    def slider(name: str, label: str, value: float):
        low, high, step = SLIDERS[name]
        return gr.Slider(low, high, value=value, step=step, label=label)

    with gr.Accordion("Generation settings (both tabs)", open=False, elem_id="settings"):
        with gr.Row():
            panel = {"max_new_tokens": gr.Slider(1, cfg.max_new_tokens_cap, value=cfg.max_new_tokens, step=1,
                                                 label="Max new tokens", elem_id="max-new-tokens"),
                     "greedy": gr.Checkbox(cfg.temperature == 0, label="Greedy decoding", info="off: sample with "
                                           "temperature, top-p and top-k", elem_id="greedy"),
                     "temperature": slider("temperature", "Temperature", cfg.temperature or SAMPLING_TEMPERATURE)}
        with gr.Row():
            panel.update(top_p=slider("top_p", "Top-p", cfg.top_p), top_k=slider("top_k", "Top-k (0: off)", cfg.top_k),
                         repetition_penalty=slider("repetition_penalty", "Repetition penalty", cfg.repetition_penalty))
    return [panel[name] for name in PANEL]


NO_DATA = ("No data set loaded. Start the demo with one to browse its samples:\n\n"
           "```\nllava-lora demo --model MODEL_DIR --adapter RUN_DIR --data DATA [--split test]\n```\n\n"
           "DATA is any data `llava-lora data check` reads: a JSON/JSONL file, a folder holding `chat.json`, parquet, shards.")


def one_or_all(images: list | None):
    """What the engine is given for a prompt: None, the image, or the list of images in placeholder order."""
    return None if not images else images[0] if len(images) == 1 else images


def _sample_callbacks(gr, cfg: DemoConfig, engine: SideBySideEngine, samples: Samples):
    """Tab 1's handlers: (show a sample, step the index by -1/+1/0 for random, compare both models on a sample)."""

    def show_sample(index: float):
        try:
            record = samples.get(index)
            info = f"`{record.id}` · {len(samples):,} samples in `{Path(samples.source).name}`"
            try:
                image = samples.image(record)
            except RequestError as e:
                image, info = None, f"{info} · ⚠️ {visitor_text(str(e))}"
        except RequestError as e:
            log.info("show_sample refused: %s", e)
            raise gr.Error(visitor_text(str(e))) from None
        return image, prompts.question(record), record.turns[-1].text, info

    def step(index: float, delta: int) -> int:
        i = int(index) if isinstance(index, (int, float)) else 0
        return random.randrange(len(samples)) if delta == 0 else (i + delta) % len(samples)

    def compare_sample(index: float, *settings_ui):
        try:
            settings = page_settings(settings_ui, cfg.max_new_tokens_cap)
            record = samples.get(index)
            image = one_or_all(samples.images(record))  # every image of the record, in placeholder order
            msgs, reference = prompts.prompt_and_reference(record)
            base = tuned = ""
            for base, tuned, status in engine.compare(engine.prompt(msgs), image, settings):
                yield base, "", tuned, "", status
            yield (base, match_badge(base, reference), tuned,
                   match_badge(tuned, reference) if engine.has_adapter else "", status)
        except RequestError as e:
            log.info("compare_sample refused: %s", e)
            raise gr.Error(visitor_text(str(e))) from None
        except Exception:  # a failure in one request: say so in the page (no detail), log it, keep serving
            log.exception("compare_sample failed")
            raise gr.Error(FAILED) from None

    return show_sample, step, compare_sample


def _sample_picker(gr, engine: SideBySideEngine, samples: Samples) -> tuple:
    """Tab 1's top row; returns (the index box, {step: its button}, the compare button, the sample's outputs:
    image, question, reference, info line)."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=240):
            image = gr.Image(label="Image", type="pil", format="png", interactive=False, height=300,
                             elem_id="sample-image")
        with gr.Column(scale=3):
            with gr.Row(equal_height=True):
                index = gr.Number(0, label=f"Sample index (0..{len(samples) - 1})", precision=0, minimum=0,
                                  maximum=len(samples) - 1, scale=2, min_width=140, elem_id="sample-index")
                steps = {-1: gr.Button("◀ Prev", scale=1, min_width=80, elem_id="prev"),
                         1: gr.Button("Next ▶", scale=1, min_width=80, elem_id="next"),
                         0: gr.Button("Random", scale=1, min_width=80, elem_id="random")}
            info = gr.Markdown(elem_id="sample-info")
            question = gr.Textbox(label="Question", interactive=False, lines=2, elem_id="sample-question")
            reference = gr.Textbox(label="Reference answer", interactive=False, elem_id="sample-reference")
            compare_btn = gr.Button("Compare base and fine-tuned" if engine.has_adapter else "Answer",
                                    variant="primary", elem_id="compare-sample")
    return index, steps, compare_btn, [image, question, reference, info]


def _sample_answers(gr, engine: SideBySideEngine) -> list:
    """Tab 1's answers: each model's with its match badge, then a status line (the compare handler's outputs)."""
    base_label, tuned_label = _labels(engine)
    with gr.Row():
        with gr.Column():
            base = gr.Textbox(label=base_label, interactive=False, lines=3, elem_id="sample-base",
                              elem_classes="answer")
            base_match = gr.HTML(elem_id="sample-base-match", elem_classes="match")
        with gr.Column(visible=engine.has_adapter):
            tuned = gr.Textbox(label=tuned_label, interactive=False, lines=3, elem_id="sample-tuned",
                               elem_classes="answer")
            tuned_match = gr.HTML(elem_id="sample-tuned-match", elem_classes="match")
    status = gr.Markdown(elem_id="sample-status", elem_classes="status")
    return [base, base_match, tuned, tuned_match, status]


def _data_tab(gr, app, cfg: DemoConfig, engine: SideBySideEngine, samples: Samples | None, ui: list) -> None:
    """Tab 1: a data-set sample by index, answered by both models and checked against its reference."""
    with gr.Tab("Data set", id="data", elem_id="tab-data"):
        if samples is None:
            gr.Markdown(NO_DATA, elem_id="no-data")
            return
        index, steps, compare_btn, sample_outputs = _sample_picker(gr, engine, samples)
        answers = _sample_answers(gr, engine)
        show_sample, step, compare_sample = _sample_callbacks(gr, cfg, engine, samples)
        shown = index.change(show_sample, [index], sample_outputs, api_name=API_SHOW_SAMPLE,
                             concurrency_limit=4)
        shown.then(lambda: ("", "", "", "", ""), None, answers, api_visibility="private")
        app.load(show_sample, [index], sample_outputs, api_visibility="private")
        for delta, btn in steps.items():
            btn.click(lambda i, d=delta: step(i, d), [index], [index], api_visibility="private")
        compare_btn.click(compare_sample, [index, *ui], answers, api_name=API_COMPARE_SAMPLE,
                          concurrency_limit=1, concurrency_id=MODEL_GROUP)


def _upload_callback(gr, cfg: DemoConfig, engine: SideBySideEngine):
    """Tab 2's handler: the uploaded images and the typed question, answered by both models."""
    # <image> is the question's way to place the images (counted against them in upload_images); every other
    # control token typed is refused
    controls = [t for t in control_tokens(engine.processor.tokenizer) if t != IMAGE_PLACEHOLDER]

    # the settings by name (demo_checks.PANEL), and the further images last with a default: a client may leave
    # them out, and the endpoint's calls of one image hold
    def compare_upload(image_path: str | None, question: str, max_new_tokens, greedy, temperature, top_p, top_k,
                       repetition_penalty, more_images: list | None = None):
        try:
            settings = page_settings((max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty),
                                     cfg.max_new_tokens_cap)
            question = checked_question(question, cfg.max_question_chars, controls)
            images = upload_images([image_path, *(more_images or [])], question, cfg.max_upload_bytes,
                                   cfg.max_upload_pixels)
            for image in images:
                check_pixels(engine.processor, image)
            msgs = prompts.user_messages(question, len(images))
            yield from engine.compare(engine.prompt(msgs), one_or_all(images), settings)
        except RequestError as e:
            log.info("compare_upload refused: %s", e)
            raise gr.Error(visitor_text(str(e))) from None
        except Exception:
            log.exception("compare_upload failed")
            raise gr.Error(FAILED) from None

    return compare_upload


def _upload_tab(gr, cfg: DemoConfig, engine: SideBySideEngine, ui: list) -> None:
    """Tab 2: uploaded images and a typed question, answered by both models."""
    base_label, tuned_label = _labels(engine)
    assert len(ui) == len(PANEL), "compare_upload names each setting of PANEL"
    compare_upload = _upload_callback(gr, cfg, engine)

    with gr.Tab("Your own image", id="upload", elem_id="tab-upload"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=240):
                upload = gr.Image(label="Image", type="filepath", image_mode=None,
                                  sources=["upload", "clipboard"], height=300, elem_id="upload-image")
                more = gr.File(label=f"More images (up to {MAX_UPLOAD_IMAGES - 1}; each where an <image> stands "
                                     "in the question, else all first)", file_count="multiple", file_types=["image"],
                               elem_id="upload-more")
            with gr.Column(scale=3):
                question = gr.Textbox(label="Question", placeholder="What is in the image?", lines=2,
                                      max_length=cfg.max_question_chars, elem_id="upload-question")
                gr.Markdown(f"Images up to {cfg.max_upload_mb:g} MB and "
                            f"{cfg.max_upload_pixels / 1e6:g} megapixels.", elem_classes="status")
                ask_btn = gr.Button("Ask both models" if engine.has_adapter else "Ask",
                                    variant="primary", elem_id="compare-upload")
        with gr.Row():
            u_base = gr.Textbox(label=base_label, interactive=False, lines=3, elem_id="upload-base",
                                elem_classes="answer")
            u_tuned = gr.Textbox(label=tuned_label, interactive=False, lines=3, visible=engine.has_adapter,
                                 elem_id="upload-tuned", elem_classes="answer")
        u_status = gr.Markdown(elem_id="upload-status", elem_classes="status")
        ask = dict(fn=compare_upload, inputs=[upload, question, *ui, more], outputs=[u_base, u_tuned, u_status],
                   concurrency_limit=1, concurrency_id=MODEL_GROUP)
        ask_btn.click(**ask, api_name=API_COMPARE_UPLOAD)
        question.submit(**ask, api_visibility="private")


def build_app(cfg: DemoConfig, engine: SideBySideEngine, samples: Samples | None) -> gr.Blocks:
    """The page: header, parameter counts, shared generation settings, and the two tabs; ``serve`` launches it
    (tests launch it the same way)."""
    gr = _gradio()
    with gr.Blocks(title="LLaVA-LoRA demo", analytics_enabled=False, delete_cache=DELETE_CACHE) as app:
        gr.Markdown(header_markdown(cfg, engine), elem_id="header")
        with gr.Accordion("Parameter statistics", open=False):
            gr.Markdown(f"```\n{format_param_stats(param_stats(engine.model))}\n```", elem_id="param-stats")
        ui = _settings_panel(gr, cfg)
        with gr.Tabs():
            _data_tab(gr, app, cfg, engine, samples, ui)
            _upload_tab(gr, cfg, engine, ui)
    app.queue(max_size=cfg.queue_size, api_open=False)  # no REST route around the queue and its size
    return app


def serve(app: gr.Blocks, cfg: DemoConfig, block: bool = True) -> str:
    """Launch ``app`` on cfg.host:cfg.port; returns the local URL (``block=False`` returns at once)."""
    gr = _gradio()
    # Fonts that ship with Gradio (nothing is fetched); their SemiBold files lack most letters, so 700 stands in.
    font = [gr.themes.LocalFont("IBM Plex Sans", weights=(400, 700)), "ui-sans-serif", "system-ui", "sans-serif"]
    mono = [gr.themes.LocalFont("IBM Plex Mono", weights=(400, 700)), "ui-monospace", "monospace"]
    theme = gr.themes.Default(primary_hue="indigo", secondary_hue="slate", font=font, font_mono=mono)
    _, url, _ = app.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, auth=cfg.credentials(),
                           show_error=False,
                           max_file_size=cfg.max_upload_bytes, prevent_thread_lock=not block, quiet=not block,
                           ssr_mode=False, theme=theme, css=CSS, footer_links=[], mcp_server=False)
    return url


def load(cfg: DemoConfig) -> tuple[SideBySideEngine, Samples | None]:
    """The model (with its adapter) and the data set of ``cfg``; data is checked first, as it loads faster."""
    samples = load_samples(cfg)
    model, processor = load_model(cfg.model, cfg.adapter, cfg.dtype, cfg.device)
    return SideBySideEngine(model, processor, has_adapter=cfg.adapter is not None), samples


def main(cfg: DemoConfig) -> int:
    _gradio()  # fail before loading the model when the extra is missing
    engine, samples = load(cfg)
    if samples is not None:
        print(f"data: {len(samples):,} samples from {samples.source}" +
              (f" ({samples.skipped:,} rejected records left out)" if samples.skipped else ""))
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {cfg.host}: anyone who can reach this machine can use the page"
              + ("" if cfg.auth else " (no --auth)"))
    if cfg.share and not cfg.auth:
        print("WARNING: --share-without-auth: the public link opens the model to anyone who has it, with no "
              "password", file=sys.stderr)
    serve(build_app(cfg, engine, samples), cfg)
    return 0
