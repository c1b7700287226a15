"""Chat formats: a chat model's turns around a host environment's observations and actions, as token ids.

A chat-tuned checkpoint (Qwen2.5 / Qwen3 use ChatML, Llama 3 its own headers) expects its context laid out in its
template's turns. An episode is one conversation: an optional system turn first, then each observation is a user turn
followed by the assistant header, and each action is the assistant's reply, ending with the template's turn-end token.
That token is the tokenizer's end-of-step token, so the sampler stops on it and the expert's actions end with it.
ChatML (`\\n` is a newline):

    <|im_start|>system\\n{system}<|im_end|>\\n                       (only with a system message)
    <|im_start|>user\\n{observation 0}<|im_end|>\\n<|im_start|>assistant\\n
    {action 0}<|im_end|>
    \\n<|im_start|>user\\n{observation 1}<|im_end|>\\n<|im_start|>assistant\\n
    {action 1}<|im_end|> ...

The newline after a turn's end token belongs to the next turn, so that an action ends exactly on the end-of-step
token; laid end to end this is the text `apply_chat_template` renders for the same messages with
`add_generation_prompt=True`. Llama 3:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{observation}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n
    {action}<|eot_id|> ...

(no separator: each turn starts right after the previous turn's end token).

Token-space consistency (docs/design.md): the template's special tokens are ids looked up by name with
`tokenizer.token_to_id`, never text run through the tokenizer. The plain text between them ("user\\n", "\\n\\n", the
system message) is ordinary text, encoded once here; the observation's text is encoded on its own by the host loop.
A whole-string encode of the rendered template gives the same ids when the tokenizer's pre-tokenizer splits at those
boundaries, as Qwen's and Llama 3's do after "user\\n" unless the observation itself starts with a newline
(tests/test_hf_end_to_end.py checks search_qa's episodes id for id against `apply_chat_template`).

Host side only: numpy, no traced code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from stepjax.checks import check_choice, fail

NONE = "none"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A chat layout by token names and text. A turn is `turn_start`, the role name, `header_end` (if any), `header_text`,
  the body, `turn_end`, then `separator` (text before the next turn); `begin` (if any) comes once, first.
  `end_of_episode` is the template's default end-of-episode token (the tokenizer's eos role)."""

  begin: str | None
  turn_start: str
  header_end: str | None
  turn_end: str
  header_text: str
  separator: str
  end_of_episode: str


TEMPLATES: dict[str, ChatTemplate] = {
    # Qwen2.5, Qwen3 (and every ChatML model). Qwen's tokenizer_config.json has pad_token <|endoftext|> too.
    "chatml": ChatTemplate(begin=None, turn_start="<|im_start|>", header_end=None, turn_end="<|im_end|>",
                           header_text="\n", separator="\n", end_of_episode="<|endoftext|>"),
    # Llama 3, 3.1, 3.2, 3.3 instruct models.
    "llama3": ChatTemplate(begin="<|begin_of_text|>", turn_start="<|start_header_id|>", header_end="<|end_header_id|>",
                           turn_end="<|eot_id|>", header_text="\n\n", separator="", end_of_episode="<|end_of_text|>"),
}
TEMPLATE_NAMES = (NONE, *TEMPLATES)
# The token names a config may override (None: the template's; "" for an optional one: no token).
TOKEN_FIELDS = ("begin", "turn_start", "header_end", "turn_end")
OPTIONAL_TOKEN_FIELDS = ("begin", "header_end")


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """The ids a chat template puts around observations (see the module docstring).

  first_prefix: before the first observation (begin token, system turn, user header).
  prefix: before every later observation (the separator after the action's turn end, user header).
  suffix: after every observation (the user turn's end, separator, assistant header); the action follows.
  end_of_step_id: the turn-end token every action ends with (the tokenizer's end-of-step token).
  token_names: field (begin, turn_start, header_end, turn_end) -> the token name used (None: no such token).
  """

  template: str
  first_prefix: tuple[int, ...]
  prefix: tuple[int, ...]
  suffix: tuple[int, ...]
  end_of_step_id: int
  token_names: tuple[tuple[str, str | None], ...] = ()

  @property
  def overhead(self) -> int:
    """The most ids the format adds to one observation: what `rollout.max_obs_len` must hold besides it."""
    return max(len(self.first_prefix), len(self.prefix)) + len(self.suffix)

  def wrap(self, observation_ids: Sequence[int] | np.ndarray, *, first: bool) -> np.ndarray:
    """int32 ids of the observation as a user turn followed by the assistant header (`first`: the episode's first
    observation, after the begin token and the system turn)."""
    ids = np.asarray(observation_ids, np.int32).reshape(-1)
    head = self.first_prefix if first else self.prefix
    return np.concatenate([np.asarray(head, np.int32), ids, np.asarray(self.suffix, np.int32)])


