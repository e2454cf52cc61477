"""What a `data:` value means, in one place: the offline digits (written once from scikit-learn's
bundled copy), the Imagenette/Imagewoof names fastai downloads, local image folders with train/ and
val/, a folder of class folders without val/ (a stratified random `valid_pct` becomes val/), and a
table of file names and labels (`{csv: labels.csv, folder: images/}`, fastai's `from_csv`); the scan of
an image folder; the fixed holdout split of its train/ images.

The last two layouts are made into the first once, as a *split view*: a folder of symbolic links with
train/ and val/ under `cache_dir()/splits`, named by a hash of the source and the split's settings, with
`split.csv` recording which image went where. Everything downstream (the decode-once cache, fastai's
pipeline, the holdout, the confirmation's val/) reads that folder as it reads any other, and the split
is the same in every run and on every node: a fixed seed over a sorted file list.

Adding a dataset touches this module (and the README). Light imports only (fastai is imported when a
download is needed), so that the CLI's checks stay fast; the two pipelines (`data`, `cache`) only read
what this module prepares.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import mimetypes
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from tune_sota.base import UserError, write_atomic

# Each name `data:` accepts besides a folder and 'digits', with the name of fastai's `URLs` constant.
DOWNLOADS = {
    "imagenette2": "IMAGENETTE",
    "imagenette2-160": "IMAGENETTE_160",
    "imagenette2-320": "IMAGENETTE_320",
    "imagewoof2": "IMAGEWOOF",
    "imagewoof2-160": "IMAGEWOOF_160",
    "imagewoof2-320": "IMAGEWOOF_320",
    "planet_tiny": "PLANET_TINY",  # lesson 3's multi-label satellite images: 200 of them
    "planet_sample": "PLANET_SAMPLE",  # ...and 1,000
}
# The downloads that are tables rather than image folders, read as fastai's lesson 3 reads them
# (`from_csv(path, folder='train', suff='.jpg', label_delim=' ')`); paths relative to the download.
TABLES = {name: {"csv": "labels.csv", "folder": "train", "fn_col": "image_name", "label_col": "tags",
                 "label_delim": " ", "suff": ".jpg"} for name in ("planet_tiny", "planet_sample")}
DIGITS_PX = 64  # the 8x8 digits are upscaled so that presizing and random crops have pixels to work with
IMAGE_EXTS = {ext for ext, kind in mimetypes.types_map.items() if kind.startswith("image/")} | {".webp"}
MOSTLY_UNREADABLE = 0.5  # above this share of unreadable images a split is an error, below it they are skipped
SPLITS = ("train", "val")
MULTI_FILE = "labels.json"  # in a split view of multi-label data: the delimiter and every label
log = logging.getLogger(__name__)
HOLDOUT_SEED = 0  # the holdout is a property of the data, not of a trial: the same in every run
SPLIT_SEED = 0  # likewise the val/ a split view draws from data without one
SPLIT_VERSION = 1  # bump when the split's rule changes: old views are then never read
# pandas readers by file suffix: what a `csv:` table may be (fastai's from_csv reads CSV; from_df any frame)
TABLE_READERS = {".csv": "read_csv", ".tsv": "read_table", ".txt": "read_table", ".parquet": "read_parquet",
                 ".feather": "read_feather", ".json": "read_json", ".xlsx": "read_excel"}


@dataclass(frozen=True)
class DataSpec:
    """A `data:` value as a mapping: an image folder, or a table of file names and labels (with the
    folder its names are relative to); column names default to fastai's conventions."""

    csv: str = ""  # a table (csv, tsv, parquet, feather, json, xlsx) of file names and labels
    folder: str = ""  # image folder: train/ and val/, or class folders (val/ drawn from them)
    fn_col: str = "fname"  # the table's column of file names, relative to `folder`
    label_col: str = "label"  # the table's column of class labels
    valid_col: str = ""  # a true/false column marking val/ rows; '' = `is_valid` if the table has one
    valid_pct: float = 0.2  # share of each class drawn as val/ when the data names none (as fastai's default)
    label_delim: str = ""  # the table's labels hold several per image, split by this (fastai's; Planet's ' ')
    suff: str = ""  # appended to each file name of the table (fastai's from_csv `suff`; Planet's '.jpg')


