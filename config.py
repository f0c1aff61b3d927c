"""Every config key, declared once: its default (whose type it takes), its meaning and its allowed values.

A run's config is the defaults, overlaid by a YAML file (config.yaml or configs/*.yaml), overlaid by
`--set KEY=VALUE` pairs from the command line. Unknown keys are rejected, so a typo never silently
trains the wrong model. Code reads it in typed sections; a checkpoint stores it as a plain dict:

    config = load_config("configs/flickr8k.yaml", ["train.epochs=5"])
    config.train.epochs, config.model.decoder         # config["train"]["epochs"] reads the same
    config.to_dict()                                   # what a checkpoint stores
    merge(DEFAULTS, checkpoint["config"], path)        # and how it is read back
"""
import dataclasses
import difflib
import math
from dataclasses import dataclass, field

import yaml

from utils import UserError


def key(default, doc: str = "", *, choices: tuple = (), low=None, high=None, low_open=False, high_open=False):
    """A key: its default, what it means, and its allowed values (choices, or a range from low to high,
    open at an end where said)."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "low": low, "high": high,
                                            "low_open": low_open, "high_open": high_open})


class Section:
    """Read by name as well, as the dict a checkpoint stores reads: section["epochs"], section.get("epochs")."""

    def __getitem__(self, name: str):
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default=None):
        return getattr(self, name) if name in self.__dataclass_fields__ else default


@dataclass(frozen=True)
class DataConfig(Section):
    captions: str = key("data/flickr8k/captions.txt", "CSV `image,caption`, Flickr8k.token.txt or a Karpathy JSON")
    images: str = key("data/flickr8k/Images", "the image folder (a Karpathy JSON's root)")
    train_split: str = key("", 'file of image names, one per line ("" = a seeded split by image), or JSON splits')
    val_split: str = key("")
    val_fraction: float = key(0.1, "the seeded split's share of validation images", low=0.0, high=1.0, high_open=True)
    seed: int = key(0)
    min_word_freq: int = key(5, "rarer training words become <unk>", low=1)
    max_caption_len: int = key(40, "words; longer captions are cut", low=1)
    image_size: int = key(0, "square CNN input; 0 = the encoder's native size (224, lite2: 260)", low=0, high=2048)


@dataclass(frozen=True)
class ModelConfig(Section):
    encoder: str = key("resnet50", choices=("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                            "efficientnet_lite2"))
    encoder_weights: str = key("imagenet", "imagenet | none | path to a state dict")
    # each decoder is models/decoder_<name>.py
    decoder: str = key("lstm", "updown: top-down attention (two LSTMs)",
                       choices=("lstm", "attention", "transformer", "updown"))
    embed_size: int = key(256, low=1)
    hidden_size: int = key(512, low=1)
    attention_size: int = key(512, "attention and updown: the attention MLP's width", low=1)
    dropout: float = key(0.5, low=0.0, high=1.0, high_open=True)
    alpha_c: float = key(1.0, "doubly stochastic attention regularisation", low=0.0)
    num_layers: int = key(3, "transformer", low=1)
    num_heads: int = key(8, "transformer", low=1)


@dataclass(frozen=True)
class TrainConfig(Section):
    epochs: int = key(10, low=1)
    batch_size: int = key(64, "captions per step; images when the CNN or self-critical training trains", low=1)
    lr: float = key(4e-4, low=0.0, low_open=True)
    encoder_lr: float = key(1e-4, "the fine-tuned CNN blocks' learning rate", low=0.0, low_open=True)
    weight_decay: float = key(0.0, low=0.0)
    grad_clip: float = key(5.0, low=0.0, low_open=True)
    lr_schedule: str = key("cosine", choices=("cosine", "constant"))
    warmup_steps: int = key(0, low=0)
    label_smoothing: float = key(0.0, low=0.0, high=1.0, high_open=True)
    batch_by_length: bool = key(False, "batches of captions of similar length: faster steps on a GPU")
    select_metric: str = key("bleu4", "what picks checkpoint_best.pth (on val, decoded as decode: says)",
                             choices=("bleu4", "cider", "loss"))
    early_stop_patience: int = key(0, "validations without improvement before stopping; 0 = never", low=0)
    val_bleu_images: int = key(500, "images decoded for validation BLEU-4 and CIDEr; 0 = off", low=0)
    val_every: int = key(0, "steps between validations (and checkpoints) within an epoch; 0 = at its end only", low=0)
    out_dir: str = key("runs/flickr8k")
    seed: int = key(42)
    device: str = key("auto", "auto | cpu | cuda | mps")
    num_workers: int = key(2, low=0)
    cache_features: bool = key(True, "keep the CNN trunk's output on disk (train.cache_dir) for the next run")
    cache_dir: str = key("cache/features")
    cache_on_device: str = key("auto", "hold the training features on the device, or stream them",
                               choices=("auto", "true", "false"))
    fine_tune_encoder: int = key(0, "how many of the CNN's last blocks train (0: frozen; true = 1). The cache then "
                                    "holds the map entering them. Lite2: 21 blocks, 6 = its 9x9 stage; ResNet-50: "
                                    "16, 3 = layer4", low=0)
    hflip: bool = key(False, 'also train on mirrored images ("left" and "right" swapped in their captions)')
    ema_decay: float = key(0.0, "validate and save an exponential moving average of the weights (0: off)",
                           low=0.0, high=1.0, high_open=True)
    amp: bool = key(True, "mixed precision on CUDA")
    compile: bool = key(False, "torch.compile the decoder")
    cuda_graphs: bool = key(True, "one GPU: replay each step as a CUDA graph (training/cuda_graphs.py)")
    log_every: int = key(50, "steps between train rows in loss_log.txt", low=1)
    init_from: str = key("", "a checkpoint whose weights start a new run (same vocabulary and model)")
    scst: bool = key(False, "self-critical training with a CIDEr-D reward (needs init_from)")
    scst_samples: int = key(5, "captions sampled per image; the baseline is the mean of the others'", low=2)


@dataclass(frozen=True)
class DecodeConfig(Section):
    max_len: int = key(30, "words generated at most", low=1)
    beam_size: int = key(3, low=1)
    length_penalty: float = key(1.0, "beam score = log p / length ** length_penalty", low=0.0)
    no_repeat_ngram: int = key(2, "never say the same n words twice in one caption (0: off)", low=0)
    # consensus (minimum Bayes risk) re-ranking: models/consensus.py
    rerank_samples: int = key(0, "consensus re-ranking: captions sampled per image beside the beam's; the candidate "
                                 "with the highest mean CIDEr-D against the others wins (0: off)", low=0)
    rerank_temperature: float = key(0.7, "consensus re-ranking: the samples' softmax temperature", low=0.0,
                                    low_open=True)
    rerank_bleu: float = key(0.0, "consensus re-ranking: weight of smoothed sentence BLEU-4 beside CIDEr-D in the "
                                  "utility (0: CIDEr-D alone)", low=0.0)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "decode": DecodeConfig}


@dataclass(frozen=True)
class Config(Section):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULTS = Config()
FIELDS = {f"{name}.{f.name}": f for name, section in SECTIONS.items() for f in dataclasses.fields(section)}
KEYS = list(FIELDS)


def describe_keys() -> str:
    """Every key with its default and meaning, a line each (train.py --help)."""
    return "\n".join(f"  {name} = {f.default!r}" + (f"    {f.metadata['doc']}" if f.metadata["doc"] else "")
                     for name, f in FIELDS.items())


def check_value(name: str, value, where: str) -> None:
    """UserError with the allowed values or range when a key's value is outside them."""
    spec = FIELDS[name].metadata
    if spec["choices"] and value not in spec["choices"]:
        raise UserError(f"{where}: {name}={value!r} is not one of {', '.join(spec['choices'])}")
    low, high = spec["low"], spec["high"]
    if low is None and high is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: {name}={value!r} is not a finite number")
    too_low = low is not None and (value <= low if spec["low_open"] else value < low)
    too_high = high is not None and (value >= high if spec["high_open"] else value > high)
    if too_low or too_high:
        lower = "" if low is None else f"{'more than' if spec['low_open'] else 'at least'} {low}"
        upper = "" if high is None else f"{'less than' if spec['high_open'] else 'at most'} {high}"
        raise UserError(f"{where}: {name}={value!r} is out of range; it must be "
                        f"{' and '.join(p for p in (lower, upper) if p)}")


