"""Score a checkpoint on a split with real decoding (never teacher forcing).

    python evaluate.py --checkpoint runs/demo/checkpoint_best.pth --split val
    python evaluate.py --checkpoint CKPT --captions data/flickr8k/captions.txt --images data/flickr8k/Images \\
        --split-file data/flickr8k/Flickr_8k.devImages.txt --out runs/x/metrics.json
    python evaluate.py --checkpoint CKPT --captions data/coco/dataset_coco.json --images data/coco --split test
    python evaluate.py --checkpoint pretrained/flickr8k_attention_lite2.pth --captions ... --images ...

Generates a caption for every image of the split, decoded as the checkpoint's decode section says
(the decoding of inference, the web demo and the README's tables; --beam-size, --max-len,
--length-penalty, --no-repeat-ngram and the --rerank-* flags of consensus re-ranking change it), prints that
decoding in one line, and scores them against all reference captions with the coco-caption toolkit: BLEU-1..4, METEOR,
ROUGE-L, CIDEr-D. Prints the metrics as one JSON object on the last line of stdout (plus
exact_match: the share of captions equal to a reference word for word, n_empty_captions and
n_skipped). With --out, writes that object to the file, and beside it <stem>_captions.json (image,
caption, references, per-image scores), which grows as captions are produced, so an interrupted run
keeps what it generated.
"""
import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

from data.features.cache import Loading, extract_features
from data.text.captions import load_splits, read_dataset
from data.text.vocab import tokenize
from evaluation.metrics import score_captions
from models.checkpoint import load_model_at
from models.decoding import Captioner, decode_settings, describe_decoding
from models.rerank_frequencies import with_rerank_cider
from utils import UserError, atomic_write_text, int_at_least, pick_device, run_main, warn


def write_json(obj, path: str) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=1))