def template_token_names(template: str, **overrides: str | None) -> dict[str, str | None]:
  """Field -> token name of `template` (one of TEMPLATES) with `overrides` (field=name; None keeps the template's,
  "" removes an optional token). One ValueError line naming the field for an unknown template or field, or an empty
  name for a required token."""
  check_choice(template, "template", tuple(TEMPLATES))
  spec = TEMPLATES[template]
  names = {field: getattr(spec, field) for field in TOKEN_FIELDS}
  for field, name in overrides.items():
    if field not in TOKEN_FIELDS:
      fail(field, f"is not a chat token field; allowed: {', '.join(TOKEN_FIELDS)}")
    if name is None:
      continue
    if not isinstance(name, str):
      fail(field, f"must be a token name (a string) or None, got {name!r}")
    if not name and field not in OPTIONAL_TOKEN_FIELDS:
      fail(field, "must name a token of the tokenizer, got ''")
    names[field] = name or None
  return names


def make_chat_format(tokenizer, template: str, *, system: str = "", **token_names: str | None) -> ChatFormat:
  """The ChatFormat of `template` ("chatml", "llama3") over `tokenizer`, with an optional `system` message and token
  name overrides (begin, turn_start, header_end, turn_end; see `template_token_names`).

  Every name is looked up with `tokenizer.token_to_id`; a missing one is one ValueError line naming its field. The
  turn-end token must be the tokenizer's end-of-step token (load a tokenizer.json with `end_of_step=<turn end>`).
  """
  names = template_token_names(template, **token_names)
  spec = TEMPLATES[template]
  if not isinstance(system, str):
    fail("system", f"must be a string (\"\" for no system turn), got {system!r}")
  where = getattr(tokenizer, "path", type(tokenizer).__name__)

  def token_id(field: str) -> int:
    name = names[field]
    try:
      return int(tokenizer.token_to_id(name))
    except KeyError:
      pass
    fail(field, f"{name!r} is not a token of {where}; set chat.{field} to one of its special tokens, or choose "
                f"another chat.template")

  ids = {field: token_id(field) for field in TOKEN_FIELDS if names[field] is not None}
  if ids["turn_end"] != tokenizer.end_of_step_id:
    fail("turn_end", f"{names['turn_end']!r} (id {ids['turn_end']}) is not the tokenizer's end-of-step token (id "
                     f"{tokenizer.end_of_step_id}); load the tokenizer with end_of_step={names['turn_end']!r}")

  def text(value: str) -> list[int]:
    return list(tokenizer.encode(value)) if value else []

  def header(role: str, body: str = "") -> list[int]:
    """The turn's start up to its body; the text after the last special token is encoded in one piece with `body`."""
    if "header_end" not in ids:
      return [ids["turn_start"]] + text(role + spec.header_text + body)
    return [ids["turn_start"]] + text(role) + [ids["header_end"]] + text(spec.header_text + body)

  separator = text(spec.separator)
  system_turn = header("system", system) + [ids["turn_end"]] + separator if system else []
  begin = [ids["begin"]] if "begin" in ids else []
  return ChatFormat(
      template=template, first_prefix=tuple(begin + system_turn + header("user")),
      prefix=tuple(separator + header("user")), suffix=tuple([ids["turn_end"]] + separator + header("assistant")),
      end_of_step_id=ids["turn_end"], token_names=tuple(names.items()))
