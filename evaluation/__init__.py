"""Caption metrics: the coco-caption scores, the CIDEr-D reward of self-critical training, the Python PTB tokenizer."""
