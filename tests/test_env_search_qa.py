"""search_qa on generated HotpotQA-layout questions (20 two-hop questions over made-up people and cities, 2
supporting and 3 distractor paragraphs each): the expert's EM is 1 in every format, BM25 finds a paragraph by its
title, SQuAD normalization / EM / F1 against hand values, the saved index is reused and rebuilt when the corpus
changes, corpus JSONL errors, the budgets, the tag and think formats, and random actions never break an episode."""

import json
import logging
import random

import numpy as np
import pytest

from stepjax.envs import host
from stepjax.envs import search_qa as sq
from stepjax.tokenizers import ByteTokenizer

NO_TOKENS = np.zeros((0,), np.int32)
NUM_QUESTIONS = 20
FORMATS = [(step, tool) for step in sq.STEP_FORMATS for tool in sq.TOOL_FORMATS]
SYLLABLES = ("zor", "kal", "pem", "dor", "ves", "tal", "mir", "bru", "fen", "gas", "hol", "isk", "jar", "kum")
JOBS = ("painter", "chemist", "sailor", "poet", "architect")


def _name(rng: random.Random, used: set) -> str:
  while True:
    name = " ".join((rng.choice(SYLLABLES) + rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize()
                    for _ in range(2))
    if name not in used:
      used.add(name)
      return name


def make_questions(seed: int = 0, count: int = NUM_QUESTIONS) -> list[dict]:
  """Bridge questions "In which city did the mentor of A live?": A's paragraph names the mentor B, B's paragraph
  names the city. Distractors are other questions' paragraphs (same title, same text, as in HotpotQA)."""
  rng, used = random.Random(seed), set()
  people = [(_name(rng, used), _name(rng, used), _name(rng, used)) for _ in range(count)]  # student, mentor, city
  paragraphs = {}
  for student, mentor, city in people:
    paragraphs[student] = [f"{student} is a {rng.choice(JOBS)} born in {rng.randrange(1800, 1990)}.",
                           f" {student} studied under {mentor}."]
    paragraphs[mentor] = [f"{mentor} is a {rng.choice(JOBS)}.", f" {mentor} lived in the city of {city}."]
  questions = []
  for i, (student, mentor, city) in enumerate(people):
    others = [title for title in paragraphs if title not in (student, mentor)]
    context = [[title, paragraphs[title]] for title in [student, mentor] + rng.sample(others, 3)]
    rng.shuffle(context)
    questions.append({"id": f"q{i}", "question": f"In which city did the mentor of {student} live?",
                      "answer": city, "supporting_facts": [[student, 1], [mentor, 1]], "context": context,
                      "type": "bridge", "level": "easy"})
  return questions


QUESTIONS = make_questions()


@pytest.fixture(scope="module")
def index():
  return sq.BM25Index(sq.passages_from_questions(QUESTIONS))


def make_env(index, **config) -> sq.SearchQAEnv:
  return sq.SearchQAEnv(QUESTIONS, sq.SearchQAConfig(**config), index=index)


def play_expert(env, seed: int, limit: int = 10):
  """Follows expert_command from reset to the end; returns (commands, steps)."""
  env.reset(seed)
  commands, steps = [], []
  while (command := env.expert_command()) is not None and len(steps) < limit:
    commands.append(command)
    steps.append(env.step(command, NO_TOKENS))
  return commands, steps


# ---- scoring ----

def test_normalization_em_and_f1_against_hand_values():
  assert sq.normalize_answer("The  Cat, a dog!") == "cat dog"
  assert sq.normalize_answer("An apple; THE theater.") == "apple theater"  # articles are whole words only
  assert sq.normalize_answer("") == "" and sq.normalize_answer("  the  ") == ""
  assert sq.normalize_answer("U.S.A.\t(1999)") == "usa 1999"
  assert sq.exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
  assert sq.exact_match("Eiffel", "Eiffel tower") == 0.0
  assert sq.exact_match("", "") == 1.0 and sq.exact_match("a", "") == 1.0  # "a" normalizes to nothing
  assert sq.f1_score("Barack Obama", "Obama") == pytest.approx(2 / 3)  # p 1/2, r 1
  assert sq.f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)  # p 1, r 2/3
  assert sq.f1_score("x x y", "x y y") == pytest.approx(2 / 3)  # common = min counts = 2
  assert sq.f1_score("", "") == 1.0 and sq.f1_score("", "x") == 0.0 and sq.f1_score("x", "the") == 0.0
  assert sq.f1_score("dog", "cat") == 0.0


