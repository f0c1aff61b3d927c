"""Every config key and its default, in one place.

A run's config is DEFAULTS, overlaid by a YAML file (config.yaml or configs/*.yaml),
overlaid by `--set KEY=VALUE` pairs from the command line. Unknown keys are rejected,
so a typo never silently trains the wrong model.
"""
import copy
import difflib
import math

import yaml

from utils import UserError

DEFAULTS = {
    "data": {
        "captions": "data/flickr8k/captions.txt",  # CSV `image,caption` or Flickr8k.token.txt
        "images": "data/flickr8k/Images",
        "train_split": "",        # file of image names, one per line; "" = seeded split by image
        "val_split": "",
        "val_fraction": 0.1,
        "seed": 0,
        "min_word_freq": 5,       # rarer training words become <unk>
        "max_caption_len": 40,    # words; longer captions are cut
        "image_size": 0,          # square CNN input; 0 = the encoder's native size (224, lite2: 260)
    },
    "model": {
        "encoder": "resnet50",    # resnet18|34|50|101|152, efficientnet_lite2
        "encoder_weights": "imagenet",  # imagenet | none | path to a state dict
        "decoder": "lstm",        # lstm | attention | transformer
        "embed_size": 256,
        "hidden_size": 512,
        "attention_size": 512,
        "dropout": 0.5,
        "alpha_c": 1.0,           # doubly stochastic attention regularisation
        "num_layers": 3,          # transformer
        "num_heads": 8,           # transformer
    },
    "train": {
        "epochs": 10,
        "batch_size": 64,
        "lr": 4e-4,
        "encoder_lr": 1e-4,       # the fine-tuned CNN blocks' learning rate
        "weight_decay": 0.0,
        "grad_clip": 5.0,
        "lr_schedule": "cosine",  # cosine | constant
        "warmup_steps": 0,
        "label_smoothing": 0.0,
        "batch_by_length": False, # batches of captions of similar length: faster steps on a GPU
        "select_metric": "bleu4", # bleu4 | cider | loss: what picks checkpoint_best.pth (on val, decoded as decode: says)
        "early_stop_patience": 0, # validations without improvement before stopping; 0 = never
        "val_bleu_images": 500,   # images decoded for validation BLEU-4 and CIDEr; 0 = off
        "val_every": 0,           # steps between validations (and checkpoints) within an epoch; 0 = at its end only
        "out_dir": "runs/flickr8k",
        "seed": 42,
        "device": "auto",         # auto | cpu | cuda | mps
        "num_workers": 2,
        "cache_features": True,
        "cache_dir": "cache/features",
        "cache_on_device": "auto",  # auto | true | false: hold the training features on the device, or stream them
        "fine_tune_encoder": 0,   # how many of the CNN's last blocks train (0: frozen; true = 1). The cache then
                                  # holds the map entering them, and a step takes train.batch_size whole images.
                                  # Lite2: 21 blocks, 6 = the 9x9 stage; ResNet-50: 16, 3 = layer4
        "hflip": False,           # also train on mirrored images ("left" and "right" swapped in their captions)
        "ema_decay": 0.0,         # validate and save an exponential moving average of the weights (0: off)
        "amp": True,              # mixed precision on CUDA
        "compile": False,         # torch.compile the decoder
        "cuda_graphs": True,      # one GPU: replay each step as a CUDA graph (cuda_graphs.py)
        "log_every": 50,          # steps between train rows in loss_log.txt
        "init_from": "",          # a checkpoint whose weights start a new run (same vocabulary and model)
        "scst": False,            # self-critical training with a CIDEr-D reward (needs init_from)
        "scst_samples": 5,        # captions sampled per image; the baseline is the mean of the others'
    },
    "decode": {
        "max_len": 30,            # words generated at most
        "beam_size": 3,
        "length_penalty": 1.0,    # beam score = log p / length ** length_penalty
        "no_repeat_ngram": 2,     # never say the same n words twice in one caption (0: off); docs/results.md
    },
}


KEYS = [f"{section}.{key}" for section in DEFAULTS for key in DEFAULTS[section]]


def describe_keys() -> str:
    """Every key with its default, a line each (train.py --help)."""
    return "\n".join(f"  {key} = {DEFAULTS[key.split('.')[0]][key.split('.')[1]]!r}" for key in KEYS)


