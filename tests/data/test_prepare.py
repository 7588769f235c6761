"""prepare(): manifest, idempotence, atomicity, tokenizers, dtype, mixture weights, the default corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_corpora import make_docs, prepare_docs, write_txt
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer

import hybridlm.data.prepare as prepare_mod
from hybridlm.config import DataConfig, SourceConfig
from hybridlm.data import DataError, PackedLoader, read_manifest
from hybridlm.data.prepare import prepare, run_prepare, verify_tokenizer
from hybridlm.data.sources import DEFAULT_CORPUS_DIR


def test_manifest_matches_the_shards(prepared):
    prepared_dir, docs = prepared
    m = read_manifest(prepared_dir)
    assert m["documents"] == len(docs) and m["dtype"] == "uint16" and m["split_seed"] == 0
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(docs)
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == m["tokens"]
    for split in ("train", "val"):
        info = m["splits"][split]
        assert (prepared_dir / info["tokens_file"]).stat().st_size == 2 * info["tokens"]
        assert np.load(prepared_dir / info["offsets_file"])[-1] == info["tokens"]
    assert len(m["tokenizer_hash"]) == 64 and m["vocab_size"] <= 320
    assert m["sources"][0]["name"].startswith("data.sources[0].path=")


def test_prepared_dir_loads_with_auto_tokenizer(prepared):
    prepared_dir, _ = prepared
    tok = AutoTokenizer.from_pretrained(str(prepared_dir))
    assert tok.eos_token_id == read_manifest(prepared_dir)["eos_id"]
    assert tok.decode(tok("mamba 日本語 🙂")["input_ids"]) == "mamba 日本語 🙂"


def test_same_config_returns_existing_dir_without_work(tmp_path, monkeypatch):
    docs = make_docs(30, seed=1)
    first = prepare_docs(tmp_path, docs)
    monkeypatch.setattr(prepare_mod, "_build", lambda *a, **k: pytest.fail("rebuilt an existing prepared dir"))
    assert prepare_docs(tmp_path, docs) == first
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_changed_config_or_tokenizer_writes_a_new_dir(tmp_path):
    docs = make_docs(30, seed=1)
    a = prepare_docs(tmp_path, docs)
    b = prepare_docs(tmp_path, docs, val_fraction=0.2)
    c = prepare_docs(tmp_path, docs, tokenizer={"train": {"vocab_size": 300}})
    assert len({a, b, c}) == 3 and all((p / "manifest.json").is_file() for p in (a, b, c))


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real = prepare_mod._write_split

    def interrupted(tmp, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        real(tmp, split, *args)

    monkeypatch.setattr(prepare_mod, "_write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_docs(tmp_path, make_docs(30, seed=1))
    assert list((tmp_path / "prepared").iterdir()) == []
    monkeypatch.setattr(prepare_mod, "_write_split", real)
    assert (prepare_docs(tmp_path, make_docs(30, seed=1)) / "manifest.json").is_file()


def test_prepared_dir_from_another_tokenizer_is_refused(tmp_path):
    docs = make_docs(30, seed=1)
    out = str(tmp_path / "fixed")
    made = prepare_docs(tmp_path, docs, prepared_dir=out)
    with pytest.raises(DataError, match=r"fixed was prepared with tokenizer .*vocab_size.*300"):
        prepare_docs(tmp_path, docs, prepared_dir=out, tokenizer={"train": {"vocab_size": 300}})
    other = prepare_docs(tmp_path / "other", make_docs(30, seed=2))  # another corpus, so another BPE
    with pytest.raises(DataError, match="another tokenizer"):
        verify_tokenizer(made, str(other / "tokenizer.json"))
    verify_tokenizer(made, str(made))  # its own tokenizer passes


def test_local_tokenizer_file_and_directory_give_the_same_tokens(tmp_path):
    docs = make_docs(40, seed=4)
    trained = prepare_docs(tmp_path / "a", docs)
    from_file = prepare_docs(tmp_path / "b", docs, tokenizer=str(trained / "tokenizer.json"))
    from_dir = prepare_docs(tmp_path / "c", docs, tokenizer=str(trained))
    hashes = {read_manifest(p)["tokenizer_hash"] for p in (trained, from_file, from_dir)}
    assert len(hashes) == 1
    assert (trained / "train.bin").read_bytes() == (from_file / "train.bin").read_bytes()
    assert (trained / "train.bin").read_bytes() == (from_dir / "train.bin").read_bytes()


def test_vocab_too_large_for_dtype_is_refused_before_work(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)} | {"<|endoftext|>": 70_000, "[UNK]": 70_001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    src = write_txt(tmp_path / "corpus.txt", ["w1 w2 w69999", "w3 w4"])
    cfg = DataConfig(sources=[SourceConfig(path=str(src))], tokenizer=str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="vocab size 70002 does not fit token dtype uint16"):
        prepare(cfg, root=tmp_path / "prepared", dtype="uint16")
    assert not (tmp_path / "prepared").exists()
    out = prepare(cfg, root=tmp_path / "prepared")  # auto picks uint32
    assert read_manifest(out)["dtype"] == "uint32"
    tokens = np.concatenate([np.fromfile(out / f"{s}.bin", dtype=np.uint32) for s in ("train", "val")])
    assert sorted(tokens) == [1, 2, 3, 4, 69_999, 70_000, 70_000]


def test_tokenizer_spec_is_validated(tmp_path):
    with pytest.raises(DataError, match="vocab_size=100"):
        prepare_docs(tmp_path, make_docs(5, seed=0), tokenizer={"train": {"vocab_size": 100}})
    with pytest.raises(DataError, match="must be a path or"):
        prepare_docs(tmp_path, make_docs(5, seed=0), tokenizer={"bpe": 3})
    with pytest.raises(DataError, match="no such file"):
        prepare_docs(tmp_path, make_docs(5, seed=0), tokenizer=str(tmp_path / "missing"))


def test_mixture_weights_hold_in_the_loader_stream(tmp_path):
    big = write_txt(tmp_path / "big.txt", make_docs(400, seed=5, prefix="big"))
    small = write_txt(tmp_path / "small.txt", make_docs(60, seed=6, prefix="small"))
    cfg = DataConfig(
        sources=[SourceConfig(path=str(big), weight=1.0), SourceConfig(path=str(small), weight=3.0)],
        tokenizer={"train": {"vocab_size": 300}},
    )
    out = prepare(cfg, root=tmp_path / "prepared")
    doc_source = np.load(out / "train_sources.npy")
    loader = PackedLoader(out, "train", 64, 8)
    counts = np.zeros(2)
    for _ in range(loader.num_rows // 8):
        batch = loader.next_batch()
        docs = batch["doc_ids"][:, 1:][batch["labels"][:, 1:] != -100].numpy()
        counts += np.bincount(doc_source[docs], minlength=2)
    assert counts[1] / counts.sum() == pytest.approx(0.75, abs=0.03)
    shares = [s["stream_share"] for s in read_manifest(out)["sources"]]
    assert shares == pytest.approx([0.25, 0.75], abs=0.01)


def test_run_prepare_reads_the_data_section_of_a_run_config(tmp_path, monkeypatch):
    src = write_txt(tmp_path / "corpus.txt", make_docs(20, seed=0))
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  sources: [{{path: {src}}}]\n  tokenizer: {{train: {{vocab_size: 300}}}}\n")
    monkeypatch.chdir(tmp_path)
    out = run_prepare(str(config), ["data.val_fraction=0.25"])
    assert out.parent == tmp_path / "data" / "prepared"
    assert read_manifest(out)["splits"]["val"]["documents"] == 5


def test_default_corpus_is_real_text_that_prepares(tmp_path):
    files = sorted(DEFAULT_CORPUS_DIR.glob("*.txt"))
    assert 100_000 < sum(p.stat().st_size for p in files) <= 2_000_000
    out = prepare(DataConfig(val_fraction=0.02), root=tmp_path)
    m = read_manifest(out)
    assert m["documents"] > 1000 and m["splits"]["val"]["documents"] > 20
    assert m["vocab_size"] == 2048  # the default trained BPE
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"


def test_tokenizing_in_several_processes_gives_the_same_shards(tmp_path, monkeypatch):
    docs = make_docs(60, seed=8)
    one = prepare_docs(tmp_path / "one", docs, num_proc=1)
    monkeypatch.setattr(prepare_mod, "TINY_CORPUS_BYTES", 0)  # take the datasets.map(num_proc=2) path
    two = prepare_docs(tmp_path / "two", docs, num_proc=2, tokenizer=str(one))
    assert (one / "train.bin").read_bytes() == (two / "train.bin").read_bytes()
    assert (one / "val.bin").read_bytes() == (two / "val.bin").read_bytes()
