"""Training machinery train.py uses: the steps, the optimizer bundle, checkpoints, the run folder and its loss log, validation, self-critical training, DDP and CUDA graphs."""