DATA_KEYS = tuple(f.name for f in fields(DataSpec))


def parse_data(data) -> DataSpec | None:
    """`data` (a name, a path, a mapping or its one-line YAML form) as a `DataSpec`; None for a dataset
    name. UserError names a bad key or value."""
    if isinstance(data, str) and data.lstrip().startswith("{"):
        try:
            data = yaml.safe_load(data)
        except yaml.YAMLError:
            raise UserError(f"data: {data!r} is not a mapping; write e.g. {{csv: labels.csv, folder: images}}") \
                from None
    if isinstance(data, dict):
        unknown = sorted(set(data) - set(DATA_KEYS))
        if unknown:
            raise UserError(f"data: unknown key '{unknown[0]}'; a data mapping takes {', '.join(DATA_KEYS)}")
        if not data.get("csv") and not data.get("folder"):
            raise UserError("data: a mapping needs csv: (a table of file names and labels) or folder: (images)")
        for k in ("folder", "csv", "fn_col", "label_col", "valid_col", "label_delim", "suff"):
            if k in data and not isinstance(data[k], str):
                raise UserError(f"data: {k}: {data[k]!r} is not a string")
        if data.get("label_delim") and not data.get("csv"):
            raise UserError("data: label_delim splits a table's labels; it needs csv: (a table of file names and "
                            "labels), not an image folder")
        if "/" in data.get("label_delim", ""):
            raise UserError("data: label_delim '/' cannot be used: labels name folders; use e.g. ' ' or ';'")
        pct = data.get("valid_pct", DataSpec.valid_pct)
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct < 1:
            raise UserError(f"data: valid_pct: {pct!r} is not allowed; must be a share in (0, 1), e.g. 0.2")
        return DataSpec(**{**data, "valid_pct": float(pct)})
    if known(data):
        return None
    if Path(str(data)).suffix.lower() in TABLE_READERS:  # `data: labels.csv`: images beside the table
        return DataSpec(csv=str(data))
    return DataSpec(folder=str(data))


def data_value(spec: DataSpec | dict) -> str:
    """The one-line form of a data mapping that `Config.data` holds (only the keys that differ from the
    defaults); a plain folder stays its path."""
    spec = spec if isinstance(spec, DataSpec) else parse_data(spec)
    d = {f.name: getattr(spec, f.name) for f in fields(DataSpec) if getattr(spec, f.name) != f.default}
    if set(d) == {"folder"}:
        return d["folder"]
    return yaml.safe_dump(d, default_flow_style=True, width=10**6, sort_keys=False).strip()


def resolve_paths(data, base: Path):
    """`data` with its relative folder and table made absolute against `base` (names left alone)."""
    spec = parse_data(data)
    if spec is None:
        return data

    def absolute(v: str) -> str:
        return v if not v.strip() or Path(v).expanduser().is_absolute() else str((base / v).resolve())

    spec = DataSpec(**{**spec.__dict__, "folder": absolute(spec.folder), "csv": absolute(spec.csv)})
    return data_value(spec) if isinstance(data, (str, dict)) else data


def data_folders(data) -> list[Path]:
    """The local paths a `data:` value reads (its folder, its table), for checks that they exist."""
    spec = parse_data(data)
    return [] if spec is None else [Path(p).expanduser() for p in (spec.folder, spec.csv) if p]


def known(data: str) -> bool:
    """Whether `data` names a dataset this module can make or download (rather than a folder)."""
    return data == "digits" or data in DOWNLOADS


def cache_dir() -> Path:
    """Where prepared datasets live: $TUNE_SOTA_CACHE, else ~/.cache/tune_sota."""
    return Path(os.environ.get("TUNE_SOTA_CACHE") or Path.home() / ".cache" / "tune_sota")


