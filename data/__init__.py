"""What the model reads: captions and their vocabulary (text/), image files (images/), the CNN features cached from them (features/), and the training splits made of all three (prepare.py)."""
