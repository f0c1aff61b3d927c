"""The captioning model: the CNN encoder, the decoders, decoding, ensembles, and checkpoint files."""