def prepare_source(data: str) -> Path:
    """The image folder (with train/ and val/) for `data`, writing or downloading it if needed: a
    folder without val/ and a table become a split view (see the module's docstring).

    An existing folder is not scanned here: reading every image header takes seconds for Imagenette,
    and both pipelines scan what they read (fastai's for its items, the cache when it decodes).
    """
    spec = parse_data(data)
    if spec is not None and spec.csv:
        return split_view(spec)
    folder = Path(spec.folder if spec is not None else data).expanduser()
    if folder.is_dir():
        if not ((folder / "train").is_dir() and (folder / "val").is_dir()) and _class_root(folder) is not None:
            return split_view(spec)
        return folder.resolve()
    if data == "digits":
        return digits_folder()
    if data not in DOWNLOADS:
        raise UserError(f"data: {folder.resolve()} is neither a folder nor a known dataset; use 'digits', one of "
                        f"{', '.join(DOWNLOADS)}, or a folder with train/ and val/ (one subfolder per class)")
    folder = _download(data)
    if data in TABLES:  # a downloaded table: its split view, as for any table
        t = TABLES[data]
        return split_view(DataSpec(**{**t, "csv": str(folder / t["csv"]), "folder": str(folder / t["folder"])}))
    return folder


def label_delim(data: str) -> str:
    """The delimiter of a multi-label `data:` value (a table with label_delim, or a download that is one);
    '' for single-label data."""
    spec = parse_data(data)
    return spec.label_delim if spec is not None else TABLES.get(data, {}).get("label_delim", "")


def _download(data: str) -> Path:
    """The folder fastai's untar_data gives for the download `data`: fetched once, then found again."""
    # Where an earlier download went, so that a search's driver finds it without importing fastai (and
    # torch with it: seconds at every start); fastai's own folder may be anywhere its config says.
    record = cache_dir() / "downloads" / f"{data}.path"
    if record.is_file() and (known := Path(record.read_text().strip())).is_dir():
        return known
    from fastai.data.external import URLs, untar_data

    # fastprogress draws its bar into any stdout; into a log file or a pipe it is stray block characters.
    shown = contextlib.nullcontext() if sys.stdout.isatty() else contextlib.redirect_stdout(io.StringIO())
    try:
        log.info("downloading %s with fastai's untar_data (once)", data)
        with shown:
            folder = Path(untar_data(getattr(URLs, DOWNLOADS[data])))
    except OSError as e:  # no network (URLError, socket errors and timeouts are OSErrors): the offline hint
        if data in TABLES:
            local = data_value(DataSpec(**{**TABLES[data], "csv": "PATH/labels.csv", "folder": "PATH/train"}))
            copy = f'a local copy of its table, e.g. --set "data={local}"'
        else:
            copy = "a local copy with train/ and val/, e.g. --set data=../shared/data/imagenette2-128"
        raise UserError(f"data: could not download {data} ({type(e).__name__}: {e}); without network, point "
                        f"data: at {copy} (in a space file a relative path is read from its folder)") from None
    except Exception as e:  # anything else (fastai's config, a broken archive) says what it was, unhinted
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"data: could not download {data}: {type(e).__name__}: {first}") from None
    write_atomic(record, str(folder))
    return folder


