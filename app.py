"""Web demo: upload images (or click a bundled example) and see the caption, the top beams and,
for attention and Transformer decoders, a heatmap per word. Runs on a CPU.

    pip install -r requirements-app.txt            # requirements.txt plus streamlit
    streamlit run app.py                           # opens with the shipped Flickr8k model
    CAPTION_APP_CHECKPOINT=runs/demo/checkpoint_best.pth streamlit run app.py   # preselect a checkpoint

The sidebar offers the shipped model (pretrained/) and every checkpoint_*.pth under runs/ (or under
$CAPTION_APP_RUNS_DIR), and takes a typed path inside those two folders. A path elsewhere on the
server is refused, unless whoever runs the server sets CAPTION_APP_ANY_CHECKPOINT=1: in a public
Space, a box that opens any path would tell visitors which files exist. The model is loaded once per
checkpoint file (path + modification time) and shared by all reruns and visitors. The upload limit
is Streamlit's own server.maxUploadSize, set in .streamlit/config.toml.
"""
import io
import math
import os
import sys
import traceback

import streamlit as st
import torch
from PIL import Image

from data.demo import knows_only_shapes
from data.images.reading import IMAGE_EXTENSIONS, input_size, load_image, resize_image
from models.checkpoint import PRETRAINED, load_checkpoint, load_model
from models.decoding import decode_settings, describe_decoding, generate
from models.rerank_frequencies import rerank_cider
from reports.gallery import attention_overlay
from utils import REPO_ROOT, UserError, pick_device

ANY_CHECKPOINT = "CAPTION_APP_ANY_CHECKPOINT"   # set to 1 by the operator: the path box opens any file
UPLOAD_TYPES = [extension.lstrip(".") for extension in IMAGE_EXTENSIONS]   # what the command line reads too
EXAMPLES_DIR = os.path.join(REPO_ROOT, "examples")          # photos, for a model trained on photos
DEMO_EXAMPLES_DIR = os.path.join(REPO_ROOT, "demo_images")   # generated shapes, for a model trained on them
N_EXAMPLES = 6
# What a model knows, in one sentence under the title: what its training photos show, and what they never do.
FLICKR8K_WORLD = ("This model learned from Flickr8k's 6,000 photos of people, children and dogs at play, sports, "
                  "water, beaches and streets; cats, food, objects, indoor close-ups and space are rare or absent "
                  "there, so it describes those as the nearest thing it has seen.")
SHAPES_ONLY = "This model learned from the generated demo shapes: it knows coloured shapes, and nothing else."
MAX_HEATMAPS = 20                   # words shown with an attention map
# What one visitor can make the server do: at most this many files per upload, each at most this many pixels,
# and shrunk to this side as it is decoded (the full-size picture is never kept, nor sent back to the browser).
MAX_UPLOADS = 8
UPLOAD_MAX_PIXELS = 12_000_000
SHOWN_SIDE = 1024


def find_checkpoints(folder: str) -> list[str]:
    """Every checkpoint_*.pth under folder (recursively), sorted."""
    found = []
    for parent, _, files in os.walk(folder):
        found += [os.path.join(parent, f) for f in files if f.startswith("checkpoint_") and f.endswith(".pth")]
    return sorted(found)


@st.cache_resource(show_spinner="Loading the model...", max_entries=2)
def load_captioner(path: str, mtime: float):
    """(model, vocab, config, device, consensus re-ranking's CIDEr-D or None) for a checkpoint; mtime is only part of
    the cache key, so a retrained file reloads."""
    checkpoint = load_checkpoint(path)
    model, vocab, config = load_model(checkpoint, path)
    cider = rerank_cider(checkpoint, path) if config.decode.rerank_samples else None
    device = pick_device("auto")
    print(f"app: loaded {path} on {device}", file=sys.stderr, flush=True)    # once per file, for every visitor
    return model.to(device), vocab, config, device, cider


