"""A captioning model as ONNX graphs (export.py --onnx), for ONNX Runtime (models.onnx_model) to run.

The folder it writes:
    encoder.onnx       uint8 images [B,3,S,S] -> grid [B,P,C]: normalisation, the frozen trunk, a fine-tuned tail
    init_state.onnx    grid [B,P,C] -> state.0 .. state.N-1: CaptionModel.init_state (an LSTM's pooled input too)
    step.onnx          tokens [B], state.0 .. -> logits [B,V], the state entries step changes, alpha [B,P]
    graphs.json        which state entries step changes, whether it gives alpha, the source checkpoint's hash
    config.json        the model's config, its paths portable; its decode section is the folder's default decoding
    vocab.json

The batch axis of every graph is dynamic. The Transformer's self-attention caches grow by one word per step,
so their word axis is dynamic too (found by comparing the state before and after one step). The search itself
(greedy, beam, sampling) is not in the graphs: models/decoding.py runs it, as on the PyTorch model.
"""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings

import torch
import torch.nn as nn

from data.images.reading import image_loader, input_size
from models.decoding import generate
from models.ensemble import CaptionEnsemble
from models.exporting import portable_config
from models.onnx_model import FORMAT, MANIFEST, is_onnx_folder, require, state_names
from utils import TEMP_PREFIX, UserError, atomic_write_text

EXAMPLE_BATCH = 2      # the traced batch: 0 and 1 would be taken for constants by torch.export
OPSET = 18


class EncoderGraph(nn.Module):
    """EncoderCNN.extract in one piece, without its CPU chunking and layout moves: a graph has no use for them."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images):
        e = self.encoder
        x = e.backbone.trunk((images.float() - e.mean) / e.std, e.tail_blocks)
        if e.tail_blocks:
            x = e.backbone.tail(x, e.tail_blocks)
        return x.flatten(2).transpose(1, 2)                                   # [B,C,H,W] -> [B,P,C]


class InitGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, grid):
        return tuple(self.model.init_state(grid))


class StepGraph(nn.Module):
    """model.step, giving only the state entries it changes (changed[i]) and alpha when there is one."""

    def __init__(self, model, changed: list[bool], alpha: bool):
        super().__init__()
        self.model, self.changed, self.alpha = model, changed, alpha

    def forward(self, tokens, *state):
        logits, state, alpha = self.model.step(tokens, state)
        return (logits, *(s for s, c in zip(state, self.changed) if c), *([alpha] if self.alpha else []))


def export_graph(module, args: tuple, path: str, input_names, output_names, dynamic_shapes) -> None:
    require("onnx", "onnxscript")
    with warnings.catch_warnings():      # the exporter's notes on axis names and deprecations: not the user's
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, path, dynamo=True, verbose=False, external_data=False,
                          opset_version=OPSET, input_names=input_names, output_names=output_names,
                          dynamic_shapes=dynamic_shapes)


@torch.no_grad()
def write_graphs(model, vocab, config, folder: str, source: str) -> None:
    """The three graphs and the JSON files of model (eval mode, on the CPU) into folder; source: the checkpoint
    file it came from (its hash is recorded, so bench.py can tell which model a folder is)."""
    if isinstance(model, CaptionEnsemble):
        raise UserError(f"{source} is an ensemble: --onnx exports one model; export one of its training "
                        f"checkpoints")
    model = model.float().eval().cpu()
    size = input_size(config.model.encoder, config.data.image_size)
    images = torch.randint(0, 256, (EXAMPLE_BATCH, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch")
    export_graph(EncoderGraph(model.encoder), (images,), os.path.join(folder, "encoder.onnx"), ["images"], ["grid"],
                 {"images": {0: batch}})
    grid = EncoderGraph(model.encoder)(images)
    first = model.init_state(grid)
    start = torch.full((EXAMPLE_BATCH,), vocab.start_id)
    _, second, alpha = model.step(start, first)
    changed = [new is not old for new, old in zip(second, first)]
    growing = [[d for d in range(s.dim()) if s.shape[d] != t.shape[d]] for s, t in zip(first, second)]
    names = state_names(len(first))
    export_graph(InitGraph(model), (grid,), os.path.join(folder, "init_state.onnx"), ["grid"], names,
                 {"grid": {0: batch}})
    _, state, _ = model.step(start + 3, second)        # two words in: no axis of the traced state is 0 or 1 long
    words = torch.export.Dim("words", max=getattr(model.decoder, "max_len", 1024) - 1)
    shapes = tuple({0: batch, **{d: words for d in axes}} for axes in growing)
    outputs = ["logits", *(f"new_{n}" for n, c in zip(names, changed) if c), *(["alpha"] if alpha is not None else [])]
    export_graph(StepGraph(model, changed, alpha is not None), (start, *state), os.path.join(folder, "step.onnx"),
                 ["tokens", *names], outputs, ({0: batch}, shapes))
    manifest = {"format": FORMAT, "step_changes": changed, "alpha": alpha is not None, "image_size": size,
                "source": {"file": os.path.basename(source),
                           "sha256": file_sha256(source) if os.path.isfile(source) else None}}
    atomic_write_text(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))
    atomic_write_text(os.path.join(folder, "config.json"), json.dumps(portable_config(config), indent=1))
    vocab.save(os.path.join(folder, "vocab.json"))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def new_folder(out: str):
    """A temp folder beside out, put in place of out when the block ends without an error (else removed): a
    failed or refused export leaves what was there. out may be absent, empty, or an earlier ONNX export."""
    out = os.path.abspath(out)
    if os.path.islink(out):
        raise UserError(f"{out}: a link; give the folder itself, or a new one")
    if os.path.exists(out) and not (os.path.isdir(out) and (is_onnx_folder(out) or not os.listdir(out))):
        raise UserError(f"{out}: exists and is not a folder export.py --onnx "
                        f"wrote; give a new folder")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    folder = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=os.path.dirname(out))
    try:
        yield folder
        os.chmod(folder, 0o755)          # mkdtemp makes 0700; the export is meant to be shared
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(folder, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@torch.no_grad()
def caption_files(model, vocab, config, paths: list[str], decode: dict, batch_size: int = 16) -> dict:
    """{file name: caption} of the readable image files, from the images as inference_visualize.py reads them
    (no feature cache: the graph's encoder is what is checked)."""
    size = input_size(config.model.encoder, config.data.image_size)
    captions = {}
    for images, good, _ in image_loader(paths, size, batch_size, num_workers=0):
        if images is None:
            continue
        results = generate(model, model.encoder.extract(images), vocab, decode)
        captions.update({os.path.basename(paths[i]): r["caption"] for i, r in zip(good, results)})
    return captions
