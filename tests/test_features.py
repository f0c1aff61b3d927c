import errno
import os
import shutil
import threading

import pytest
import torch

from data.features import cache as feature_cache
from data.features.cache import CUDA_BATCH, Loading, extract_features, wait_for_cache_writes
from data.features.key import cache_key
from data.images.reading import ImageFiles
from models.encoder import EncoderCNN

CPU = torch.device("cpu")


def encoder(seed=0, tail=0):
    torch.manual_seed(seed)
    return EncoderCNN("resnet18", "none", 16, spatial=True, tail_blocks=tail)


def paths(tiny_data, n=6):
    return [os.path.join(tiny_data[1], f"shape_{i:04d}.png") for i in range(n)]


def test_cache_is_reused_and_matches_fresh_features(tiny_data, tmp_path):
    enc = encoder()
    first, ok = extract_features(enc, paths(tiny_data), 32, str(tmp_path), CPU, Loading(workers=0))
    assert first.shape == (6, 1, 512) and first.dtype == torch.float16 and all(ok)   # 32px -> 1x1 grid
    images = ImageFiles(paths(tiny_data), 32)
    fresh = enc.extract(torch.stack([images[i][0] for i in range(6)])).half()
    assert torch.allclose(first[:].float(), fresh.float(), atol=1e-2)
    enc.trunk = None   # any recomputation would now fail: the second call must come from the cache
    again, _ = extract_features(enc, paths(tiny_data), 32, str(tmp_path), CPU, Loading(workers=0))
    assert torch.equal(first[:], again[:])


