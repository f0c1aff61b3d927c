"""The check on the validation split: teacher-forced loss over all its captions, and the captions of its
first train.val_decoded_images images, decoded as the config's decode section says (the decoding that is
reported), scored with each of evaluation.metrics.SCORE_NAMES (no Java, so it is fast).
"""
import torch

from evaluation.metrics import SCORE_NAMES, quick_scores
from models.decoding import decode_settings, describe_decoding, generate
from models.rerank_frequencies import training_cider
from training.steps import Batch, batch_loss

DECODE_BATCH = 256
LOSS_BATCH = 512          # captions per teacher-forced validation batch: no gradients, so larger than training's


def describe_validation(config, n_val_images: int) -> str:
    """One line: what validation decodes and scores."""
    n = min(config.train.val_decoded_images, n_val_images)
    if not n:
        return f"validation: loss on {n_val_images} images (train.val_decoded_images=0: no captions decoded)"
    return (f"validation: loss on {n_val_images} images; {' and '.join(SCORE_NAMES.values())} of {n} decoded with "
            f"{describe_decoding(config.decode)}")


@torch.no_grad()
def validate(model, val: dict, feed, config, vocab, amp) -> tuple[float, dict]:
    """(validation loss, SCORE_NAMES' scores of the decoded captions by coco name; nan where
    train.val_decoded_images is 0).
    feed: a data.features.store.FeatureFeed over the validation images."""
    model.eval()
    total, count, bs = 0.0, 0, LOSS_BATCH
    for start in range(0, len(val["tokens"]), bs):
        rows = slice(start, start + bs)
        image_index = val["image_index"][rows]
        first = int(image_index[0])     # a fine-tuned tail runs once per image, not once per caption
        inputs = feed.batch(torch.arange(first, int(image_index[-1]) + 1))
        tokens, lengths = val["tokens"][rows].to(inputs.device), val["lengths"][rows]
        # Summed over the target tokens (normalizer 1), without label smoothing: the mean is a true perplexity.
        batch = Batch(slice(None), lengths, tokens, inputs, image_of_row=(image_index - first).to(inputs.device),
                      normalizer=1.0)
        loss, _ = batch_loss(model, batch, amp, label_smoothing=0.0)
        total, count = total + loss.item(), count + int((lengths - 1).sum())
    scores = {name: float("nan") for name in SCORE_NAMES.values()}
    n = min(config.train.val_decoded_images, len(val["names"]))
    if n:
        hypotheses, decode = {}, decode_settings(config.decode)
        if decode.rerank_samples:        # consensus re-ranking: CIDEr-D with the training captions' frequencies
            decode = decode.with_cider(training_cider(config, vocab))
        for start in range(0, n, DECODE_BATCH):
            inputs = feed.batch(torch.arange(start, min(start + DECODE_BATCH, n)))
            with amp:
                results = generate(model, model.encoder.tail(inputs), vocab, decode)
            hypotheses.update({val["names"][start + j]: r["caption"] for j, r in enumerate(results)})
        scores = quick_scores(hypotheses, {name: val["references"][name] for name in hypotheses})
    model.train()
    return total / max(count, 1), scores