CHOICES = {
    "model.encoder": ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "efficientnet_lite2"),
    "model.decoder": ("lstm", "attention", "transformer"),
    "train.lr_schedule": ("cosine", "constant"),
    "train.select_metric": ("bleu4", "cider", "loss"),
    "train.cache_on_device": ("auto", "true", "false"),
}
# (lowest, highest) allowed, None for no bound; an interval's open ends are in OPEN_ABOVE/OPEN_BELOW
RANGES = {
    "data.val_fraction": (0.0, 1.0), "data.min_word_freq": (1, None), "data.max_caption_len": (1, None),
    "data.image_size": (0, 2048), "model.embed_size": (1, None), "model.hidden_size": (1, None),
    "model.attention_size": (1, None), "model.dropout": (0.0, 1.0), "model.alpha_c": (0.0, None),
    "model.num_layers": (1, None), "model.num_heads": (1, None), "train.epochs": (1, None),
    "train.batch_size": (1, None), "train.lr": (0.0, None), "train.encoder_lr": (0.0, None),
    "train.weight_decay": (0.0, None), "train.grad_clip": (0.0, None), "train.warmup_steps": (0, None),
    "train.label_smoothing": (0.0, 1.0), "train.early_stop_patience": (0, None), "train.val_bleu_images": (0, None),
    "train.val_every": (0, None), "train.num_workers": (0, None), "train.log_every": (1, None),
    "train.scst_samples": (2, None), "train.fine_tune_encoder": (0, None), "train.ema_decay": (0.0, 1.0),
    "decode.max_len": (1, None), "decode.beam_size": (1, None),
    "decode.length_penalty": (0.0, None), "decode.no_repeat_ngram": (0, None),
}
OPEN_ABOVE = {"train.lr", "train.encoder_lr", "train.grad_clip"}        # must be more than the lowest
OPEN_BELOW = {"data.val_fraction", "model.dropout", "train.label_smoothing", "train.ema_decay"}   # must be less than the highest


def check_value(key: str, value, where: str) -> None:
    """ValueError with the allowed values or range when a key's value is outside them."""
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(f"{where}: {key}={value!r} is not one of {', '.join(CHOICES[key])}")
    if key not in RANGES:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: {key}={value!r} is not a finite number")
    low, high = RANGES[key]
    too_low = low is not None and (value <= low if key in OPEN_ABOVE else value < low)
    too_high = high is not None and (value >= high if key in OPEN_BELOW else value > high)
    if too_low or too_high:
        lower = "" if low is None else f"{'more than' if key in OPEN_ABOVE else 'at least'} {low}"
        upper = "" if high is None else f"{'less than' if key in OPEN_BELOW else 'at most'} {high}"
        raise UserError(f"{where}: {key}={value!r} is out of range; it must be {' and '.join(p for p in (lower, upper) if p)}")


def parse_overrides(pairs: list[str]) -> dict:
    """["train.lr=1e-3", ...] -> {"train.lr": 0.001, ...}; values are YAML scalars."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE, for example --set train.epochs=5")
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return overrides


def merge(config: dict, updates: dict, source: str) -> dict:
    """Overlay nested `updates` (or dotted keys) on config; reject keys that DEFAULTS lacks."""
    config = copy.deepcopy(config)
    for dotted, value in _flatten(updates).items():
        section, _, key = dotted.partition(".")
        if section not in DEFAULTS or key not in DEFAULTS[section]:
            close = difflib.get_close_matches(dotted, KEYS, n=3, cutoff=0.75)
            hint = f"did you mean {' or '.join(close)}?" if close else "python train.py --help lists every key"
            raise UserError(f"{source}: unknown key {dotted}; {hint}")
        if dotted == "train.fine_tune_encoder" and isinstance(value, bool):
            value = int(value)      # it was a switch for the last block before it counted blocks
        config[section][key] = _coerce(value, DEFAULTS[section][key], f"{source}: {dotted}")
        check_value(dotted, config[section][key], source)
    return config


def _coerce(value, default, where: str):
    """Give value the default's type; YAML reads 1e-3 as a string and 5 where 5.0 is meant."""
    if value is None and isinstance(default, str):
        return ""
    if isinstance(value, bool) and isinstance(default, str):     # YAML reads `true` as a boolean
        return str(value).lower()
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
        elif isinstance(default, float) and isinstance(value, (int, float, str)):
            return float(value)
        elif isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
            return value
        elif isinstance(default, str) and isinstance(value, (str, int, float)):
            return str(value)
    except ValueError:
        pass
    raise UserError(f"{where} must be a {type(default).__name__}, got {value!r}")


def load_config(path: str | None, overrides: list[str] | None = None) -> dict:
    config = DEFAULTS
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                from_file = yaml.safe_load(f) or {}
        except OSError as e:
            raise UserError(f"{path}: cannot read the config ({e.strerror}); pass --config with an existing YAML file") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(from_file, dict):
            raise UserError(f"{path}: expected a mapping of sections (data:, model:, train:, decode:)")
        config = merge(config, from_file, path)
    return merge(config, parse_overrides(overrides or []), "--set")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
