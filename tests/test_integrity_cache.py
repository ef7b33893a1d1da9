"""Feature-cache integrity: damaged entries (truncated, flipped bytes, changed ids) are found when they are loaded
and rebuilt with a warning; entries written before the checksums still load; filesystem faults (unwritable
directory, full disk) are one-line errors naming the path, and the entry they interrupt resumes later."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from taft.backbones.assets import minilm_dir
from taft.backbones.tokenizer import TextTokenizer
from taft.data import FeatureCache, TextDataset, image_folder
from taft.data.feature_cache import CachedFeatures, reader, writer
from taft.errors import TaftError
from test_data_cache import KEY, N_IMAGES, PP, Trunk, entries, folder  # noqa: F401 (folder: a fixture)

pytestmark = pytest.mark.usefixtures("isolated_cache")
FILES = ("features.npy", "labels.npy", "ids.json")


def built(folder: Path) -> CachedFeatures:
    return FeatureCache().build_or_load(image_folder(folder, PP), Trunk(), KEY, batch_size=4, progress=False)


def rebuilt(folder: Path, entry: Path, because: str) -> tuple[CachedFeatures, Trunk]:
    """Build_or_load again, expecting a one-line warning that `entry` is damaged (`because`) and a full rebuild."""
    trunk = Trunk()
    with pytest.warns(UserWarning, match=f"feature-cache entry {entry} is damaged .*{because}.*; rebuilding it") as w:
        cf = FeatureCache().build_or_load(image_folder(folder, PP), trunk, KEY, batch_size=4, progress=False)
    assert all("\n" not in str(m.message) for m in w) and trunk.calls == 4 and cf.path == entry
    return cf, trunk


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_meta_records_the_files_checksums(folder):
    cf = built(folder)
    assert cf.meta["sha256"] == {f: hashlib.sha256((cf.path / f).read_bytes()).hexdigest() for f in FILES}


def test_text_entries_checksum_their_lengths_too():
    tok = TextTokenizer(minilm_dir() / "tokenizer.json", max_length=16)
    ds = TextDataset(["a fine film", "dull and long", "great", "awful"], [1, 0, 1, 0], list("abcd"), ["neg", "pos"],
                     tok, source="test")

    def trunk(tokens):  # (B, N) token ids -> (B, N, 2) features
        return torch.stack([tokens.ids.float(), tokens.mask.float()], -1)

    cf = FeatureCache().build_or_load(ds, trunk, KEY, batch_size=2, progress=False)
    assert set(cf.meta["sha256"]) == {*FILES, "lengths.npy"}
    flip_last_byte(cf.path / "lengths.npy")
    assert FeatureCache().load(ds, KEY) is None
    with pytest.warns(UserWarning, match="lengths.npy does not match its recorded checksum"):
        again = FeatureCache().build_or_load(ds, trunk, KEY, batch_size=2, progress=False)
    assert again.lengths == cf.lengths


def test_truncated_features_are_damage_and_are_rebuilt(folder):
    cf = built(folder)
    good = (cf.path / "features.npy").read_bytes()
    (cf.path / "features.npy").write_bytes(good[:-10])
    ds = image_folder(folder, PP)
    assert FeatureCache().load(ds, KEY) is None
    with pytest.raises(TaftError) as info:
        CachedFeatures(cf.path)  # not numpy's "mmap length is greater than file size"
    assert str(info.value).startswith(f"{cf.path} is a damaged feature-cache entry (features.npy has")
    again, _ = rebuilt(folder, cf.path, "features.npy has .* bytes")
    assert (again.path / "features.npy").read_bytes() == good


@pytest.mark.parametrize("name", FILES)
def test_changed_bytes_are_damage_and_are_rebuilt(folder, name):
    cf = built(folder)
    good = (cf.path / name).read_bytes()
    flip_last_byte(cf.path / name)
    assert FeatureCache().load(image_folder(folder, PP), KEY) is None
    again, _ = rebuilt(folder, cf.path, f"{name} does not match its recorded checksum")
    assert (again.path / name).read_bytes() == good


def test_large_features_are_hashed_only_when_asked(folder, monkeypatch):
    """Past VERIFY_LIMIT, a load checks the sizes of features.npy but hashes it only with verify=True."""
    cf = built(folder)
    flip_last_byte(cf.path / "features.npy")
    monkeypatch.setattr(reader, "VERIFY_LIMIT", 0)
    ds = image_folder(folder, PP)
    assert FeatureCache().load(ds, KEY) is not None
    assert FeatureCache().load(ds, KEY, verify=True) is None
    with pytest.warns(UserWarning, match="features.npy does not match its recorded checksum"):
        FeatureCache().build_or_load(ds, Trunk(), KEY, batch_size=4, progress=False, verify=True)
    monkeypatch.setattr(reader, "VERIFY_LIMIT", 2**40)
    assert FeatureCache().load(ds, KEY) is not None  # rebuilt: whole again
    assert FeatureCache().load(ds, KEY, verify=False) is not None


def test_entries_written_before_the_checksums_still_load_and_are_size_checked(folder):
    cf = built(folder)
    meta = json.loads((cf.path / "meta.json").read_text())
    del meta["sha256"]
    (cf.path / "meta.json").write_text(json.dumps(meta))
    trunk = Trunk()
    old = FeatureCache().build_or_load(image_folder(folder, PP), trunk, KEY, batch_size=4, progress=False)
    assert trunk.calls == 0 and np.array_equal(old.features, cf.features) and "sha256" not in old.meta
    (cf.path / "features.npy").write_bytes((cf.path / "features.npy").read_bytes()[:-1])
    rebuilt(folder, cf.path, "features.npy has")


def failing(real, error: int, on_call: int = 1):
    """`real` (a file operation taking a path first), except that its `on_call`-th call raises OSError(`error`)."""
    calls = []

    def fake(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == on_call:
            raise OSError(error, os.strerror(error), str(path))
        return real(path, *args, **kwargs)
    return fake


def test_full_disk_while_writing_is_one_line_and_the_build_resumes(folder, tmp_path, monkeypatch):
    ds = image_folder(folder, PP)
    with monkeypatch.context() as m, pytest.raises(TaftError) as info:  # the third progress.json fails
        m.setattr(writer, "atomic_write", failing(writer.atomic_write, errno.ENOSPC, on_call=3))
        FeatureCache().build_or_load(ds, Trunk(), KEY, batch_size=4, progress=False)
    (entry,) = entries(tmp_path)
    assert str(info.value) == f"cannot write feature-cache entry {entry / 'progress.json'}: No space left on device"
    assert not (entry / "meta.json").exists() and FeatureCache().load(ds, KEY) is None
    trunk = Trunk()
    cf = FeatureCache().build_or_load(ds, trunk, KEY, batch_size=4, progress=False)
    assert trunk.calls == 2 and len(cf) == N_IMAGES  # chunks 2 and 3: 0 and 1 were recorded


def test_full_disk_is_found_when_the_features_file_is_allocated(folder, monkeypatch):
    """The whole features.npy is reserved up front: a full disk is an error there, never a crash (SIGBUS) while
    writing through the memmap."""
    ds = image_folder(folder, PP)
    with monkeypatch.context() as m, pytest.raises(TaftError, match=r"cannot write feature-cache entry "
                                                   r".*features.npy: No space left on device$"):
        m.setattr(writer, "allocate", failing(writer.allocate, errno.ENOSPC))
        FeatureCache().build_or_load(ds, Trunk(), KEY, batch_size=4, progress=False)
    assert FeatureCache().load(ds, KEY) is None
    assert len(FeatureCache().build_or_load(ds, Trunk(), KEY, batch_size=4, progress=False)) == N_IMAGES


@pytest.mark.parametrize("on_call, what", [(1, "create the cache directory {cache}"),
                                           (2, "write feature-cache entry {cache}/features/")])
def test_uncreatable_cache_directory_is_one_line(folder, tmp_path, monkeypatch, on_call, what):
    """Tests run as root, where a read-only mode does not stop writes: the refusals are simulated (the first
    mkdir makes TAFT_CACHE, the second the entry's directory)."""
    monkeypatch.setattr(Path, "mkdir", failing(Path.mkdir, errno.EACCES, on_call))
    with pytest.raises(TaftError) as info:
        FeatureCache().build_or_load(image_folder(folder, PP), Trunk(), KEY, progress=False)
    message = str(info.value)
    assert message.startswith(f"cannot {what.format(cache=tmp_path / 'cache')}") and message.endswith(
        ": Permission denied") and "\n" not in message


def test_unwritable_entry_directory_is_one_line(folder, monkeypatch):
    monkeypatch.setattr(writer, "open", failing(open, errno.EROFS), raising=False)  # the entry's lock file
    with pytest.raises(TaftError, match=r"cannot write feature-cache entry .*\.lock: Read-only file system$"):
        FeatureCache().build_or_load(image_folder(folder, PP), Trunk(), KEY, progress=False)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_cache_directory_is_one_line(folder, tmp_path):
    root = tmp_path / "cache" / "features"
    root.mkdir(parents=True)
    root.chmod(0o555)
    try:
        with pytest.raises(TaftError, match=f"cannot write feature-cache entry {root}.*: Permission denied$"):
            FeatureCache().build_or_load(image_folder(folder, PP), Trunk(), KEY, progress=False)
    finally:
        root.chmod(0o755)
