"""A folder that `export.py --onnx` wrote, run by ONNX Runtime behind the interface decoding.py drives.

    model, vocab, config = load_onnx_model("onnx_out/")
    grid = model.encoder.extract(images)               # uint8 [B,3,S,S] -> [B,P,C]: encoder.onnx
    generate(model, grid, vocab, decode_settings(config.decode))    # models/decoding.py: init_state.onnx, step.onnx

The graphs hold the model's arithmetic; the search (greedy, beam, sampling, the n-gram ban) stays ours, in
models/decoding.py, on the torch tensors this module hands back. The folder's graphs.json says which state
entries step.onnx changes: the ones it passes through unchanged (the attention decoder's grid and its
projection, the Transformer's cross-attention keys) are not outputs of the graph, and the tensors already held
are kept, so they are not copied at every word. onnxruntime is imported only here, when a folder is loaded.
"""
import hashlib
import json
import os

import numpy as np
import torch

from config import DEFAULTS, merge
from data.text.vocab import Vocabulary
from utils import UserError

MANIFEST = "graphs.json"            # what marks a folder as an ONNX export: models.checkpoint.load_model_at
FORMAT = 1
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(uint8)": np.uint8}


def require(*modules: str):
    """The ONNX packages, imported; one line on how to install them when one is missing."""
    import importlib
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as e:
        raise UserError(f"ONNX export and ONNX Runtime need packages that are not installed ({e.name}): "
                        f"pip install -r requirements-onnx.txt") from None


def is_onnx_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable as JSON ({str(e)[:80]}); export the folder again with "
                        f"export.py --onnx") from None


def load_onnx_model(folder: str):
    """(OnnxCaptionModel, vocab, config) of a folder written by export.py --onnx."""
    manifest = read_json(os.path.join(folder, MANIFEST))
    if manifest.get("format") != FORMAT:
        raise UserError(f"{folder}: an ONNX export of another version of this project (format "
                        f"{manifest.get('format')!r}, this one reads {FORMAT}); export it again with this version")
    config = merge(DEFAULTS, read_json(os.path.join(folder, "config.json")), os.path.join(folder, "config.json"))
    vocab = Vocabulary.load(os.path.join(folder, "vocab.json"))
    return OnnxCaptionModel(folder, manifest, config.model.encoder), vocab, config


def session(path: str):
    """An ONNX Runtime session on the CPU, with as many threads as torch uses (OMP_NUM_THREADS holds for both)."""
    (ort,) = require("onnxruntime")
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing from the ONNX export; export the folder again with export.py --onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run(graph, inputs: dict) -> list[np.ndarray]:
    """A session on torch tensors {input name: tensor}, each cast to the type its input declares (the cache's fp16
    grid to float). An input the graph does not read is not among its inputs, and not given."""
    feeds = {spec.name: np.ascontiguousarray(inputs[spec.name].detach().cpu().numpy(), dtype=NUMPY_TYPES[spec.type])
             for spec in graph.get_inputs()}
    return graph.run(None, feeds)


def state_names(n: int) -> list[str]:
    return [f"state.{i}" for i in range(n)]


class OnnxEncoder:
    """encoder.onnx as the tools use an encoder: extract (and trunk: the same, as the tail is inside the graph),
    tail (nothing left to run), and what the feature cache keys by (its name, the graph file's hash)."""

    tail_blocks = 0              # the cache stores the grid itself
    training = False

    def __init__(self, path: str, name: str):
        self.path, self.name, self.graph, self._fingerprint = path, name, session(path), None

    def eval(self):
        return self

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B,3,S,S] -> the grid [B,P,C], on the images' device."""
        return torch.from_numpy(run(self.graph, {"images": images})[0]).to(images.device)

    extract = trunk

    def tail(self, stored: torch.Tensor) -> torch.Tensor:
        return stored

    def weights_fingerprint(self, host_copy=None) -> str:
        if self._fingerprint is None:
            with open(self.path, "rb") as f:
                self._fingerprint = "onnx-" + hashlib.sha1(f.read()).hexdigest()[:11]
        return self._fingerprint


class OnnxCaptionModel:
    """CaptionModel's decoding interface over init_state.onnx and step.onnx: torch tensors in and out (on the
    device of the tensors given; ONNX Runtime itself runs on the CPU)."""

    def __init__(self, folder: str, manifest: dict, encoder_name: str):
        self.folder, self.manifest = folder, manifest
        self.encoder = OnnxEncoder(os.path.join(folder, "encoder.onnx"), encoder_name)
        self.init_graph = session(os.path.join(folder, "init_state.onnx"))
        self.step_graph = session(os.path.join(folder, "step.onnx"))
        self.changed = manifest["step_changes"]           # per state entry: whether step.onnx gives a new one

    def to(self, device):
        return self

    def eval(self):
        return self

    def init_state(self, features: torch.Tensor) -> tuple:
        return tuple(torch.from_numpy(s).to(features.device) for s in run(self.init_graph, {"grid": features}))

    def step(self, tokens: torch.Tensor, state: tuple):
        """tokens [B] -> (logits [B,V], the new state, attention [B,P] or None), as the decoders' step."""
        inputs = {"tokens": tokens, **dict(zip(state_names(len(state)), state))}
        outputs = iter(torch.from_numpy(o).to(tokens.device) for o in run(self.step_graph, inputs))
        logits = next(outputs)
        state = tuple(next(outputs) if changed else kept for kept, changed in zip(state, self.changed))
        return logits, state, next(outputs) if self.manifest["alpha"] else None
