"""Export a training checkpoint as a small inference checkpoint: the form of the shipped model.

    python export.py runs/NAME/checkpoint_best.pth pretrained/flickr8k_attention_lite2.pth \\
        --verify-images data/flickr8k/Images --verify-split data/flickr8k/Flickr_8k.devImages.txt
    python evaluate.py --checkpoint pretrained/flickr8k_attention_lite2.pth --captions data/flickr8k/captions.txt \\
        --images data/flickr8k/Images --split-file data/flickr8k/Flickr_8k.devImages.txt --out runs/NAME/metrics_shipped.json
    python export.py runs/NAME/checkpoint_best.pth pretrained/flickr8k_attention_lite2.pth \\
        --scores runs/NAME/metrics_shipped.json \\
        --verify-images data/flickr8k/Images --verify-split data/flickr8k/Flickr_8k.devImages.txt

The file holds the trained weights in half precision, the vocabulary, the config (data paths of the
training machine written as data/<folder>/<file>, as the README lays data out), the dev scores
(--scores) and the command that trained the model; no optimizer state. The frozen CNN's weights stay
out when a package supplies them, and a hash of them is recorded and checked at load time; a
fine-tuned tail of the CNN ships inside. The n-gram document frequencies of the training captions (data.captions
and its training split) ship too, for consensus re-ranking (models/consensus.py), when those can be read here.

With --verify-images, the exported model captions those images as the checkpoint's decode section
says (the decoding users get), and at least --min-agreement of its captions must equal the training
checkpoint's before the file is written. The scores it embeds must be the exported file's own: the
second export above writes the same weights with the scores evaluate.py gave on the first, and with
--verify-images it checks that the captions behind them (the _captions.json beside the scores) are the
ones the exported file gives. --card pretrained/README.md rewrites the Hugging Face Hub metadata at the top of
the model card (tags, the model-index of those scores: reports/model_card.py) from the file it writes.

--ensemble adds more training checkpoints of the same vocabulary and CNN trunk: the file then decodes
with all the models at once, averaging their word log-probabilities at each step (models.ensemble):

    python export.py runs/A/checkpoint_best.pth ensemble.pth --ensemble runs/B/checkpoint_best.pth ...

--onnx writes a folder of ONNX graphs instead (models/onnx_export.py): the CNN (uint8 images -> grid, a fine-tuned
tail included), the decoder's init_state and step, and the config and vocabulary as JSON. CHECKPOINT may then
also be an exported file (pretrained/*.pth). inference_visualize.py and evaluate.py take the folder as
--checkpoint: ONNX Runtime runs the graphs, models/decoding.py the search. With --verify-images its captions
must equal the PyTorch model's on at least --min-agreement of the images before the folder is put in place:

    python export.py pretrained/flickr8k_attention_lite2.pth onnx/flickr8k_attention_lite2 --onnx \\
        --verify-images data/flickr8k/Images --verify-split data/flickr8k/Flickr_8k.devImages.txt
"""
import argparse
import hashlib
import io
import json
import os
import sys

import torch
from tqdm import tqdm

from data.features.cache import Loading, extract_features
from data.images.reading import list_images
from data.text.captions import read_split_file
from models.checkpoint import is_inference, load_checkpoint, load_model, load_model_at
from models.decoding import RERANK_KEYS, decode_settings, describe_decoding, generate
from models.ensemble import CaptionEnsemble
from models.exporting import MAX_SHIPPED_BYTES, MAX_SHIPPED_ENSEMBLE_BYTES, inference_checkpoint
from models.onnx_export import caption_files, new_folder, write_graphs
from models.rerank_frequencies import frequencies_to_export, with_rerank_cider
from reports.model_card import check_card, update_card
from training.weight_average import unaveraged
from utils import UserError, atomic_save, atomic_write, pick_device, run_main, warn


def captions_of(models, paths, config, device, decode, batch_size=64) -> list[dict]:
    """{image name: caption} of each model on the image files, on the trunk's output computed (or read from the
    cache) once for all: the models share their frozen trunk."""
    vocab = models[0][1]
    features, ok = extract_features(models[0][0].encoder, paths, config.data.image_size, config.train.cache_dir,
                                    device, Loading(batch_size, workers=0, desc="verify: features"))
    names = [os.path.basename(p) for p, good in zip(paths, ok) if good]
    captions = [{} for _ in models]
    for start in tqdm(range(0, len(features), batch_size), desc="verify: captions", unit="batch"):
        batch = features[start:start + batch_size].to(device)
        with torch.no_grad():
            for found, (model, *_) in zip(captions, models):
                results = generate(model, model.encoder.tail(batch), vocab, decode)
                found.update({name: r["caption"] for name, r in zip(names[start:], results)})
    return captions


