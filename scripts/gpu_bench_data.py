"""The training data of gpu_bench.sh's Python parts, in one place: bench.py's own choice of 1,500 devdata
images (bench.find_data: the first train-split files on disk with captions), their captions encoded as
train.py encodes them, and a random ResNet-50 grid per image (a grid's values do not change a step's speed).

    from scripts.gpu_bench_data import load
    vocab, (tokens, lengths, image_index), features = load()   # features [1500, 49, 2048] fp16, on the CPU
"""
import argparse

import torch

import bench
from config import DEFAULTS
from data.dataset import read_captions
from data.prepare import encode_captions
from data.vocab import Vocabulary

IMAGES = 1500


def load(folder: str = "devdata/flickr8k"):
    _, captions_path, names, _ = bench.find_data(argparse.Namespace(data=folder), None, IMAGES)
    captions = read_captions(captions_path)
    vocab = Vocabulary.build((c for n in names for c in captions[n]), 5)
    rows = encode_captions(names, captions, vocab, DEFAULTS["data"]["max_caption_len"])
    return vocab, rows, torch.randn(len(names), 49, 2048).half()
