"""search_qa: question answering over real multi-hop data (HotpotQA layout) with a BM25 search tool, as a host
environment (`stepjax.envs.host.HostEnv`). It is the real-data version of `lookup_qa`: same step formats, same
"search, then answer" skill, but free-text queries against a passage index and free-text answers scored by
SQuAD-style exact match.

    env = SearchQAEnv(questions, SearchQAConfig(top_k=3), index_dir="data/hotpot/bm25")
    text = env.reset(seed=0)                      # the allowed calls and the question
    step = env.step("search Scott Derrickson", tokens)
    env.expert_command()                          # "search Ed Wood" ... then "answer yes"

Questions are plain dicts in the HotpotQA layout: "id", "question", "answer", "supporting_facts" ([title,
sentence_index] pairs), "context" ([title, [sentence, ...]] pairs), and optionally "type", "level", "source".

Retrieval: a `bm25s` index over passages {title, text}: by default the union of the questions' context paragraphs
(deduplicated by title, first occurrence kept; text = the sentences joined), or a corpus JSONL file (one
{"title": ..., "text": ...} object per line). A passage is indexed as "title text", so a title query finds its
passage. With `index_dir` the index is saved there with a manifest (corpus size, content hash, settings) and loaded
again when the manifest matches; when it does not, the index is rebuilt and a warning says why
(`BM25Index.status` is "built", "loaded" or "rebuilt").

Steps: one tool call each, `step_format` "plain" (the call alone) or "think" (`<think>...</think>` then exactly one
call). `tool_format` "command": `search <query>` / `answer <text>` (one line); "tags" (Search-R1 style):
`<search>query</search>` / `<answer>text</answer>`. A search returns the top-k passages with a positive score, one
"Title: text" line each, each passage text cut to `passage_budget` characters or whitespace words ("..." marks a
cut). An answer ends the episode (terminated). Example, plain command format:

    Tools: search <query> (returns the top 3 passages), answer <text> (ends the episode).
    Q: Were Scott Derrickson and Ed Wood of the same nationality?
    > search Scott Derrickson
    Scott Derrickson: Scott Derrickson (born July 16, 1966) is an American director, ...
    > search Ed Wood
    Ed Wood: Edward Davis Wood Jr. (October 10, 1924 - December 10, 1978) was an American filmmaker, ...
    > answer yes
    Correct.

Rewards (sparse): at the answer step, 1.0 if the answer matches the gold answer exactly after SQuAD normalization
(lowercase, no punctuation, no articles a/an/the, whitespace collapsed), else 0.0; a malformed call (no call,
unknown call, empty query or answer, text around the call) gets `invalid_penalty` (default 0.0) and the fixed
feedback `invalid_text(...)`; every other step 0.0. Nothing raises on any action text. info: "success", "parsed",
"em", "f1" (SQuAD token F1; both 0.0 before the answer), "searches" (so far), "context_chars" (so far).

Budgets: `max_steps` truncates the episode at that step unless it answers (truncated; no answer reward, a malformed
step keeps its penalty). `max_context_chars` bounds the characters of all observations of an episode (the first one
included): a step whose observation would go past it gets `CONTEXT_FEEDBACK` instead and truncates the episode
(an answer step still terminates normally). Once an episode has ended, `step` returns `EPISODE_OVER_TEXT`, reward
0.0, parsed=False and the flags of the step that ended it (terminated / truncated never flip back); `step` before
the first `reset` raises RuntimeError.

The expert (`expert_command`) searches each distinct supporting-fact title in order (the query is the title), then
answers the gold answer; in the think format its think span says why ("search for X first", "X says ...; next Y",
"the answer is Z").

Think format and special tokens: the host loop decodes actions with `skip_special=True`, so when `<think>` and
`</think>` are special tokens of the run's tokenizer they are absent from `action_text`; pass `decode` (token ids ->
text that keeps them, without the end-of-step token) and the env reads the tokens through it instead.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import string
from typing import Any, Callable, Sequence

import bm25s
import numpy as np

from stepjax.checks import check_choice, check_int, check_number, fail
from stepjax.envs.host import HostStep

logger = logging.getLogger(__name__)

STEP_FORMATS = ("plain", "think")
TOOL_FORMATS = ("command", "tags")
BUDGET_UNITS = ("chars", "words")
MANIFEST_NAME = "search_qa_manifest.json"
MANIFEST_VERSION = 1
MAX_QUERY_CHARS = 1000  # longer queries are cut (a random-token query must stay cheap)

CUE = "\n> "
CORRECT_TEXT = "Correct."
WRONG_TEXT = "Wrong, the answer was {}."
NO_RESULTS_TEXT = "No passages found."
CONTEXT_FEEDBACK = "Context budget exhausted; the episode ends."
STEP_BUDGET_FEEDBACK = "Step budget exhausted; the episode ends."
EPISODE_OVER_TEXT = "The episode is over."
THINK_HINT = "Reply as <think>...</think> then one call.\n"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_THINK = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)
_TAG_CALL = re.compile(r"<(search|answer)>(.*)</\1>", re.DOTALL)


# ---------------------------------------------------------------------------------------------------------------
# SQuAD-style answer scoring.

def normalize_answer(text: str) -> str:
  """SQuAD normalization: lowercase, punctuation removed, articles a/an/the removed, whitespace collapsed."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
  """1.0 when both normalize to the same text (two empty answers match), else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
  """SQuAD token F1 of the normalized answers (bag of words); 1.0 when both are empty, 0.0 when one is."""
  predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if not predicted or not expected:
    return float(predicted == expected)
  common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(predicted), common / len(expected)
  return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------------------------
# Questions and passages.

@dataclasses.dataclass(frozen=True)
class Passage:
  title: str
  text: str


def _is_str_list(value: Any) -> bool:
  return isinstance(value, list) and all(isinstance(item, str) for item in value)


def check_question(question: Any, field: str) -> None:
  """One HotpotQA-layout record: the fields this env reads, with their types (one ValueError line otherwise)."""
  if not isinstance(question, dict):
    fail(field, f"must be a dict, got {type(question).__name__}")
  for key in ("id", "question", "answer"):
    if not isinstance(question.get(key), str):
      fail(f"{field}.{key}", f"must be a string, got {question.get(key)!r:.60}")
  if not question["question"].strip():
    fail(f"{field}.question", "must not be empty")
  facts = question.get("supporting_facts")
  if not isinstance(facts, list) or not all(
      isinstance(fact, (list, tuple)) and len(fact) == 2 and isinstance(fact[0], str) and isinstance(fact[1], int)
      for fact in facts):
    fail(f"{field}.supporting_facts", "must be a list of [title, sentence_index] pairs")
  context = question.get("context")
  if not isinstance(context, list) or not all(
      isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and _is_str_list(item[1])
      for item in context):
    fail(f"{field}.context", "must be a list of [title, [sentence, ...]] pairs")


def join_sentences(sentences: Sequence[str]) -> str:
  return " ".join(" ".join(sentence.split()) for sentence in sentences if sentence.strip())


def passages_from_questions(questions: Sequence[dict]) -> list[Passage]:
  """The union of the questions' context paragraphs, deduplicated by title (first occurrence kept)."""
  passages: dict[str, Passage] = {}
  for question in questions:
    for title, sentences in question["context"]:
      if title not in passages:
        passages[title] = Passage(title, join_sentences(sentences))
  return list(passages.values())