def digits_folder() -> Path:
    """scikit-learn's bundled handwritten digits as an image folder, written once (offline, real)."""
    root = cache_dir() / f"digits-{DIGITS_PX}"
    if (root / "val").is_dir():
        return root
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx_train, _ = train_test_split(range(len(d.target)), test_size=0.2, random_state=0, stratify=d.target)
    idx_train = set(idx_train)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".digits-"))
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        folder = tmp / ("train" if i in idx_train else "val") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = Image.fromarray((img * (255 / 16)).astype(np.uint8)).resize((DIGITS_PX, DIGITS_PX), Image.BILINEAR)
        pixels.convert("RGB").save(folder / f"{i:04d}.png")
    try:  # publish atomically; a concurrent writer that won the race leaves us nothing to do
        tmp.rename(root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_rgb(path) -> Image.Image:
    """Any image file as 8-bit RGB: grayscale, palette and CMYK converted, transparency on white,
    16-bit and 32-bit channels scaled down (PIL's own conversion would clip them to white)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
            im = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, rgba)
        return im.convert("RGB")


def is_image(p: Path) -> bool:
    """Whether `p` is named like an image file (hidden files are not)."""
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def readable(p: Path) -> bool:
    """Whether PIL recognises the file as an image (a header check: cheap enough for every file)."""
    try:
        with Image.open(p) as im:
            im.size  # noqa: B018  (reading the header is the check)
        return True
    except Exception:
        return False


@dataclass
class Scan:
    """The images of one image-folder dataset: class names and (path, class index) per split."""

    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]
    unreadable: list[Path] = field(default_factory=list)


def scan(root: Path, splits: tuple[str, ...] = SPLITS) -> Scan:
    """List and check an image folder (train/ and val/, one subfolder per class); UserError if unusable."""
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"data: {root} has no {split}/ folder; it needs train/ and val/, each with one "
                            f"folder per class")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    if multi_label(root) is not None:  # class folders are label sets: val/ may hold a set train/ lacks
        classes = sorted({*classes, *(d.name for d in (root / "val").iterdir()
                                      if d.is_dir() and not d.name.startswith("."))})
    elif len(classes) < 2:
        raise UserError(f"data: {root / 'train'} has {len(classes)} class folder(s); a classifier needs at "
                        f"least 2 (one subfolder of images per class)")
    extra = sorted(d.name for d in (root / "val").iterdir() if d.is_dir() and d.name not in classes)
    if extra:
        raise UserError(f"data: {root / 'val'} has classes that train/ lacks: {', '.join(extra[:5])}; "
                        f"val/ may only use train/'s classes")
    out = Scan(classes, {})
    for split in splits:  # only the splits asked for are read: a search's trials never open val/
        files, labels = [], []
        for i, c in enumerate(classes):
            found = sorted(p for p in (root / split / c).rglob("*") if p.is_file() and is_image(p)) \
                if (root / split / c).is_dir() else []
            if not found and split == "train":
                raise UserError(f"data: class folder {root / split / c} has no images "
                                f"({', '.join(sorted(IMAGE_EXTS & {'.jpg', '.jpeg', '.png'}))}, ...)")
            files += found
            labels += [i] * len(found)
        if not files:
            raise UserError(f"data: {root / split} has no images in its class folders")
        with ThreadPoolExecutor(8) as pool:
            ok = list(pool.map(readable, files))
        bad = [f for f, good in zip(files, ok) if not good]
        if len(bad) > MOSTLY_UNREADABLE * len(files):
            raise UserError(f"data: {len(bad)} of {len(files)} images in {root / split} are unreadable "
                            f"(first: {', '.join(p.name for p in bad[:3])}); fix or remove them")
        out.unreadable += bad
        out.splits[split] = [(f, y) for f, y, good in zip(files, labels, ok) if good]
    return out




def multi_label(root: Path) -> tuple[str, list[str]] | None:
    """(label delimiter, every label) of a multi-label split view, whose class folders are label sets
    joined by the delimiter (`split_view` of a table with `label_delim`); None for single-label data."""
    f = Path(root) / MULTI_FILE
    if not f.is_file():
        return None
    d = json.loads(f.read_text())
    return d["label_delim"], d["labels"]


def multi_hot(classes: list[str], delim: str, labels: list[str]) -> np.ndarray:
    """classes x labels, 1.0 where a class folder (a label set) holds the label."""
    index = {t: j for j, t in enumerate(labels)}
    out = np.zeros((len(classes), len(labels)), dtype=np.float32)
    for i, c in enumerate(classes):
        out[i, [index[t] for t in c.split(delim)]] = 1.0
    return out


def holdout_split(labels, share: float, seed: int = HOLDOUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) indices of `labels`: `share` of each class held out, at least one image of a
    class with two or more, always the same for the same labels (a fixed seed, not the trial's)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = min(len(idx) - 1, max(1, int(round(share * len(idx)))))
        held.append(rng.permutation(idx)[:n])
    held = np.sort(np.concatenate(held)) if held else np.array([], dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held)
    return kept, held


def _class_root(folder: Path) -> Path | None:
    """Where a folder without val/ keeps its class folders (itself, or its train/), or None if it has none."""
    for root in (folder / "train", folder):
        if root.is_dir() and any(d.is_dir() and not d.name.startswith(".") and d.name not in SPLITS
                                 for d in root.iterdir()):
            return root
    return None


def _class_items(spec: DataSpec) -> tuple[list[tuple[Path, str, str]], np.ndarray | None, str]:
    """(image, label, name in its class folder) of a folder of class folders, no fixed val/, a key."""
    folder = Path(spec.folder).expanduser().resolve()
    root = _class_root(folder)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and d.name not in SPLITS)
    items, h = [], hashlib.sha256()
    for c in classes:
        for p in sorted(p for p in (root / c).rglob("*") if p.is_file() and is_image(p)):
            rel = str(p.relative_to(root / c))
            items.append((p, c, rel))
            st = p.stat()
            h.update(f"{c}/{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return items, None, h.hexdigest()


def read_table(path: Path):
    """A pandas-readable table by its suffix; UserError (one line) when it is missing or unreadable."""
    import pandas as pd

    if not path.is_file():
        raise UserError(f"data: csv {path} does not exist; give a table of file names and labels")
    reader = getattr(pd, TABLE_READERS.get(path.suffix.lower(), "read_csv"))
    try:
        return reader(path)
    except Exception as e:  # a parser error, a missing optional engine (pyarrow, openpyxl)
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"data: cannot read {path} as a table: {type(e).__name__}: {first}") from None


_TRUE, _FALSE = {"true", "1", "yes", "valid", "1.0"}, {"false", "0", "no", "train", "0.0", ""}


def _validity(column, name: str, table: Path) -> np.ndarray:
    """A validity column as booleans: true/false, 1/0, yes/no (any case); UserError otherwise."""
    out = []
    for v in column.tolist():
        text = str(v).strip().lower() if v == v else ""  # NaN != NaN: an empty cell is a training row
        if text not in _TRUE | _FALSE:
            raise UserError(f"data: {table.name}'s column {name} must be true/false (or 1/0); found {v!r}")
        out.append(text in _TRUE)
    return np.array(out, dtype=bool)


def _table_items(spec: DataSpec) -> tuple[list[tuple[Path, str, str]], np.ndarray | None, str]:
    """(image, label, name under its class folder) of each row of a table, its validity (None when the
    table has no validity column), and a key of the table's content and the images' sizes and times."""
    table = Path(spec.csv).expanduser().resolve()
    df = read_table(table)
    cols = [str(c) for c in df.columns]
    df.columns = cols
    for key, name in (("fn_col", spec.fn_col), ("label_col", spec.label_col)):
        if name not in cols:
            raise UserError(f"data: {table.name} has no column '{name}' ({key}); its columns: "
                            f"{', '.join(cols[:10])}; set {key}: in the data mapping")
    valid_col = spec.valid_col or ("is_valid" if "is_valid" in cols else "")
    if valid_col and valid_col not in cols:
        raise UserError(f"data: {table.name} has no column '{valid_col}' (valid_col); its columns: "
                        f"{', '.join(cols[:10])}")
    if df.empty:
        raise UserError(f"data: {table} has no rows")
    folder = Path(spec.folder).expanduser().resolve() if spec.folder else table.parent
    names, labels = df[spec.fn_col].astype(str).str.strip() + spec.suff, df[spec.label_col]
    if labels.isna().any():
        first = int(labels.isna().to_numpy().argmax()) + 2  # the line in the file: 1-based, after the header
        raise UserError(f"data: {table.name} has {int(labels.isna().sum())} row(s) without a label in column "
                        f"'{spec.label_col}' (first: line {first}); fill or drop them")
    labels = labels.astype(str).str.strip()
    if spec.label_delim:  # each image's labels as one folder name: the set, sorted, joined by the delimiter
        sets = [sorted({t.strip() for t in v.split(spec.label_delim) if t.strip()}) for v in labels]
        labels = labels.copy()
        labels[:] = [spec.label_delim.join(t) for t in sets]
        bad = sorted({t for ts in sets for t in ts if "/" in t or t.startswith(".")} | {"" for ts in sets if not ts})
        if bad:
            raise UserError(f"data: {table.name}'s label {bad[0]!r} cannot be a label (no '/', no leading '.', "
                            f"at least one label per image)")
        if len({t for ts in sets for t in ts}) < 2:
            raise UserError(f"data: {table.name}'s column '{spec.label_col}' has fewer than 2 labels split by "
                            f"label_delim {spec.label_delim!r}; is that its delimiter?")
    bad = sorted({c for c in labels if "/" in c or c.startswith(".") or not c})
    if bad:
        raise UserError(f"data: {table.name}'s label {bad[0]!r} cannot name a class folder (no '/', no leading '.')")
    classes = sorted(set(labels))
    if len(classes) < 2 and not spec.label_delim:
        raise UserError(f"data: {table.name}'s column '{spec.label_col}' has {len(classes)} class "
                        f"({', '.join(classes)}); a classifier needs at least 2")
    dup = names[names.duplicated()]
    if len(dup):
        raise UserError(f"data: {table.name} names {dup.iloc[0]} more than once; one row per image")
    paths = [folder / n for n in names]
    missing = [n for n, p in zip(names, paths) if not p.is_file()]
    if missing:
        raise UserError(f"data: {len(missing)} of {len(paths)} files named in {table.name} are not in {folder} "
                        f"(first: {', '.join(missing[:3])}); fix the table, or set folder: to where they are")
    valid = _validity(df[valid_col], valid_col, table) if valid_col else None
    if valid is not None and (valid.all() or not valid.any()):
        which = "every" if valid.all() else "no"
        raise UserError(f"data: {table.name}'s column {valid_col} marks {which} row valid; val/ and train/ each "
                        f"need images (drop the column for a random {spec.valid_pct:.0%})")
    h = hashlib.sha256(table.read_bytes())
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return [(p, c, n) for p, c, n in zip(paths, labels, names)], valid, h.hexdigest()


def split_view(spec: DataSpec) -> Path:
    """The train/ and val/ folder (symbolic links) of a folder without val/ or a table, made once: val/
    is the table's validity column, else a stratified `valid_pct` of each class (a fixed seed)."""
    items, valid, content = _table_items(spec) if spec.csv else _class_items(spec)
    if not items:
        raise UserError(f"data: {spec.folder} has no images in its class folders")
    if len({c for _, c, _ in items}) < 2 and not spec.label_delim:
        raise UserError(f"data: {spec.folder} has 1 class folder; a classifier needs at least 2 (one subfolder "
                        f"of images per class)")
    source = spec.csv or spec.folder
    key = json.dumps({"version": SPLIT_VERSION, "spec": data_value(spec), "content": content, "seed": SPLIT_SEED})
    name = Path(source).stem or "data"
    root = cache_dir() / "splits" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (root / "split.csv").is_file():
        return root
    if valid is None:
        _, held = holdout_split([c for _, c, _ in items], spec.valid_pct, seed=SPLIT_SEED)
        valid = np.zeros(len(items), dtype=bool)
        valid[held] = True
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-"))
    record = io.StringIO()
    rows = csv.writer(record, lineterminator="\n")
    rows.writerow(("file", "label", "split"))
    for (path, label, rel), is_valid in zip(items, valid):
        split = "val" if is_valid else "train"
        link = tmp / split / label / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
        rows.writerow((str(path), label, split))
    if spec.label_delim:  # multi-label: each class folder is a set of labels (see `multi_label`)
        labels = sorted({t for _, c, _ in items for t in c.split(spec.label_delim)})
        (tmp / MULTI_FILE).write_text(json.dumps({"label_delim": spec.label_delim, "labels": labels}) + "\n")
    (tmp / "split.csv").write_text(record.getvalue())  # last: a view is there once this is
    try:  # publish atomically; a concurrent writer that won the race leaves us nothing to do
        tmp.rename(root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    n_val = int(valid.sum())
    log.info("data: split view of %s in %s: %d train, %d val images", source, root, len(items) - n_val, n_val)
    return root


def split_record(data: str) -> Path | None:
    """The `split.csv` of `data`'s split view (which image is in val/), or None for data with its own val/."""
    root = prepare_source(data) if not known(data) else None
    return root / "split.csv" if root is not None and (root / "split.csv").is_file() else None
