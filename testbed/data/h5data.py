"""The HDF5 dataset format (schema 1; docs/data-format.md): its paths, write, open + validate, read, hash.

Everything that touches a dataset file goes through this module, so validation happens in one place.  The PyTorch
view of a split, :class:`SegDataset`, lives in :mod:`testbed.data.h5dataset` (which imports this module, never the
other way round); ``h5data.SegDataset`` still names it.
Files are plain HDF5; ``docs/data-format.md`` describes them for people who read them with h5py alone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from testbed.core.atomic import atomic_file
from testbed.core import safeload
from testbed.core.errors import UserError, did_you_mean

FORMAT = "testbed-seg"
SCHEMA_VERSION = 1
IGNORE_INDEX = 255
SPLITS = ("train", "test")
# The schema's array paths (docs/data-format.md), spelled here only: other modules name them by these constants.
TRAIN_IMAGES, TRAIN_LABELS = "train/images", "train/labels"
TEST_IMAGES, TEST_LABELS = "test/images", "test/labels"
VAL_IMAGES, VAL_LABELS = "val/images", "val/labels"  # optional: a validation split (real datasets' importers)
TEST_ATTACKED_IMAGES, TEST_ATTACKED_LABELS = "test_attacked/images", "test_attacked/labels"
TEST_ATTACKED_GT, TEST_ATTACKED_INDEX = "test_attacked/gt", "test_attacked/index"
TEST_BENIGN_INDEX, CLEAN_INDEX = "test_benign/index", "defense/clean_index"
POISON_INDEX, ORIGINAL_IMAGES, ORIGINAL_LABELS = "train/poison_index", "train/original_images", "train/original_labels"
NOISE_INDEX, NOISE_ORIGINAL_IMAGES = "train/noise_index", "train/noise_original_images"
_LABEL_CHECK_BLOCK = 256
_SEGDATASET_MODULE = "testbed.data.h5dataset"  # SegDataset's home (a torch view of a split)
# Bounds on what a file may declare, checked before anything is read (docs/data-format.md, "Limits")
DEFAULT_MAX_IMAGE_PIXELS = 1 << 27  # H × W of one image: 134 M pixels (11585²), 384 MiB per RGB image


def max_image_pixels() -> int:
    """``TESTBED_MAX_IMAGE_PIXELS`` (default 2**27): the largest H × W a dataset file may declare."""
    text = os.environ.get("TESTBED_MAX_IMAGE_PIXELS", "")
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"environment variable TESTBED_MAX_IMAGE_PIXELS={text!r} must be a positive whole number")
    return int(text)


def stored_problem(ds: h5py.Dataset) -> str | None:
    """Why array ``ds`` declares more than the file stores (None when every element it declares is stored).

    Writers of this testbed write every row, so a chunked array holds every chunk its shape needs and a
    contiguous one all its bytes; a file that declares 10⁹ rows in 1.4 KB would otherwise be read (as fill
    values) for hours.  Cheap: counts chunks in the index, reads no data."""
    if ds.size == 0:
        return None
    if ds.chunks is None:
        stored, declared = ds.id.get_storage_size(), ds.size * ds.dtype.itemsize
        return None if stored >= declared else (
            f"declares {declared} bytes {ds.shape} but stores {stored}")
    declared = 1
    for n, c in zip(ds.shape, ds.chunks):
        declared *= -(-n // c)
    stored = ds.id.get_num_chunks()
    return None if stored >= declared else f"declares {ds.shape} ({declared} chunks) but stores {stored} chunk(s)"


def _json_attr(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _abandon(f: h5py.File) -> None:
    """Close ``f`` after a failed write without letting HDF5 crash.

    After one failed write HDF5 retries its buffered writes at close, in destructors (where Python can only
    print the error) and at interpreter exit, where it can end in a segmentation fault.  Pointing the file's
    descriptor at /dev/null makes those writes succeed into nothing, so the close is clean; the caller then
    deletes the temporary file.
    """
    with contextlib.suppress(Exception):
        fd = f.id.get_vfd_handle()
        if isinstance(fd, int) and fd > 2:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, fd)
            os.close(null)
    with contextlib.suppress(Exception):
        f.close()


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike) -> Iterator[h5py.File]:
    """A new HDF5 file written atomically (:func:`testbed.core.atomic.atomic_file`) whose write errors are clean.

    HDF5 buffers writes and reports a failure late (at a flush, at close, or in a destructor), so the file is
    flushed explicitly while the caller's datasets are still open, and on any failure it is abandoned
    (:func:`_abandon`) before the temporary file is removed: one error, no crash, nothing left behind.
    """
    path = Path(path)
    with atomic_file(path) as tmp:
        f = h5py.File(tmp, "w")
        try:
            yield f
            f.flush()
            f.close()
        except BaseException as e:
            _abandon(f)
            if isinstance(e, RuntimeError) and "write failed" in str(e):  # HDF5 reports some failed writes as these
                m = re.search(r"errno = (\d+)", str(e))
                code = int(m.group(1)) if m else errno.EIO
                raise OSError(code, os.strerror(code)) from None
            raise  # atomic_file removes the temporary file and words a full disk as one line


class DatasetWriter:
    """Streams arrays into a new dataset file, atomically: nothing appears at ``path`` unless it completes.

    >>> with DatasetWriter(path, classes, source={...}, image_size=(64, 64)) as w:
    ...     w.put("train/images", images); w.put("train/labels", labels)   # or create() + slices
    """

    def __init__(
        self,
        path: str | os.PathLike,
        classes: Sequence[str],
        *,
        source: Mapping[str, Any],
        image_size: Sequence[int],
        compression: str | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        if compression not in (None, "lzf", "gzip"):
            raise UserError(f"unknown compression {compression!r}; use lzf, gzip or none")
        classes = list(classes)
        if not classes or len(classes) > 255:
            raise UserError(f"a dataset needs 1..255 classes, got {len(classes)}")
        if len(set(classes)) != len(classes):
            raise UserError("class names must be unique")
        self.path = Path(path)
        self.classes = classes
        self.compression = compression
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self._attrs: dict[str, Any] = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "classes": classes,
            "ignore_index": IGNORE_INDEX,
            "source": dict(source),
            "image_size": list(self.image_size),
        }
        self._attrs.update(attrs or {})
        self._ctx = None
        self._datasets: list[h5py.Dataset] = []  # kept alive so their chunks are flushed by us, not by the GC
        self.file: h5py.File | None = None

    def __enter__(self) -> "DatasetWriter":
        self._ctx = atomic_h5(self.path)
        self.file = self._ctx.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                for name, value in self._attrs.items():
                    is_json = isinstance(value, (dict, list)) and name != "image_size"
                    self.file.attrs[name] = _json_attr(value) if is_json else value
                for split in SPLITS:
                    for kind in ("images", "labels"):
                        if f"{split}/{kind}" not in self.file:
                            raise ValueError(f"dataset is missing /{split}/{kind}")
        except BaseException as e:  # let atomic_h5 abandon the file and discard the temp file
            try:
                self._ctx.__exit__(type(e), e, e.__traceback__)
            finally:
                self._datasets.clear()
            raise
        try:
            return bool(self._ctx.__exit__(exc_type, exc, tb))
        finally:
            self._datasets.clear()

    def set_attr(self, name: str, value: Any) -> None:
        self._attrs[name] = value

    def create(self, name: str, shape: Sequence[int], dtype: Any) -> h5py.Dataset:
        """Create an empty array; image/label arrays are chunked one sample per chunk."""
        shape = tuple(int(s) for s in shape)
        kwargs: dict[str, Any] = {}
        if len(shape) >= 3 and shape[0] > 0:
            kwargs["chunks"] = (1,) + shape[1:]
            if self.compression:
                kwargs["compression"] = self.compression
        ds = self.file.create_dataset(name, shape=shape, dtype=dtype, **kwargs)
        self._datasets.append(ds)
        return ds

    def put(self, name: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        ds = self.create(name, array.shape, array.dtype)
        if array.size:
            ds[...] = array


def write_dataset(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    classes: Sequence[str],
    *,
    source: Mapping[str, Any],
    compression: str | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete dataset from in-memory arrays (keys like ``"train/images"``), atomically."""
    h, w = np.asarray(arrays["train/images"]).shape[1:3]
    with DatasetWriter(path, classes, source=source, image_size=(h, w), compression=compression, attrs=attrs) as wr:
        for name, array in arrays.items():
            wr.put(name, array)
    return Path(path)