def load_corpus_jsonl(path: str | os.PathLike) -> list[Passage]:
  """Passages from a JSONL file, one {"title": str, "text": str} object per line (blank lines skipped). A bad line
  is one ValueError naming the file, the line number and the field."""
  path = os.fspath(path)
  passages = []
  with open(path, encoding="utf-8") as handle:
    for number, line in enumerate(handle, start=1):
      if line.strip():
        passages.append(_parse_corpus_line(path, number, line))
  if not passages:
    fail("corpus_file", f"{path} holds no passages")
  return passages


def _parse_corpus_line(path: str, number: int, line: str) -> Passage:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as error:
    fail("corpus_file", f"{path} line {number}: not valid JSON ({error.msg})")
  if not isinstance(record, dict):
    fail("corpus_file", f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
  for key in ("title", "text"):
    if not isinstance(record.get(key), str):
      fail("corpus_file", f"{path} line {number}: field {key!r} must be a string, got {record.get(key)!r:.60}")
  if not record["title"].strip():
    fail("corpus_file", f"{path} line {number}: field 'title' must not be empty")
  return Passage(record["title"], record["text"])


def corpus_hash(passages: Sequence[Passage]) -> str:
  """sha256 of the passages' titles and texts, in order."""
  digest = hashlib.sha256()
  for passage in passages:
    digest.update(json.dumps([passage.title, passage.text], ensure_ascii=True).encode("ascii"))
    digest.update(b"\n")
  return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# BM25 retrieval.

def _load_stemmer(stemmer: bool):
  if not stemmer:
    return None
  try:
    import Stemmer  # pylint: disable=import-outside-toplevel
  except ImportError:
    fail("stemmer", "True needs the PyStemmer package (pip install PyStemmer); use stemmer=False")
  return Stemmer.Stemmer("english")


class BM25Index:
  """A bm25s index over passages, indexed as "title text" (lowercase, English stopwords of bm25s removed, words of
  2+ word characters, optional PyStemmer stemming).

  index_dir: where the index and its manifest live (None: in memory only). A saved index is loaded when its manifest
  (corpus size, content hash, settings) matches, else rebuilt and saved. `status`: "built" (no usable saved index),
  "loaded" or "rebuilt" (a saved index did not match). Search is read-only: envs on threads may share one index.
  """

  def __init__(self, passages: Sequence[Passage], index_dir: str | os.PathLike | None = None, *,
               stopwords: str | None = "en", stemmer: bool = False, k1: float = 1.5, b: float = 0.75):
    self.passages = list(passages)
    if not self.passages:
      fail("corpus", "the passage corpus is empty")
    check_number(k1, "k1", lambda v: v >= 0, "a number >= 0")
    check_number(b, "b", lambda v: 0 <= v <= 1, "in [0, 1]")
    check_choice(stopwords, "stopwords", ("en", None))
    self._stemmer = _load_stemmer(stemmer)
    self._stopwords = stopwords or []
    self.settings = {"stopwords": stopwords, "stemmer": bool(stemmer), "k1": float(k1), "b": float(b)}
    self.manifest = {"version": MANIFEST_VERSION, "corpus_size": len(self.passages),
                     "corpus_hash": corpus_hash(self.passages), "settings": self.settings}
    self.index_dir = None if index_dir is None else os.fspath(index_dir)
    self.status = "built"
    self._retriever = self._load_or_build()

  def _tokenize(self, texts: list[str], return_ids: bool):
    return bm25s.tokenize(texts, stopwords=self._stopwords, stemmer=self._stemmer, return_ids=return_ids,
                          show_progress=False)

  def _build(self):
    retriever = bm25s.BM25(k1=self.settings["k1"], b=self.settings["b"])
    texts = [f"{passage.title} {passage.text}" for passage in self.passages]
    retriever.index(self._tokenize(texts, return_ids=True), show_progress=False)
    return retriever

  def _saved_manifest(self) -> dict | None:
    path = os.path.join(self.index_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
      return None
    try:
      with open(path, encoding="utf-8") as handle:
        return json.load(handle)
    except (OSError, ValueError):
      return {}

  def _load_or_build(self):
    if self.index_dir is None:
      return self._build()
    saved = self._saved_manifest()
    if saved == self.manifest:
      try:
        retriever = bm25s.BM25.load(self.index_dir, show_progress=False)
        self.status = "loaded"
        logger.info("search_qa: loaded the BM25 index of %d passages from %s", len(self.passages), self.index_dir)
        return retriever
      except Exception as error:  # noqa: BLE001 - a damaged index is rebuilt, not fatal
        logger.warning("search_qa: the BM25 index in %s could not be loaded (%r); rebuilding", self.index_dir, error)
        self.status = "rebuilt"
    elif saved is not None:
      self.status = "rebuilt"
      logger.warning("search_qa: the BM25 index in %s does not match the corpus (%d passages, hash %.12s; saved: %s "
                     "passages, hash %.12s) or the settings; rebuilding", self.index_dir, len(self.passages),
                     self.manifest["corpus_hash"], saved.get("corpus_size"), saved.get("corpus_hash", ""))
    retriever = self._build()
    self._save(retriever)
    return retriever

  def _save(self, retriever) -> None:
    os.makedirs(self.index_dir, exist_ok=True)
    manifest_path = os.path.join(self.index_dir, MANIFEST_NAME)
    if os.path.exists(manifest_path):
      os.remove(manifest_path)  # a half-written index must never look valid
    retriever.save(self.index_dir, show_progress=False)
    with open(manifest_path + ".tmp", "w", encoding="utf-8") as handle:
      json.dump(self.manifest, handle, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    logger.info("search_qa: built the BM25 index of %d passages into %s", len(self.passages), self.index_dir)

  def search(self, query: str, k: int) -> list[tuple[Passage, float]]:
    """The top-k passages with a positive score, best first (ties: corpus order); [] when no query word is in the
    index."""
    tokens = [token for token in self._tokenize([query], return_ids=False)[0] if token]
    if not tokens:
      return []
    scores = np.asarray(self._retriever.get_scores(tokens), np.float64)
    order = np.argsort(-scores, kind="stable")[:k]
    return [(self.passages[i], float(scores[i])) for i in order if scores[i] > 0]


# ---------------------------------------------------------------------------------------------------------------
# Config and action parsing.

@dataclasses.dataclass(frozen=True)
class SearchQAConfig:
  """step_format: "plain" | "think"; tool_format: "command" | "tags"; top_k: passages per search; passage_budget:
  the most characters or words (`budget_unit` "chars" | "words") of each passage text; max_steps: step budget;
  max_context_chars: budget of all observation characters of an episode (None: no budget); invalid_penalty: reward
  of a malformed call."""

  step_format: str = "plain"
  tool_format: str = "command"
  top_k: int = 3
  passage_budget: int = 400
  budget_unit: str = "chars"
  max_steps: int = 8
  max_context_chars: int | None = 12000
  invalid_penalty: float = 0.0

  def __post_init__(self):
    check_choice(self.step_format, "step_format", STEP_FORMATS)
    check_choice(self.tool_format, "tool_format", TOOL_FORMATS)
    check_int(self.top_k, "top_k", 1)
    check_int(self.passage_budget, "passage_budget", 1)
    check_choice(self.budget_unit, "budget_unit", BUDGET_UNITS)
    check_int(self.max_steps, "max_steps", 1)
    check_int(self.max_context_chars, "max_context_chars", 1, optional=True)
    check_number(self.invalid_penalty, "invalid_penalty")


@dataclasses.dataclass(frozen=True)
class ToolCall:
  kind: str  # "search" | "answer"
  argument: str  # whitespace collapsed, non-empty
  think: str = ""


def _parse_call(text: str, tool_format: str) -> tuple[str, str] | None:
  text = text.strip()
  if tool_format == "tags":
    match = _TAG_CALL.fullmatch(text)
    if match is None or "<" in match.group(2):  # exactly one call, no nested or repeated tags
      return None
    kind, argument = match.group(1), match.group(2)
  else:
    if "\n" in text:
      return None
    kind, _, argument = text.partition(" ")
    if kind not in ("search", "answer"):
      return None
  argument = " ".join(argument.split())
  return (kind, argument) if argument else None


def parse_action(text: str, step_format: str = "plain", tool_format: str = "command") -> ToolCall | None:
  """One tool call, or None when the text is not exactly one well-formed call (in the think format: after exactly
  one leading `<think>...</think>`). Never raises on a string."""
  think = ""
  if step_format == "think":
    match = _THINK.fullmatch(text)
    if match is None or "<think>" in match.group(1):
      return None
    think, text = match.group(1).strip(), match.group(2)
  call = _parse_call(text, tool_format)
  return None if call is None else ToolCall(call[0], call[1][:MAX_QUERY_CHARS], think)


def format_call(kind: str, argument: str, tool_format: str, think: str | None = None) -> str:
  """The text of a call (the inverse of parse_action): `search q` / `<search>q</search>`, after `<think>..</think>`
  when `think` is given."""
  call = f"{kind} {argument}" if tool_format == "command" else f"<{kind}>{argument}</{kind}>"
  return call if think is None else f"<think>{think}</think>{call}"


def invalid_text(config: SearchQAConfig) -> str:
  """The fixed feedback of a malformed call, naming the allowed calls."""
  search, answer = format_call("search", "<query>", "command"), format_call("answer", "<text>", "command")
  if config.tool_format == "tags":
    search, answer = format_call("search", "query", "tags"), format_call("answer", "text", "tags")
  think = " after <think>...</think>" if config.step_format == "think" else ""
  return f"Invalid action. Use exactly one call{think}: {search} or {answer}." + CUE


def cut_text(text: str, budget: int, unit: str) -> str:
  """`text` cut to `budget` characters or whitespace words; "..." marks a cut."""
  if unit == "words":
    words = text.split()
    return text if len(words) <= budget else " ".join(words[:budget]) + " ..."
  return text if len(text) <= budget else text[:budget].rstrip() + "..."


# ---------------------------------------------------------------------------------------------------------------
# The environment.

@dataclasses.dataclass
class _Episode:
  question: dict
  steps: int = 0
  searches: int = 0
  context_chars: int = 0
  searched: set = dataclasses.field(default_factory=set)  # normalized queries
  done: bool = False
  terminated: bool = False
  truncated: bool = False
  success: bool = False
  em: float = 0.0
  f1: float = 0.0


class SearchQAEnv:
  """Multi-hop QA with a BM25 search tool as a `HostEnv`; see the module docstring.

  questions: HotpotQA-layout dicts. config: `SearchQAConfig`. index: a `BM25Index` to share between envs (else one
  is built from `corpus_file`, or from the questions' context paragraphs, saved in `index_dir` when given).
  order: question indices; `reset(seed)` plays `questions[order[seed % len(order)]]` (default: seed % count).
  decode: token ids -> text, read instead of `action_text` (see "Think format and special tokens").
  """

  def __init__(self, questions: Sequence[dict], config: SearchQAConfig | None = None, *,
               index: BM25Index | None = None, index_dir: str | os.PathLike | None = None,
               corpus_file: str | os.PathLike | None = None, order: Sequence[int] | None = None,
               decode: Callable[[np.ndarray], str] | None = None):
    self.questions = list(questions)
    if not self.questions:
      fail("questions", "must hold at least one question")
    for i, question in enumerate(self.questions):
      check_question(question, f"questions[{i}]")
    self.config = SearchQAConfig() if config is None else config
    self.order = self._check_order(order)
    if index is None:
      passages = load_corpus_jsonl(corpus_file) if corpus_file is not None else passages_from_questions(self.questions)
      index = BM25Index(passages, index_dir)
    self.index = index
    self.decode = decode
    self.invalid_text = invalid_text(self.config)
    self._episode: _Episode | None = None

  def _check_order(self, order: Sequence[int] | None) -> list[int]:
    if order is None:
      return list(range(len(self.questions)))
    order = list(order)
    if not order:
      fail("order", "must hold at least one question index")
    for i in order:
      check_int(i, "order", 0)
      if i >= len(self.questions):
        fail("order", f"index {i} is out of range for {len(self.questions)} questions")
    return [int(i) for i in order]

  # ---- HostEnv ----

  def reset(self, seed: int) -> str:
    """Starts the question chosen by `seed`; returns the allowed calls and the question."""
    question = self.questions[self.order[int(seed) % len(self.order)]]
    self._episode = _Episode(question)
    observation = self._intro() + f"Q: {' '.join(question['question'].split())}" + CUE
    self._episode.context_chars = len(observation)
    return observation

  def step(self, action_text: str, action_tokens: np.ndarray | None = None) -> HostStep:
    """One tool call (see the module docstring). `action_tokens` is read only through `decode`, when given."""
    episode = self._episode
    if episode is None:
      raise RuntimeError("SearchQAEnv.step called before reset")
    if episode.done:
      return HostStep(EPISODE_OVER_TEXT, 0.0, episode.terminated, episode.truncated, self._info(episode, False))
    if self.decode is not None and action_tokens is not None:
      action_text = self.decode(np.asarray(action_tokens))
    call = parse_action(action_text if isinstance(action_text, str) else "", self.config.step_format,
                        self.config.tool_format)
    episode.steps += 1
    if call is not None and call.kind == "answer":
      return self._answer(episode, call.argument)
    if call is None:
      observation, reward = self.invalid_text, self.config.invalid_penalty
    else:
      observation, reward = self._search(episode, call.argument), 0.0
    return self._continue(episode, observation, reward, parsed=call is not None)

  # ---- transitions ----

  def _intro(self) -> str:
    config = self.config
    search = format_call("search", "<query>" if config.tool_format == "command" else "query", config.tool_format)
    answer = format_call("answer", "<text>" if config.tool_format == "command" else "text", config.tool_format)
    intro = f"Tools: {search} (returns the top {config.top_k} passages), {answer} (ends the episode).\n"
    return intro + (THINK_HINT if config.step_format == "think" else "")

  def _search(self, episode: _Episode, query: str) -> str:
    episode.searches += 1
    episode.searched.add(normalize_answer(query))
    hits = self.index.search(query, self.config.top_k)
    if not hits:
      return NO_RESULTS_TEXT + CUE
    lines = [f"{p.title}: {cut_text(p.text, self.config.passage_budget, self.config.budget_unit)}" for p, _ in hits]
    return "\n".join(lines) + CUE

  def _answer(self, episode: _Episode, answer: str) -> HostStep:
    gold = episode.question["answer"]
    episode.em, episode.f1 = exact_match(answer, gold), f1_score(answer, gold)
    episode.success = episode.em == 1.0
    episode.done = episode.terminated = True
    observation = CORRECT_TEXT if episode.success else WRONG_TEXT.format(gold)
    episode.context_chars += len(observation)
    return HostStep(observation, episode.em, True, False, self._info(episode, True))

  def _continue(self, episode: _Episode, observation: str, reward: float, parsed: bool) -> HostStep:
    """A step that did not answer: applies the context budget, then the step budget."""
    budget = self.config.max_context_chars
    if budget is not None and episode.context_chars + len(observation) > budget:
      observation = CONTEXT_FEEDBACK
      episode.truncated = True
    elif episode.steps >= self.config.max_steps:
      observation = STEP_BUDGET_FEEDBACK
      episode.truncated = True
    episode.done = episode.truncated
    episode.context_chars += len(observation)
    return HostStep(observation, float(reward), False, episode.truncated, self._info(episode, parsed))

  def _info(self, episode: _Episode, parsed: bool) -> dict:
    return {"success": episode.success, "parsed": parsed, "em": episode.em, "f1": episode.f1,
            "searches": episode.searches, "context_chars": episode.context_chars}

  # ---- expert ----

  @property
  def question(self) -> dict | None:
    """The record of the current episode (None before the first reset)."""
    return None if self._episode is None else self._episode.question

  def supporting_titles(self) -> list[str]:
    """The distinct supporting-fact titles of the current question, in order."""
    return list(dict.fromkeys(title for title, _ in self._episode.question["supporting_facts"]))

  def expert_command(self) -> str | None:
    """The oracle's next call (with its think span in the think format): search the first supporting title not
    searched yet, else answer the gold answer. None before reset and once the episode has ended."""
    episode = self._episode
    if episode is None or episode.done:
      return None
    titles = self.supporting_titles()
    pending = [title for title in titles if normalize_answer(title) not in episode.searched]
    done = [title for title in titles if title not in pending]
    if pending:
      kind, argument = "search", " ".join(pending[0].split())
      think = f"{done[-1]} says {self._fact(done[-1])}; next {argument}" if done else f"search for {argument} first"
    else:
      kind, argument = "answer", " ".join(episode.question["answer"].split())
      think = f"the answer is {argument}"
    return format_call(kind, argument, self.config.tool_format,
                       think if self.config.step_format == "think" else None)

  def _fact(self, title: str, max_words: int = 12) -> str:
    """The first supporting sentence of `title` (cut to `max_words` words), for the expert's think span."""
    paragraphs = {name: sentences for name, sentences in self._episode.question["context"]}
    sentences = paragraphs.get(title, [])
    for name, index in self._episode.question["supporting_facts"]:
      if name == title and 0 <= index < len(sentences):
        return cut_text(" ".join(sentences[index].split()), max_words, "words")
    return "..."