def read_scores(path: str, decode: dict) -> tuple[dict, dict]:
    """(scores, {image: caption} behind them, or {} when evaluate.py's _captions.json is not beside them);
    the scores must come from the decoding the file will default to."""
    try:
        with open(path, encoding="utf-8") as f:
            scores = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--scores {path}: not a readable JSON file ({e}); pass evaluate.py's --out") from None
    expected = {**dict.fromkeys(RERANK_KEYS), **decode.to_dict()}     # re-ranking's keys are there only when it is on
    other = {k: (scores.get(k), v) for k, v in expected.items() if scores.get(k) != v}
    if other:
        raise UserError(f"--scores {path}: measured with {', '.join(f'{k}={a!r}' for k, (a, _) in other.items())}, "
                        f"while the file decodes with {describe_decoding(decode)}; score it with evaluate.py's defaults")
    captions_path = os.path.splitext(path)[0] + "_captions.json"
    if not os.path.isfile(captions_path):
        return scores, {}
    with open(captions_path, encoding="utf-8") as f:
        return scores, {row["image"]: row["caption"] for row in json.load(f)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint",
                        help="a training checkpoint (checkpoint_best.pth); with --onnx also pretrained/*.pth")
    parser.add_argument("out", help="the inference checkpoint to write, e.g. pretrained/flickr8k_attention_lite2.pth; "
                                    "with --onnx, the folder")
    parser.add_argument("--onnx", action="store_true",
                        help="write ONNX graphs into the folder OUT instead (on the CPU)")
    parser.add_argument("--scores", help="evaluate.py's --out JSON of the exported file (dev, its default decoding)")
    parser.add_argument("--command", help="the command that trained it (default: the one the checkpoint records)")
    parser.add_argument("--verify-images", metavar="DIR", help="images to compare captions on")
    parser.add_argument("--verify-split", metavar="FILE", help="names of --verify-images to use, one per line")
    parser.add_argument("--min-agreement", type=float, default=0.99, help="share of equal captions required (0.99)")
    parser.add_argument("--ensemble", nargs="+", default=[], metavar="CHECKPOINT",
                        help="more training checkpoints to decode with it as one ensemble")
    parser.add_argument("--card", metavar="README",
                        help="the model card whose Hub metadata (the YAML block at its top: scores, tags) to rewrite "
                             "from the file, e.g. pretrained/README.md")
    parser.add_argument("--unaveraged", action="store_true",
                        help="write instead a training checkpoint of the weights training went on from, not their "
                             "average (train.ema_decay), to score them")
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.onnx:
        return export_onnx(args)
    check_replaceable(args.out, training=args.unaveraged)
    if args.unaveraged:
        atomic_save(unaveraged(training_checkpoint(args.checkpoint)), args.out)
        print(f"{args.out}: the weights training went on from, without their average")
        return
    if args.card:
        check_card(args.card)
    checkpoints, loaded, full = load_members(args)
    decode = decode_settings(full[2].decode)
    scores, scored_captions = read_scores(args.scores, decode) if args.scores else (None, {})
    exported = inference_checkpoint(checkpoints[0], loaded[0][0], scores, args.command,
                                    [(c, m) for c, (m, _, _) in zip(checkpoints[1:], loaded[1:])],
                                    frequencies_to_export(full[2], full[1]))
    buffer = io.BytesIO()
    torch.save(exported, buffer)
    data = buffer.getvalue()
    limit = MAX_SHIPPED_ENSEMBLE_BYTES if args.ensemble else MAX_SHIPPED_BYTES
    if len(data) > limit:
        warn(f"the exported file is {len(data) / 2**20:.1f} MB, over the {limit / 2**20:.0f} MB the repository ships "
             f"{'an ensemble' if args.ensemble else 'one model'} in")
    # Loaded back as a user will load it: weights_only, the CNN's trunk from its package, the hash checked.
    shipped = torch.load(io.BytesIO(data), weights_only=True)
    verify(args, full, load_model(shipped, args.out), with_rerank_cider(decode, shipped, args.out), scored_captions)
    atomic_write(args.out, lambda f: f.write(data))
    print(f"{args.out}: {len(data) / 2**20:.1f} MB, sha256 {hashlib.sha256(data).hexdigest()}")
    if args.card:
        update_card(args.card, shipped, os.path.splitext(os.path.basename(args.out))[0])
        print(f"{args.card}: its Hub metadata rewritten from {args.out}")