# ---- the expert ----

@pytest.mark.parametrize("step_format,tool_format", FORMATS)
def test_expert_reaches_exact_match_on_every_question(index, step_format, tool_format):
  env = make_env(index, step_format=step_format, tool_format=tool_format)
  for seed in range(NUM_QUESTIONS):
    commands, steps = play_expert(env, seed)
    assert len(steps) == 3, commands  # two supporting titles, then the answer
    assert [s.reward for s in steps] == [0.0, 0.0, 1.0]
    assert steps[-1].terminated and not steps[-1].truncated
    assert not any(s.terminated or s.truncated for s in steps[:-1])
    info = steps[-1].info
    assert info["success"] and info["parsed"] and info["em"] == 1.0 and info["f1"] == 1.0 and info["searches"] == 2
    titles = [title for title, _ in QUESTIONS[seed]["supporting_facts"]]
    assert titles[0] in steps[0].observation.split("\n")[0]  # the searched paragraph comes first
    assert env.expert_command() is None


def test_expert_texts_carry_the_decision(index):
  question = QUESTIONS[0]
  (student, _), (mentor, _) = question["supporting_facts"]
  commands, _ = play_expert(make_env(index, step_format="think"), 0)
  assert commands == [f"<think>search for {student} first</think>search {student}",
                      f"<think>{student} says {student} studied under {mentor}.; next {mentor}</think>search {mentor}",
                      f"<think>the answer is {question['answer']}</think>answer {question['answer']}"]
  commands, _ = play_expert(make_env(index, tool_format="tags"), 0)
  assert commands == [f"<search>{student}</search>", f"<search>{mentor}</search>",
                      f"<answer>{question['answer']}</answer>"]


# ---- retrieval ----

def test_bm25_top1_for_a_title_query_is_that_paragraph(index):
  titles = {title for question in QUESTIONS for title, _ in question["supporting_facts"]}
  assert len(index.passages) == 2 * NUM_QUESTIONS  # deduplicated by title
  for title in titles:
    hits = index.search(title, 3)
    assert hits[0][0].title == title
    assert [score for _, score in hits] == sorted((score for _, score in hits), reverse=True)
  assert index.search("the of and", 3) == [] and index.search("", 3) == []  # stopwords only, nothing


def test_search_observation_format_and_passage_budget(index):
  question = QUESTIONS[0]
  title = question["supporting_facts"][1][0]  # the mentor: also named in the student's paragraph
  text = sq.join_sentences(dict(question["context"])[title])
  env = make_env(index, top_k=2, passage_budget=5, budget_unit="words")
  env.reset(0)
  lines = env.step(f"search {title}", NO_TOKENS).observation.split("\n")
  assert len(lines) == 3 and lines[-1] == "> "
  assert lines[0] == f"{title}: " + " ".join(text.split()[:5]) + " ..."
  env = make_env(index, top_k=1, passage_budget=10)
  env.reset(0)
  assert env.step(f"search {title}", NO_TOKENS).observation == f"{title}: {text[:10].rstrip()}...\n> "
  assert sq.cut_text("abc def", 7, "chars") == "abc def" and sq.cut_text("a b c", 2, "words") == "a b ..."
  step = env.step("search zzzqqq", NO_TOKENS)
  assert step.observation == sq.NO_RESULTS_TEXT + "\n> " and step.info["parsed"] and step.info["searches"] == 2


