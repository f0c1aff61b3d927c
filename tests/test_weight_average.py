"""training/weight_average.py: the average, swapped in and out, and resumed."""
import pytest
import torch

from training.weight_average import WARMUP, WeightAverage


def test_the_average_follows_the_weights_and_swaps_in_and_out():
    model = torch.nn.Linear(2, 1)
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    model.register_parameter("frozen", frozen)
    start = model.weight.detach().clone()
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update()                                # decay min(0.5, 2 / (WARMUP + 1)) = 2/11
    decay = min(0.5, 2 / (WARMUP + 1))
    expected = decay * start + (1 - decay) * (start + 1)
    assert torch.allclose(average.average[0], expected)
    with average.swapped_in():
        assert torch.allclose(model.weight, expected)
        with average.swapped_in():                  # nested: still the average
            assert torch.allclose(model.weight, expected)
            assert torch.equal(average.state_dict()["trained"][0], start + 1)   # the weights training goes on from
        assert torch.allclose(model.weight, expected)
    assert torch.equal(model.weight, start + 1) and len(average.params) == 2    # weight and bias, not the frozen one


def test_a_resumed_average_goes_on_from_the_checkpoints_two_sets_of_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            model.weight.mul_(1.5)
        average.update()
    with average.swapped_in():
        saved_model = {k: v.clone() for k, v in model.state_dict().items()}      # what a checkpoint's "model" holds
        saved = average.state_dict()
    again = torch.nn.Linear(3, 2)
    again.load_state_dict(saved_model)
    resumed = WeightAverage(again, decay=0.9)
    resumed.load_state_dict(saved)
    assert resumed.updates == 3 and torch.equal(again.weight, model.weight)
    assert torch.equal(resumed.average[0], average.average[0])


def test_the_unaveraged_copy_of_a_checkpoint_holds_the_weights_training_went_on_from(tiny_overrides, tmp_path):
    import train
    from models.checkpoint import load_checkpoint
    from training.weight_average import unaveraged
    train.main(["--set", *tiny_overrides, "model.decoder=attention", "train.ema_decay=0.9", "train.epochs=1"])
    checkpoint = load_checkpoint(str(tmp_path / "run" / "checkpoint_last.pth"))
    plain = unaveraged(checkpoint)
    trained = checkpoint["weight_average"]["trained"]
    assert torch.equal(plain["model"]["decoder.fc.weight"], trained[-2])          # the last two: fc's weight and bias
    assert not torch.equal(plain["model"]["decoder.fc.weight"], checkpoint["model"]["decoder.fc.weight"])
    assert torch.equal(plain["model"]["encoder.backbone.0.weight"], checkpoint["model"]["encoder.backbone.0.weight"])
    # A run without an average has nothing to un-average: one line says so.
    from utils import UserError
    with pytest.raises(UserError, match="holds no weight average"):
        unaveraged({**checkpoint, "weight_average": None})
    # export.py writes it, as the command the docs give: a training checkpoint evaluate.py scores.
    import export
    out = tmp_path / "unaveraged.pth"
    export.main([str(tmp_path / "run" / "checkpoint_last.pth"), str(out), "--unaveraged"])
    written = load_checkpoint(str(out))
    assert torch.equal(written["model"]["decoder.fc.weight"], plain["model"]["decoder.fc.weight"])
    assert written["weight_average"] is None and "kind" not in written
