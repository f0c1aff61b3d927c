"""The end-of-epoch check on the validation split: teacher-forced loss over all its captions, and greedy
captions of its first train.val_bleu_images images scored with BLEU-4 and CIDEr-D (no Java, so it is fast).
"""
import torch

from evaluation.metrics import quick_scores
from models.decoding import generate
from training.step import batch_loss

DECODE_BATCH = 256
LOSS_BATCH = 512          # captions per teacher-forced validation batch: no gradients, so larger than training's


@torch.no_grad()
def validate(model, val: dict, feed, config, vocab, amp) -> tuple[float, dict]:
    """(validation loss, {"BLEU-4", "CIDEr"} of greedy captions; nan where train.val_bleu_images is 0).
    feed: a data.feature_store.FeatureFeed over the validation images."""
    model.eval()
    total, count, bs = 0.0, 0, LOSS_BATCH
    for start in range(0, len(val["tokens"]), bs):
        rows = slice(start, start + bs)
        inputs = feed.batch(val["image_index"][rows])
        tokens, lengths = val["tokens"][rows].to(inputs.device), val["lengths"][rows]
        # Summed over the target tokens (normalizer 1), without label smoothing: the mean is a true perplexity.
        loss, _ = batch_loss(model, inputs, tokens, lengths, config, amp, normalizer=1.0, label_smoothing=0.0)
        total, count = total + loss.item(), count + int((lengths - 1).sum())
    scores = {"BLEU-4": float("nan"), "CIDEr": float("nan")}
    n = min(config["train"]["val_bleu_images"], len(val["names"]))
    if n:
        hypotheses = {}
        for start in range(0, n, DECODE_BATCH):
            inputs = feed.batch(torch.arange(start, min(start + DECODE_BATCH, n)))
            with amp:
                features = model.encoder.extract(inputs) if config["train"]["fine_tune_encoder"] else inputs
                results = generate(model, features, vocab, beam_size=1, max_len=config["decode"]["max_len"])
            hypotheses.update({val["names"][start + j]: r["caption"] for j, r in enumerate(results)})
        scores = quick_scores(hypotheses, {name: val["references"][name] for name in hypotheses})
    model.train()
    return total / max(count, 1), scores