def test_index_is_saved_reused_and_rebuilt_when_the_corpus_changes(tmp_path, caplog):
  passages = sq.passages_from_questions(QUESTIONS)
  first = sq.BM25Index(passages, tmp_path / "bm25")
  assert first.status == "built" and (tmp_path / "bm25" / sq.MANIFEST_NAME).is_file()
  manifest = json.loads((tmp_path / "bm25" / sq.MANIFEST_NAME).read_text())
  assert manifest["corpus_size"] == len(passages) and manifest["corpus_hash"] == sq.corpus_hash(passages)
  again = sq.BM25Index(passages, tmp_path / "bm25")
  assert again.status == "loaded"
  query = passages[3].title
  assert [(p.title, s) for p, s in again.search(query, 3)] == [(p.title, s) for p, s in first.search(query, 3)]
  changed = passages[:-1] + [sq.Passage("Extra Place", "A new passage about an extra place.")]
  with caplog.at_level(logging.WARNING, logger=sq.__name__):
    rebuilt = sq.BM25Index(changed, tmp_path / "bm25")
  assert rebuilt.status == "rebuilt" and "rebuilding" in caplog.text
  assert rebuilt.search("extra place", 1)[0][0].title == "Extra Place"
  assert sq.BM25Index(changed, tmp_path / "bm25").status == "loaded"
  assert sq.BM25Index(changed, tmp_path / "bm25", k1=1.2).status == "rebuilt"  # settings are in the manifest
  (tmp_path / "bm25" / "data.csc.index.npy").unlink()  # a damaged index with a matching manifest
  with caplog.at_level(logging.WARNING, logger=sq.__name__):
    assert sq.BM25Index(changed, tmp_path / "bm25", k1=1.2).status == "rebuilt"
  assert "could not be loaded" in caplog.text
  env = sq.SearchQAEnv(QUESTIONS, index_dir=tmp_path / "env_index")
  assert env.index.status == "built"
  assert sq.SearchQAEnv(QUESTIONS, index_dir=tmp_path / "env_index").index.status == "loaded"


def test_corpus_jsonl_file_and_its_one_line_errors(tmp_path):
  path = tmp_path / "corpus.jsonl"
  records = [{"title": p.title, "text": p.text} for p in sq.passages_from_questions(QUESTIONS)]
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
  env = sq.SearchQAEnv(QUESTIONS, corpus_file=path)
  assert len(env.index.passages) == len(records)
  cases = [('{"title": "A", "text": "x"}\n{"title": "B"\n', "line 2: not valid JSON"),
           ('{"title": "A", "text": "x"}\n\n{"text": "y"}\n', "line 3: field 'title' must be a string"),
           ('{"title": "A", "text": 7}\n', "line 1: field 'text' must be a string, got 7"),
           ('[1, 2]\n', "line 1: expected a JSON object, got list"),
           ('{"title": " ", "text": "y"}\n', "line 1: field 'title' must not be empty")]
  for content, message in cases:
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as error:
      sq.SearchQAEnv(QUESTIONS, corpus_file=path)
    assert str(error.value).startswith(f"corpus_file: {path} {message}")
    assert "\n" not in str(error.value)


# ---- budgets ----

def test_step_budget_truncates_without_an_answer(index):
  env = make_env(index, max_steps=2, invalid_penalty=-0.5)
  env.reset(1)
  first = env.step("search anything", NO_TOKENS)
  assert not (first.terminated or first.truncated)
  last = env.step("search something else", NO_TOKENS)
  assert last.truncated and not last.terminated and last.reward == 0.0
  assert last.observation == sq.STEP_BUDGET_FEEDBACK and not last.info["success"]
  env.reset(1)
  env.step("search anything", NO_TOKENS)
  bad = env.step("nonsense", NO_TOKENS)  # a malformed last step keeps its penalty
  assert bad.truncated and bad.reward == -0.5 and not bad.info["parsed"]
  env.reset(1)
  env.step("search anything", NO_TOKENS)
  answer = env.step(f"answer {QUESTIONS[1]['answer']}", NO_TOKENS)  # an answer on the last step terminates
  assert answer.terminated and not answer.truncated and answer.reward == 1.0


