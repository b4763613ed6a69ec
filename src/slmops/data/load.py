"""Load a dataset split from local files or the Hugging Face Hub, with `datasets` slice
syntax ('train[:4096]', 'train[10%:20%]') for local files too. Out-of-range slices and
empty splits are errors, never silently clamped."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from slmops.errors import DataError

EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_SPLIT = re.compile(r"^\s*(?P<name>[\w.\-]+)\s*(?:\[\s*(?P<start>-?\d+%?)?\s*:\s*(?P<end>-?\d+%?)?\s*\])?\s*$")


@dataclass(frozen=True)
class SplitSpec:
    name: str
    start: str | None
    end: str | None
    text: str

    def bounds(self, n_rows: int) -> tuple[int, int]:
        """Row range [lo, hi) of the slice on a split of n_rows, checked."""

        def index(value: str | None, default: int) -> int:
            if value is None:
                return default
            if value.endswith("%"):
                pct = int(value[:-1])
                if not -100 <= pct <= 100:
                    raise DataError(f"split {self.text!r}: {value} is not a percentage between -100% and 100%")
                return round(n_rows * pct / 100) if pct >= 0 else n_rows + round(n_rows * pct / 100)
            number = int(value)
            if number > n_rows or number < -n_rows:
                raise DataError(f"split {self.text!r} is out of range: split {self.name!r} has {n_rows} rows")
            return number if number >= 0 else n_rows + number

        lo, hi = index(self.start, 0), index(self.end, n_rows)
        if hi <= lo:
            raise DataError(f"split {self.text!r} selects no rows (split {self.name!r} has {n_rows} rows)")
        return lo, hi


def parse_split(text: str) -> SplitSpec:
    match = _SPLIT.match(text)
    if not match:
        raise DataError(f"cannot parse split {text!r}; write it as 'train', 'train[:4096]' or 'train[10%:20%]'")
    return SplitSpec(match["name"], match["start"], match["end"], text.strip())


@dataclass
class LoadedSplit:
    dataset: object  # datasets.Dataset
    source: str
    split: str
    fingerprint: str
    first_row: int = 0  # index in the whole split of the slice's first row
    skipped_rows: int = 0  # rows left out by --skip_bad_rows


def load_split(data_name: str | None, split: str, data_files: list[str] | None = None, subset: str | None = None) -> LoadedSplit:
    """One split (with its slice applied) as a `datasets.Dataset`."""
    spec = parse_split(split)
    files = local_split_files(data_name, data_files)
    if files is not None:
        if spec.name not in files:
            raise DataError(
                f"split {spec.name!r} not found in {data_name or data_files}: it has {', '.join(sorted(files))} "
                "(a single local file is the split 'train')"
            )
        dataset = _load_local(files[spec.name])
        fingerprint = _hash_files(files[spec.name])
        source = ", ".join(str(p) for p in files[spec.name])
    else:
        dataset = _load_hub(data_name, spec.name, subset)
        fingerprint = getattr(dataset, "_fingerprint", "") or ""
        source = f"hub:{data_name}" + (f"/{subset}" if subset else "")
    n_rows = len(dataset)
    if n_rows == 0:
        raise DataError(f"split {spec.name!r} of {source} is empty")
    lo, hi = spec.bounds(n_rows)
    if (lo, hi) != (0, n_rows):
        dataset = dataset.select(range(lo, hi))
    return LoadedSplit(dataset, source, spec.text, hashlib.sha256(f"{fingerprint}:{lo}:{hi}".encode()).hexdigest()[:16], lo)


def local_split_files(data_name: str | None, data_files: list[str] | None) -> dict[str, list[Path]] | None:
    """{split name: files} for local data, or None when data_name is a Hub dataset."""
    if data_files:
        root = Path(data_name).expanduser() if data_name and Path(data_name).expanduser().is_dir() else Path(".")
        paths = [(root / f).expanduser() for f in data_files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"data file(s) not found: {', '.join(missing)}")
        return {"train": paths}
    if data_name is None:
        raise DataError("no dataset given: pass --data_name (a local file or folder, or a Hub dataset name)")
    path = Path(data_name).expanduser()
    if path.is_file():
        _check_extension(path)
        return {"train": [path]}
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if not found:
            raise DataError(f"folder {str(path)!r} holds no data files ({', '.join(EXTENSIONS)})")
        splits: dict[str, list[Path]] = {}
        for file in found:
            splits.setdefault(file.stem.split("-")[0].split(".")[0], []).append(file)
        if "val" in splits and "validation" not in splits:
            splits["validation"] = splits["val"]
        return splits
    looks_local = data_name.startswith((".", "/", "~")) or Path(data_name).suffix.lower() in EXTENSIONS or data_name.count("/") > 1
    if looks_local:
        raise DataError(f"data file {data_name!r} does not exist")
    return None


def _check_extension(path: Path) -> None:
    if path.suffix.lower() not in EXTENSIONS:
        raise DataError(f"{str(path)!r}: unsupported data file type {path.suffix!r}; use one of {', '.join(EXTENSIONS)}")


def _load_local(paths: list[Path]):
    import datasets

    kinds = {EXTENSIONS[p.suffix.lower()] for p in paths}
    if len(kinds) != 1:
        raise DataError(f"mixed data file types in one split: {', '.join(str(p) for p in paths)}")
    kind = kinds.pop()
    if kind == "json":
        rows: list[dict] = []
        for path in paths:
            rows.extend(read_json_rows(path))
        columns: dict[str, None] = {}
        for row in rows:
            columns.update(dict.fromkeys(row))
        return datasets.Dataset.from_list([{c: row.get(c) for c in columns} for row in rows])
    if kind == "csv":
        return datasets.Dataset.from_pandas(_read_csv(paths), preserve_index=False)
    if kind == "text":
        lines = [line for path in paths for line in read_text(path).splitlines()]
        return datasets.Dataset.from_dict({"text": lines})
    try:
        return datasets.load_dataset(kind, data_files=[str(p) for p in paths], split="train")
    except Exception as exc:
        raise DataError(f"could not read {', '.join(str(p) for p in paths)} as {kind}: {str(exc)[:300]}") from None


def read_text(path: Path) -> str:
    """A data file's text; bytes that are not UTF-8 are named with their line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); "
                        "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _read_csv(paths: list[Path]):
    """CSV files through pandas (the reader `datasets` uses), with its line-numbered errors
    kept: a ragged row is named, not hidden behind 'An error occurred while generating'."""
    import io

    import pandas as pd

    frames = []
    for path in paths:
        try:
            frames.append(pd.read_csv(io.StringIO(read_text(path))))
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: the CSV file is empty (no header row)") from None
        except pd.errors.ParserError as exc:
            detail = str(exc).strip().removeprefix("Error tokenizing data. C error: ")
            raise DataError(f"{path}: malformed CSV: {detail} (the header has {_header_width(path)} columns)") from None
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return frame.astype(object).where(frame.notna(), None)  # empty cells are missing values (None), as in JSON


