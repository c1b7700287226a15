"""Multi-hop QA files (HotpotQA, 2WikiMultihopQA, MuSiQue) parsed into one record type, strictly.

Every format becomes the same plain dict, so environments and evaluation code read one layout:

    {"id": str, "question": str, "answer": str, "type": str, "level": str,
     "supporting_facts": [[title, sentence_index], ...], "context": [[title, [sentence, ...]], ...],
     "source": "hotpotqa" | "2wikimultihopqa" | "musique"}

Formats (`load_records(path, format)`):
  hotpotqa         one JSON list of {_id, question, answer, type, level, supporting_facts, context}; context items
                   are [title, [sentence, ...]]. Its unlabelled test file (no answer) is rejected: answer is required.
  2wikimultihopqa  the same layout without `level` (-> ""). Its `evidences` triples and entity ids are not kept.
  musique          JSONL, one {id, question, answer, answerable, paragraphs, question_decomposition} per line.
                   Each paragraph {title, paragraph_text, is_supporting} becomes the context item
                   [title, [paragraph_text]] (one "sentence" per paragraph, file order) and each supporting
                   paragraph the fact [title, 0]. What does not map cleanly: `question_decomposition` (the hops and
                   their answers) and `answer_aliases` are dropped; paragraphs of the same article share a title, so
                   such a fact names the article, not the paragraph; `type` and `level` are "" (the hop count is
                   only a prefix of the id); an unanswerable question (answerable false, MuSiQue-Full) keeps its
                   record with no way to tell it apart, unless skip_unanswerable=True drops it. Either way
                   `LoadReport.unanswerable` counts them; a missing `answerable` means true (MuSiQue-Ans), a missing
                   `is_supporting` false.

Checks: the file exists, is UTF-8, parses (position of the first JSON error), is not empty; every record is an
object with every field of the right type, ids are non-empty and unique. A supporting fact is not checked against
the context (HotpotQA itself has facts whose sentence index is out of range). Each failure is one ValueError line
naming the file, the record index (and id when known) and the field:

    /data/hotpot.json[3].supporting_facts[1]: expected [title, sentence_index], got ['Paris'] (record id '5a8b')

skip_invalid=True instead skips a bad record (a whole JSON list that does not parse is still an error), logs how
many were skipped and returns their error lines in `LoadReport.skipped_invalid`. Nothing else is dropped.

`qa_builder.MultihopQA` writes these records as a TFDS dataset; `decode_record` turns a stored example back into this
dict.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterator

from stepjax.checks import check_bool, check_choice, fail

FORMATS = ("hotpotqa", "2wikimultihopqa", "musique")
RECORD_KEYS = ("id", "question", "answer", "type", "level", "supporting_facts", "context", "source")

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadReport:
  """What `load_records` read: the records, and what it left out (nothing unless asked)."""

  path: str
  format: str
  records: list[dict]
  skipped_invalid: list[str]  # one error line per skipped record (skip_invalid=True only)
  unanswerable: int  # MuSiQue records with answerable false, kept or skipped
  skipped_unanswerable: int

  @property
  def skipped(self) -> int:
    return len(self.skipped_invalid) + self.skipped_unanswerable


class _Bad(Exception):
  """A field of one record is wrong: becomes `path[i].field: message (record id ...)`."""

  def __init__(self, field: str, message: str):
    super().__init__(field, message)
    self.field, self.message = field, message


def _json_type(x: Any) -> str:
  names = {dict: "object", list: "list", str: "string", bool: "bool", int: "int", float: "float", type(None): "null"}
  return names.get(type(x), type(x).__name__)


def _get(raw: dict, key: str, kind: type, kind_name: str, default: Any = None) -> Any:
  if key not in raw:
    if default is not None:
      return default
    raise _Bad(key, "missing")
  value = raw[key]
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise _Bad(key, f"expected {kind_name}, got {_json_type(value)}")
  return value


def _text(raw: dict, key: str, default: str | None = None) -> str:
  return _get(raw, key, str, "a string", default)


def _record_id(raw: dict, key: str) -> str:
  value = _text(raw, key)
  if not value:
    raise _Bad(key, "empty id")
  return value


def _fact(item: Any, field: str) -> list:
  ok = (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], int)
        and not isinstance(item[1], bool) and 0 <= item[1] < 2**31)
  if not ok:
    raise _Bad(field, f"expected [title, sentence_index] (a string and an int >= 0), got {_short(item)}")
  return [item[0], item[1]]


def _paragraph(item: Any, field: str) -> list:
  ok = (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], list)
        and all(isinstance(s, str) for s in item[1]))
  if not ok:
    raise _Bad(field, f"expected [title, [sentence, ...]] (strings), got {_short(item)}")
  return [item[0], list(item[1])]


def _short(x: Any, limit: int = 80) -> str:
  text = json.dumps(x, ensure_ascii=False)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _list(raw: dict, key: str, item: Callable[[Any, str], Any]) -> list:
  return [item(x, f"{key}[{i}]") for i, x in enumerate(_get(raw, key, list, "a list"))]


def _hotpot_like(raw: dict, source: str) -> dict:
  """HotpotQA and 2WikiMultihopQA share the layout (2Wiki has no `level`)."""
  return {"id": _record_id(raw, "_id"), "question": _text(raw, "question"), "answer": _text(raw, "answer"),
          "type": _text(raw, "type", ""), "level": _text(raw, "level", ""),
          "supporting_facts": _list(raw, "supporting_facts", _fact), "context": _list(raw, "context", _paragraph),
          "source": source}


def _musique(raw: dict) -> tuple[dict, bool]:
  """-> (record, answerable)."""
  record_id = _record_id(raw, "id")
  paragraphs = _get(raw, "paragraphs", list, "a list")
  context, facts = [], []
  for i, p in enumerate(paragraphs):
    field = f"paragraphs[{i}]"
    if not isinstance(p, dict):
      raise _Bad(field, f"expected an object, got {_json_type(p)}")
    try:
      title, text = _text(p, "title"), _text(p, "paragraph_text")
      supporting = _get(p, "is_supporting", bool, "a bool", False)
    except _Bad as bad:
      raise _Bad(f"{field}.{bad.field}", bad.message) from None
    context.append([title, [text]])
    if supporting:
      facts.append([title, 0])
  answerable = _get(raw, "answerable", bool, "a bool", True)
  record = {"id": record_id, "question": _text(raw, "question"), "answer": _text(raw, "answer"), "type": "",
            "level": "", "supporting_facts": facts, "context": context, "source": "musique"}
  return record, answerable


def _read_text(path: str) -> str:
  if not os.path.isfile(path):
    fail(path, "no such file")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as error:
    fail(path, f"not UTF-8 text (byte {error.start})")
  if not text.strip():
    fail(path, "empty file")
  return text


def _json_list(path: str) -> Iterator[tuple[int, Any, str]]:
  """(record index, parsed object, where-suffix) for each element of the file's JSON list."""
  try:
    data = json.loads(_read_text(path))
  except json.JSONDecodeError as error:
    fail(path, f"malformed JSON at line {error.lineno} column {error.colno}: {error.msg}")
  if not isinstance(data, list):
    fail(path, f"expected a JSON list of records, got {_json_type(data)}")
  if not data:
    fail(path, "no records (an empty JSON list)")
  for i, raw in enumerate(data):
    yield i, raw, ""


