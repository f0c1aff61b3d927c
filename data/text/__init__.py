"""Captions: the files they come in (CSV, Flickr8k token file, Karpathy JSON), split files, and the vocabulary."""