def images_to_score(args, config):
    """(references: image -> captions, names to caption) from the flags, or the checkpoint's own split."""
    if args.split in ("train", "val") and not args.captions:
        references, train_names, val_names = load_splits(config.data)
        args.captions, args.images = config.data.captions, config.data.images
        return references, train_names if args.split == "train" else val_names
    if not (args.captions and args.images):
        raise UserError("give --captions and --images (and --split-file, or --split with a Karpathy JSON), "
                        "or --split val for the checkpoint's own validation split")
    # --split names a Karpathy JSON's splits (default: test), --split-file lists images (default: every one)
    references, splits = read_dataset(args.captions, {"test": args.split or args.split_file})
    return references, list(references) if splits["test"] is None else splits["test"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint (train.py's or pretrained/*.pth), or a folder of export.py --onnx")
    parser.add_argument("--captions", help="captions file: image,caption CSV, Flickr8k.token.txt or Karpathy JSON")
    parser.add_argument("--images", help="image folder (for a Karpathy JSON: the root its file paths start from)")
    parser.add_argument("--split-file", help="image names to evaluate, one per line (default: every captioned image)")
    parser.add_argument("--split", help="with a Karpathy JSON: its split(s), e.g. test or val (default test); "
                                        "without --captions: train or val of the checkpoint's own dataset")
    parser.add_argument("--beam-size", type=int_at_least(1), default=None,
                        help="beam width, 1 = greedy (default: the checkpoint's decode.beam_size)")
    parser.add_argument("--max-len", type=int_at_least(1), default=None,
                        help="maximum caption length in words (default: the checkpoint's)")
    parser.add_argument("--length-penalty", type=float, default=None,
                        help="beam score = log p / length ** this (default: the checkpoint's decode.length_penalty)")
    parser.add_argument("--no-repeat-ngram", type=int_at_least(0), default=None,
                        help="never repeat n words in a caption (0: off; default: the checkpoint's decode.no_repeat_ngram)")
    parser.add_argument("--rerank-samples", type=int_at_least(0), default=None,
                        help="consensus re-ranking: sample N captions per image beside the beam's and keep the one "
                             "most like the others, by CIDEr-D (0: off; default: the checkpoint's decode.rerank_samples)")
    parser.add_argument("--rerank-temperature", type=float, default=None,
                        help="consensus re-ranking: the samples' temperature (default: decode.rerank_temperature)")
    parser.add_argument("--rerank-bleu", type=float, default=None,
                        help="consensus re-ranking: weight of BLEU-4 beside CIDEr-D (default: decode.rerank_bleu)")
    parser.add_argument("--out", help="write the metrics JSON here, and <stem>_captions.json beside it")
    parser.add_argument("--batch-size", type=int_at_least(1), default=64)
    parser.add_argument("--num-workers", type=int_at_least(0), default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-cache", action="store_true", help="recompute CNN features instead of reading train.cache_dir")
    return parser.parse_args(argv)


def present(names: list, references: dict, args) -> tuple[list, int]:
    """(the names both captioned and on disk, how many others were skipped, each kind with a warning)."""
    not_captioned = [n for n in names if n not in references]
    missing = [n for n in names if n in references and not os.path.isfile(os.path.join(args.images, n))]
    if not_captioned:
        warn(f"{len(not_captioned)} images to score have no caption in {args.captions} (e.g. {not_captioned[0]}); skipped")
    if missing:
        warn(f"{len(missing)} images are not in {args.images} (e.g. {missing[0]}); skipped")
    absent = set(missing)
    kept = [n for n in names if n in references and n not in absent]
    if not kept:
        raise UserError(f"nothing to evaluate: no image of {args.split_file or args.split or args.captions} is both "
                        f"captioned in {args.captions} and present in {args.images}")
    return kept, len(not_captioned) + len(missing)


def caption_all(captioner: Captioner, names, references, args, captions_path) -> list[dict]:
    """[{image, caption, references}] for the readable images of names, written to captions_path as they come."""
    paths = [os.path.join(args.images, n) for n in names]
    # The CNN trunk's output comes from the training cache when it is there (same key, same weights).
    encoder, config = captioner.model.encoder, captioner.config
    cache_dir = None if args.no_cache else config.train.cache_dir
    features, ok = extract_features(encoder, paths, config.data.image_size, cache_dir, captioner.device,
                                    Loading(args.batch_size, args.num_workers))
    readable, produced = [n for n, good in zip(names, ok) if good], []
    try:
        for start in tqdm(range(0, len(readable), args.batch_size),
                          desc=f"captioning (beam {captioner.decode.beam_size})", unit="batch", file=sys.stderr):
            with torch.no_grad():
                results = captioner.captions(encoder.tail(features[start:start + args.batch_size].to(captioner.device)))
            produced += [{"image": name, "caption": r["caption"], "references": references[name]}
                         for name, r in zip(readable[start:], results)]
            if captions_path:
                write_json(produced, captions_path)
    except KeyboardInterrupt as stop:       # Ctrl-C or SIGTERM: the captions file holds every caption made
        kept = f"kept the {len(produced)} captions made so far in {captions_path}" if captions_path else \
            f"{len(produced)} captions made, none kept (give --out to keep them)"
        raise type(stop)(kept) from None
    return produced


def main(argv=None):
    args = parse_args(argv)
    own_split = args.split in ("train", "val") and not args.captions
    if not own_split:       # the user's paths are checked before the model loads: a mistake is told at once
        references, names = images_to_score(args, None)
        names, skipped = present(names, references, args)
    device = pick_device(args.device)
    model, vocab, config, checkpoint = load_model_at(args.checkpoint)      # a .pth, or an ONNX folder
    model.to(device)
    if own_split:
        references, names = images_to_score(args, config)
        names, skipped = present(names, references, args)
    decode = decode_settings(config.decode, beam_size=args.beam_size, max_len=args.max_len,
                             length_penalty=args.length_penalty, no_repeat_ngram=args.no_repeat_ngram,
                             rerank_samples=args.rerank_samples, rerank_temperature=args.rerank_temperature,
                             rerank_bleu=args.rerank_bleu)
    print(f"decoding: {describe_decoding(decode)}", file=sys.stderr)
    captions_path = os.path.splitext(args.out)[0] + "_captions.json" if args.out else None
    captioner = Captioner(model, vocab, config, with_rerank_cider(decode, checkpoint, args.checkpoint), device)
    produced = caption_all(captioner, names, references, args, captions_path)
    empty = sum(1 for p in produced if not p["caption"])
    if empty:
        warn(f"{empty} generated captions are empty (the model said <end> first); they score 0")
    metrics, per_image, notes = score_captions({p["image"]: p["caption"] for p in produced},
                                               {p["image"]: p["references"] for p in produced})
    for note in notes:
        warn(note)
    result = {**{k: (round(v, 4) if v is not None else None) for k, v in metrics.items()}, "n_images": len(produced),
              "exact_match": round(sum(tokenize(p["caption"]) in [tokenize(r) for r in p["references"]]
                                       for p in produced) / len(produced), 4),
              **decode.to_dict(), "n_empty_captions": empty, "n_skipped": skipped + len(names) - len(produced)}
    if args.out:
        for p in produced:
            p["scores"] = per_image[p["image"]]
        write_json(produced, captions_path)
        write_json(result, args.out)
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