def parse_overrides(pairs: list[str]) -> dict:
    """["train.lr=1e-3", ...] -> {"train.lr": 0.001, ...}; values are YAML scalars."""
    overrides = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE, for example --set train.epochs=5")
        overrides[name.strip()] = yaml.safe_load(value) if value.strip() else ""
    return overrides


def merge(config: Config, updates: dict, source: str) -> Config:
    """config with nested `updates` (or dotted keys) overlaid; keys no section declares are rejected."""
    values = config.to_dict()
    for name, value in _flatten(updates).items():
        if name not in FIELDS:
            close = difflib.get_close_matches(name, KEYS, n=3, cutoff=0.75)
            hint = f"did you mean {' or '.join(close)}?" if close else "python train.py --help lists every key"
            raise UserError(f"{source}: unknown key {name}; {hint}")
        if name == "train.fine_tune_encoder" and isinstance(value, bool):
            value = int(value)      # it was a switch for the last block before it counted blocks
        section, key_name = name.split(".")
        values[section][key_name] = _coerce(value, FIELDS[name].default, f"{source}: {name}")
        check_value(name, values[section][key_name], source)
    return Config(**{section: SECTIONS[section](**keys) for section, keys in values.items()})


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


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    config = DEFAULTS
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                from_file = yaml.safe_load(f) or {}
        except OSError as e:
            raise UserError(f"{path}: cannot read the config ({e.strerror}); pass --config with an existing YAML "
                            f"file") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(from_file, dict):
            raise UserError(f"{path}: expected a mapping of sections (data:, model:, train:, decode:)")
        config = merge(config, from_file, path)
    return merge(config, parse_overrides(overrides or []), "--set")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
