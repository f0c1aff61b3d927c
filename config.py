"""Every config key and its default, in one place.

A run's config is DEFAULTS, overlaid by a YAML file (config.yaml or configs/*.yaml),
overlaid by `--set KEY=VALUE` pairs from the command line. Unknown keys are rejected,
so a typo never silently trains the wrong model.
"""
import copy

import yaml

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
        "encoder_lr": 1e-4,       # used when fine_tune_encoder is on
        "weight_decay": 0.0,
        "grad_clip": 5.0,
        "lr_schedule": "cosine",  # cosine | constant
        "warmup_steps": 0,
        "label_smoothing": 0.0,
        "batch_by_length": False, # batches of captions of similar length: faster steps on a GPU
        "select_metric": "bleu4", # bleu4 | cider | loss: what picks checkpoint_best.pth (greedy, on val)
        "early_stop_patience": 0, # epochs without improvement before stopping; 0 = never
        "val_bleu_images": 500,   # images decoded for the per-epoch validation BLEU-4; 0 = off
        "out_dir": "runs/flickr8k",
        "seed": 42,
        "device": "auto",         # auto | cpu | cuda | mps
        "num_workers": 2,
        "cache_features": True,
        "cache_dir": "cache/features",
        "fine_tune_encoder": False,  # train the last CNN block too (no feature cache then)
        "amp": True,              # mixed precision on CUDA
        "compile": False,         # torch.compile the decoder
        "cuda_graphs": True,      # one GPU: replay each step as a CUDA graph (cuda_graphs.py)
        "log_every": 50,          # steps between train rows in loss_log.txt
    },
    "decode": {
        "max_len": 30,            # words generated at most
        "beam_size": 3,
        "length_penalty": 1.0,    # beam score = log p / length ** length_penalty
    },
}


def parse_overrides(pairs: list[str]) -> dict:
    """["train.lr=1e-3", ...] -> {"train.lr": 0.001, ...}; values are YAML scalars."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, for example --set train.epochs=5")
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return overrides


def merge(config: dict, updates: dict, source: str) -> dict:
    """Overlay nested `updates` (or dotted keys) on config; reject keys that DEFAULTS lacks."""
    config = copy.deepcopy(config)
    for dotted, value in _flatten(updates).items():
        section, _, key = dotted.partition(".")
        if section not in DEFAULTS or key not in DEFAULTS[section]:
            known = ", ".join(f"{s}.{k}" for s in DEFAULTS for k in DEFAULTS[s])
            raise ValueError(f"{source}: unknown config key {dotted!r}; known keys: {known}")
        config[section][key] = _coerce(value, DEFAULTS[section][key], f"{source}: {dotted}")
    return config


def _coerce(value, default, where: str):
    """Give value the default's type; YAML reads 1e-3 as a string and 5 where 5.0 is meant."""
    if value is None and isinstance(default, str):
        return ""
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
    raise ValueError(f"{where} must be a {type(default).__name__}, got {value!r}")


def load_config(path: str | None, overrides: list[str] | None = None) -> dict:
    config = DEFAULTS
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                from_file = yaml.safe_load(f) or {}
        except OSError as e:
            raise ValueError(f"{path}: cannot read the config ({e.strerror}); pass --config with an existing YAML file") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(from_file, dict):
            raise ValueError(f"{path}: expected a mapping of sections (data:, model:, train:, decode:)")
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