def read_rows(ds: h5py.Dataset | np.ndarray, index: Sequence[int] | np.ndarray) -> np.ndarray:
    """Rows ``index`` (any order, repeats allowed), reading one slice per run of consecutive rows.

    h5py's list indexing costs ~40 ms for 16 rows of a chunked array; a slice costs ~20 µs.
    """
    index = np.asarray(index, dtype=np.int64)
    if index.size == 0:
        return np.empty((0,) + ds.shape[1:], ds.dtype)
    uniq, inverse = np.unique(index, return_inverse=True)
    out = np.empty((uniq.size,) + ds.shape[1:], ds.dtype)
    breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
    for start, run in zip(np.r_[0, breaks], np.split(uniq, breaks)):
        out[start : start + run.size] = ds[run[0] : run[-1] + 1]
    return out[inverse]


class SegFile:
    """A validated, read-only dataset file.  Use :func:`open_dataset`."""

    def __init__(self, path: str | os.PathLike, check_labels: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise UserError(f"{self.path} is a directory, not a dataset file")
        try:
            is_h5 = h5py.is_hdf5(self.path)
        except OSError as e:
            raise UserError(f"{self.path}: cannot read ({e.strerror or e})") from None
        if not is_h5:
            raise UserError(f"{self.path} is not an HDF5 file; make one with `testbed data synth` or `testbed data import`")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError:
            raise UserError(f"{self.path} is corrupt or truncated (HDF5 could not open it); re-create it") from None
        try:
            self._validate(check_labels)
        except UserError:
            self.file.close()
            raise
        except (OSError, KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
            self.file.close()
            raise UserError(f"{self.path} is corrupt or truncated ({e}); re-create it") from None

    # -- validation ---------------------------------------------------------------------------
    def _validate(self, check_labels: bool) -> None:
        a = self.file.attrs
        fmt = a.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != FORMAT:
            raise UserError(f"{self.path} is an HDF5 file but not a testbed dataset (format={fmt!r}, expected {FORMAT!r})")
        version = int(a.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            raise UserError(
                f"{self.path} has schema_version {version}; this testbed reads schema {SCHEMA_VERSION} (upgrade segbackdoor or re-create the file)"
            )
        self.attrs: dict[str, Any] = {}
        for name, value in a.items():
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str) and value[:1] in "{[":
                value = safeload.loads(value, f"{self.path}: attribute {name!r}")
            elif isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, np.generic):
                value = value.item()
            self.attrs[name] = value
        self.classes: list[str] = self._check_classes(self.attrs.get("classes"))
        self.num_classes = len(self.classes)
        self.palette: list[list[int]] | None = self._check_palette(self.attrs.get("palette"))
        self.ignore_index = int(self.attrs.get("ignore_index", IGNORE_INDEX))
        self.source: dict = self.attrs.get("source", {})
        self.attack: dict | None = self.attrs.get("attack")
        for key, value in (("source", self.source), ("attack", self.attack)):
            if value is not None and not isinstance(value, dict):
                raise UserError(f"{self.path}: attribute {key!r} must be a JSON object, got {str(value)[:60]}; the file "
                                "is damaged or was not written by segbackdoor")
        size = self.attrs.get("image_size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise UserError(f"{self.path}: root attribute image_size is {size!r}, not [H, W]; the file is damaged, re-create it")
        self.image_size = (size[0], size[1])
        self._check_declared()
        for split in SPLITS:
            for kind in ("images", "labels"):
                if f"{split}/{kind}" not in self.file:
                    raise UserError(f"{self.path} lacks /{split}/{kind}; it is not a complete testbed dataset")
            self._check_pair(f"{split}/images", f"{split}/labels")
        if VAL_IMAGES in self.file or VAL_LABELS in self.file:
            for name in (VAL_IMAGES, VAL_LABELS):
                if name not in self.file:
                    raise UserError(f"{self.path} has /val but no /{name}; it is not a complete testbed dataset")
            self._check_pair(VAL_IMAGES, VAL_LABELS)
        for labels in ("test_attacked/labels", "test_attacked/gt"):
            if "test_attacked/images" in self.file and labels in self.file:
                self._check_pair("test_attacked/images", labels)
        if "train/original_images" in self.file:
            self._check_pair("train/original_images", "train/original_labels")
        self._check_indices()
        if check_labels:
            for name in self.file:
                for key in ("labels", "gt", "original_labels"):
                    if f"{name}/{key}" in self.file:
                        self._check_label_range(f"{name}/{key}")

    def _check_declared(self) -> None:
        """What the file declares, bounded before anything is read (docs/data-format.md, "Limits")."""
        h, w = self.image_size
        if h * w > max_image_pixels():
            raise UserError(f"{self.path}: declares {h}×{w} images, more than the {max_image_pixels()} pixels "
                            "an image may have (TESTBED_MAX_IMAGE_PIXELS); refused before reading")
        for name, ds in self.arrays().items():
            problem = stored_problem(ds)
            if problem is not None:
                raise UserError(f"{self.path}: /{name} {problem}; the file is damaged, truncated or hostile: refused "
                                "before reading")

    def _check_classes(self, classes: Any) -> list[str]:
        """Class names are how everything refers to classes: 1..255 distinct, non-empty strings."""
        fix = "the file is damaged; re-create it (or re-import it with a corrected classes file)"
        if not isinstance(classes, list) or not 1 <= len(classes) <= 255:
            raise UserError(f"{self.path}: root attribute classes must be a JSON list of 1..255 names, got {str(classes)[:60]!r}; {fix}")
        bad = [c for c in classes if not isinstance(c, str) or not c.strip()]
        if bad:
            raise UserError(f"{self.path}: class names must be non-empty strings, got {bad[0]!r}; {fix}")
        dupes = sorted({c for c in classes if classes.count(c) > 1})
        if dupes:
            raise UserError(f"{self.path}: class name(s) {', '.join(map(repr, dupes))} appear more than once; {fix}")
        return list(classes)

    def _check_palette(self, pal: Any) -> list[list[int]] | None:
        """The optional ``palette`` attribute: one [r, g, b] (0..255) per class, in class id order."""
        if pal is None:
            return None
        ok = isinstance(pal, list) and len(pal) == self.num_classes and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in pal)
        if not ok:
            raise UserError(f"{self.path}: root attribute palette must list one [r, g, b] (0..255) per class "
                            f"({self.num_classes}), got {str(pal)[:60]!r}; the file is damaged, re-create it")
        return pal

    def _array(self, name: str) -> h5py.Dataset:
        obj = self.file[name]
        if not isinstance(obj, h5py.Dataset):
            raise UserError(f"{self.path}: /{name} is a {type(obj).__name__.lower()}, not an array; the file is damaged, re-create it")
        return obj

    def _check_pair(self, images: str, labels: str) -> None:
        x, y = self._array(images), self._array(labels)
        h, w = self.image_size
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            raise UserError(f"{self.path}: /{images} and /{labels} must be uint8")
        if x.ndim != 4 or x.shape[1:] != (h, w, 3):
            raise UserError(f"{self.path}: /{images} has shape {x.shape}, expected [N,{h},{w},3]")
        if y.shape != x.shape[:3]:
            raise UserError(f"{self.path}: /{labels} has shape {y.shape}, expected {x.shape[:3]}")

    # index arrays of a poisoned file: what they index, and which array their length must match
    _INDEX_ARRAYS = (("train/poison_index", "train", "train/original_images"), ("defense/clean_index", "train", None),
                     ("test_attacked/index", "test", "test_attacked/images"), ("test_benign/index", "test", None),
                     ("train/noise_index", "train", "train/noise_original_images"))

    def _check_indices(self) -> None:
        for name, split, rows in self._INDEX_ARRAYS:
            if name not in self.file:
                continue
            ds = self._array(name)
            n = self.length(split)
            if ds.ndim != 1 or ds.dtype.kind not in "iu":
                raise UserError(f"{self.path}: /{name} must be a 1-D integer array, got {ds.dtype} {ds.shape}; "
                                "the file is damaged, re-create it with `testbed poison`")
            idx = ds[()]
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise UserError(f"{self.path}: /{name} holds index {int(idx.max()) if idx.max() >= n else int(idx.min())} "
                                f"outside /{split} (0..{n - 1}); the file is damaged, re-create it with `testbed poison`")
            if rows is not None and rows in self.file and self._array(rows).shape[0] != idx.size:
                raise UserError(f"{self.path}: /{name} has {idx.size} entries but /{rows} has "
                                f"{self._array(rows).shape[0]} rows; the file is damaged, re-create it with `testbed poison`")

    def _check_label_range(self, name: str) -> None:
        ds = self._array(name)
        k = self.num_classes
        for start in range(0, ds.shape[0], _LABEL_CHECK_BLOCK):
            block = ds[start : start + _LABEL_CHECK_BLOCK]
            bad = (block >= k) & (block != self.ignore_index)
            if bad.any():
                i = start + int(np.argwhere(bad)[0][0])
                raise UserError(
                    f"{self.path}: /{name}[{i}] holds label {int(block[bad].max())} but the file has only {k} classes (0..{k - 1}, ignore {self.ignore_index})"
                )

    # -- access -------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.file

    def __getitem__(self, name: str) -> np.ndarray:
        """Read a whole array, e.g. ``f["test/images"]``."""
        if name not in self.file:
            raise KeyError(f"{self.path} has no /{name}")
        return self.file[name][()]

    def read(self, name: str, index: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Read rows ``index`` (any order, repeats allowed) of array ``name``."""
        ds = self.file[name]
        if index is None:
            return ds[()]
        return read_rows(ds, index)

    def length(self, split: str) -> int:
        return int(self.file[f"{split}/images"].shape[0])

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of array ``name``, without reading it."""
        return tuple(self.file[name].shape)

    def dtype(self, name: str) -> np.dtype:
        return self.file[name].dtype

    def arrays(self) -> dict[str, h5py.Dataset]:
        """Every array of the file by path, in HDF5's visiting order (the handles close with the file)."""
        out: dict[str, h5py.Dataset] = {}

        def visit(name: str, obj: Any) -> None:  # returns None: a value would stop the visit
            if isinstance(obj, h5py.Dataset):
                out[name] = obj

        self.file.visititems(visit)
        return out

    @property
    def is_poisoned(self) -> bool:
        return self.attack is not None

    def class_id(self, name: str) -> int:
        """The id of class ``name`` (case-insensitive, see :func:`find_class`); an unknown name is a user error
        listing the valid ones."""
        cid = find_class(self.classes, name)
        if cid is None:
            raise UserError(f"unknown class {name!r}{did_you_mean(name, self.classes)}; {self.path.name} has: {', '.join(self.classes)}")
        return cid

    def content_hash(self) -> str:
        return content_hash(self.file)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "SegFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def find_class(classes: Sequence[str], name: str) -> int | None:
    """The id of class ``name`` in ``classes``: the exact name, else the one name equal to it ignoring case
    ("road" finds CamVid's "Road"); None when there is none (or two names differ only by case)."""
    classes = list(classes)
    if name in classes:
        return classes.index(name)
    folded = [i for i, c in enumerate(classes) if c.casefold() == str(name).casefold()]
    return folded[0] if len(folded) == 1 else None


def open_dataset(path: str | os.PathLike, check_labels: bool = True) -> SegFile:
    """Open and validate a dataset file; every problem is a :class:`UserError` with a one-line message."""
    return SegFile(path, check_labels=check_labels)


def canonical_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:  # JSON attrs hash by content, not by key order or whitespace
            return safeload.loads(value, "attribute")
        except UserError:
            return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def content_hash(f: h5py.File | str | os.PathLike) -> str:
    """sha256 over every array (name, dtype, shape, bytes) and every root attribute, not the HDF5 layout.

    Two files with the same content hash the same whether chunked, compressed or written in another order.
    """
    if not isinstance(f, h5py.File):
        with h5py.File(f, "r") as fh:
            return content_hash(fh)
    h = hashlib.sha256()
    attrs = {k: canonical_attr(v) for k, v in f.attrs.items()}
    h.update(json.dumps(attrs, sort_keys=True).encode())
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    for name in sorted(names):
        ds = f[name]
        h.update(f"\0{name}\0{ds.dtype.str}\0{ds.shape}\0".encode())
        if ds.ndim == 0:
            h.update(np.ascontiguousarray(ds[()]).tobytes())
            continue
        step = max(1, (64 << 20) // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:]) or 1)))
        for start in range(0, ds.shape[0], step):
            h.update(np.ascontiguousarray(ds[start : start + step]).tobytes())
    return h.hexdigest()


def path(split: str, array: str) -> str:
    """The path of ``array`` (``images``, ``labels``, ``gt``, ``index``, an attack's own) in group ``split``."""
    return f"{split}/{array}"


class RowReader:
    """Reads rows of one array of one file on demand, opening the file per call (no handle to keep or leak).

    The defender's lazy view of the training set (:mod:`testbed.evaluation.threat_model`): indexing like a numpy array
    (ints, slices, ``...``, tuples, int or bool arrays, negative rows), without validating the file each time.
    """

    __slots__ = ("_path", "_name")

    def __init__(self, path: str | os.PathLike, name: str) -> None:
        self._path = str(path)
        self._name = name

    def __call__(self, index: Any) -> np.ndarray:
        with h5py.File(self._path, "r") as f:
            ds = f[self._name]
            if isinstance(index, (int, np.integer, slice)) or index is Ellipsis:
                return ds[index]
            if isinstance(index, tuple):
                return ds[()][index] if len(ds) <= 4096 else ds[index]
            idx = np.asarray(index)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
            idx = idx.astype(np.int64).reshape(-1)
            idx = np.where(idx < 0, idx + len(ds), idx)
            if idx.size == 0:
                return np.empty((0,) + ds.shape[1:], ds.dtype)
            uniq, inverse = np.unique(idx, return_inverse=True)
            return ds[uniq][inverse]


def __getattr__(name: str) -> Any:
    """``h5data.SegDataset`` (the path the docs gave before the rooms) names :class:`testbed.data.h5dataset.SegDataset`.

    The dependency runs one way, h5dataset → h5data: this module never imports h5dataset (nor torch); the old name
    is looked up by its module path only when asked for."""
    if name == "SegDataset":
        return importlib.import_module(_SEGDATASET_MODULE).SegDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