def test_changed_file_weights_or_transform_never_reuse_stale_features(tiny_data, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(tiny_data[1], images)
    files = [str(images / f"shape_{i:04d}.png") for i in range(4)]
    enc = encoder()
    before, _ = extract_features(enc, files, 32, str(tmp_path / "c"), CPU, Loading(workers=0))
    shutil.copy(images / "shape_0010.png", files[0])                 # new content under the same name
    after, _ = extract_features(enc, files, 32, str(tmp_path / "c"), CPU, Loading(workers=0))
    assert not torch.equal(before[0], after[0]) and torch.equal(before[1:], after[1:])
    assert cache_key(encoder(seed=1), 32) != cache_key(enc, 32)      # other weights
    assert cache_key(enc, 64) != cache_key(enc, 32)                  # other transform


def test_cache_key_follows_weights_changed_in_place():
    enc = encoder()
    key = cache_key(enc, 32)
    original = {k: v.clone() for k, v in enc.backbone.state_dict().items()}
    with torch.no_grad():
        enc.backbone[0].weight[0, 0, 0, 0] += 1       # the fingerprint is memoised: it must notice this
    assert cache_key(enc, 32) != key
    enc.backbone.load_state_dict(original)
    assert cache_key(enc, 32) == key


def test_shard_of_only_changed_images_is_deleted_and_partly_changed_one_kept(tiny_data, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(tiny_data[1], images)
    files = [str(images / f"shape_{i:04d}.png") for i in range(4)]
    enc, cache = encoder(), str(tmp_path / "c")
    folder = os.path.join(cache, cache_key(enc, 32))
    extract_features(enc, files[:2], 32, cache, CPU, Loading(workers=0))
    extract_features(enc, files[2:], 32, cache, CPU, Loading(workers=0))
    os.utime(files[0], ns=(1, 1))                          # the images of the first shard are copied again
    os.remove(files[1])
    os.utime(files[2], ns=(1, 1))                          # one of the second shard's two
    capsys.readouterr()
    features, ok = extract_features(enc, files, 32, cache, CPU, Loading(workers=0))
    assert "deleted 1 feature cache shard whose" in capsys.readouterr().err
    assert ok == [True, False, True, True] and features.shape[0] == 3
    listed = [[f[0] for f in torch.load(os.path.join(folder, name), weights_only=True)["files"]]
              for name in os.listdir(folder)]
    assert sorted(listed) == sorted([files[2:], [files[0], files[2]]])   # the second shard, and the recomputed rows


def test_shards_other_ranks_are_writing_or_deleting_are_left_alone(tiny_data, tmp_path, capsys, monkeypatch):
    files = paths(tiny_data, 2)
    enc, cache = encoder(), str(tmp_path / "c")
    folder = os.path.join(cache, cache_key(enc, 32))
    os.makedirs(folder)
    writing = os.path.join(folder, ".tmp-abc.pt")            # atomic_save's temp file, half written
    with open(writing, "wb") as f:
        f.write(b"PK\x03\x04 half a shard")
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda d: listdir(d) + (["deleted-since.pt"] if d == folder else []))
    features, ok = extract_features(enc, files, 32, cache, CPU, Loading(workers=0))
    assert ok == [True, True] and features.shape[0] == 2
    assert os.path.exists(writing)
    assert "damaged" not in capsys.readouterr().err


def test_temp_shard_of_a_killed_writer_is_deleted_after_an_hour(tiny_data, tmp_path, capsys):
    enc, cache = encoder(), str(tmp_path / "c")
    folder = os.path.join(cache, cache_key(enc, 32))
    os.makedirs(folder)
    abandoned, recent = os.path.join(folder, ".tmp-old.pt"), os.path.join(folder, ".tmp-new.pt")
    for temp in (abandoned, recent):
        with open(temp, "wb") as f:
            f.write(b"PK\x03\x04 half a shard")
    two_hours_ago = os.stat(abandoned).st_mtime - 7200
    os.utime(abandoned, (two_hours_ago, two_hours_ago))
    features, ok = extract_features(enc, paths(tiny_data, 2), 32, cache, CPU, Loading(workers=0))
    assert ok == [True, True] and features.shape[0] == 2
    assert not os.path.exists(abandoned) and os.path.exists(recent)
    assert "deleted 1 half-written feature cache shard left by a killed run" in capsys.readouterr().err


def test_truncated_shard_is_detected_and_rebuilt(tiny_data, tmp_path, capsys):
    enc = encoder()
    good, _ = extract_features(enc, paths(tiny_data), 32, str(tmp_path), CPU, Loading(workers=0))
    good = good[:]                            # read now: the store maps the shard that is about to be cut short
    folder = os.path.join(tmp_path, cache_key(enc, 32))
    shard = os.path.join(folder, os.listdir(folder)[0])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    rebuilt, _ = extract_features(enc, paths(tiny_data), 32, str(tmp_path), CPU, Loading(workers=0))
    assert "damaged" in capsys.readouterr().err
    assert torch.equal(good, rebuilt[:])


def test_a_shard_the_system_refuses_to_open_is_kept_not_deleted(tiny_data, tmp_path, monkeypatch):
    enc = encoder()
    extract_features(enc, paths(tiny_data), 32, str(tmp_path), CPU, Loading(workers=0))
    folder = os.path.join(tmp_path, cache_key(enc, 32))
    shards = sorted(os.listdir(folder))

    def too_many_open_files(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(feature_cache.torch, "load", too_many_open_files)
    with pytest.raises(OSError, match="Too many open files"):
        extract_features(enc, paths(tiny_data), 32, str(tmp_path), CPU, Loading(workers=0))
    assert sorted(os.listdir(folder)) == shards


def test_unreadable_image_is_skipped_and_counted(tiny_data, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    feats, ok = extract_features(encoder(), paths(tiny_data, 3) + [str(bad)], 32, None, CPU, Loading(workers=0))
    assert ok == [True, True, True, False] and len(feats) == 3
    assert "1 of 4 images could not be read" in capsys.readouterr().err


@pytest.mark.parametrize("tail", [0, 2])      # the grid of a frozen CNN, the map entering a fine-tuned tail
def test_interrupted_extraction_keeps_what_it_computed(tiny_data, tmp_path, monkeypatch, tail):
    enc, files, seen, interrupted = encoder(tail=tail), paths(tiny_data, 24), [], []
    real_extract = enc.trunk

    def ctrl_c_at_batch_4(images):
        seen.append(len(images))
        if len(seen) == 4 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return real_extract(images)

    monkeypatch.setattr(enc, "trunk", ctrl_c_at_batch_4)
    with pytest.raises(KeyboardInterrupt):
        extract_features(enc, files, 32, str(tmp_path), CPU, Loading(4, workers=0))
    # Batches 1 to 3, all that was computed before Ctrl-C, were kept: 12 images are cached.
    seen.clear()
    resumed, ok = extract_features(enc, files, 32, str(tmp_path), CPU, Loading(4, workers=0))
    assert sum(seen) == len(files) - 12 and all(ok)
    fresh, _ = extract_features(encoder(tail=tail), files, 32, None, CPU, Loading(4, workers=0))
    assert torch.allclose(resumed[:].float(), fresh[:].float(), atol=1e-3)


def test_extraction_need_not_wait_for_its_cache_writes(tiny_data, tmp_path, monkeypatch):
    """train.py trains while the shards are written; they are all on disk after wait_for_cache_writes()."""
    disk_free, real_save = threading.Event(), feature_cache.atomic_save

    def slow_save(obj, path, durable=True):
        disk_free.wait()
        real_save(obj, path, durable)

    monkeypatch.setattr(feature_cache, "atomic_save", slow_save)
    enc, files = encoder(), paths(tiny_data)
    try:
        got, ok = extract_features(enc, files, 32, str(tmp_path), CPU, Loading(workers=0, wait_for_cache=False))
        folder = tmp_path / cache_key(enc, 32)
        assert all(ok) and os.listdir(folder) == []              # returned before its shard was written
    finally:
        disk_free.set()                                          # a failed check must not leave the writer blocked
    wait_for_cache_writes()
    assert len(os.listdir(folder)) == 1
    enc.trunk = None
    again, _ = extract_features(enc, files, 32, str(tmp_path), CPU, Loading(workers=0))
    assert torch.equal(got[:], again[:])


def test_a_failed_cache_write_warns_and_keeps_the_features(tiny_data, tmp_path, monkeypatch, capsys):
    def full_disk(obj, path, durable=True):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(feature_cache, "atomic_save", full_disk)
    got, ok = extract_features(encoder(), paths(tiny_data), 32, str(tmp_path), CPU, Loading(workers=0))
    fresh, _ = extract_features(encoder(), paths(tiny_data), 32, None, CPU, Loading(workers=0))
    assert all(ok) and torch.equal(got[:], fresh[:])
    err = capsys.readouterr().err
    assert "could not write 6 images' features to the feature cache" in err and "No space left" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_short_batch_on_cuda_runs_padded_and_keeps_only_its_own_rows(tiny_data):
    """So that the CNN only ever sees one batch size (a new one makes cuDNN build its plans again)."""
    cuda = torch.device("cuda")
    enc = encoder().to(cuda)
    files = paths(tiny_data, 20)                          # one batch: 20 images and 236 rows of padding
    sizes, extract = [], enc.trunk
    enc.trunk = lambda images: sizes.append(len(images)) or extract(images)
    feats, ok = extract_features(enc, files, 32, None, cuda, Loading(workers=0))
    assert sizes == [CUDA_BATCH] and feats.shape == (20, 1, 512) and all(ok)
    images = ImageFiles(files, 32)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        alone = extract(torch.stack([images[i][0] for i in range(20)]).to(cuda)).half().cpu()
    cosine = torch.nn.functional.cosine_similarity(feats[:].float().flatten(1), alone.float().flatten(1))
    assert cosine.min() > 0.999


def test_cache_of_another_encoder_is_not_reused(tiny_data, tmp_path):
    files = [os.path.join(tiny_data[1], f"shape_{i:04d}.png") for i in range(3)]
    torch.manual_seed(0)
    resnet18, resnet34 = EncoderCNN("resnet18", "none", 16, True), EncoderCNN("resnet34", "none", 16, True)
    extract_features(resnet18, files, 32, str(tmp_path), CPU, Loading(workers=0))
    calls = []
    real = resnet34.trunk
    resnet34.trunk = lambda images: calls.append(len(images)) or real(images)
    got, _ = extract_features(resnet34, files, 32, str(tmp_path), CPU, Loading(workers=0))
    assert calls == [3] and len(os.listdir(tmp_path)) == 2           # recomputed, into its own folder
    expected = real(torch.stack([ImageFiles(files, 32)[i][0] for i in range(3)])).half()
    assert torch.allclose(got[:].float(), expected.float(), atol=1e-2)


def test_a_cache_on_a_full_disk_warns_and_the_features_are_still_there(tiny_data, small_disk, capsys):
    disk, fill = small_disk
    fill(4096)
    got, ok = extract_features(encoder(), paths(tiny_data), 32, str(disk / "cache"), CPU, Loading(workers=0))
    fresh, _ = extract_features(encoder(), paths(tiny_data), 32, None, CPU, Loading(workers=0))
    assert all(ok) and torch.equal(got[:], fresh[:])
    err = capsys.readouterr().err
    assert "could not write 6 images' features to the feature cache" in err and "No space left on device" in err
    assert "Traceback" not in err


def test_a_bug_while_reading_the_cache_deletes_no_shard(tiny_data, tmp_path, monkeypatch):
    """Only a damaged shard is deleted: an error of ours (or Ctrl-C) while reading leaves the cache whole."""
    enc, cache = encoder(), str(tmp_path / "c")
    extract_features(enc, paths(tiny_data, 2), 32, cache, CPU, Loading(workers=0))
    folder = os.path.join(cache, cache_key(enc, 32))
    shards = sorted(os.listdir(folder))

    def buggy_load(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(torch, "load", buggy_load)
    with pytest.raises(ZeroDivisionError):
        extract_features(enc, paths(tiny_data, 2), 32, cache, CPU, Loading(workers=0))
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        extract_features(enc, paths(tiny_data, 2), 32, cache, CPU, Loading(workers=0))
    assert sorted(os.listdir(folder)) == shards


def test_a_trunk_cache_is_keyed_by_its_cut_and_mirroring_and_reused(tiny_data, tmp_path):
    torch.manual_seed(0)
    frozen = EncoderCNN("resnet18", "none", 16, spatial=True)
    tuned = EncoderCNN("resnet18", "none", 16, spatial=True, tail_blocks=2)
    deeper = EncoderCNN("resnet18", "none", 16, spatial=True, tail_blocks=3)
    tuned.load_state_dict(frozen.state_dict())
    deeper.load_state_dict(frozen.state_dict())
    keys = {cache_key(e, 32, mirrored) for e in (frozen, tuned, deeper) for mirrored in (False, True)}
    assert len(keys) == 6
    key = cache_key(tuned, 32)
    with torch.no_grad():                     # the tail's weights change in training: the key never holds them
        tuned.tail_parameters()[0].add_(1.0)
    assert cache_key(tuned, 32) == key
    cache = str(tmp_path / "c")
    files = paths(tiny_data, 4)
    stored, _ = extract_features(tuned, files, 32, cache, CPU, Loading(workers=0))
    mirrored, _ = extract_features(tuned, files, 32, cache, CPU, Loading(workers=0), mirrored=True)
    images = torch.stack([ImageFiles(files, 32)[i][0] for i in range(4)])
    with torch.no_grad():
        assert torch.allclose(stored[:].float(), tuned.trunk(images), atol=1e-2)
        assert torch.allclose(mirrored[:].float(), tuned.trunk(images.flip(-1)), atol=1e-2)
    tuned.trunk = None                         # read back from the cache, not computed again
    again, ok = extract_features(tuned, files, 32, cache, CPU, Loading(workers=0))
    assert all(ok) and torch.equal(again[:], stored[:]) and tuple(again.shape[1:]) == (256, 2, 2)   # layer3's output enters layer4


@pytest.mark.parametrize("damage", ["flipped bytes", "a nan"])
def test_a_shard_whose_values_changed_on_disk_is_caught_and_rebuilt(tiny_data, tmp_path, capsys, damage):
    enc = encoder()
    good = extract_features(enc, paths(tiny_data), 32, str(tmp_path), CPU, Loading(workers=0))[0][:]
    folder = os.path.join(tmp_path, cache_key(enc, 32))
    shard_path = os.path.join(folder, os.listdir(folder)[0])
    shard = torch.load(shard_path, weights_only=True)
    raw = shard["features"].view(torch.uint8).view(-1)
    if damage == "flipped bytes":
        raw[100:2100] ^= 0x5A                       # 2,000 bytes, as a failing disk would
    else:
        shard["features"][3, 0, 7] = float("nan")
    torch.save(shard, shard_path)
    rebuilt, _ = extract_features(enc, paths(tiny_data), 32, str(tmp_path), CPU, Loading(workers=0))
    assert "feature cache shard is damaged (its checksums do not match" in capsys.readouterr().err
    assert torch.equal(good, rebuilt[:])


def test_checksums_are_exact_integers_whatever_the_thread_count():
    rows = torch.randn(5, 3, 7).half()
    sums = feature_cache.row_checksums(rows)
    torch.set_num_threads(1)
    try:
        assert torch.equal(sums, feature_cache.row_checksums(rows.clone()))
    finally:
        torch.set_num_threads(2)
    swapped = rows.clone()
    swapped[0, 0, 0], swapped[0, 0, 1] = rows[0, 0, 1], rows[0, 0, 0]
    assert not torch.equal(sums[:1], feature_cache.row_checksums(swapped)[:1]) or rows[0, 0, 0] == rows[0, 0, 1]
