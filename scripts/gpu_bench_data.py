"""The training data of gpu_bench.sh's Python parts, in one place: devdata's first 1,500 Flickr8k train
images, their captions encoded as train.py encodes them, and a random ResNet-50 grid per image (a grid's
values do not change a step's speed).

    from scripts.gpu_bench_data import load
    vocab, (tokens, lengths, image_index), features = load()   # features [1500, 49, 2048] fp16, on the CPU
"""
import torch

from config import DEFAULTS
from data.dataset import read_captions, read_split_file
from data.prepare import encode_captions
from data.vocab import Vocabulary

IMAGES = 1500


def load(folder: str = "devdata/flickr8k"):
    captions = read_captions(f"{folder}/captions.txt")
    names = [n for n in read_split_file(f"{folder}/Flickr_8k.trainImages.txt") if n in captions][:IMAGES]
    vocab = Vocabulary.build((c for n in names for c in captions[n]), 5)
    rows = encode_captions(names, captions, vocab, DEFAULTS["data"]["max_caption_len"])
    return vocab, rows, torch.randn(len(names), 49, 2048).half()
