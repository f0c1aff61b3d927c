"""The naive baseline that bench.py measures against: the classic captioning-tutorial loop.

PIL + torchvision.transforms, DataLoader(num_workers=2), a fp32 ResNet-50 run on every batch,
an LSTM (Linear+BatchNorm head) trained on its output, no feature cache. It is deliberately
written the way tutorials write it; the project's own pipeline never uses it.
"""
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

from config import DEFAULTS, IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from models.decoder_lstm import DecoderRNN
from models.decoding import DecodeSettings, generate

MAX_LEN = DEFAULTS.decode.max_len


def now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def naive_transform(size):
    return torchvision.transforms.Compose([torchvision.transforms.Resize((size, size)), torchvision.transforms.ToTensor(),
                                           torchvision.transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class NaiveCaptioner(nn.Module):
    """Show and Tell as in the classic tutorials: fp32 ResNet-50 on every batch, Linear+BatchNorm, LSTM."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.cnn = nn.Sequential(*list(torchvision.models.resnet50(weights=None).children())[:-1])   # to avgpool
        self.cnn.requires_grad_(False)
        self.embed = nn.Sequential(nn.Linear(2048, 256), nn.BatchNorm1d(256))
        self.decoder = DecoderRNN(vocab_size, ModelConfig(embed_size=256, hidden_size=512, dropout=0.5))

    def train(self, mode: bool = True):
        super().train(mode)
        self.cnn.eval()            # frozen: keep its BatchNorm statistics
        return self

    def init_state(self, images):  # images [B,3,S,S] normalised -> LSTM state; lets decoding.generate drive it
        with torch.no_grad():
            features = self.cnn(images).flatten(1)                                  # [B, 2048]
        return self.decoder.init_state(self.embed(features))

    def step(self, tokens, state):
        return self.decoder.step(tokens, state)

    def forward(self, images, captions, lengths):
        with torch.no_grad():
            features = self.cnn(images).flatten(1)
        logits, _ = self.decoder(self.embed(features), captions[:, :-1], lengths - 1)  # [B, T, V]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), captions[:, 1:].reshape(-1), ignore_index=0)

    def copy_from(self, model):
        """Take a project LSTM model's weights, so both pipelines compute the same captions."""
        self.cnn[:8].load_state_dict(model.encoder.backbone.state_dict())
        self.embed.load_state_dict(model.encoder.embed.state_dict())
        self.decoder.load_state_dict(model.decoder.state_dict())


class NaiveImages(torch.utils.data.Dataset):
    """Caption rows (or images) -> (normalised float image, tokens, length), opened with PIL every time."""

    def __init__(self, paths, size, tokens=None, lengths=None, image_index=None):
        self.paths, self.transform = paths, naive_transform(size)
        self.tokens, self.lengths, self.image_index = tokens, lengths, image_index

    def __len__(self):
        return len(self.paths) if self.tokens is None else len(self.tokens)

    def __getitem__(self, i):
        if self.tokens is None:
            return self.transform(Image.open(self.paths[i]).convert("RGB"))
        image = Image.open(self.paths[self.image_index[i]]).convert("RGB")
        return self.transform(image), self.tokens[i], self.lengths[i]


@torch.no_grad()
def naive_extract(naive, paths, size, bs, device):
    naive.cnn(torch.zeros(2, 3, size, size, device=device))            # warm-up
    start = now(device)
    for images in torch.utils.data.DataLoader(NaiveImages(paths, size), batch_size=bs, num_workers=2):
        naive.cnn(images.to(device)).flatten(1).cpu()                   # [b, 2048]
    return len(paths) / (now(device) - start)


def naive_train(vocab_size, images: NaiveImages, bs, device, max_epochs, budget_s, folder):
    """The classic loop from JPEGs to a checkpoint per epoch, over caption rows `images` (a NaiveImages with
    tokens): (model, epochs done, wall s, captions/s in epoch 1)."""
    start = now(device)
    naive = NaiveCaptioner(vocab_size).to(device)
    optimizer = torch.optim.Adam([p for p in naive.parameters() if p.requires_grad], lr=1e-3)
    loader = torch.utils.data.DataLoader(images, batch_size=bs, shuffle=True, num_workers=2)
    epochs, step_ends = 0, []
    while epochs < max_epochs and (epochs == 0 or now(device) - start < budget_s):
        naive.train()
        for images, tokens, lengths in loader:
            loss = naive(images.to(device), tokens[:, :int(lengths.max())].to(device), lengths)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()                                                 # the classic loop prints it
            if epochs == 0:
                step_ends.append((time.perf_counter(), len(tokens)))
        torch.save(naive.state_dict(), os.path.join(folder, "naive.pth"))
        epochs += 1
    wall = now(device) - start
    if len(step_ends) > 1:   # steady state: from the end of step 1 to the end of the epoch's last step
        rate = sum(n for _, n in step_ends[1:]) / (step_ends[-1][0] - step_ends[0][0])
    else:
        rate = step_ends[0][1] / wall
    return naive, epochs, wall, rate


@torch.no_grad()
def naive_infer(naive, vocab, paths, size, bs, beam, device):
    naive.eval()
    transform = naive_transform(size)
    start = now(device)
    for first in range(0, len(paths), bs):
        images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[first:first + bs]])
        generate(naive, images.to(device), vocab, DecodeSettings(beam_size=beam, max_len=MAX_LEN))
    return len(paths) / (now(device) - start)
