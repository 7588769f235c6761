"""Instruction data: loss mask on exactly the response tokens, packing of whole examples, overlong
examples counted, chat templates, the prepared dir's identity, and every bad input's error."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from finetune_data import EOS, prepare_examples, reverse_examples, write_jsonl

from hybridlm.config import DataConfig, SourceConfig
from hybridlm.data import DataError, PackedLoader, load_tokenizer, read_manifest
from hybridlm.data.instruct import DEFAULT_CHAT_TEMPLATE, check_vocab
from hybridlm.data.prepare import prepare, run_prepare
from hybridlm.data.tokenizer import train_bpe

USER, ASSISTANT = "<|user|>\n", "<|assistant|>\n"


def all_rows(prepared, seq_len: int) -> list[dict[str, np.ndarray]]:
    """Every packed row of the train split once, in stored order."""
    loader = PackedLoader(prepared, "train", seq_len, 1, shuffle=False)
    return [{k: v[0].numpy() for k, v in loader.next_batch().items()} for _ in range(loader.num_rows)]


def per_document(rows: list[dict[str, np.ndarray]]) -> dict[int, dict[str, np.ndarray]]:
    """Tokens and labels of each document id, asserting that no document spans two rows."""
    docs = {}
    for row in rows:
        for d in np.unique(row["doc_ids"][row["doc_ids"] >= 0]):
            assert d not in docs, f"document {d} is split across rows"
            sel = row["doc_ids"] == d
            assert np.all(np.diff(np.flatnonzero(sel)) == 1), "a document's tokens are not contiguous"
            docs[int(d)] = {"input_ids": row["input_ids"][sel], "labels": row["labels"][sel]}
    return docs


def n_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def test_mask_covers_exactly_the_response_tokens_and_survives_packing(tmp_path):
    records = reverse_examples(40)
    prepared = prepare_examples(tmp_path, records, seq_len=64)
    tok = load_tokenizer(prepared)
    m = read_manifest(prepared)
    expected = [n_tokens(tok, r["response"]) + 1 for r in records]  # + the EOS that ends the answer
    assert m["instruct"]["response_tokens"] == m["splits"]["train"]["response_tokens"] == sum(expected)

    rows = all_rows(prepared, 64)
    assert len(rows) < len(records)  # several examples share a row
    docs = per_document(rows)
    assert sorted(docs) == list(range(len(records)))
    for d, record in enumerate(records):
        labels = docs[d]["labels"]
        assert (labels != -100).sum() == expected[d]
        assert tok.decode(labels[labels != -100]) == record["response"] + EOS
        assert tok.decode(docs[d]["input_ids"]) == f"{USER}{record['prompt']}\n{ASSISTANT}{record['response']}{EOS}"
    for row in rows:  # padding: never a target, its own document id
        pad = row["doc_ids"] == -1
        assert np.all(row["labels"][pad] == -100) and np.all(row["input_ids"][pad] == m["eos_id"])


def test_messages_mask_every_assistant_turn_and_nothing_else(tmp_path):
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Reverse: a b"},
        {"role": "assistant", "content": "b a"},
        {"role": "user", "content": "Reverse: stone river cloud"},
        {"role": "assistant", "content": "cloud river stone"},
    ]
    prepared = prepare_examples(tmp_path, [{"messages": conversation}], seq_len=256)
    tok = load_tokenizer(prepared)
    (doc,) = per_document(all_rows(prepared, 256)).values()
    labels = doc["labels"]
    assert (labels != -100).sum() == n_tokens(tok, "b a") + n_tokens(tok, "cloud river stone") + 2
    assert tok.decode(labels[labels != -100]) == f"b a{EOS}cloud river stone{EOS}"
    assert tok.decode(doc["input_ids"]).startswith("<|system|>\nAnswer briefly.\n<|user|>\nReverse: a b\n")


def test_tokenizer_chat_template_is_used_and_saved(tmp_path, tiny_config):
    tok = train_bpe(["### user: hello world reverse these words ### assistant: words"] * 20, 300)
    tok.chat_template = (
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}### assistant: {% endif %}"
    )
    tok.save_pretrained(str(tmp_path / "tok"))
    records = [{"prompt": "hello world", "response": "world hello"}]
    prepared = prepare_examples(tmp_path, records, tokenizer=str(tmp_path / "tok"))
    assert read_manifest(prepared)["instruct"]["chat_template"] == "tokenizer"
    assert load_tokenizer(prepared).chat_template == tok.chat_template
    (doc,) = per_document(all_rows(prepared, 64)).values()
    # the template's own end of turn (EOS, newline) is the answer's; no second EOS is appended
    assert tok.decode(doc["labels"][doc["labels"] != -100]) == f"world hello{EOS}\n"
    # the prepared copy of a checkpoint's tokenizer passes the checkpoint's vocabulary check
    check_vocab(tiny_config(vocab_size=len(tok)), load_tokenizer(prepared), tmp_path / "tok")


def test_data_chat_template_wins_over_the_tokenizers(tmp_path):
    tok = train_bpe(["hello world reverse these words"] * 20, 300)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(str(tmp_path / "tok"))
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    records = [{"prompt": "hello world", "response": "world hello"}]
    prepared = prepare_examples(tmp_path, records, tokenizer=str(tmp_path / "tok"), chat_template=template)
    assert read_manifest(prepared)["instruct"]["chat_template"] == "data.chat_template"
    (doc,) = per_document(all_rows(prepared, 64)).values()
    assert tok.decode(doc["input_ids"]) == f"[user] hello world\n[assistant] world hello\n{EOS}"
    assert tok.decode(doc["labels"][doc["labels"] != -100]) == f"world hello\n{EOS}"  # EOS appended: it stops


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("x", "renders none of the assistant text"),
        ("{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}", "not render .* as a prefix"),
        ("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}", "the chat template cannot render"),
    ],
)
def test_unusable_chat_template_is_an_error_naming_the_example(tmp_path, template, message):
    with pytest.raises(DataError, match=f"sft.jsonl:1: .*{message}"):
        prepare_examples(tmp_path, reverse_examples(2), chat_template=template)


def test_default_template_is_saved_with_a_trained_tokenizer(tmp_path):
    prepared = prepare_examples(tmp_path, reverse_examples(3))
    assert read_manifest(prepared)["instruct"]["chat_template"] == "default"
    tok = load_tokenizer(prepared)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{USER}hi\n{ASSISTANT}"


def lengths_of(tok, records) -> tuple[list[int], list[int]]:
    """Full token length of each example (default template) and the length of its prompt part."""
    prompt = [n_tokens(tok, f"{USER}{r['prompt']}\n{ASSISTANT}") for r in records]
    full = [p + n_tokens(tok, r["response"]) + 1 for p, r in zip(prompt, records, strict=True)]
    return full, prompt


def overlong_records() -> list[dict]:
    words = "apple river stone cloud green music paper light house water".split()
    records = [
        {"prompt": "Reverse: " + " ".join(words[: 1 + i % 9]), "response": " ".join((words * 3)[: 1 + (i * 7) % 25])}
        for i in range(24)
    ]
    records.append({"prompt": "Reverse: " + " ".join(words * 6), "response": "apple"})  # the prompt alone overflows
    return records


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path, caplog, policy):
    seq_len = 48
    records = overlong_records()
    with caplog.at_level(logging.WARNING, logger="hybridlm.data"):
        prepared = prepare_examples(tmp_path, records, seq_len=seq_len, overlong=policy)
    tok = load_tokenizer(prepared)
    full, prompt = lengths_of(tok, records)
    too_long = [n > seq_len for n in full]
    if policy == "truncate":
        want_truncated = sum(n > seq_len and p < seq_len for n, p in zip(full, prompt, strict=True))
    else:
        want_truncated = 0
    want_dropped = sum(too_long) - want_truncated
    assert want_dropped > 0 and sum(too_long) < len(records) and (want_truncated > 0) == (policy == "truncate")
    m = read_manifest(prepared)
    assert m["instruct"]["overlong"] == {
        "policy": policy,
        "seq_len": seq_len,
        "truncated": want_truncated,
        "dropped": want_dropped,
    }
    assert m["documents"] == len(records) - want_dropped
    assert f"{want_truncated} truncated" in caplog.text and f"{want_dropped} dropped" in caplog.text

    docs = per_document(all_rows(prepared, seq_len))
    kept = [i for i, n in enumerate(full) if n <= seq_len or (policy == "truncate" and prompt[i] < seq_len)]
    assert len(docs) == len(kept)
    for d, i in enumerate(kept):
        ids = docs[d]["input_ids"]
        assert len(ids) == min(full[i], seq_len)
        assert (ids[-1] == m["eos_id"]) == (full[i] <= seq_len)  # a cut answer does not end in EOS


def test_prepared_dir_depends_on_seq_len_for_instruct_data_only(tmp_path):
    records = reverse_examples(5)
    a = prepare_examples(tmp_path, records, seq_len=64)
    b = prepare_examples(tmp_path, records, seq_len=128)
    assert a != b and read_manifest(b)["seq_len"] == 128
    write_jsonl(tmp_path / "text.jsonl", [{"text": "plain text document number one"}, {"text": "and two"}])
    text_cfg = DataConfig(sources=[SourceConfig(path=str(tmp_path / "text.jsonl"))], tokenizer=str(a))
    t1 = prepare(text_cfg, root=tmp_path / "prepared", seq_len=64)
    assert prepare(text_cfg, root=tmp_path / "prepared", seq_len=128) == t1
    assert read_manifest(t1)["kind"] == "text" and "seq_len" not in read_manifest(t1)


def test_hybridlm_prepare_packs_instruct_data_at_the_configs_train_seq_len(tmp_path):
    src = write_jsonl(tmp_path / "sft.jsonl", reverse_examples(4))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data:\n  sources: [{{path: {src}, format: instruct}}]\n  tokenizer: {{train: {{vocab_size: 300}}}}\n"
        f"  prepared_dir: {tmp_path / 'prepared'}\ntrain:\n  seq_len: 512\n"
    )
    assert read_manifest(run_prepare(str(config), []))["seq_len"] == 512


def test_loader_refuses_another_seq_len_than_prepared(tmp_path):
    prepared = prepare_examples(tmp_path, reverse_examples(5), seq_len=64)
    with pytest.raises(DataError, match="packed into rows of 64 tokens, not seq_len=128"):
        PackedLoader(prepared, "train", 128, 1)


BAD_LINES = [
    ("[1, 2]", "sft.jsonl:2: expected a JSON object, got list"),
    ('{"prompt": "x"}', "sft.jsonl:2: expected fields 'prompt' and 'response', or 'messages'; fields: prompt"),
    ('{"prompt": "x", "response": "  "}', "sft.jsonl:2: empty response"),
    ('{"prompt": "x", "response": 3}', "sft.jsonl:2: field 'response' holds int, not text"),
    ('{"messages": []}', "sft.jsonl:2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "sft.jsonl:2: messages\\[0\\].role='bot' must be one of"),
    ('{"messages": [{"role": "user"}]}', "sft.jsonl:2: messages\\[0\\] must be an object with 'role' and 'content'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "sft.jsonl:2: no assistant message"),
    (
        '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}',
        "sft.jsonl:2: messages\\[1\\] is an empty assistant response",
    ),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "sft.jsonl:2: messages\\[0\\] is an assistant turn"),
    ('{"prompt": "x", "response": ', "sft.jsonl:2: invalid JSON"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES, ids=[m.split(": ", 1)[1][:30] for _, m in BAD_LINES])
def test_bad_example_is_a_one_line_error_naming_file_and_line(tmp_path, line, message):
    good = json.dumps({"prompt": "a b", "response": "b a"})
    (tmp_path / "sft.jsonl").write_text(f"{good}\n{line}\n{good}\n", encoding="utf-8")
    cfg = DataConfig(sources=[SourceConfig(path=str(tmp_path / "sft.jsonl"), format="instruct")])
    with pytest.raises(DataError, match=message) as e:
        prepare(cfg, root=tmp_path / "prepared", seq_len=64)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


def test_bad_instruct_configs_are_refused_before_reading(tmp_path):
    jsonl = write_jsonl(tmp_path / "sft.jsonl", reverse_examples(2))
    txt = tmp_path / "notes.txt"
    txt.write_text("some text\n")
    instruct = SourceConfig(path=str(jsonl), format="instruct")
    with pytest.raises(DataError, match="packed into rows of train.seq_len tokens when prepared: seq_len=None"):
        prepare(DataConfig(sources=[instruct]), root=tmp_path / "p")
    with pytest.raises(DataError, match="mixes format: text and format: instruct"):
        prepare(DataConfig(sources=[instruct, SourceConfig(path=str(txt))]), root=tmp_path / "p", seq_len=64)
    with pytest.raises(DataError, match="format: instruct reads .jsonl/.json files, not notes.txt"):
        prepare(DataConfig(sources=[SourceConfig(path=str(txt), format="instruct")]), root=tmp_path / "p", seq_len=64)


def test_check_vocab_refuses_a_checkpoint_that_cannot_read_the_tokenizer(tmp_path, tiny_config):
    make_tiny_config = tiny_config
    prepared = prepare_examples(tmp_path, reverse_examples(3))
    tok = load_tokenizer(prepared)
    check_vocab(make_tiny_config(vocab_size=len(tok)), tok)
    check_vocab(make_tiny_config(vocab_size=len(tok) + 40), tok)  # padded HF-style vocab: fine
    with pytest.raises(DataError, match=f"model.vocab_size=61 but the tokenizer has {len(tok)} tokens"):
        check_vocab(make_tiny_config(vocab_size=61), tok)
    other = train_bpe(["entirely different words for another tokenizer"] * 10, 300)
    other.save_pretrained(str(tmp_path / "ckpt"))
    with pytest.raises(DataError, match="saved with another tokenizer"):
        check_vocab(make_tiny_config(vocab_size=len(tok)), tok, tmp_path / "ckpt")
    tok.save_pretrained(str(tmp_path / "same"))
    check_vocab(make_tiny_config(vocab_size=len(tok)), tok, tmp_path / "same")
