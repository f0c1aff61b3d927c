"""bench.py --pretrained --onnx DIR: the shipped model in PyTorch (eager) beside its ONNX export (ONNX Runtime), in
one run, on the same photos, threads and decoding (the model's decode section: beam 3 for the shipped model).

- cnn_bs{1,16}_images_per_s: photos already read and resized, through the CNN alone (encoder.extract)
- decoder_bs{1,16}_images_per_s: the CNN's grids (PyTorch's, for both) through the search alone
  (models/decoding.py drives both sides; ONNX Runtime runs init_state and each step)
- photo_to_caption_bs{1,16}_images_per_s: files read, resized, through the CNN and the search
- load_s: the model loaded in a running process
- cold_start_s: `python inference_visualize.py --checkpoint MODEL --images ONE_PHOTO` in a new process, start to
  exit (Python and torch starting, the model loaded, one photo captioned, the gallery written)

Each ratio is "times better for ONNX Runtime" (>1: ONNX wins). ONNX Runtime runs as many threads as torch
(OMP_NUM_THREADS holds for both).
"""
import os
import sys
import tempfile
import time

import torch

from benchmarks.pretrained import command, photos
from data.images.reading import image_loader, input_size
from models.checkpoint import load_model_at
from models.decoding import decode_settings, describe_decoding, generate
from models.onnx_export import file_sha256
from models.onnx_model import MANIFEST, is_onnx_folder, read_json, require
from utils import REPO_ROOT, UserError

BATCHES = (1, 16)


def check_source(folder: str, checkpoint: str) -> None:
    """UserError unless folder is an ONNX export of the checkpoint file (the hash graphs.json records)."""
    if not is_onnx_folder(folder):
        raise UserError(f"--onnx {folder}: not a folder export.py --onnx wrote (it has no {MANIFEST})")
    source = read_json(os.path.join(folder, MANIFEST))["source"]
    if source["sha256"] != file_sha256(checkpoint):
        raise UserError(f"--onnx {folder} was exported from another file ({source['file']}), not "
                        f"{os.path.relpath(checkpoint)}; export it again: python export.py "
                        f"{os.path.relpath(checkpoint)} {folder} --onnx")


def timed_load(path: str):
    start = time.perf_counter()
    model, vocab, config, _ = load_model_at(path)
    return (model.eval(), vocab, config), time.perf_counter() - start


def rate(work, batches: list) -> float:
    """Images per second of work(batch) over batches, after one batch of warm-up (first allocations)."""
    work(batches[0])
    start = time.perf_counter()
    for batch in batches:
        work(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


@torch.no_grad()
def side_figures(loaded, paths: list[str], size: int, decode: dict, grids: dict) -> dict:
    """One side's in-process rates at each batch size; grids: {batch size: the grids both sides decode}."""
    model, vocab, _ = loaded
    figures = {}
    for bs in BATCHES:
        images = [b for b, _, _ in image_loader(paths, size, bs, num_workers=0) if b is not None]
        figures[f"cnn_bs{bs}_images_per_s"] = rate(model.encoder.extract, images)
        figures[f"decoder_bs{bs}_images_per_s"] = rate(lambda g: generate(model, g, vocab, decode), grids[bs])

        def whole(files):
            for batch, _, _ in image_loader(files, size, bs, num_workers=0):
                generate(model, model.encoder.extract(batch), vocab, decode)
        groups = [paths[i:i + bs] for i in range(0, len(paths), bs)]
        figures[f"photo_to_caption_bs{bs}_images_per_s"] = rate(whole, groups)
    return figures


@torch.no_grad()
def run(onnx_folder: str, checkpoint: str, data: str | None, n_photos: int) -> dict:
    """Both sides on the first n_photos dev photos of data (a Flickr8k folder), else generated JPEGs."""
    check_source(onnx_folder, checkpoint)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        paths, source = photos(data, tmp)
        paths = paths[:n_photos]
        cold = {name: command(["--checkpoint", path, "--images", paths[0]], os.path.join(tmp, name))
                for name, path in (("pytorch", checkpoint), ("onnx", onnx_folder))}
        pytorch, pytorch_load = timed_load(checkpoint)
        onnx, onnx_load = timed_load(onnx_folder)
        config = pytorch[2]
        size, decode = input_size(config.model.encoder, config.data.image_size), decode_settings(config.decode)
        grids = {bs: [pytorch[0].encoder.extract(b) for b, _, _ in image_loader(paths, size, bs, num_workers=0)
                      if b is not None] for bs in BATCHES}
        measured = {name: side_figures(loaded, paths, size, decode, grids)
                    for name, loaded in (("pytorch", pytorch), ("onnx", onnx))}
    figures = {key: figure(measured["pytorch"][key], measured["onnx"][key]) for key in measured["pytorch"]}
    figures["load_s"] = figure(pytorch_load, onnx_load, higher_is_better=False)
    figures["cold_start_s"] = figure(cold["pytorch"], cold["onnx"], higher_is_better=False)
    (onnxruntime,) = require("onnxruntime")
    return {"benchmark": "onnx", "model": os.path.relpath(checkpoint, REPO_ROOT), "onnx": onnx_folder,
            "photos": len(paths), "source": source, "decoding": describe_decoding(decode), "batch_sizes": BATCHES,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "figures": figures}


def figure(pytorch: float, onnx: float, higher_is_better: bool = True) -> dict:
    ratio = onnx / pytorch if higher_is_better else pytorch / onnx
    return {"pytorch": round(pytorch, 3), "onnx": round(onnx, 3), "ratio": round(ratio, 3)}


def print_table(result: dict) -> None:
    lines = [f"{'figure':<38}{'pytorch':>12}{'onnx':>12}{'ratio':>9}"]
    lines += [f"{name:<38}{f['pytorch']:>12.4g}{f['onnx']:>12.4g}{f['ratio']:>8.2f}x"
              for name, f in result["figures"].items()]
    print(f"\n{result['model']} vs its ONNX export {result['onnx']} ({result['threads']} threads), {result['photos']} "
          f"{result['source']} photos, {result['decoding']}:\n" + "\n".join(lines), file=sys.stderr)
