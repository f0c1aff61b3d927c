"""The exported form of a training checkpoint, as export.py writes it (the shipped model's form): what
export.py's library side holds beside models/onnx_export.py. models/checkpoint.py reads both forms.

An inference checkpoint holds the trained weights in half precision, with a hash of them; the vocabulary;
the config, its paths written as they read on any machine (data/<folder>/<file>, runs/<name>); the dev
scores; the command that trained it; no optimizer. The frozen CNN's weights (its trunk) stay out when a
package supplies them, and a hash of them is recorded; a fine-tuned tail ships inside.
"""
import os
import shlex

from config import DEFAULTS, PATH_KEYS, merge
from data.features.key import weights_hash
from models.checkpoint import CHECKPOINT_FORMAT, INFERENCE, RERANK_FREQUENCIES, TRAINED
from models.encoder import EncoderCNN
from utils import UserError

MAX_SHIPPED_BYTES = 20 * 2**20    # the repository's limit for the shipped model
MAX_SHIPPED_ENSEMBLE_BYTES = 45 * 2**20       # and for a shipped ensemble


def _check_trunk_is_packaged(model, config) -> None:
    """The frozen trunk is left out of an exported file and taken from its package at load time, so it must be the
    package's own: UserError when blocks before the fine-tuned tail were trained too (a run started from a model
    fine-tuned deeper than its train.fine_tune_encoder)."""
    packaged = EncoderCNN(config.model.encoder, "imagenet", config.model.embed_size, model.encoder.spatial,
                          model.encoder.tail_blocks)
    if packaged.weights_fingerprint() != model.encoder.weights_fingerprint():
        raise UserError(f"the CNN's frozen part is not the {config.model.encoder} weights its package supplies: blocks "
                        f"before the last {model.encoder.tail_blocks} were trained (its train.init_from was fine-tuned "
                        f"deeper?); export a model whose train.fine_tune_encoder counts every block that was trained")


def portable_path(key: str, path: str) -> str:
    """A config path as it reads on any machine: an absolute one of the training machine becomes
    data/<folder>/<file> (data keys), runs/<folder>/<file> (train.init_from), runs/<folder> (train.out_dir), or
    the default (train.cache_dir); a relative one stays."""
    if not os.path.isabs(path):
        return path
    folder, name = os.path.basename(os.path.dirname(path)), os.path.basename(path)
    if key == "train.out_dir":
        return f"runs/{name}"
    if key == "train.cache_dir":
        return DEFAULTS.train.cache_dir
    if key == "train.init_from":
        return f"{folder if folder == 'pretrained' else 'runs/' + folder}/{name}"
    return f"data/{folder}/{name}"


def portable_config(config) -> dict:
    """config (a Config) as a dict whose paths read on any machine (portable_path)."""
    config = config.to_dict()
    for key in PATH_KEYS:
        section, name = key.split(".")
        if config[section][name]:
            config[section][name] = portable_path(key, config[section][name])
    return config


def portable_command(command: str) -> str:
    """The training command with each `KEY=/absolute/path` of a config path key written as portable_path writes
    it. It stays shell text: `cmd1 && cmd2; cmd3` keeps its operators bare, and a word with spaces stays quoted."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError as e:
        raise UserError(f"--command {command!r}: {e}; quote it as a shell would") from None
    for i, word in enumerate(words):
        key, sep, value = word.partition("=")
        if sep and key in PATH_KEYS and os.path.isabs(value):
            words[i] = f"{key}={portable_path(key, value)}"
    return " ".join(word if set(word) <= set(lexer.punctuation_chars) else shlex.quote(word) for word in words)


def inference_checkpoint(checkpoint: dict, model, scores: dict | None, command: str | None,
                         members: tuple = (), rerank_frequencies: dict | None = None) -> dict:
    """The exported form of a training checkpoint (see the module's docstring): trained weights in half
    precision, vocabulary, config, dev scores and the command that trained it; no optimizer. members: (training
    checkpoint, its model) of the ensemble's other models, each exported the same way into "members".
    rerank_frequencies: the training captions' document frequencies that consensus re-ranking reads
    (models.rerank_frequencies.count_frequencies), when they could be counted."""
    exported = {"format": CHECKPOINT_FORMAT, "kind": INFERENCE, **_exported_model(checkpoint, model),
                "vocab": checkpoint["vocab"], "scores": scores or checkpoint.get("scores") or {},
                "command": portable_command(command or checkpoint.get("command") or ""),
                "trained": {k: checkpoint.get("progress", {}).get(k) for k in ("epoch", "step", "best")}}
    if members:
        exported["members"] = [_exported_model(*member) for member in members]
    if rerank_frequencies is not None:
        exported[RERANK_FREQUENCIES] = rerank_frequencies
    return exported


def _exported_model(checkpoint: dict, model) -> dict:
    """{"model": trained weights in half precision, without a packaged CNN's trunk; "config"; "encoder_hash"
    of that trunk, when a package supplies it}."""
    config = merge(DEFAULTS, checkpoint["config"], "checkpoint")
    from_package = config.model.encoder_weights == "imagenet"
    if from_package:
        _check_trunk_is_packaged(model, config)
    trunk = {"encoder.backbone." + k for k in model.encoder.trunk_state()} if from_package else set()
    weights = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["model"].items() if k not in trunk}
    exported = {"model": weights, "config": portable_config(config), "weights_hash": weights_hash(weights, TRAINED)}
    if from_package:
        exported["encoder_hash"] = model.encoder.weights_fingerprint()
    return exported
