"""Documents from the sources of ``data.sources``: local files, globs, directories, HF datasets.

File formats, chosen by suffix:
- ``.txt``: one document per paragraph (a run of non-blank lines; blank lines separate documents).
- ``.jsonl`` / ``.json``: one document per record, the text in ``text_field`` (a ``.json`` file
  is either one JSON array of records or JSON lines).
- ``.parquet``: one document per row, the text in the ``text_field`` column.
A directory means every file with one of these suffixes below it; a path with ``*``, ``?`` or
``[`` is a glob (``**`` recurses). Files are read in sorted order, so the corpus order is fixed.
Bad input is a ``DataError`` naming the file and the line, byte offset or field.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

from hybridlm.config import SourceConfig
from hybridlm.data.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
DEFAULT_CORPUS_DIR = Path(__file__).parent / "corpus"


def default_sources() -> list[SourceConfig]:
    """The embedded default corpus (see data/README.md), used when ``data.sources`` is empty."""
    return [SourceConfig(path=str(DEFAULT_CORPUS_DIR))]


def source_name(src: SourceConfig, index: int) -> str:
    """How errors and the manifest name a source: ``data.sources[i].path='...'``."""
    key, value = ("path", src.path) if src.path is not None else ("hf_dataset", src.hf_dataset)
    if src.task is not None:
        key, value = "task", src.task
    return f"data.sources[{index}].{key}={value!r}"


def resolve_files(src: SourceConfig, index: int) -> list[Path]:
    """The files a ``path`` source names, sorted; an error when there are none."""
    name = source_name(src, index)
    pattern = str(Path(src.path).expanduser())
    if any(c in pattern for c in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
        files = [p for p in matches if p.suffix in SUFFIXES]
        if not files:
            raise DataError(f"{name}: the glob matches no {'/'.join(SUFFIXES)} file")
        return files
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{name}: the directory holds no {'/'.join(SUFFIXES)} file")
        return files
    if not path.is_file():
        raise DataError(f"{name}: no such file or directory")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{name}: unsupported file type {path.suffix!r} (expected one of {', '.join(SUFFIXES)})")
    return [path]


def check_source(src: SourceConfig, index: int) -> None:
    """Refuse a source that cannot be read, before any work: missing files, synthetic tasks."""
    if src.task is not None:
        raise DataError(f"{source_name(src, index)}: synthetic tasks are generated at train time, not prepared")
    if src.path is not None:
        resolve_files(src, index)


def iter_documents(src: SourceConfig, index: int) -> Iterator[str]:
    """Every non-empty document of one source, in a fixed order; an error if there is none."""
    count = 0
    docs = _iter_hf(src, index) if src.hf_dataset is not None else _iter_files(src, index)
    for text in docs:
        if text.strip():
            count += 1
            yield text
    if count == 0:
        raise DataError(f"{source_name(src, index)}: no documents (empty corpus)")


def _iter_files(src: SourceConfig, index: int) -> Iterator[str]:
    for path in resolve_files(src, index):
        if path.suffix == ".txt":
            yield from read_txt(path)
        elif path.suffix == ".parquet":
            yield from read_parquet(path, src.text_field)
        else:
            yield from read_json(path, src.text_field)


def read_txt(path: Path) -> Iterator[str]:
    """Paragraphs of a UTF-8 text file, each without its final line break."""
    paragraph: list[str] = []
    for line in decoded_lines(path):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph).rstrip("\r\n")
            paragraph = []
    if paragraph:
        yield "".join(paragraph).rstrip("\r\n")


def read_json(path: Path, field: str) -> Iterator[str]:
    """Records of a JSON-lines file, or of a ``.json`` file holding one array of records."""
    if path.suffix == ".json":
        head = path.open("rb").read(64).lstrip()
        if head.startswith(b"["):
            text = "".join(decoded_lines(path))
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
            for i, record in enumerate(records):
                yield _field(record, field, f"{path}: record {i}")
            return
    for lineno, line in enumerate(decoded_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        yield _field(record, field, f"{path}:{lineno}")


def read_parquet(path: Path, field: str) -> Iterator[str]:
    """The ``field`` column of a parquet file, one document per row."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    columns = pf.schema_arrow.names
    if field not in columns:
        raise DataError(f"{path}: no column {field!r} (text_field); columns: {', '.join(columns)}")
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for i, text in enumerate(batch.column(0).to_pylist()):
            if not isinstance(text, str | None):
                raise DataError(f"{path}: column {field!r} holds {type(text).__name__} at row {i}, not text")
            yield text or ""


def _iter_hf(src: SourceConfig, index: int) -> Iterator[str]:
    import datasets

    name = source_name(src, index)
    try:
        ds = datasets.load_dataset(src.hf_dataset, src.subset, split=src.split, streaming=True)
    except Exception as e:  # hub, network, builder and split errors all mean "cannot read this source"
        raise DataError(f"{name}: cannot load ({type(e).__name__}: {_first_line(e)})") from None
    columns = list(ds.features) if ds.features is not None else None
    if columns is not None and src.text_field not in columns:
        raise DataError(f"{name}: no field {src.text_field!r} (text_field); fields: {', '.join(columns)}")
    for i, record in enumerate(ds):
        yield _field(record, src.text_field, f"{name}: record {i}")


def _field(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with field {field!r}, got {type(record).__name__}")
    if field not in record:
        raise DataError(f"{where}: no field {field!r} (text_field); fields: {', '.join(map(str, record))}")
    text = record[field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} holds {type(text).__name__}, not text")
    return text


def decoded_lines(path: Path) -> Iterator[str]:
    """Lines of a UTF-8 file; undecodable bytes are an error naming the byte offset."""
    offset = 0
    with path.open("rb") as f:
        for raw in f:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not valid UTF-8 at byte offset {offset + e.start}") from None
            offset += len(raw)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]
