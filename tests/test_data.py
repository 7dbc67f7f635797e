"""Data pipeline: sources, tokenizers, packing invariants, sharding, checkpointed iteration."""

import collections
import json

import numpy as np
import pytest

from deepjax.data import (DOMAINS, ArrayRecordSource, ByteTokenizer, HFTokenizer, SyntheticCorpus,
                          TextFileSource, load_tokenizer, make_dataset)
from deepjax.data.packing import SplitLongDocuments

BYTE = ByteTokenizer()
VOCAB = 272   # the tiny preset's vocabulary


def _dataset(source, **kw):
  kw = {"seq_len": 128, "batch_size": 4, "seed": 0, "vocab_size": VOCAB, **kw}
  return make_dataset(source, kw.pop("tokenizer", BYTE), **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _segments(batches):
  """(tokens, domain) of every packed segment, in order."""
  out = []
  for b in batches:
    for row in range(len(b["tokens"])):
      for s in np.unique(b["segment_ids"][row]):
        if s:
          where = b["segment_ids"][row] == s
          out.append((b["tokens"][row][where], int(b["domains"][row][where][0])))
  return out


def _check_batch(b, tok=BYTE, seq_len=128):
  """Packing invariants of one batch."""
  for key in ("tokens", "segment_ids", "positions", "domains"):
    assert b[key].dtype == np.int32 and b[key].shape[1] == seq_len, key
  pad = b["segment_ids"] == 0
  assert (b["tokens"][pad] == tok.pad_id).all()
  assert (b["positions"][pad] == 0).all() and (b["domains"][pad] == -1).all()
  for row_seg, row_pos, row_tok, row_dom in zip(b["segment_ids"], b["positions"], b["tokens"],
                                                b["domains"]):
    used = row_seg[row_seg > 0]
    # Segments are 1, 2, 3, ... in order, each contiguous, padding only at the end.
    assert (np.diff(row_seg[: len(used)]) >= 0).all() and (row_seg[len(used):] == 0).all()
    ids = np.unique(used)
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    for s in np.unique(used):
      where = row_seg == s
      np.testing.assert_array_equal(row_pos[where], np.arange(where.sum()))
      assert len(np.unique(row_dom[where])) == 1
      inner = row_tok[where][1:-1]
      assert not np.isin(inner, [tok.bos_id, tok.pad_id]).any()


# ---------------------------------------------------------------------------------------------
# Synthetic corpus


def test_synthetic_corpus_is_a_pure_function_of_seed_split_index():
  a, b = SyntheticCorpus(seed=3), SyntheticCorpus(seed=3)
  assert len(a) == 10**7 and len(SyntheticCorpus("eval")) == 10**4
  assert [b[i] for i in (7, 123456, 0)] == [a[i] for i in (7, 123456, 0)]   # any order
  assert a[9_999_999]["text"]
  assert [a[i] for i in range(20)] != [SyntheticCorpus(seed=4)[i] for i in range(20)]
  with pytest.raises(IndexError):
    a[10**7]
  with pytest.raises(ValueError, match="split"):
    SyntheticCorpus("test")


def test_every_domain_appears_with_its_own_alphabet():
  corpus = SyntheticCorpus()
  by_domain = collections.defaultdict(set)
  for i in range(300):
    doc = corpus[i]
    by_domain[doc["domain"]].update(doc["text"])
  assert sorted(by_domain) == list(range(len(DOMAINS)))
  name = {d: by_domain[DOMAINS.index(d)] for d in DOMAINS}
  assert name["arithmetic"] <= set("0123456789+-*=\n")
  assert name["brackets"] <= set("()[]{}<>\n")
  assert ">" in name["copy"] and "|" in name["reverse"] and "?" in name["kv_recall"]
  assert name["english"] <= set("abcdefghijklmnopqrstuvwxyzTM .")


def test_eval_split_is_disjoint_from_train():
  train = {SyntheticCorpus("train")[i]["text"] for i in range(300)}
  evals = {SyntheticCorpus("eval")[i]["text"] for i in range(300)}
  assert len(train) == len(evals) == 300 and not train & evals


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trips_unicode():
  text = "héllo wörld ☃ 𝄞 日本語\n"
  ids = BYTE.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len(text.encode())
  assert BYTE.decode([BYTE.bos_id, *ids, BYTE.eos_id, BYTE.pad_id]) == text
  assert BYTE.decode([0xE2, 0x98]) == "\ufffd"   # truncated UTF-8 is replaced, not raised
  assert (BYTE.vocab_size, BYTE.bos_id, BYTE.eos_id, BYTE.pad_id) == (259, 256, 257, 258)
  assert isinstance(load_tokenizer("byte"), ByteTokenizer)


@pytest.fixture
def hf_tokenizer_file(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the cat sat on the mat", "the dog ate the cat"] * 5, trainer)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  return path


def test_hf_tokenizer_round_trip_and_specials(hf_tokenizer_file):
  tok = load_tokenizer(hf_tokenizer_file.parent)   # a directory holding tokenizer.json
  assert isinstance(tok, HFTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  text = "the cat ate the mat, héllo ☃"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
  assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
  assert HFTokenizer(hf_tokenizer_file, bos="</s>", pad=0).bos_id == 2
  with pytest.raises(ValueError, match="not in the vocabulary"):
    HFTokenizer(hf_tokenizer_file, bos="<nope>")
  with pytest.raises(FileNotFoundError):
    load_tokenizer(hf_tokenizer_file.parent / "missing.json")
  batch = next(_dataset(SyntheticCorpus(num_docs=50), tokenizer=tok, vocab_size=tok.vocab_size))
  _check_batch(batch, tok)


def test_out_of_vocabulary_tokenizer_is_rejected(hf_tokenizer_file):
  with pytest.raises(ValueError, match=r"259.*vocab_size=200"):
    _dataset(SyntheticCorpus(), vocab_size=200)
  tok = HFTokenizer(hf_tokenizer_file)
  with pytest.raises(ValueError, match=f"{tok.vocab_size} ids.*vocab_size=259"):
    _dataset(SyntheticCorpus(), tokenizer=tok, vocab_size=259)


# ---------------------------------------------------------------------------------------------
# Packing and targets


def test_batches_are_deterministic_for_a_seed():
  first = _take(_dataset(SyntheticCorpus()), 3)
  again = _take(_dataset(SyntheticCorpus()), 3)
  other = _take(_dataset(SyntheticCorpus(), seed=1), 3)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not all(np.array_equal(a["tokens"], c["tokens"]) for a, c in zip(first, other))
  for b in first:
    _check_batch(b)


def test_one_epoch_packs_every_document_once_in_its_own_segment():
  corpus = SyntheticCorpus(num_docs=40)
  batches = list(_dataset(corpus, seq_len=512, num_epochs=1))
  assert len({b["tokens"].shape for b in batches}) == 1   # the short last batch is padded
  for b in batches:
    _check_batch(b, seq_len=512)
  segments = _segments(batches)
  for tokens, _ in segments:
    assert tokens[0] == BYTE.bos_id and tokens[-1] == BYTE.eos_id
  packed = sorted((BYTE.decode(t), d) for t, d in segments)
  assert packed == sorted((corpus[i]["text"], corpus[i]["domain"]) for i in range(40))


def test_long_documents_are_split_into_seq_len_pieces():
  pieces = SplitLongDocuments(4).flat_map({"tokens": np.arange(10), "domains": np.zeros(10)})
  assert [p["tokens"].tolist() for p in pieces] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  corpus = SyntheticCorpus(num_docs=12)
  batches = list(_dataset(corpus, seq_len=16, num_epochs=1))
  for b in batches:
    _check_batch(b, seq_len=16)
  lengths = [len(corpus[i]["text"].encode()) + 2 for i in range(12)]
  segments = _segments(batches)
  assert len(segments) == sum(-(-n // 16) for n in lengths)
  assert sum(len(t) for t, _ in segments) == sum(lengths)
  assert sum(t[0] == BYTE.bos_id for t, _ in segments) == 12


# ---------------------------------------------------------------------------------------------
# Sharding and checkpointing


def test_processes_read_disjoint_shards_that_cover_the_source():
  corpus = SyntheticCorpus(num_docs=30)
  kw = {"seq_len": 512, "batch_size": 4, "num_epochs": 1}
  texts = lambda batches: [BYTE.decode(t) for t, _ in _segments(batches)]  # noqa: E731
  single = texts(list(_dataset(corpus, **kw)))
  shards = [texts(list(_dataset(corpus, process_index=p, process_count=2, **kw)))
            for p in range(2)]
  assert next(_dataset(corpus, process_index=1, process_count=2, **kw))["tokens"].shape[0] == 2
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(single) and len(single) == 30
  with pytest.raises(ValueError, match="divisible"):
    _dataset(corpus, batch_size=3, process_count=2)


@pytest.mark.parametrize("taken", [1, 6])
def test_iterator_state_round_trips_through_json(taken):
  # An epoch of 25 documents is ~8 batches, so the 5 batches after 6 cross an epoch boundary.
  make = lambda: _dataset(SyntheticCorpus(num_docs=25), seq_len=64)  # noqa: E731
  it = make()
  _take(it, taken)
  state = json.dumps(it.get_state())
  expected = _take(it, 5)
  restored = make()
  restored.set_state(json.loads(state))
  for a, b in zip(expected, _take(restored, 5)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


# ---------------------------------------------------------------------------------------------
# File sources


def test_text_file_source(tmp_path):
  (tmp_path / "b.txt").write_text("second file\n\nmore ☃\n")
  (tmp_path / "a.txt").write_text("first file")
  files = TextFileSource(str(tmp_path / "*.txt"))
  assert len(files) == 2 and files[0]["text"] == "first file" and files[1]["domain"] == -1
  lines = TextFileSource([tmp_path / "b.txt", tmp_path / "a.txt"], lines=True)
  assert [lines[i]["text"] for i in range(len(lines))] == ["second file", "more ☃", "first file"]
  assert lines[1]["origin"].endswith("b.txt:3")
  batches = list(_dataset(lines, num_epochs=1))
  assert sorted(BYTE.decode(t) for t, _ in _segments(batches)) == ["first file", "more ☃",
                                                                     "second file"]
  assert (batches[0]["domains"] == -1).all()
  with pytest.raises(FileNotFoundError, match="no files match"):
    TextFileSource(str(tmp_path / "*.json"))
  (tmp_path / "bad.txt").write_bytes(b"\xff\xfe broken")
  with pytest.raises(ValueError, match="bad.txt.*UTF-8"):
    TextFileSource(str(tmp_path / "bad.txt"))[0]


def _write_array_record(path, records):
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()


def test_array_record_source_text_and_pretokenized(tmp_path):
  pytest.importorskip("array_record")
  _write_array_record(tmp_path / "text.arrayrecord", ["héllo".encode(), b"world"])
  text = ArrayRecordSource(str(tmp_path / "text.arrayrecord"))
  assert [text[i]["text"] for i in range(len(text))] == ["héllo", "world"]

  docs = [[5, 6, 7], [100, 200], [1]]
  for n, chunk in enumerate((docs[:2], docs[2:])):
    _write_array_record(tmp_path / f"ids-{n}.arrayrecord",
                        [np.asarray(d, "<i4").tobytes() for d in chunk])
  ids = ArrayRecordSource(str(tmp_path / "ids-*.arrayrecord"), pretokenized=True)
  assert [ids[i]["tokens"].tolist() for i in range(3)] == docs
  assert ids[2]["origin"].endswith("ids-1.arrayrecord record 0")
  packed = sorted(t.tolist() for t, _ in _segments(list(_dataset(ids, num_epochs=1))))
  assert packed == sorted([BYTE.bos_id, *d, BYTE.eos_id] for d in docs)

  (tmp_path / "junk.arrayrecord").write_bytes(b"not an array record")
  with pytest.raises(ValueError, match="junk.arrayrecord"):
    ArrayRecordSource(str(tmp_path / "junk.arrayrecord"))


def test_pretokenized_ids_outside_the_vocabulary_are_rejected(tmp_path):
  pytest.importorskip("array_record")
  _write_array_record(tmp_path / "oov.arrayrecord",
                      [np.asarray(d, "<i4").tobytes() for d in ([1, 2], [3, 300, 4])])
  it = _dataset(ArrayRecordSource(str(tmp_path / "oov.arrayrecord"), pretokenized=True),
                shuffle=False)
  with pytest.raises(ValueError, match=r"token id 300 from .*oov.arrayrecord record 1.*272"):
    next(it)