def _header_width(path: Path) -> int:
    import csv
    import io

    return len(next(csv.reader(io.StringIO(read_text(path))), []))


def read_json_rows(path: Path) -> list[dict]:
    """Rows of a .json (array of objects, or {"data": [...]}) or .jsonl file; a bad line is
    reported with its number."""
    text = read_text(path)
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if not stripped.startswith("{"):
                raise DataError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
            data = None  # may be JSON Lines saved as .json
        if isinstance(data, list):
            return _check_rows(data, path)
        if isinstance(data, dict):
            for key in ("data", "rows", "examples", "train"):
                if isinstance(data.get(key), list):
                    return _check_rows(data[key], path)
            if "\n" not in text.strip():
                return _check_rows([data], path)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: malformed JSON on line {number} (column {exc.colno}): {exc.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def _check_rows(rows: list, path: Path) -> list[dict]:
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {index} of the JSON array is not an object")
    return rows


def data_fingerprint(data_name: str | None, data_files: list[str] | None = None) -> str:
    """A hash of a dataset's content: of its local files' bytes, or of a Hub dataset's name
    (its files are pinned by `datasets`' own cache). Changes exactly when the data does."""
    files = local_split_files(data_name, data_files)
    if files is None:
        return hashlib.sha256(f"hub:{data_name}".encode()).hexdigest()[:16]
    return _hash_files([path for split in sorted(files) for path in files[split]])[:16]


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _load_hub(name: str, split: str, subset: str | None):
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise DataError(f"dataset {name!r}: {exc}") from None
        raise DataError(f"could not load dataset {name!r}: {exc}") from None
    except Exception as exc:
        raise DataError(
            f"could not load dataset {name!r} from the Hugging Face Hub ({type(exc).__name__}: {str(exc)[:200]}). "
            "For local data pass a path to an existing file or folder."
        ) from None
