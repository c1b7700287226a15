"""lookup_qa: multi-hop question answering with a search tool (a small, learnable stand-in for HotpotQA).

Each episode draws a knowledge base from its reset key over a fixed pool of pseudo-word entities: every entity
has one fact per relation ("Zorva: mentor Kalin; city Pemo; rival Dorna; author Vesk."), all random except a
hidden chain e0 -r1-> e1 -r2-> ... -> ek (k = `params.hops`, distinct entities) that is written into it. The
question names e0 and the relation path; the agent reads an entity's facts with `search <name>` (the true next hop
plus its other relations as distractors) and ends the episode with `answer <name>`. Example, hops = 2:

    Answer with: search <name>, answer <name>.
    Q: what is the city of the mentor of Zorva?
    > search Zorva
    Zorva: mentor Kalin; city Pemo; rival Dorna; author Vesk.
    > search Kalin
    Kalin: mentor Isko; city Jorn; rival Talo; author Mavo.
    > answer Jorn
    Correct.

With `num_relations` < 4 every line has the first relations of RELATIONS only ("Zorva: mentor Kalin; city Pemo."):
fewer distractors to read past, the same chain.

Rewards: 1.0 for the right answer (terminated, success), 0.0 for a wrong one (terminated), `params.invalid_penalty`
for an action that spells no command (including `search` of a name outside the pool), 0.0 otherwise. Hitting
`params.max_steps` truncates. The scripted expert searches along the chain and answers: success 1.0 whenever
max_steps >= hops + 1 (`params.expert_slip` and `params.expert_skip` make it imperfect on purpose). A uniformly
random command from the table succeeds about 1/num_entities of the time (it answers early, at random: measured
0.027-0.035 over 4096 episodes at hops 1-4), random tokens never parse (0.0).

Sizes with ByteTokenizer and the defaults (32 entities, max_hops 4): initial observation <= 119 tokens, search
result <= 62, answer <= 21, invalid-action feedback 55; max_obs_len 119. The expert's actions take up to 13 tokens
plain (`answer Lenta` + end of step); with its think section (THINK_TEXTS) they vary with the step and the names,
up to about 80 bytes. With `tokenizers.WordTokenizer(vocabulary())` a name or relation is one token and the
expert's think-format steps of a 2-hop question take 17, 28 and 26 tokens.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from stepjax.checks import check_choice, check_int, fail
from stepjax.envs.base import CommandTable, Environment, Fragments, StepInfo, host_array
from stepjax.tokenizers import Tokenizer

Array = Any

# Pseudo-words of 4-6 letters, distinct, none a relation word: the entity pool (the first `num_entities` are used).
ENTITY_NAMES = (
    "Zorva", "Kalin", "Pemo", "Dorna", "Vesk", "Talo", "Mirel", "Bruna",
    "Fenwo", "Gaspi", "Hollo", "Isko", "Jarel", "Kumo", "Lenta", "Mavo",
    "Nerit", "Oskal", "Pilvo", "Quara", "Rusko", "Sefa", "Tumbi", "Ulmar",
    "Varo", "Wenda", "Xilo", "Yarra", "Zeno", "Aldo", "Bisca", "Corra",
    "Delma", "Erno", "Fiska", "Gorum", "Hesta", "Ilva", "Jorn", "Kesti",
    "Lurra", "Mondo", "Nilsa", "Orvi", "Pasko", "Rilla", "Sorne", "Tovi",
)
RELATIONS = ("mentor", "city", "rival", "author")
STEP_FORMATS = ("plain", "think")
THINK_WORDINGS = ("question", "fact")
SUCCESS_REWARD = 1.0


def slip_relations(num_relations: int) -> tuple[int, int]:
  """The imperfect expert's one systematic slip (`LookupQAParams.expert_slip`): the relation it misreads when it
  answers, and the one it reads instead. With all 4 relations "author" read as "city"; with fewer, the last relation
  read as "city" (3) or "mentor" (2); with 1 there is nothing else to read and the slip changes nothing."""
  return num_relations - 1, 1 if num_relations > 2 else 0


INTRO_TEXT = "Answer with: search <name>, answer <name>.\n"
INVALID_TEXT = "Invalid action. Use: search <name> or answer <name>.\n> "
# The expert's think sections (step_format="think") carry the decision: the fact just read and what it implies,
#   first step:   <think>find the mentor of Zorva first</think>search Zorva
#   middle steps: <think>the mentor of Zorva is Kalin; next the city of Kalin</think>search Kalin
#   answer:       <think>the city of Kalin is Jorn; the answer is Jorn</think>answer Jorn
# so the think text is part of the skill (it restates the fact to follow and names the entity the command copies).
# That is think_wording="question": the fact in the question's word order. think_wording="fact" restates it in the
# order of the fact line just read, so the entity follows its relation word as it does there:
#   middle steps: <think>Zorva has mentor Kalin; next the city of Kalin</think>search Kalin
#   answer:       <think>Kalin has city Jorn; the answer is Jorn</think>answer Jorn
THINK_TEXTS = ("<think>", "</think>", "find the ", " first", "the ", " is ", "; next the ", "; the answer is ",
               " has ")


def vocabulary() -> tuple[str, ...]:
  """Every word this environment writes (entity names, relations, the fixed texts), for `tokenizers.WordTokenizer`:
  with it a name is one token in the question, in the facts and in the command that copies it."""
  # Words keep their ids across releases (trained models and results stay comparable): new words go at the end.
  # ("I need the next fact", "I know the answer" were the think texts of the first release.)
  texts = [INTRO_TEXT, INVALID_TEXT, "<think>I need the next fact.</think>", "<think>I know the answer.</think>",
           "Q: what is the of the of", "Correct.", "Wrong, it was", *THINK_TEXTS]
  words = list(ENTITY_NAMES) + list(RELATIONS) + re.findall(r"\w+", " ".join(texts))
  return tuple(dict.fromkeys(words))


@struct.dataclass
class LookupQAParams:
  """Traced per-run settings. `hops` is the difficulty knob (clipped to [1, max_hops]); `max_steps` truncates;
  `invalid_penalty` is added for an action that spells no command (0.0 keeps the reward sparse; e.g. -0.1 shapes
  the command format). Two ways to make the scripted expert imperfect, so that demonstrations leave room for RL that
  a perfect expert's do not (0.0: the perfect expert):
  `expert_slip`: answering a question whose last relation is "author", it reads the "city" fact instead with this
  probability (`slip_relations`): a wrong fact copied.
  `expert_skip`: after reading each fact but the last, it stops early with this probability and answers the entity
  it just read ("Zorva has mentor Kalin; the answer is Kalin"): a wrong decision (to answer instead of following the
  chain), made inside the think span, while every fact it restates is read right."""

  hops: int = 2
  max_steps: int = 8
  invalid_penalty: float = 0.0
  expert_slip: float = 0.0
  expert_skip: float = 0.0


@struct.dataclass
class LookupQAState:
  """One episode. N = num_entities, H = max_hops, R = num_relations."""

  facts: Array  # [N, R] int32: facts[e, r] = the entity that is relation r of entity e (R = num_relations)
  chain: Array  # [H + 1] int32: e0 ... eH, distinct; the answer is chain[hops]
  path: Array  # [H] int32: the relation r_{i+1} leading from chain[i] to chain[i + 1]
  hops: Array  # [] int32
  searched: Array  # [N] bool: entities the agent has searched
  answered: Array  # [] int32: the entity answered, -1 before the answer
  step_count: Array  # [] int32: steps taken (counted by `Environment.step`)
  done: Array  # [] bool: terminated or truncated (set by `Environment.step`)
  success: Array  # [] bool


class LookupQA(Environment):
  """Multi-hop QA over a per-episode knowledge base; see the module docstring.

  Static settings: `num_entities` (pool size, 2 verbs x pool = the command table), `max_hops`, `num_relations`
  (the first 1-4 of RELATIONS on every fact line and in the questions), `max_obs_len`
  (default: the worst case; a larger value pads, a smaller one is a ValueError), `max_action_len` (default 24
  plain, 64 think), `step_format` ("plain", or "think": `<think>...</think>` then exactly one command),
  `think_wording` (how the expert's think span restates the fact just read: "question", "the r of e is v", or
  "fact", "e has r v", the fact line's order; see THINK_TEXTS).
  """

  name = "lookup_qa"

  def __init__(self, tokenizer: Tokenizer, *, num_entities: int = 32, max_hops: int = 4, num_relations: int = 4,
               max_obs_len: int | None = None, max_action_len: int | None = None, step_format: str = "plain",
               think_wording: str = "question"):
    check_choice(step_format, "step_format", STEP_FORMATS)
    check_choice(think_wording, "think_wording", THINK_WORDINGS)
    check_int(max_hops, "max_hops", 1)
    if not 1 <= check_int(num_relations, "num_relations") <= len(RELATIONS):
      fail("num_relations", f"expected 1 ... {len(RELATIONS)}, got {num_relations}")
    if not max_hops + 1 <= check_int(num_entities, "num_entities") <= len(ENTITY_NAMES):
      fail("num_entities", f"expected max_hops + 1 = {max_hops + 1} ... {len(ENTITY_NAMES)}, got {num_entities}")
    self.tokenizer = tokenizer
    self.num_entities = num_entities
    self.max_hops = max_hops
    self.num_relations = num_relations
    self.relations = RELATIONS[:num_relations]
    self._slip = slip_relations(num_relations)  # (misread, read instead)
    self.step_format = step_format
    self.think_wording = think_wording
    self.entity_names = ENTITY_NAMES[:num_entities]
    names = self.entity_names
    # Command c: search entity c for c < N, answer entity c - N otherwise.
    self.commands = CommandTable(tokenizer, [f"search {e}" for e in names] + [f"answer {e}" for e in names],
                                 think=step_format == "think")

    texts: list[str] = []

    def add(*pieces: str) -> int:
      texts.extend(pieces)
      return len(texts) - len(pieces)

    self._name0 = add(*names)
    self._relation0 = add(*self.relations)
    self._intro = add(INTRO_TEXT)
    self._question = add("Q: what is the ")
    self._of_the = add(" of the ")
    self._of = add(" of ")
    self._question_end = add("?\n> ")
    self._colon = add(": ")
    self._space = add(" ")
    self._fact_separator = add("; ")
    self._facts_end = add(".\n> ")
    self._correct = add("Correct.\n")
    self._wrong = add("Wrong, it was ")
    self._wrong_end = add(".\n")
    self._invalid = add(INVALID_TEXT)
    # The think section's pieces come after every observation text (" of " is shared).
    self._think = {text: add(text) for text in THINK_TEXTS if text != " of "} if step_format == "think" else {}
    self.fragments = Fragments(tokenizer, texts)

    longest_name = self.fragments.longest(range(self._name0, self._name0 + num_entities))
    longest_relation = self.fragments.longest(range(self._relation0, self._relation0 + num_relations))
    worst_cases = {
        "question": [self._intro, self._question] + [longest_relation, self._of_the] * (max_hops - 1)
                    + [longest_relation, self._of, longest_name, self._question_end],
        "facts": [longest_name, self._colon]
                 + sum(([self._relation0 + r, self._space, longest_name, self._fact_separator]
                        for r in range(num_relations)), [])[:-1] + [self._facts_end],
        "answer": [self.fragments.longest([self._correct, self._wrong]), longest_name, self._wrong_end],
        "invalid": [self._invalid],
    }
    # The worst cases have the slot layouts of the real observations, with the longest fragment in every slot.
    self._num_slots = max(len(slots) for slots in worst_cases.values())
    self.max_obs_lens = {kind: self.fragments.max_len_of(slots) for kind, slots in worst_cases.items()}
    worst = max(self.max_obs_lens.values())
    if max_obs_len is not None and max_obs_len < worst:
      fail("max_obs_len", f"an observation can take {worst} tokens with this tokenizer, got {max_obs_len}")
    self.max_obs_len = worst if max_obs_len is None else max_obs_len

    self._max_think_len = 0
    if step_format == "think":
      worst_thinks = self._think_slot_layouts(*(longest_name, longest_relation) * 3)
      self._num_think_slots = max(len(slots) for slots in worst_thinks)
      self._max_think_len = max(self.fragments.max_len_of(slots) for slots in worst_thinks)
    expert_len = self._max_think_len + int(self.commands.lengths.max()) + 1
    if max_action_len is None:  # room for the expert's longest action and a little more
      max_action_len = 24 if step_format == "plain" else -(-(expert_len + 8) // 8) * 8
    self.max_action_len = max_action_len
    if self.max_action_len < expert_len:
      fail("max_action_len", f"the expert's actions take up to {expert_len} tokens, got {max_action_len}")

  def default_params(self) -> LookupQAParams:
    return LookupQAParams()

  # --------------------------------------------------------------------------------------------------------------
  # Observations: fixed-size slot vectors of fragment indices (-1 = nothing), composed into tokens.

  def _pad_slots(self, slots: Array) -> Array:
    return jnp.concatenate([slots, jnp.full((self._num_slots - slots.shape[0],), -1, jnp.int32)])

  def _question_slots(self, state: LookupQAState) -> Array:
    """"Answer with... Q: what is the r_k of the ... of the r_1 of e0?" -> [num_slots]; outermost relation first."""
    hop = jnp.arange(self.max_hops)
    relation = state.path[jnp.clip(state.hops - 1 - hop, 0, self.max_hops - 1)]
    relation_slot = jnp.where(hop < state.hops, self._relation0 + relation, -1)
    separator = jnp.where(hop < state.hops - 1, self._of_the, jnp.where(hop == state.hops - 1, self._of, -1))
    middle = jnp.stack([relation_slot, separator], axis=1).reshape(-1)
    slots = jnp.concatenate([jnp.asarray([self._intro, self._question], jnp.int32), middle.astype(jnp.int32),
                             jnp.stack([self._name0 + state.chain[0], jnp.int32(self._question_end)])])
    return self._pad_slots(slots.astype(jnp.int32))

  def _facts_slots(self, state: LookupQAState, entity: Array) -> Array:
    """"e: mentor x; city y; rival z; author w." -> [num_slots]."""
    relation = jnp.arange(self.num_relations)
    separator = jnp.where(relation < self.num_relations - 1, self._fact_separator, self._facts_end)
    per_relation = jnp.stack([self._relation0 + relation, jnp.full_like(relation, self._space),
                              self._name0 + state.facts[entity], separator], axis=1).reshape(-1)
    slots = jnp.concatenate([jnp.stack([self._name0 + entity, jnp.int32(self._colon)]), per_relation])
    return self._pad_slots(slots.astype(jnp.int32))

  def _think_slot_layouts(self, first_name, first_relation, previous_name, relation, name, next_relation):
    """Fragment slots of the expert's three think sections (see THINK_TEXTS): the first step ("find the r1 of e0
    first"), a middle step ("the r of previous is name; next the next_relation of name") and the answer ("the r of
    previous is name; the answer is name"). Arguments are fragment indices (ints, or traced int32)."""
    t = self._think
    first = [t["<think>"], t["find the "], first_relation, self._of, first_name, t[" first"], t["</think>"]]
    if self.think_wording == "question":
      fact = [t["<think>"], t["the "], relation, self._of, previous_name, t[" is "], name]
    else:
      fact = [t["<think>"], previous_name, t[" has "], relation, self._space, name]
    middle = fact + [t["; next the "], next_relation, self._of, name, t["</think>"]]
    answer = fact + [t["; the answer is "], name, t["</think>"]]
    return first, middle, answer

  def _think_slots(self, state: LookupQAState, hop: Array, slip: Array, skip: Array) -> Array:
    """The expert's think section at chain position `hop` (searching chain[hop], or answering when hop == hops;
    `slip`: the answer restates the misread fact, `slip_relations`; `skip`: it answers chain[hop], the entity just
    read, instead of searching it) -> [num_think_slots] fragment indices (-1 = nothing)."""
    last = self.max_hops - 1
    name = lambda e: self._name0 + state.chain[e]  # noqa: E731
    relation = lambda r: self._relation0 + state.path[jnp.clip(r, 0, last)]  # noqa: E731
    before = jnp.maximum(hop - 1, 0)
    misread = self._slip[1]
    read = jnp.where(slip, self._relation0 + misread, relation(before))
    value = jnp.where(slip, self._name0 + state.facts[state.chain[before], misread], name(hop))
    layouts = self._think_slot_layouts(name(0), relation(0), name(before), read, value, relation(hop))
    first, middle, answer = (jnp.asarray(slots + [-1] * (self._num_think_slots - len(slots)), jnp.int32)
                             for slots in layouts)
    return jnp.where(hop == 0, first, jnp.where((hop >= state.hops) | skip, answer, middle))

  def _answer_slots(self, correct: Array, answer: Array) -> Array:
    """"Correct." or "Wrong, it was <answer>." -> [num_slots]."""
    slots = jnp.stack([jnp.where(correct, self._correct, self._wrong), jnp.where(correct, -1, self._name0 + answer),
                       jnp.where(correct, -1, self._wrong_end)])
    return self._pad_slots(slots.astype(jnp.int32))

  # --------------------------------------------------------------------------------------------------------------
  # The environment API.

  def reset(self, key: Array, params: LookupQAParams) -> tuple[LookupQAState, Array, Array]:
    """-> (state, obs [max_obs_len] int32, obs_len)."""
    n, max_hops, num_relations = self.num_entities, self.max_hops, self.num_relations
    hops = jnp.clip(jnp.asarray(params.hops, jnp.int32), 1, max_hops)
    # One draw of random bits for the whole episode: each jax.random call costs seconds of XLA compile on CPU.
    # The modulo bias of 31-bit integers reduced mod <= 48 is negligible.
    draws = (jax.random.bits(key, (n + max_hops + n * num_relations,), jnp.uint32) >> 1).astype(jnp.int32)
    chain_scores, path_draws, fact_draws = jnp.split(draws, [n, n + max_hops])
    chain = jnp.argsort(chain_scores)[:max_hops + 1].astype(jnp.int32)  # Distinct entities.
    path = path_draws % num_relations
    # Random distractor facts (never an entity's own name), then the chain written over them.
    offsets = 1 + fact_draws.reshape(n, num_relations) % (n - 1)
    facts = (jnp.arange(n, dtype=jnp.int32)[:, None] + offsets) % n
    facts = facts.at[chain[:max_hops], path].set(chain[1:])
    state = LookupQAState(facts=facts, chain=chain, path=path, hops=hops, searched=jnp.zeros((n,), bool),
                          answered=jnp.int32(-1), step_count=jnp.int32(0), done=jnp.bool_(False),
                          success=jnp.bool_(False))
    obs, obs_len = self.fragments.compose(self._question_slots(state), self.max_obs_len)
    return state, obs, obs_len

  def step_env(self, key: Array, state: LookupQAState, action: Array, action_len: Array, params: LookupQAParams):
    """One transition of a running episode (`Environment.step` adds the step budget and the no-op after the end):
    action [A] int32 (A any), action_len [] -> (state, obs [max_obs_len] int32, obs_len, reward, terminated,
    StepInfo)."""
    del key  # Deterministic transitions.
    n = self.num_entities
    command = self.commands.match(action, action_len)
    parsed = command >= 0
    entity = jnp.maximum(command, 0) % n
    is_search = parsed & (command < n)
    is_answer = parsed & (command >= n)
    answer = state.chain[state.hops]
    correct = is_answer & (entity == answer)
    terminated = is_answer  # an answer, right or wrong, ends the episode
    reward = jnp.where(correct, SUCCESS_REWARD, 0.0) + jnp.where(parsed, 0.0, params.invalid_penalty)

    invalid_slots = self._pad_slots(jnp.asarray([self._invalid], jnp.int32))
    slots = jnp.where(is_search, self._facts_slots(state, entity),
                      jnp.where(is_answer, self._answer_slots(correct, answer), invalid_slots))
    obs, obs_len = self.fragments.compose(slots, self.max_obs_len)
    next_state = state.replace(searched=state.searched.at[entity].set(state.searched[entity] | is_search),
                               answered=jnp.where(is_answer, entity, state.answered), success=correct)
    return next_state, obs, obs_len, reward, terminated, StepInfo(parsed, correct)

  def expert_action(self, key: Array, state: LookupQAState, params: LookupQAParams) -> tuple[Array, Array]:
    """Search the first chain entity not searched yet, in chain order; answer once all of them are. With
    `params.expert_slip` a question ending in "author" is answered from the "city" fact with that probability; with
    `params.expert_skip` each search after the first becomes, with that probability, an answer of the entity just
    read. -> (tokens [max_action_len] int32, length)."""
    on_path = jnp.arange(self.max_hops) < state.hops
    to_search = on_path & ~state.searched[state.chain[:self.max_hops]]
    searching = jnp.any(to_search)
    hop = jnp.where(searching, jnp.argmax(to_search), state.hops)
    last = state.chain[jnp.clip(state.hops - 1, 0, self.max_hops - 1)]
    uniform = (jax.random.bits(key, (), jnp.uint32) >> 8).astype(jnp.float32) / (1 << 24)  # in [0, 1)
    misread, read_instead = self._slip
    slip = (~searching & (state.path[jnp.clip(state.hops - 1, 0, self.max_hops - 1)] == misread)
            & (uniform < params.expert_slip))
    skip = searching & (hop > 0) & (uniform < params.expert_skip)
    answer = jnp.where(slip, state.facts[last, read_instead], state.chain[state.hops])
    answer = jnp.where(skip, state.chain[hop], answer)
    command = jnp.where(searching & ~skip, state.chain[hop], self.num_entities + answer)
    eos = self.tokenizer.end_of_step_id
    if self.step_format == "plain":
      return self.commands.encode(command, self.max_action_len, eos)
    think = self.fragments.compose(self._think_slots(state, hop, slip, skip), self._max_think_len)
    return self.commands.encode(command, self.max_action_len, eos, prefix=think)

  def question_text(self, state: LookupQAState) -> str:
    """The question of one concrete state, as the initial observation words it (host side)."""
    s = jax.tree_util.tree_map(host_array, state)
    relations = [self.relations[s.path[i]] for i in reversed(range(int(s.hops)))]
    return f"Q: what is the {' of the '.join(relations)} of {self.entity_names[s.chain[0]]}?"

  def render(self, state: LookupQAState) -> str:
    s = jax.tree_util.tree_map(host_array, state)
    names, hops = self.entity_names, int(s.hops)
    chain = names[s.chain[0]] + "".join(f" -{self.relations[s.path[i]]}-> {names[s.chain[i + 1]]}"
                                        for i in range(hops))
    facts = [f"  {names[e]}: " + "; ".join(f"{r} {names[s.facts[e, j]]}" for j, r in enumerate(self.relations))
             for e in s.chain[:hops]]
    searched = ", ".join(names[e] for e in np.flatnonzero(s.searched)) or "-"
    if s.answered >= 0:
      status = f"answered {names[s.answered]} ({'correct' if s.success else 'wrong'})"
    else:
      status = "done (truncated)" if s.done else "running"
    return "\n".join([self.question_text(state), f"chain: {chain}  (answer {names[s.chain[hops]]})",
                      "facts along the chain:", *facts, f"searched: {searched}",
                      f"step {int(s.step_count)}, {status}"])