def _json_lines(path: str) -> Iterator[tuple[int, Any, str]]:
  """(record index, parsed object or the JSONDecodeError, where-suffix) for each non-blank line."""
  index = 0
  for number, line in enumerate(_read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      raw = json.loads(line)
    except json.JSONDecodeError as error:
      raw = error
    yield index, raw, f"line {number}"
    index += 1


def _convert(raw: Any, fmt: str) -> tuple[dict, bool]:
  if isinstance(raw, json.JSONDecodeError):
    raise _Bad("", f"malformed JSON at column {raw.colno}: {raw.msg}")
  if not isinstance(raw, dict):
    raise _Bad("", f"expected a JSON object, got {_json_type(raw)}")
  if fmt == "musique":
    return _musique(raw)
  return _hotpot_like(raw, fmt), True


def _where(raw: Any, fmt: str, position: str) -> str:
  """' (record id 'x', line 3)': what locates a record besides its index, when known."""
  key = "id" if fmt == "musique" else "_id"
  parts = [f"record id {raw[key]!r}"] if isinstance(raw, dict) and isinstance(raw.get(key), str) else []
  parts += [position] if position else []
  return f" ({', '.join(parts)})" if parts else ""


def load_records(path: str | os.PathLike, format: str, *, skip_invalid: bool = False,
                 skip_unanswerable: bool = False) -> LoadReport:
  """Parse a HotpotQA / 2WikiMultihopQA / MuSiQue file into common records (see the module docstring)."""
  fmt = check_choice(format, "format", FORMATS)
  check_bool(skip_invalid, "skip_invalid")
  check_bool(skip_unanswerable, "skip_unanswerable")
  path = os.fspath(path)
  records, skipped, first_seen = [], [], {}
  unanswerable = skipped_unanswerable = 0
  for i, raw, position in (_json_lines if fmt == "musique" else _json_list)(path):
    try:
      record, answerable = _convert(raw, fmt)
      if record["id"] in first_seen:
        raise _Bad("id", f"duplicate, first used by record {first_seen[record['id']]}")
    except _Bad as bad:
      field = f"{path}[{i}]" + (f".{bad.field}" if bad.field else "")
      if not skip_invalid:
        fail(field, bad.message + _where(raw, fmt, position))
      skipped.append(f"{field}: {bad.message}{_where(raw, fmt, position)}")
      continue
    first_seen[record["id"]] = i
    if not answerable:
      unanswerable += 1
      if skip_unanswerable:
        skipped_unanswerable += 1
        continue
    records.append(record)
  if skipped:
    _log.warning("%s: skipped %d invalid records (skip_invalid=True); first: %s", path, len(skipped), skipped[0])
  if unanswerable:
    _log.warning("%s: %d unanswerable questions, %s", path, unanswerable,
                 "skipped" if skip_unanswerable else "kept (skip_unanswerable=False)")
  if not records:
    fail(path, f"no records left ({len(skipped)} invalid, {skipped_unanswerable} unanswerable skipped)")
  return LoadReport(path, fmt, records, skipped, unanswerable, skipped_unanswerable)


def decode_record(example: dict) -> dict:
  """A stored example (as `as_data_source` returns it: bytes, lists) -> the common record dict."""
  text = lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x)
  facts, context = example["supporting_facts"], example["context"]
  sentences = [text(s) for s in example["context_sentences"]]
  paragraphs, start = [], 0
  for title, count in zip(context["title"], context["num_sentences"]):
    paragraphs.append([text(title), sentences[start:start + int(count)]])
    start += int(count)
  return {"id": text(example["id"]), "question": text(example["question"]), "answer": text(example["answer"]),
          "type": text(example["type"]), "level": text(example["level"]),
          "supporting_facts": [[text(t), int(i)] for t, i in zip(facts["title"], facts["sentence_index"])],
          "context": paragraphs, "source": text(example["source"])}


def encode_record(record: dict) -> dict:
  """The common record -> the flat example `decode_record` inverts (TFDS cannot write nested lists of text
  without TensorFlow, so the context is stored as titles, sentence counts and one flat list of sentences)."""
  return {"id": record["id"], "question": record["question"], "answer": record["answer"], "type": record["type"],
          "level": record["level"], "source": record["source"],
          "supporting_facts": {"title": [t for t, _ in record["supporting_facts"]],
                               "sentence_index": [i for _, i in record["supporting_facts"]]},
          "context": {"title": [t for t, _ in record["context"]],
                      "num_sentences": [len(s) for _, s in record["context"]]},
          "context_sentences": [s for _, sentences in record["context"] for s in sentences]}
