"""Image files into the CNN's input: read with PIL everywhere, decoded by nvjpeg on a CUDA GPU."""