def load_members(args) -> tuple[list, list, tuple]:
    """(training checkpoints, each one's (model, vocab, config), the (model, vocab, config) to export: the first
    model, or all of them as one ensemble)."""
    paths = [args.checkpoint, *args.ensemble]
    checkpoints = [training_checkpoint(path) for path in paths]
    loaded = [load_model(checkpoint, path) for checkpoint, path in zip(checkpoints, paths)]
    for (_, vocab, _), path in zip(loaded[1:], args.ensemble):
        if vocab.itos != loaded[0][1].itos:
            raise UserError(f"--ensemble {path}: its vocabulary differs from {args.checkpoint}'s; an ensemble's models "
                            f"must be trained on one vocabulary (the same data and data.min_word_freq)")
    if not args.ensemble:
        return checkpoints, loaded, loaded[0]
    sizes = [config.data.image_size for _, _, config in loaded]
    return checkpoints, loaded, (CaptionEnsemble([model for model, _, _ in loaded], sizes).eval(), *loaded[0][1:])


def verify(args, full, again, decode, scored_captions: dict) -> None:
    """With --verify-images: the exported file (again) captions as the training checkpoint (full) does, and as the
    captions behind --scores say; UserError, and nothing written, below --min-agreement."""
    if not args.verify_images:
        if scored_captions:
            warn("the scores were not checked against the exported file's captions: give --verify-images")
        return
    device = pick_device(args.device)
    print(f"verify: decoding with {describe_decoding(decode)}", file=sys.stderr)
    for model, *_ in (full, again):
        model.to(device)
    ours, theirs = captions_of([full[:2], again[:2]], verification_images(args), full[2], device, decode)
    agreement(ours, theirs, "the training checkpoint's", args.min_agreement, args.out)
    if scored_captions:
        agreement({n: scored_captions[n] for n in theirs if n in scored_captions}, theirs,
                  f"the captions behind --scores {args.scores}", args.min_agreement, args.out)


def verification_images(args) -> list[str]:
    return ([os.path.join(args.verify_images, n) for n in read_split_file(args.verify_split)]
            if args.verify_split else list_images([args.verify_images]))


def export_onnx(args) -> None:
    """--onnx: the folder of graphs, loaded back as users load it and checked against the PyTorch model before it
    is put in place."""
    if args.ensemble or args.scores or args.card:
        raise UserError("--onnx exports one model as it is: leave out --ensemble, --scores and --card")
    checkpoint = load_checkpoint(args.checkpoint)
    model, vocab, config = load_model(checkpoint, args.checkpoint)
    with new_folder(args.out) as folder:
        write_graphs(model, vocab, config, folder, args.checkpoint)
        onnx_model, _, _, _ = load_model_at(folder)              # loaded back as a user will load it
        if args.verify_images:
            decode = decode_settings(config.decode)
            print(f"verify: decoding with {describe_decoding(decode)}", file=sys.stderr)
            decode = with_rerank_cider(decode, checkpoint, args.checkpoint)
            paths = verification_images(args)
            ours, theirs = (caption_files(m, vocab, config, paths, decode) for m in (model, onnx_model))
            agreement(ours, theirs, "the PyTorch model's", args.min_agreement, args.out)
        size = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
    print(f"{args.out}: {size / 2**20:.1f} MB in {len(os.listdir(args.out))} files")


def check_replaceable(out: str, training: bool = False) -> None:
    """An existing OUT is replaced only when it is a file export.py wrote (a model being re-shipped; a training
    checkpoint for --unaveraged); anything else there is never written over."""
    if not os.path.lexists(out):
        return
    if os.path.isdir(out):
        raise UserError(f"{out} is a folder; give the file to write, e.g. {os.path.join(out, 'model.pth')}")
    try:
        ours = is_inference(load_checkpoint(out)) != training
    except UserError:
        ours = False
    if not ours:
        raise UserError(f"{out} exists and is not a model export.py wrote; it is never written over: give a new file name")


def training_checkpoint(path: str) -> dict:
    checkpoint = load_checkpoint(path)
    if is_inference(checkpoint):
        raise UserError(f"{path} is already an exported checkpoint; export the training checkpoint")
    return checkpoint


def agreement(expected: dict, found: dict, whose: str, min_agreement: float, out: str) -> None:
    """Print how many of the exported file's captions equal `expected`'s; UserError below min_agreement."""
    same = sum(found.get(name) == caption for name, caption in expected.items())
    print(f"the exported file's captions equal {whose} for {same} of {len(expected)} images "
          f"({len(expected) - same} differ)", file=sys.stderr)
    if not expected or same < min_agreement * len(expected):
        raise UserError(f"only {same} of {len(expected)} captions equal {whose} (at least {min_agreement:.0%} "
                        f"required); {out} was not written")


if __name__ == "__main__":
    run_main(main)