def test_context_budget_truncates_with_fixed_feedback(index):
  env = make_env(index)
  budget = len(env.reset(2)) + 40
  env = make_env(index, max_context_chars=budget)
  env.reset(2)
  small = env.step("search zzzqqq", NO_TOKENS)  # "No passages found." fits
  assert not small.truncated and small.info["context_chars"] <= budget
  step = env.step(f"search {QUESTIONS[2]['supporting_facts'][0][0]}", NO_TOKENS)
  assert step.truncated and not step.terminated and step.observation == sq.CONTEXT_FEEDBACK and step.reward == 0.0
  assert env.step("answer x", NO_TOKENS).observation == sq.EPISODE_OVER_TEXT


# ---- parsing ----

def test_tag_format_and_think_format_parsing(index):
  assert sq.parse_action("<search> Ed  Wood </search>", "plain", "tags") == sq.ToolCall("search", "Ed Wood")
  assert sq.parse_action(" <answer>yes</answer>\n", "plain", "tags") == sq.ToolCall("answer", "yes")
  assert sq.parse_action("<think> hm </think><answer>no</answer>", "think", "tags") == sq.ToolCall(
      "answer", "no", "hm")
  assert sq.parse_action("<think>a</think>\nsearch b c", "think", "command") == sq.ToolCall("search", "b c", "a")
  malformed = [("", "plain", "command"), ("search", "plain", "command"), ("search   ", "plain", "command"),
               ("lookup x", "plain", "command"), ("Search x", "plain", "command"),
               ("search x\nanswer y", "plain", "command"), ("search x", "plain", "tags"),
               ("<search></search>", "plain", "tags"), ("<search>a</answer>", "plain", "tags"),
               ("<search>x</search><answer>y</answer>", "plain", "tags"),
               ("I think <answer>y</answer>", "plain", "tags"),
               ("search x", "think", "command"), ("<think>a</think>", "think", "command"),
               ("<think>a</think>search x", "plain", "command"),
               ("<think><think>a</think>answer b", "think", "command")]
  for text, step_format, tool_format in malformed:
    assert sq.parse_action(text, step_format, tool_format) is None, text
  env = make_env(index, tool_format="tags")
  observation = env.reset(3)
  assert "<search>query</search>" in observation and "<answer>text</answer>" in observation
  title = QUESTIONS[3]["supporting_facts"][1][0]
  assert env.step(f"<search>{title}</search>", NO_TOKENS).observation.startswith(f"{title}: ")
  step = env.step("<answer>The " + QUESTIONS[3]["answer"].upper() + ".</answer>", NO_TOKENS)
  assert step.terminated and step.reward == 1.0 and step.info["em"] == 1.0


def test_think_format_reads_tokens_through_decode(index):
  tokenizer = ByteTokenizer(extra_special_tokens=("<think>", "</think>"))
  env = make_env(index, step_format="think")
  env.decode = lambda ids: tokenizer.decode(ids)  # keeps the special tokens the loop's decoding drops
  env.reset(4)
  command = env.expert_command()
  ids = np.asarray(tokenizer.encode(command), np.int32)
  text = tokenizer.decode(ids, skip_special=True)
  assert "<think>" not in text  # what the host loop would pass
  step = env.step(text, ids)
  assert step.info["parsed"] and step.info["searches"] == 1


# ---- robustness and episode rules ----

