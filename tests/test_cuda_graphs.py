"""cuda_graphs: where graphs apply, and that the step they capture computes train.py's eager step.

Capturing needs a GPU (benchmarks/gpu_check.sh checks the replayed steps against eager ones there); here
the same step runs uncaptured on the CPU.
"""
import pytest
import torch

from config import load_config
from models.caption_model import build_model
from training import steps
from training.cuda_graphs import LENGTH_STEP, GraphedStep, graphs_apply
from training.optimization import make_amp, make_optimization
from training.steps import Batch, TrainingSetup

CUDA = torch.device("cuda")     # only compared with, never used
CPU = torch.device("cpu")


def test_graphs_apply_to_one_cuda_process_with_a_frozen_cnn_in_bf16_or_fp32():
    assert graphs_apply(load_config(None, []), CUDA, 1, None)
    assert not graphs_apply(load_config(None, []), CPU, 1, None)
    assert not graphs_apply(load_config(None, []), CUDA, 2, None)               # DDP
    assert not graphs_apply(load_config(None, []), CUDA, 1, torch.amp.GradScaler("cpu"))   # fp16
    for key in ("compile", "fine_tune_encoder"):
        assert not graphs_apply(load_config(None, [f"train.{key}=true"]), CUDA, 1, None)
    assert not graphs_apply(load_config(None, ["train.cuda_graphs=false"]), CUDA, 1, None)


def tiny(decoder):
    torch.manual_seed(0)
    config = load_config(None, ["model.encoder=resnet18", "model.encoder_weights=none", f"model.decoder={decoder}",
                                "model.embed_size=16", "model.hidden_size=32", "model.attention_size=16",
                                "model.num_heads=4", "model.num_layers=2", "model.dropout=0",
                                "train.label_smoothing=0.1", "train.grad_clip=0.05", "train.batch_size=4"])
    model = build_model(config, vocab_size=30).train()
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.backbone")]
    inputs = torch.randn(3, 4, 512)                                        # 3 images' cached grids [P=4, C=512]
    lengths = torch.tensor([5, 3, 7, 4, 6, 2])                             # 6 captions, tokens with <start>, <end>
    tokens = torch.randint(3, 30, (6, 12))
    tokens[torch.arange(12) >= lengths.unsqueeze(1)] = 0
    return config, model, params, inputs, torch.tensor([0, 1, 2, 0, 1, 2]), tokens, lengths


@pytest.mark.parametrize("decoder", ["lstm", "attention", "transformer", "updown"])
def test_the_captured_step_equals_the_eager_step(decoder):
    """Padded to a whole number of LENGTH_STEPs, with its own token count as divisor, the step's loss and its
    clipped gradients are train.py's eager step's."""
    config, model, params, inputs, image_index, tokens, lengths = tiny(decoder)
    rows = torch.tensor([2, 0, 5, 3])                                       # longest: 7 tokens
    graphed = GraphedStep(model, params, inputs, image_index, tokens, lengths, config)
    loss = graphed.step(rows, 2 * LENGTH_STEP + 2)                         # padded past the longest caption
    graph_grads = [g.clone() for g in graphed.grads]
    assert all(p.grad is g for p, g in zip(params, graphed.grads))         # what optimizer.step() reads

    model.zero_grad(set_to_none=True)
    amp, _ = make_amp(CPU, True)
    eager, extra = steps.batch_loss(model, Batch(rows, lengths[rows], tokens, inputs, image_index), amp,
                                    config.train.label_smoothing)
    (eager + extra).backward()
    norm = torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
    assert norm > config.train.grad_clip                                   # clipping did change the gradients
    assert torch.allclose(loss, eager.detach(), atol=1e-6)
    for p, got in zip(params, graph_grads):
        assert torch.allclose(got, p.grad, atol=1e-6)


class FakeGraphed:
    """Stands in for a GraphedStep: records its calls; returns a loss, or None as after a failed capture."""

    def __init__(self, loss):
        self.loss, self.calls = loss, []

    def __call__(self, rows, longest):
        self.calls.append((len(rows), longest))
        return self.loss


@pytest.mark.parametrize("graph_loss", [torch.tensor(1.5), None])
def test_a_cross_entropy_step_replays_full_batches_and_runs_short_ones_eagerly(graph_loss):
    config, model, params, inputs, image_index, tokens, lengths = tiny("lstm")
    setup = TrainingSetup(model, model, config, make_optimization(model, config, CPU), CPU)
    graphed = FakeGraphed(graph_loss)
    full, short = torch.tensor([2, 0, 5, 3]), torch.tensor([1, 4])
    before = [p.detach().clone() for p in params]
    loss = steps.cross_entropy_step(setup, Batch(full, lengths[full], tokens, inputs, image_index), graphed)
    assert graphed.calls == [(4, 7)]
    if graph_loss is not None:
        assert loss is graph_loss                       # the graph's loss; the optimizer stepped on its gradients
    else:
        assert loss.requires_grad                       # the capture failed: an eager step instead
    steps.cross_entropy_step(setup, Batch(short, lengths[short], tokens, inputs, image_index), graphed)
    assert graphed.calls == [(4, 7)]                    # the short batch did not go to the graph
    assert any(not torch.equal(b, p) for b, p in zip(before, params))


def test_graphed_step_captures_the_setups_model_over_its_decoder_parameters(monkeypatch):
    """graphed_step reads what to capture from a TrainingSetup; where graphs do not apply (a CPU) it gives None."""
    from training import cuda_graphs
    config, model, params, inputs, image_index, tokens, lengths = tiny("attention")
    setup = TrainingSetup(model, model, config, make_optimization(model, config, CPU), CPU)
    assert cuda_graphs.graphed_step(setup, inputs, image_index, tokens, lengths) is None
    asked = []
    monkeypatch.setattr(cuda_graphs, "graphs_apply", lambda *args, **kwargs: asked.append((args, kwargs)) or True)
    graphed = cuda_graphs.graphed_step(setup, inputs, image_index, tokens, lengths)
    assert asked == [((config, CPU, 1, None), {"streamed": False})]
    assert graphed.model is model and graphed.params is setup.optimization.decoder_params
    assert cuda_graphs.graphed_step(setup, inputs, None, tokens, lengths) is not None and asked[-1][1]["streamed"]
