"""Tests for models/decoder_attention.py: shapes, forward/step agreement, regulariser, state reordering, overfit."""
import pytest
import torch

from config import ModelConfig
from models.decoder_attention import AttentionDecoder
from tests.conftest import assert_padding_does_not_change_valid_logits, random_caption_batch

C, P, V, START, END = 16, 4, 12, 1, 2


def make_decoder(**kwargs) -> AttentionDecoder:
    torch.manual_seed(0)
    sizes = dict(embed_size=8, hidden_size=32, attention_size=24)
    return AttentionDecoder(C, V, ModelConfig(**{**sizes, **kwargs}))


def make_batch(lengths):
    return random_caption_batch(lengths, P, C, V, START)


def run_steps(decoder, features, tokens, lengths):
    """Teacher-forced decoding one row at a time with step(); -> per-row logits [L,V] and alphas [L,P]."""
    rows = []
    for i, length in enumerate(lengths.tolist()):
        state = decoder.init_state(features[i:i + 1])
        logits, alphas = [], []
        for t in range(length):
            step_logits, state, alpha = decoder.step(tokens[i:i + 1, t], state)
            logits.append(step_logits[0])
            alphas.append(alpha[0])
        rows.append((torch.stack(logits), torch.stack(alphas)))
    return rows


def test_shapes_and_batch_first_state():
    decoder = make_decoder()
    features, tokens, lengths = make_batch([5, 3, 4])
    logits, extra_loss = decoder(features, tokens, lengths)
    assert logits.shape == (3, 5, V)
    assert extra_loss.dim() == 0
    state = decoder.init_state(features)
    assert len(state) == 4 and all(s.size(0) == 3 for s in state)
    step_logits, new_state, alpha = decoder.step(tokens[:, 0], state)
    assert step_logits.shape == (3, V) and alpha.shape == (3, P)
    assert [s.shape for s in new_state] == [s.shape for s in state]
    assert torch.allclose(alpha.sum(1), torch.ones(3))


@pytest.mark.parametrize("lengths", [[4, 4, 4], [2, 5, 1, 3]])
def test_step_reproduces_forward(lengths):
    decoder = make_decoder().eval()
    features, tokens, lengths = make_batch(lengths)
    with torch.no_grad():
        logits, extra_loss = decoder(features, tokens, lengths)
        rows = run_steps(decoder, features, tokens, lengths)
    expected_extra = 0.0
    for i, (row_logits, row_alphas) in enumerate(rows):
        assert torch.allclose(logits[i, :len(row_logits)], row_logits, atol=1e-5)
        expected_extra += ((1 - row_alphas.sum(0)) ** 2).mean() / len(rows)
    # The regulariser only counts each row's valid steps.
    assert torch.allclose(extra_loss, torch.as_tensor(expected_extra), atol=1e-5)


def test_rows_run_to_the_batch_end_train_as_if_each_ran_alone():
    """forward() runs every row to the batch's longest caption: its loss and gradients are the rows' own."""
    features, tokens, lengths = make_batch([2, 5, 1, 3])
    targets = torch.randint(3, V, tokens.shape) * (tokens != 0)
    decoder = make_decoder(dropout=0.0, alpha_c=0.0)

    def summed_loss(rows, length):
        logits, _ = decoder(features[rows], tokens[rows, :length], lengths[rows])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets[rows, :length].reshape(-1),
                                                 ignore_index=0, reduction="sum")

    summed_loss(slice(None), tokens.size(1)).backward()
    batch_grads = {n: p.grad.clone() for n, p in decoder.named_parameters() if p.grad is not None}
    decoder.zero_grad()
    for i, length in enumerate(lengths.tolist()):
        summed_loss(slice(i, i + 1), length).backward()           # gradients add up over the rows
    for name, grad in batch_grads.items():
        assert torch.allclose(grad, dict(decoder.named_parameters())[name].grad, atol=1e-5), name


def test_padding_tokens_do_not_change_valid_logits():
    decoder = make_decoder().eval()
    assert_padding_does_not_change_valid_logits(decoder, *make_batch([2, 5, 3]))


def test_extra_loss_nonnegative_and_off_when_alpha_c_zero():
    features, tokens, lengths = make_batch([3, 5, 2])
    _, extra_loss = make_decoder(alpha_c=1.0)(features, tokens, lengths)
    assert extra_loss.item() > 0
    extra_loss.backward()  # the regulariser trains the attention MLP
    _, zero_loss = make_decoder(alpha_c=0.0)(features, tokens, lengths)
    assert zero_loss.item() == 0.0


def test_reordered_state_matches_reordered_batch():
    decoder = make_decoder().eval()
    features, tokens, _ = make_batch([3, 3, 3])
    index = torch.tensor([2, 0, 0, 1])  # reorder and duplicate, as beam search does
    with torch.no_grad():
        state = decoder.init_state(features)
        _, state, _ = decoder.step(tokens[:, 0], state)
        reordered = tuple(s.index_select(0, index) for s in state)
        got_logits, _, got_alpha = decoder.step(tokens[index, 1], reordered)

        direct = decoder.init_state(features[index])
        _, direct, _ = decoder.step(tokens[index, 0], direct)
        want_logits, _, want_alpha = decoder.step(tokens[index, 1], direct)
    assert torch.allclose(got_logits, want_logits, atol=1e-6)
    assert torch.allclose(got_alpha, want_alpha, atol=1e-6)


def test_bad_feature_dim_is_a_value_error():
    decoder = make_decoder()
    features, tokens, lengths = make_batch([3, 2])
    with pytest.raises(ValueError, match="decoder_attention.py"):
        decoder(features[:, :, :8], tokens, lengths)


def test_overfits_four_captions_and_greedy_decodes_them():
    torch.manual_seed(2)
    decoder = make_decoder(dropout=0.1)
    features = torch.randn(4, P, C)
    captions = torch.tensor([[START, 3, 4, 5, END],
                             [START, 6, 7, 8, END],
                             [START, 9, 10, 11, END],
                             [START, 5, 3, 9, END]])
    inputs, targets, lengths = captions[:, :-1], captions[:, 1:], torch.full((4,), 4)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        logits, extra_loss = decoder(features, inputs, lengths)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
        optimizer.zero_grad()
        (loss + extra_loss).backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20

    decoder.eval()
    with torch.no_grad():
        state = decoder.init_state(features)
        token = torch.full((4,), START)
        decoded = []
        for _ in range(captions.size(1) + 2):
            logits, state, _ = decoder.step(token, state)
            token = logits.argmax(1)
            decoded.append(token)
    decoded = torch.stack(decoded, 1)
    for i in range(4):
        words = decoded[i].tolist()
        assert END in words, f"row {i} never ended: {words}"
        assert words[:words.index(END) + 1] == targets[i].tolist()
