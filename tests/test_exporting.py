"""models/exporting.py: an exported file's config and command read on any machine."""
import pytest


def test_portable_command_keeps_a_multi_stage_recipe_runnable_shell_text():
    from models.exporting import portable_command
    command = ("python train.py --config configs/a.yaml && python train.py --config configs/b.yaml "
               "--set train.init_from=/home/me/runs/a/checkpoint_best.pth 'data.captions=my captions.csv'")
    assert portable_command(command) == (
        "python train.py --config configs/a.yaml && python train.py --config configs/b.yaml "
        "--set train.init_from=runs/a/checkpoint_best.pth 'data.captions=my captions.csv'")
    # An operator glued to a word stays an operator; only config path keys are rewritten.
    assert portable_command("python train.py --set train.out_dir=/home/u/runs/a; tee /abs/log") == (
        "python train.py --set train.out_dir=runs/a ; tee /abs/log")


def test_portable_paths_keep_the_shipped_folder_and_refuse_a_broken_command():
    from models.exporting import portable_command, portable_path
    from utils import UserError
    assert portable_path("train.init_from", "/home/u/repo/pretrained/m.pth") == "pretrained/m.pth"
    assert portable_path("train.init_from", "/home/u/repo/runs/a/checkpoint_best.pth") == "runs/a/checkpoint_best.pth"
    with pytest.raises(UserError, match="No closing quotation"):
        portable_command('python train.py --set "data.captions=a')
