"""What every decoder checks of its teacher-forcing inputs, in one place (each decoder module imports it)."""


def check_teacher_forcing(features, tokens, lengths, decoder: str):
    """One readable line when a decoder's forward() gets mismatched inputs; returns lengths on the CPU, or
    left on a CUDA device, whose values are not checked: reading them would wait for the GPU (and a CUDA
    graph's capture forbids it)."""
    if tokens.size(0) != features.size(0) or lengths.numel() != tokens.size(0):
        raise ValueError(f"{decoder}: batch sizes differ (features {features.size(0)}, tokens "
                         f"{tokens.size(0)}, lengths {lengths.numel()}); pass one row per image")
    if lengths.is_cuda:
        return lengths
    lengths = lengths.cpu()
    if lengths.min() < 1 or lengths.max() > tokens.size(1):
        raise ValueError(f"{decoder}: lengths must lie in [1, {tokens.size(1)}] (tokens.size(1)), "
                         f"got {lengths.tolist()}; pass the count of valid input tokens per row")
    return lengths
