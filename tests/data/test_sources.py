"""Reading sources: file formats, globs and directories, and one clear error per kind of bad input."""

from __future__ import annotations

import json

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_corpora import write_txt

from hybridlm.config import DataConfig, SourceConfig
from hybridlm.data import DataError
from hybridlm.data.prepare import prepare
from hybridlm.data.sources import iter_documents


def docs_of(**source) -> list[str]:
    return list(iter_documents(SourceConfig(**source), 0))


def test_txt_holds_one_document_per_paragraph(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsame doc\n\n\n  second doc  \n \t\nthird\r\nwith crlf\r\n\r\n")
    assert docs_of(path=str(path)) == ["first line\nsame doc", "  second doc  ", "third\r\nwith crlf"]


def test_json_jsonl_parquet_directory_and_glob(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"body": "one"}\n\n{"body": "two", "x": 1}\n')
    (tmp_path / "d" / "b.json").write_text(json.dumps([{"body": "three"}, {"body": "four"}]))
    pq.write_table(pa.table({"body": ["five", "six"]}), tmp_path / "d" / "c.parquet")
    (tmp_path / "d" / "skip.md").write_text("not a corpus file")
    assert docs_of(path=str(tmp_path / "d"), text_field="body") == ["one", "two", "three", "four", "five", "six"]
    assert docs_of(path=str(tmp_path / "d" / "*.js*"), text_field="body") == ["one", "two", "three", "four"]


def test_hf_dataset_reads_what_load_dataset_accepts(tmp_path):
    (tmp_path / "part.jsonl").write_text('{"text": "from the hub api"}\n{"text": "second"}\n')
    assert docs_of(hf_dataset=str(tmp_path)) == ["from the hub api", "second"]
    with pytest.raises(DataError, match=r"data.sources\[0\].hf_dataset=.*no field 'content'.*fields: text"):
        docs_of(hf_dataset=str(tmp_path), text_field="content")


def test_unreachable_hf_dataset_names_the_source(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"data.sources\[0\].hf_dataset='nobody/nothing': cannot load"):
        docs_of(hf_dataset="nobody/nothing")


def test_missing_file_glob_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"data.sources\[0\].path=.*missing.txt.*no such file"):
        docs_of(path=str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="the glob matches no"):
        docs_of(path=str(tmp_path / "*.jsonl"))
    with pytest.raises(DataError, match="the directory holds no"):
        docs_of(path=str(tmp_path))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        docs_of(path=str(tmp_path / "x.csv"))


def test_empty_corpus(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(DataError, match=r"data.sources\[0\].path=.*blank.txt.*no documents"):
        docs_of(path=str(tmp_path / "blank.txt"))


def test_undecodable_bytes_name_the_file_and_byte_offset(tmp_path):
    good = "fine ü\nstill fine\nok ".encode()
    (tmp_path / "bad.txt").write_bytes(good + b"\xff\xfe no")
    with pytest.raises(DataError, match=rf"bad.txt: not valid UTF-8 at byte offset {len(good)}$"):
        docs_of(path=str(tmp_path / "bad.txt"))


def test_missing_json_field_names_file_line_and_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: no field 'text' \(text_field\); fields: body"):
        docs_of(path=str(tmp_path / "a.jsonl"))
    (tmp_path / "b.json").write_text(json.dumps([{"text": "ok"}, {"txt": "x"}]))
    with pytest.raises(DataError, match=r"b.json: record 1: no field 'text'"):
        docs_of(path=str(tmp_path / "b.json"))
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"c.jsonl:2: invalid JSON"):
        docs_of(path=str(tmp_path / "c.jsonl"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet: no column 'text'.*columns: body"):
        docs_of(path=str(tmp_path / "d.parquet"))


def test_errors_surface_from_prepare_and_leave_nothing_behind(tmp_path):
    good = write_txt(tmp_path / "good.txt", ["a document", "another"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    cfg = DataConfig(sources=[SourceConfig(path=str(good)), SourceConfig(path=str(tmp_path / "bad.jsonl"))])
    with pytest.raises(DataError, match=r"bad.jsonl:2: no field 'text'"):
        prepare(cfg, root=tmp_path / "prepared")
    assert list((tmp_path / "prepared").iterdir()) == []
    missing = DataConfig(sources=[SourceConfig(path=str(tmp_path / "nope.txt"))])
    with pytest.raises(DataError, match=r"data.sources\[0\].path=.*nope.txt.*no such file"):
        prepare(missing, root=tmp_path / "prepared2")
    assert not (tmp_path / "prepared2").exists()


def test_synthetic_task_sources_are_not_prepared(tmp_path):
    cfg = DataConfig(sources=[SourceConfig(task="mqar")])
    with pytest.raises(DataError, match=r"data.sources\[0\].task='mqar': synthetic tasks"):
        prepare(cfg, root=tmp_path)
