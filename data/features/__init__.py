"""The feature cache: each image's output of the CNN's frozen trunk, computed once, keyed by what made it, memory-mapped."""
