"""data/mirror.py: mirrored images' rows, and their captions with left and right swapped."""
import torch

from data.mirror import Mirroring
from data.text.vocab import Vocabulary


def test_mirrored_images_use_the_second_rows_and_swap_left_and_right():
    vocab = Vocabulary.build(["a dog on the left", "a man to the right", "a cat"], 1)
    captions = ["a dog on the left", "a man to the right", "a cat"]
    tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(vocab.encode(c)) for c in captions], batch_first=True)
    image_index = torch.tensor([0, 0, 1])
    mirroring = Mirroring(vocab, tokens, image_index, n_images=2, seed=3)
    seen = set()
    for epoch in range(20):
        epoch_tokens, epoch_index, image_row = mirroring.epoch(epoch)
        mirrored = image_row >= 2
        assert torch.equal(image_row, torch.arange(2) + 2 * mirrored)
        assert torch.equal(epoch_index, image_index + 2 * mirrored[image_index])
        said = [vocab.decode(row.tolist()) for row in epoch_tokens]
        if mirrored[0]:
            assert said[:2] == ["a dog on the right", "a man to the left"]
        else:
            assert said[:2] == captions[:2]
        assert said[2] == "a cat"
        seen.add(tuple(mirrored.tolist()))
    assert len(seen) == 4                                       # each image mirrored in some epochs, not others
    assert torch.equal(mirroring.epoch(5)[2], mirroring.epoch(5)[2])           # an epoch's draw is seeded