class NamedBytes(io.BytesIO):
    """Uploaded bytes that print as their file name, so load_image's error messages name the upload."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self):
        return self.name

    __repr__ = __str__


@st.cache_data(max_entries=4 * MAX_UPLOADS, show_spinner=False)
def read_image(data: bytes, name: str) -> Image.Image:
    """Uploaded bytes -> RGB image turned by its EXIF orientation and shrunk to SHOWN_SIDE as it is decoded, or
    UserError naming the file (not an image, too many pixels, too narrow). Streamlit itself refuses files over its
    upload limit. Cached by the bytes: a rerun (a slider moved) decodes no upload again."""
    return load_image(NamedBytes(data, name), max_pixels=UPLOAD_MAX_PIXELS, max_side=SHOWN_SIDE)


@st.cache_data(max_entries=8 * MAX_UPLOADS, show_spinner=False)
def cached_caption(checkpoint: str, data: bytes, name: str, settings: tuple, _captioner) -> dict:
    """caption() of an upload, once per (checkpoint file, upload bytes, decoding): moving a slider back, or any other
    rerun, captions no unchanged upload again."""
    return caption(_captioner, read_image(data, name), **dict(settings))


def caption(captioner, image: Image.Image, beam_size: int, max_len: int, no_repeat_ngram: int) -> dict:
    """One image -> decoding.generate's result plus `heatmaps`: [(word, overlay image)] when the model attends."""
    model, vocab, config, device, cider = captioner
    size = input_size(config.model.encoder, config.data.image_size)
    decode = decode_settings(config.decode, beam_size=beam_size, max_len=max_len, no_repeat_ngram=no_repeat_ngram)
    if cider is not None:
        decode = decode.with_cider(cider)
    with torch.inference_mode():
        features = model.encoder.extract(resize_image(image, size).unsqueeze(0).to(device))   # [1,3,S,S] -> [1,P,C]
        result = generate(model, features, vocab, decode)[0]
    attention, result["heatmaps"] = result["attention"], []
    if attention is not None and len(attention):                                            # [n_words, P]
        side = math.isqrt(attention.size(1))
        if side * side == attention.size(1):
            words = result["caption"].split()
            result["heatmaps"] = [(word, attention_overlay(image, weights, (side, side)))
                                  for word, weights in list(zip(words, attention))[:MAX_HEATMAPS]]
    return result


def show_result(name: str, image: Image.Image, result: dict) -> None:
    st.divider()
    picture, text = st.columns([1, 2])
    picture.image(image, caption=name, width="stretch")
    text.subheader(result["caption"] or "(empty caption)")
    text.caption("Top beams (score: length-normalised log-probability, higher is better)")
    text.dataframe([{"rank": i + 1, "caption": beam, "score": round(float(score), 3)}
                    for i, (beam, score) in enumerate(result["beams"])], hide_index=True, width="stretch")
    if result["heatmaps"]:
        st.caption("Attention per word: where the model looked while saying it")
        words, overlays = zip(*result["heatmaps"])
        st.image(list(overlays), caption=list(words), width=96)


def runs_dir() -> str:
    return os.environ.get("CAPTION_APP_RUNS_DIR", os.path.join(REPO_ROOT, "runs"))


def offered_checkpoints() -> list[str]:
    """The shipped model first (when this copy has it), then the runs' checkpoints; the operator's
    CAPTION_APP_CHECKPOINT, if set, first of all."""
    found = ([PRETRAINED] if os.path.isfile(PRETRAINED) else []) + find_checkpoints(runs_dir())
    options = [os.path.relpath(p, REPO_ROOT) if p.startswith(REPO_ROOT + os.sep) else p for p in found]
    options = [o for o in options if allowed(o)]    # a link under runs/ to a file elsewhere is not offered
    preset = os.environ.get("CAPTION_APP_CHECKPOINT")
    return [preset] + [o for o in options if o != preset] if preset else options


def allowed(path: str) -> bool:
    """Whether a path (typed, or found under runs/) lies inside pretrained/ or the runs folder, after links are
    followed."""
    if os.environ.get(ANY_CHECKPOINT) == "1":
        return True
    real = os.path.realpath(os.path.join(REPO_ROOT, path))
    return any(real.startswith(os.path.realpath(folder) + os.sep)
               for folder in (os.path.dirname(PRETRAINED), runs_dir()))


def sidebar_checkpoint() -> str | None:
    """The checkpoint path the sidebar selects: the typed path if any, else the selectbox's choice."""
    options = offered_checkpoints()
    st.sidebar.header("Model")
    chosen = st.sidebar.selectbox("Checkpoint", options, index=0, placeholder="none found") if options else None
    typed = st.sidebar.text_input("...or a checkpoint path under pretrained/ or runs/",
                                  placeholder="runs/my_run/checkpoint_best.pth").strip()
    if typed and not allowed(typed):
        st.sidebar.error(f"{typed}: outside pretrained/ and runs/; this demo opens only its own checkpoints")
        return chosen
    return typed or chosen


def what_it_knows(vocab, config) -> str | None:
    """The sentence under the title on what the model learned from: for the shapes demo and for Flickr8k,
    whose worlds we know; a model trained on other data gets none rather than a wrong one."""
    if knows_only_shapes(vocab.itos):
        return SHAPES_ONLY
    return FLICKR8K_WORLD if "flickr8k" in config.data.captions.lower() else None


def examples_for(vocab) -> str:
    """The bundled examples a model can say something about: shapes for a demo model, photos for the others."""
    return DEMO_EXAMPLES_DIR if knows_only_shapes(vocab.itos) else EXAMPLES_DIR


def example_buttons(folder: str) -> None:
    """Thumbnails of a few bundled images; clicking one makes it the page's one input."""
    if not os.path.isdir(folder):
        return
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(tuple(UPLOAD_TYPES)))[:N_EXAMPLES]
    if not names:
        return
    st.write("...or click an example:")
    for number, (column, name) in enumerate(zip(st.columns(len(names)), names), 1):
        path = os.path.join(folder, name)
        column.image(path, width="stretch")
        column.button(f"Example {number}", key=f"example_{name}", help=name, width="stretch", on_click=choose_example,
                      args=(path,))