def _random_action(rng: random.Random, question: dict) -> str:
  pieces = ["search ", "answer ", "<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>", "\n", " ",
            question["answer"], question["supporting_facts"][0][0], "the", "!?", "\x00", "é", "\ud800"]
  kind = rng.randrange(4)
  if kind == 0:
    return "".join(rng.choice(pieces) for _ in range(rng.randrange(6)))
  if kind == 1:
    return bytes(rng.randrange(256) for _ in range(rng.randrange(40))).decode("utf-8", errors=rng.choice(
        ["replace", "ignore", "surrogateescape"]))
  if kind == 2:
    return rng.choice(["search ", "answer ", ""]) + "".join(chr(rng.randrange(32, 0x3000)) for _ in range(8))
  return rng.choice(["search ", "answer "]) + rng.choice([question["answer"], "nothing", ""])


@pytest.mark.parametrize("step_format,tool_format", [("plain", "command"), ("think", "tags")])
def test_random_actions_never_crash_and_done_never_flips_back(index, step_format, tool_format):
  penalty = -0.25
  env = make_env(index, step_format=step_format, tool_format=tool_format, max_steps=6, invalid_penalty=penalty,
                 max_context_chars=1500)
  rng = random.Random(0)
  seed, ended, rewards, episodes = 0, None, set(), 0
  env.reset(seed)
  for _ in range(400):
    step = env.step(_random_action(rng, env.question), NO_TOKENS)
    assert isinstance(step.observation, str) and {"success", "parsed", "em", "f1", "searches"} <= set(step.info)
    rewards.add(step.reward)
    if ended is not None:  # an ended episode stays ended, with the same flags and nothing more
      assert step.observation == sq.EPISODE_OVER_TEXT and step.reward == 0.0 and not step.info["parsed"]
      assert (step.terminated, step.truncated) == ended
      if rng.random() < 0.5:
        seed, ended, episodes = seed + 1, None, episodes + 1
        env.reset(seed)
    elif step.terminated or step.truncated:
      assert step.terminated != step.truncated
      ended = (step.terminated, step.truncated)
  assert rewards <= {penalty, 0.0, 1.0} and penalty in rewards and episodes > 10


def test_reset_order_and_protocol(index):
  env = make_env(index)
  assert isinstance(env, host.HostEnv)
  with pytest.raises(RuntimeError):
    env.step("search x", NO_TOKENS)
  observation = env.reset(NUM_QUESTIONS + 5)
  assert env.question is QUESTIONS[5] and observation.endswith(f"Q: {QUESTIONS[5]['question']}\n> ")
  assert "search <query>" in observation and "answer <text>" in observation
  ordered = sq.SearchQAEnv(QUESTIONS, index=index, order=[7, 2])
  ordered.reset(3)
  assert ordered.question is QUESTIONS[2]
  assert "<think>...</think>" in make_env(index, step_format="think").reset(0)


def test_bad_settings_are_one_line_naming_the_field(index):
  cases = [(lambda: sq.SearchQAConfig(top_k=0), "top_k: "),
           (lambda: sq.SearchQAConfig(step_format="x"), "step_format: "),
           (lambda: sq.SearchQAConfig(tool_format="json"), "tool_format: "),
           (lambda: sq.SearchQAConfig(budget_unit="lines"), "budget_unit: "),
           (lambda: sq.SearchQAConfig(max_context_chars=0), "max_context_chars: "),
           (lambda: sq.SearchQAEnv([], index=index), "questions: "),
           (lambda: sq.SearchQAEnv([dict(QUESTIONS[0], answer=None)], index=index), "questions[0].answer: "),
           (lambda: sq.SearchQAEnv([dict(QUESTIONS[0], context=[["t", "s"]])], index=index), "questions[0].context: "),
           (lambda: sq.SearchQAEnv(QUESTIONS, index=index, order=[NUM_QUESTIONS]), "order: "),
           (lambda: sq.BM25Index([]), "corpus: ")]
  for make, prefix in cases:
    with pytest.raises(ValueError) as error:
      make()
    assert str(error.value).startswith(prefix) and "\n" not in str(error.value), str(error.value)
