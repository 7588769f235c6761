"""Build the embedded default corpus: the docstrings of the Python standard library.

The corpus ships in ``hybridlm/data/corpus/*.txt`` (real English technical prose, written by the
CPython developers, under the PSF license). This module is how those files were made, so they can
be rebuilt and checked: ``python -m hybridlm.data.default_corpus [OUT_DIR]``. Sources are parsed
with ``ast`` (no module is imported, so nothing runs); each docstring of a module, class or
function with enough prose becomes one document, its internal blank lines folded so that it
stays one paragraph (the ``.txt`` reader splits documents at blank lines).
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "turtledemo", "_bundled", "__phello__"}
MIN_WORDS = 12  # "Return self==value." and friends carry no language worth learning
FILE_BYTES = 200_000  # bytes per output file, roughly


def stdlib_files(stdlib: Path) -> list[Path]:
    """Public pure-Python modules of the standard library, sorted for a fixed corpus order."""
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in SKIP_DIRS or part.startswith("_") for part in rel.parts):
            continue
        files.append(path)
    return files


def docstrings(path: Path) -> Iterator[str]:
    """Docstrings of the module, its classes and functions, in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc
        children = [
            n
            for n in ast.iter_child_nodes(node)
            if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        stack.extend(reversed(children))


def as_document(doc: str) -> str | None:
    """One paragraph of prose, or None for a docstring that is too short or mostly code."""
    lines = [line.rstrip() for line in doc.splitlines() if line.strip()]
    text = "\n".join(lines)
    letters = sum(c.isalpha() or c.isspace() for c in text)
    if len(text.split()) < MIN_WORDS or letters < 0.8 * len(text):
        return None
    return text


def build(out_dir: Path = CORPUS_DIR) -> list[Path]:
    """Write the corpus files; returns them."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    files: list[list[str]] = [[]]
    for path in stdlib_files(stdlib):
        for doc in docstrings(path):
            text = as_document(doc)
            if text is None or text in seen:
                continue
            seen.add(text)
            files[-1].append(text)
            if sum(len(t.encode()) + 2 for t in files[-1]) > FILE_BYTES:
                files.append([])
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.txt"):
        old.unlink()
    written = []
    for k, docs in enumerate(d for d in files if d):
        path = out_dir / f"stdlib_docstrings_{k:02d}.txt"
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else CORPUS_DIR
    for p in build(out):
        print(p, p.stat().st_size)
