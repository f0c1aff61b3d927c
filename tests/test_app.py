"""app.py (Streamlit demo) through streamlit.testing's AppTest, plus its plain helpers called directly."""
import io
import os
import shutil

import pytest

pytest.importorskip("streamlit")
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

import app  # noqa: E402
from models.checkpoint import PRETRAINED, load_checkpoint, load_model  # noqa: E402
from utils import REPO_ROOT  # noqa: E402

APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "app.py")
EXAMPLES = sorted(os.listdir(app.DEMO_EXAMPLES_DIR)) if os.path.isdir(app.DEMO_EXAMPLES_DIR) else []   # tiny demo models
EXAMPLE = EXAMPLES[0] if EXAMPLES else None   # the first example button
can_upload = hasattr(AppTest, "file_uploader")   # AppTest simulates uploads in newer Streamlit only


def png_bytes(path=None, size=(64, 48)) -> bytes:
    image = Image.open(path).convert("RGB") if path else Image.new("RGB", size, (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def captioner_for(path):
    model, vocab, config = load_model(load_checkpoint(path), path)
    return model, vocab, config, torch.device("cpu"), None


def start(monkeypatch, tmp_path, checkpoint=None) -> AppTest:
    """Run the app with `checkpoint` preselected and an empty runs folder (so the repo's runs/ is not listed)."""
    runs = tmp_path / "empty_runs"
    runs.mkdir(exist_ok=True)
    monkeypatch.setenv("CAPTION_APP_RUNS_DIR", str(runs))
    if checkpoint:
        monkeypatch.setenv("CAPTION_APP_CHECKPOINT", checkpoint)
    else:
        monkeypatch.delenv("CAPTION_APP_CHECKPOINT", raising=False)
    return AppTest.from_file(APP, default_timeout=60).run()


def image_captions(at) -> list[list[str]]:
    """The captions of each st.image element (AppTest.image exists only in newer Streamlit)."""
    elements = at.image if hasattr(at, "image") else at.get("imgs")
    return [[image.caption for image in element.proto.imgs] for element in elements]


def beam_rows(at) -> list:
    return at.dataframe[0].value["caption"].tolist()


@pytest.mark.skipif(EXAMPLE is None, reason="demo_images/ is missing")
def test_example_click_shows_caption_beams_and_attention(tiny_checkpoints, monkeypatch, tmp_path):
    checkpoint = tiny_checkpoints["attention"]
    at = start(monkeypatch, tmp_path, checkpoint)
    assert not at.exception and not at.error
    assert at.info and "Upload an image" in at.info[0].value
    at.button(key=f"example_{EXAMPLE}").click().run()
    assert not at.exception and not at.error
    image = Image.open(os.path.join(app.DEMO_EXAMPLES_DIR, EXAMPLE)).convert("RGB")
    expected = app.caption(captioner_for(checkpoint), image, beam_size=at.slider[0].value, max_len=at.slider[1].value,
                           no_repeat_ngram=at.slider[2].value)
    assert at.subheader[0].value == expected["caption"]
    assert beam_rows(at) == [beam for beam, _ in expected["beams"]]
    assert expected["caption"] and expected["caption"].split()[:app.MAX_HEATMAPS] in image_captions(at)
    # The chosen example stays shown on the next rerun (a slider change).
    at.slider[0].set_value(1).run()
    assert at.subheader[0].value and len(beam_rows(at)) == 1


@pytest.mark.skipif(EXAMPLE is None, reason="demo_images/ is missing")
def test_beam_slider_changes_number_of_beams(tiny_checkpoints, monkeypatch, tmp_path):
    checkpoint = tiny_checkpoints["lstm"]
    at = start(monkeypatch, tmp_path, checkpoint)
    at.slider[0].set_value(1).run()
    at.button(key=f"example_{EXAMPLE}").click().run()
    assert len(beam_rows(at)) == 1
    at.slider[0].set_value(4).run()
    image = Image.open(os.path.join(app.DEMO_EXAMPLES_DIR, EXAMPLE)).convert("RGB")
    expected = app.caption(captioner_for(checkpoint), image, beam_size=4, max_len=at.slider[1].value,
                           no_repeat_ngram=at.slider[2].value)
    assert len(beam_rows(at)) == len(expected["beams"]) > 1
    assert at.subheader[0].value == expected["caption"]
    assert at.slider[2].value == captioner_for(checkpoint)[2]["decode"]["no_repeat_ngram"]   # the model's setting


def test_opens_with_the_shipped_model_selected_and_photo_examples(monkeypatch, tmp_path):
    if not os.path.isfile(PRETRAINED):
        pytest.fail(f"{PRETRAINED} is missing: the repository ships it")
    at = start(monkeypatch, tmp_path)
    assert not at.exception and not at.error
    assert at.selectbox[0].options[0] == os.path.relpath(PRETRAINED, REPO_ROOT)
    assert at.selectbox[0].value == os.path.relpath(PRETRAINED, REPO_ROOT)
    photo = sorted(n for n in os.listdir(app.EXAMPLES_DIR) if n.endswith(".jpg"))[0]   # the photos, not the shapes
    at.button(key=f"example_{photo}").click().run()
    assert not at.exception and not at.error and at.subheader[0].value


def test_no_checkpoint_found_says_how_to_train(monkeypatch, tmp_path):
    monkeypatch.setattr("models.checkpoint.PRETRAINED", str(tmp_path / "not_shipped.pth"))   # a clone without it
    at = start(monkeypatch, tmp_path)
    assert not at.exception
    assert "No checkpoint found" in at.error[0].value and "python train.py" in at.error[0].value
    assert not at.file_uploader if can_upload else not at.button


def test_missing_and_corrupt_checkpoints_show_errors(monkeypatch, tmp_path):
    at = start(monkeypatch, tmp_path, str(tmp_path / "missing.pth"))
    assert not at.exception
    assert "no such checkpoint" in at.error[0].value and "python train.py" in at.error[0].value
    corrupt = tmp_path / "empty_runs" / "checkpoint_best.pth"        # inside the runs folder: may be typed
    corrupt.write_bytes(b"not a checkpoint at all")
    at.text_input[0].input(str(corrupt)).run()
    assert not at.exception
    assert str(corrupt) in at.error[0].value and "not a checkpoint: a text file" in at.error[0].value


def test_a_typed_path_outside_its_folders_is_refused(tiny_checkpoints, monkeypatch, tmp_path):
    outside = tiny_checkpoints["lstm"]                                  # a real checkpoint, elsewhere on the server
    at = start(monkeypatch, tmp_path, outside)
    at.text_input[0].input("/etc/passwd").run()
    assert not at.exception
    assert any("/etc/passwd: outside pretrained/ and runs/" in e.value for e in at.error)
    assert not any("text file" in e.value for e in at.error)            # never opened, so nothing said about it
    monkeypatch.setenv(app.ANY_CHECKPOINT, "1")                         # the operator allows any path
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.text_input[0].input("/etc/passwd").run()
    assert not at.exception
    assert "/etc/passwd: not a checkpoint: a text file" in at.error[0].value


def test_checkpoints_under_runs_are_listed(tiny_checkpoints, monkeypatch, tmp_path):
    runs = tmp_path / "runs" / "a"
    runs.mkdir(parents=True)
    shutil.copy(tiny_checkpoints["lstm"], runs / "checkpoint_best.pth")
    (runs / "notes.txt").write_text("not a checkpoint")
    assert app.find_checkpoints(str(tmp_path / "runs")) == [str(runs / "checkpoint_best.pth")]
    monkeypatch.setenv("CAPTION_APP_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("CAPTION_APP_CHECKPOINT", raising=False)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and not at.error
    shipped = [os.path.relpath(PRETRAINED, REPO_ROOT)] if os.path.isfile(PRETRAINED) else []
    assert at.selectbox[0].options == shipped + [str(runs / "checkpoint_best.pth")]


def test_read_image_refuses_non_images_and_too_many_pixels(monkeypatch):
    assert app.read_image(png_bytes(), "ok.png").size == (64, 48)
    with pytest.raises(ValueError, match=r"^notes\.png: not a readable image"):
        app.read_image(b"hello, I am a text file", "notes.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)   # 64x48 = 3072 pixels > 2 * 500: a "decompression bomb"
    with pytest.raises(ValueError, match=r"^huge\.png: image too large"):
        app.read_image(png_bytes(), "huge.png")


def test_the_upload_limit_is_streamlits_own_setting():
    with open(os.path.join(REPO_ROOT, ".streamlit", "config.toml"), encoding="utf-8") as f:
        assert "maxUploadSize = 10" in f.read()
    with open(APP, encoding="utf-8") as f:
        assert " MB" not in f.read()                 # stated once, by Streamlit's uploader, not again by the app


@pytest.mark.skipif(not can_upload, reason="this Streamlit's AppTest cannot simulate st.file_uploader")
def test_uploads_caption_good_images_and_report_bad_ones(tiny_checkpoints, monkeypatch, tmp_path):
    checkpoint = tiny_checkpoints["lstm"]
    at = start(monkeypatch, tmp_path, checkpoint)
    good = png_bytes()
    text_file = ("renamed.png", b"just some text\n", "image/png")
    at.file_uploader[0].set_value([text_file, ("red.png", good, "image/png")]).run()
    assert not at.exception
    assert len(at.error) == 1 and at.error[0].value.startswith("renamed.png: not a readable image")
    image = app.read_image(good, "red.png")
    expected = app.caption(captioner_for(checkpoint), image, at.slider[0].value, at.slider[1].value, at.slider[2].value)
    assert [h.value for h in at.subheader] == [expected["caption"] or "(empty caption)"]


def test_the_file_watcher_is_off_and_uploads_take_what_the_command_line_reads():
    """A virtual environment inside the repository (as the README makes one) overflowed the watcher's inotify
    queue; and the uploader refused BMP and GIF, which inference_visualize.py reads."""
    with open(os.path.join(REPO_ROOT, ".streamlit", "config.toml"), encoding="utf-8") as f:
        assert 'fileWatcherType = "none"' in f.read()
    from data.images.reading import IMAGE_EXTENSIONS
    assert sorted("." + t for t in app.UPLOAD_TYPES) == sorted(IMAGE_EXTENSIONS) and "bmp" in app.UPLOAD_TYPES


def test_the_page_says_in_one_sentence_what_the_shipped_model_knows(monkeypatch, tmp_path):
    at = start(monkeypatch, tmp_path)
    assert not at.exception
    assert any(c.value == app.FLICKR8K_WORLD for c in at.caption)
    assert "cats, food" in app.FLICKR8K_WORLD
    # A photo model trained on other captions gets no sentence rather than Flickr8k's.
    from config import load_config
    from data.text.vocab import Vocabulary
    photos = Vocabulary.build(["a man rides a horse on the beach"])
    assert app.what_it_knows(photos, load_config(None, ["data.captions=data/coco/dataset_coco.json"])) is None
    assert app.what_it_knows(photos, load_config(None, ["data.captions=data/flickr8k/captions.txt"])) == app.FLICKR8K_WORLD


def test_a_link_under_runs_to_a_file_elsewhere_is_not_offered(tiny_checkpoints, monkeypatch, tmp_path):
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    shutil.copy(tiny_checkpoints["lstm"], runs / "a" / "checkpoint_best.pth")
    (runs / "checkpoint_passwd.pth").symlink_to("/etc/passwd")
    monkeypatch.setenv("CAPTION_APP_RUNS_DIR", str(runs))
    monkeypatch.delenv("CAPTION_APP_CHECKPOINT", raising=False)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert not any("passwd" in option for option in at.selectbox[0].options)
    assert str(runs / "a" / "checkpoint_best.pth") in at.selectbox[0].options


def test_a_load_error_names_the_file_as_given_not_the_servers_path_to_it(monkeypatch, tmp_path):
    at = start(monkeypatch, tmp_path)
    real = tmp_path / "empty_runs" / "stored" / "damaged.pth"
    real.parent.mkdir()
    real.write_bytes(b"not a checkpoint")
    (tmp_path / "empty_runs" / "checkpoint_named.pth").symlink_to(real)
    typed = str(tmp_path / "empty_runs" / "checkpoint_named.pth")
    at.text_input[0].input(typed).run()
    assert not at.exception
    assert typed in at.error[0].value and str(real) not in at.error[0].value


def test_tracebacks_stay_in_the_server_log():
    with open(os.path.join(REPO_ROOT, ".streamlit", "config.toml"), encoding="utf-8") as f:
        assert 'showErrorDetails = "none"' in f.read()


def test_an_unexpected_error_is_one_line_on_the_page_and_a_traceback_in_the_log(monkeypatch, capsys):
    shown = []
    monkeypatch.setattr(app.st, "error", shown.append)

    def broken(data, name):
        raise RuntimeError("/srv/secret/path exploded")
    monkeypatch.setattr(app, "read_image", broken)
    app.show_input("pretrained/x.pth", "photo.png", b"bytes", None, ())
    assert shown == ["photo.png: could not be captioned: an error on the server (its log has the details)"]
    log = capsys.readouterr().err
    assert "Traceback" in log and "/srv/secret/path exploded" in log


def test_uploads_are_shrunk_as_they_are_read_and_extreme_sizes_refused():
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(buffer, format="PNG")
    assert max(app.read_image(buffer.getvalue(), "big.png").size) == app.SHOWN_SIDE
    for size, words in (((70_000, 1), "image too large"), ((5_000, 3_000), "image too large"),
                        ((1, 2_000), "too narrow")):
        buffer = io.BytesIO()
        Image.new("L", size).save(buffer, format="PNG")
        with pytest.raises(ValueError, match=words):
            app.read_image(buffer.getvalue(), "odd.png")


def test_an_unchanged_upload_is_captioned_once_whatever_reruns(tiny_checkpoints, monkeypatch):
    calls = []
    real_caption = app.caption
    monkeypatch.setattr(app, "caption", lambda *a, **k: calls.append(1) or real_caption(*a, **k))
    captioner = captioner_for(tiny_checkpoints["lstm"])
    settings = (("beam_size", 2), ("max_len", 8), ("no_repeat_ngram", 0))
    data = png_bytes(size=(40, 40))
    first = app.cached_caption("key-once", data, "a.png", settings, captioner)
    again = app.cached_caption("key-once", data, "a.png", settings, captioner)
    assert first["caption"] == again["caption"] and len(calls) == 1
    app.cached_caption("key-once", data, "a.png", (("beam_size", 1),) + settings[1:], captioner)
    assert len(calls) == 2                                            # another decoding is another caption


@pytest.mark.skipif(not can_upload, reason="this Streamlit's AppTest cannot simulate st.file_uploader")
@pytest.mark.skipif(EXAMPLE is None, reason="demo_images/ is missing")
def test_one_current_result_set_and_at_most_max_uploads(tiny_checkpoints, monkeypatch, tmp_path):
    at = start(monkeypatch, tmp_path, tiny_checkpoints["lstm"])
    at.button(key=f"example_{EXAMPLE}").click().run()
    assert [i for row in image_captions(at) for i in row].count(EXAMPLE) == 1
    files = [(f"u{i}.png", png_bytes(size=(40 + i, 40)), "image/png") for i in range(app.MAX_UPLOADS + 2)]
    at.file_uploader[0].set_value(files).run()
    assert not at.exception
    shown = [i for row in image_captions(at) for i in row]
    assert EXAMPLE not in shown                                       # the example's result gave way to the uploads
    assert len(at.subheader) == app.MAX_UPLOADS
    assert any(f"first {app.MAX_UPLOADS} of the {app.MAX_UPLOADS + 2} files" in w.value for w in at.warning)