def choose_example(path: str) -> None:
    """An example click replaces the uploads: the page shows one current set of results."""
    st.session_state["example"] = path
    st.session_state["uploader"] = st.session_state.get("uploader", 0) + 1     # a new, empty file uploader


def forget_example() -> None:
    st.session_state.pop("example", None)           # new uploads replace the example


def visitor_inputs(upload_column) -> list[tuple[str, bytes]]:
    """(name, bytes) of what to caption: the uploads (at most MAX_UPLOADS), or the example clicked last."""
    uploads = upload_column.file_uploader("Upload images", type=UPLOAD_TYPES, accept_multiple_files=True,
                                          key=f"uploads_{st.session_state.get('uploader', 0)}", on_change=forget_example)
    uploads = uploads or []
    if len(uploads) > MAX_UPLOADS:
        upload_column.warning(f"Captioning the first {MAX_UPLOADS} of the {len(uploads)} files; upload the others "
                              f"separately.")
    inputs = [(upload.name, upload.getvalue()) for upload in uploads[:MAX_UPLOADS]]
    example = st.session_state.get("example")
    if not inputs and example:
        with open(example, "rb") as f:
            inputs.append((os.path.basename(example), f.read()))
    return inputs


def open_captioner(path: str):
    """The sidebar's checkpoint, loaded (once per file); a page error otherwise that names the file as the visitor
    gave it, never the server's own path to it."""
    full = os.path.realpath(os.path.join(REPO_ROOT, path))      # one cache entry per file, however it was named
    try:
        return full, load_captioner(full, os.path.getmtime(full) if os.path.exists(full) else 0.0)
    except (UserError, OSError) as e:
        message = str(e).replace(full, path).replace(REPO_ROOT + os.sep, "")
        st.error(f"Cannot load the checkpoint: {message}. Train one with `python train.py`, or pick another in the "
                 f"sidebar.")
        st.stop()


def show_input(checkpoint: str, name: str, data: bytes, captioner, settings: tuple) -> None:
    """Caption one upload and show it; whatever the file makes go wrong is a message on the page, and a traceback
    in the server's log only."""
    try:
        image = read_image(data, name)
        with st.spinner(f"Captioning {name}..."):
            result = cached_caption(checkpoint, data, name, settings, captioner)
        show_result(name, image, result)
    except UserError as e:
        st.error(str(e))
    except Exception:       # a bug of ours, or a library's, that this file set off: the visitor sees one line
        traceback.print_exc(file=sys.stderr)
        st.error(f"{name}: could not be captioned: an error on the server (its log has the details)")


def main() -> None:
    st.set_page_config(page_title="Image captioning", page_icon="🖼️", layout="wide")
    st.title("Image captioning")
    path = sidebar_checkpoint()
    if not path:
        st.error("No checkpoint found: this copy has no shipped model in pretrained/ (restore it with "
                 "`git checkout -- pretrained/`) and nothing under runs/. Train one with `python train.py` "
                 "(it writes runs/<name>/checkpoint_best.pth).")
        st.stop()
    full, captioner = open_captioner(path)
    _, vocab, config, device, _ = captioner
    known = what_it_knows(vocab, config)
    if known:
        st.caption(known)
    st.sidebar.header("Decoding")
    beam_size = st.sidebar.slider("Beam size", 1, 10, min(max(config.decode.beam_size, 1), 10))
    max_len = st.sidebar.slider("Max caption length (words)", 5, 60, min(max(config.decode.max_len, 5), 60))
    no_repeat_ngram = st.sidebar.slider("Never repeat a phrase of this many words (0: off)", 0, 5,
                                        min(config.decode.no_repeat_ngram, 5))
    decode = decode_settings(config.decode, beam_size=beam_size, max_len=max_len, no_repeat_ngram=no_repeat_ngram)
    st.sidebar.caption(f"Decoding: {describe_decoding(decode)}.")
    st.sidebar.caption(f"{config.model.encoder} + {config.model.decoder} on {device.type}; "
                       f"images up to {UPLOAD_MAX_PIXELS:,} pixels, {MAX_UPLOADS} at a time")

    upload_column, example_column = st.columns([2, 3], gap="large")
    with example_column:
        example_buttons(examples_for(vocab))
    inputs = visitor_inputs(upload_column)
    if not inputs:
        st.info("Upload an image or click an example to caption it.")
    settings = (("beam_size", beam_size), ("max_len", max_len), ("no_repeat_ngram", no_repeat_ngram))
    key = f"{full}:{os.path.getmtime(full)}"          # a retrained file is a new checkpoint for the cache
    for name, data in inputs:
        show_input(key, name, data, captioner, settings)


if __name__ == "__main__":   # `streamlit run` executes this file as __main__; `import app` (tests) does not
    main()
