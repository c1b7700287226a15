"""Tokenizers: the `Tokenizer` protocol, a file-free byte-level default and a wrapper over Hugging Face `tokenizers`.

Every tokenizer reserves three special tokens that the rest of stepjax relies on:

* `pad` (`<|pad|>`) — fills rows of fixed-shape arrays; never generated, never trained on;
* `end_of_step` (`<|end_of_step|>`) — the model emits it to end one step's action (one response);
* `end_of_episode` (`<|end_of_episode|>`) — ends the whole episode (`eos_id`).

Token-space consistency (see docs/design.md): the model's own tokens are never re-encoded from text. Environments turn
their text into ids once — `encode_fragments` at construction time for pure-JAX environments, `encode` per
observation for host environments — and `pad_batch` lays ragged id lists out as fixed-shape arrays.

Host-side only: this module imports numpy and, lazily, the optional `tokenizers` library; never jax.
Chat templates (a chat model's turns around observations, as ids) are `stepjax.chat`'s.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from stepjax import checks

PAD_TOKEN = "<|pad|>"
END_OF_STEP_TOKEN = "<|end_of_step|>"
END_OF_EPISODE_TOKEN = "<|end_of_episode|>"

# Role names used as keys of `Tokenizer.special_ids` for the three reserved tokens.
PAD = "pad"
END_OF_STEP = "end_of_step"
END_OF_EPISODE = "end_of_episode"

TOKENIZER_FILE_NAME = "tokenizer.json"
TOKENIZER_CONFIG_FILE_NAME = "tokenizer_config.json"

IdsLike = Sequence[int] | np.ndarray


@runtime_checkable
class Tokenizer(Protocol):
  """What stepjax needs from a tokenizer. Ids are plain Python ints on the host side.

  `special_ids` maps role names (`"pad"`, `"end_of_step"`, `"end_of_episode"`) and the literal text of every other
  special token (e.g. `"<think>"`) to its id. Special tokens that appear literally in text encode as single ids.
  """

  @property
  def vocab_size(self) -> int:
    """One more than the largest id this tokenizer can produce (the model's vocabulary must be at least this)."""
    ...

  @property
  def pad_id(self) -> int:
    """Id that fills padded positions."""
    ...

  @property
  def eos_id(self) -> int:
    """Id of the end-of-episode token."""
    ...

  @property
  def end_of_step_id(self) -> int:
    """Id of the end-of-step token."""
    ...

  @property
  def special_ids(self) -> dict[str, int]:
    """Role name or literal text of each special token → id."""
    ...

  def encode(self, text: str, *, add_special: bool = False) -> list[int]:
    """Ids of `text`. `add_special` applies the tokenizer's own post-processing (e.g. a BOS token)."""
    ...

  def decode(self, ids: IdsLike, *, skip_special: bool = False) -> str:
    """Text of `ids`; never raises on ids out of range (they decode to a visible placeholder)."""
    ...

  def encode_batch(self, texts: Sequence[str], *, add_special: bool = False) -> list[list[int]]:
    """`encode` of each text."""
    ...

  def token_to_id(self, token: str) -> int:
    """Id of a token given by its literal text; KeyError when the tokenizer has no such token."""
    ...

  def id_to_token(self, token_id: int) -> str:
    """Literal text of a token id; KeyError when the id is out of range."""
    ...


def unknown_id_placeholder(token_id: int) -> str:
  """Visible text that `decode` writes for an id the tokenizer does not know."""
  return f"<|unknown_id:{token_id}|>"


def _ids_as_list(ids: IdsLike) -> list[int]:
  """Ids from a list, tuple or array of any integer dtype and shape, flattened to Python ints."""
  return np.asarray(ids, dtype=np.int64).reshape(-1).tolist()


def _special_token_pattern(special_texts: Sequence[str]) -> re.Pattern[str]:
  """A regex that splits text around literal special tokens; longest first so that prefixes never win."""
  alternatives = "|".join(re.escape(text) for text in sorted(special_texts, key=len, reverse=True))
  return re.compile(f"({alternatives})")


def _check_extra_special_tokens(extra_special_tokens: Sequence[str], reserved: Sequence[str]) -> tuple[str, ...]:
  """Validated extra special tokens: non-empty strings, no duplicates, none equal to a reserved token."""
  if isinstance(extra_special_tokens, str):
    raise TypeError(f"extra_special_tokens must be a sequence of strings, got the string {extra_special_tokens!r}")
  extras = tuple(extra_special_tokens)
  for text in extras:
    if not isinstance(text, str) or not text:
      raise ValueError(f"extra_special_tokens must hold non-empty strings, got {text!r}")
  duplicates = sorted({text for text in extras if extras.count(text) > 1})
  if duplicates:
    raise ValueError(f"extra_special_tokens has duplicates: {duplicates}")
  clashes = sorted(set(extras) & set(reserved))
  if clashes:
    raise ValueError(f"extra_special_tokens {clashes} clash with the reserved special tokens {list(reserved)}")
  return extras


class _SpecialIds:
  """The role ids of a tokenizer that keeps them in `self._special_ids` (role or special text -> id): for the byte
  and word tokenizers pad is 0, end of step 1 and end of episode 2; a tokenizer.json maps them to its own tokens."""

  _special_ids: dict[str, int]

  @property
  def pad_id(self) -> int:
    """Id of the pad token."""
    return self._special_ids[PAD]

  @property
  def eos_id(self) -> int:
    """Id of the end-of-episode token."""
    return self._special_ids[END_OF_EPISODE]

  @property
  def end_of_step_id(self) -> int:
    """Id of the end-of-step token."""
    return self._special_ids[END_OF_STEP]

  @property
  def special_ids(self) -> dict[str, int]:
    """The three roles plus the text of every special token (the extra ones, and a tokenizer.json's added ones)
    -> id (a copy)."""
    return dict(self._special_ids)


class ByteTokenizer(_SpecialIds):
  """UTF-8 byte-level tokenizer that needs no files: the embedded default, sized for small models.

  Id layout (fixed, so ids never move when extras are configured):

  | ids                         | tokens                                                    |
  |-----------------------------|-----------------------------------------------------------|
  | 0                           | `<|pad|>` (pad is 0, so zero-initialised arrays are pad)  |
  | 1                           | `<|end_of_step|>`                                         |
  | 2                           | `<|end_of_episode|>`                                      |
  | 3 … 258                     | raw bytes 0x00 … 0xFF (`byte + BYTE_OFFSET`)              |
  | 259 … 259 + len(extras) − 1 | `extra_special_tokens`, in the order given                |

  `vocab_size` is 259 + len(extras), well inside the `tiny` model preset's 512. Special tokens that appear literally
  in text encode as their single id, so `decode(encode(text)) == text` for every string. `decode` never raises:
  invalid UTF-8 becomes U+FFFD and ids out of range become `unknown_id_placeholder(id)`.
  """

  BYTE_OFFSET = 3
  NUM_BYTES = 256

  def __init__(self, extra_special_tokens: Sequence[str] = ()):
    """`extra_special_tokens`: further tokens (e.g. `"<think>"`, `"<tool_call>"`) that get single ids."""
    reserved = (PAD_TOKEN, END_OF_STEP_TOKEN, END_OF_EPISODE_TOKEN)
    self.extra_special_tokens = _check_extra_special_tokens(extra_special_tokens, reserved)
    first_extra_id = self.BYTE_OFFSET + self.NUM_BYTES
    self._special_text_to_id = {text: token_id for token_id, text in enumerate(reserved)}
    for index, text in enumerate(self.extra_special_tokens):
      self._special_text_to_id[text] = first_extra_id + index
    self._special_id_to_text = {token_id: text for text, token_id in self._special_text_to_id.items()}
    self._special_ids = {PAD: 0, END_OF_STEP: 1, END_OF_EPISODE: 2}
    self._special_ids.update({text: self._special_text_to_id[text] for text in self.extra_special_tokens})
    self._vocab_size = first_extra_id + len(self.extra_special_tokens)
    self._special_pattern = _special_token_pattern(list(self._special_text_to_id))

  def __repr__(self) -> str:
    return f"ByteTokenizer(extra_special_tokens={list(self.extra_special_tokens)}, vocab_size={self.vocab_size})"

  @property
  def vocab_size(self) -> int:
    """259 + the number of extra special tokens."""
    return self._vocab_size


  def encode(self, text: str, *, add_special: bool = False) -> list[int]:
    """UTF-8 bytes offset by `BYTE_OFFSET`, with literal special tokens as single ids. `add_special` is accepted
    for the protocol and changes nothing: this tokenizer has no BOS or other post-processing."""
    del add_special
    ids: list[int] = []
    # re.split with one capture group alternates plain text (even indices) and special tokens (odd indices).
    for index, piece in enumerate(self._special_pattern.split(text)):
      if index % 2:
        ids.append(self._special_text_to_id[piece])
      elif piece:
        ids.extend(self._encode_plain(piece))
    return ids

  def _encode_plain(self, text: str) -> list[int]:
    """Ids of text that holds no special token."""
    return self._byte_ids(text)

  def _byte_ids(self, text: str) -> list[int]:
    return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64) + self.BYTE_OFFSET).tolist()

  def _id_bytes(self, token_id: int) -> bytes | None:
    """The UTF-8 bytes a non-special id stands for, None for an unknown id."""
    if self.BYTE_OFFSET <= token_id < self.BYTE_OFFSET + self.NUM_BYTES:
      return bytes([token_id - self.BYTE_OFFSET])
    return None

  def encode_batch(self, texts: Sequence[str], *, add_special: bool = False) -> list[list[int]]:
    """`encode` of each text."""
    return [self.encode(text, add_special=add_special) for text in texts]

  def decode(self, ids: IdsLike, *, skip_special: bool = False) -> str:
    """Text of `ids`. Runs of byte ids decode together (so multi-byte characters survive); special ids decode to
    their text unless `skip_special`; ids out of range decode to a visible placeholder. Never raises."""
    pieces: list[str] = []
    pending_bytes = bytearray()
    for token_id in _ids_as_list(ids):
      piece_bytes = self._id_bytes(token_id)
      if piece_bytes is not None:
        pending_bytes.extend(piece_bytes)
        continue
      if pending_bytes:
        pieces.append(pending_bytes.decode("utf-8", errors="replace"))
        pending_bytes.clear()
      if token_id in self._special_id_to_text:
        if not skip_special:
          pieces.append(self._special_id_to_text[token_id])
      else:
        pieces.append(unknown_id_placeholder(token_id))
    if pending_bytes:
      pieces.append(pending_bytes.decode("utf-8", errors="replace"))
    return "".join(pieces)

  def token_to_id(self, token: str) -> int:
    """Id of a special token's text, or of a byte token written `<0xNN>`."""
    if token in self._special_text_to_id:
      return self._special_text_to_id[token]
    byte_match = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
    if byte_match:
      return int(byte_match.group(1), 16) + self.BYTE_OFFSET
    raise KeyError(f"ByteTokenizer has no token {token!r}; special tokens are {list(self._special_text_to_id)}")

  def id_to_token(self, token_id: int) -> str:
    """Text of a special id, or `<0xNN>` for a byte id."""
    token_id = int(token_id)
    if token_id in self._special_id_to_text:
      return self._special_id_to_text[token_id]
    if self.BYTE_OFFSET <= token_id < self.BYTE_OFFSET + self.NUM_BYTES:
      return f"<0x{token_id - self.BYTE_OFFSET:02X}>"
    raise KeyError(f"ByteTokenizer has no id {token_id}; ids lie in [0, {self.vocab_size})")


_WORD_PATTERN = re.compile(r"\w+|\W", re.UNICODE)


class WordTokenizer(ByteTokenizer):
  """A byte tokenizer plus a fixed word vocabulary: each word of `words` is one id, everything else bytes.

  Ids: the `ByteTokenizer` layout (pad 0, end_of_step 1, end_of_episode 2, bytes 3-258, extra special tokens), then
  the words in the order given. Text splits into runs of word characters (`\\w+`) and single other characters; a run
  in the vocabulary encodes as its id, anything else (unknown words, spaces, punctuation) as bytes. So the same word
  is the same id wherever it stands (no leading-space variants), which is what lets a small model copy a name from
  an observation into its action. `decode(encode(text)) == text` for every string.

  This is the embedded default's tokenizer at laptop scale: with `lookup_qa.vocabulary()` an episode takes about
  4x fewer tokens than with bytes (and attention about 16x less work), and a real model's BPE plays this role at scale.
  """

  def __init__(self, words: Sequence[str], extra_special_tokens: Sequence[str] = ()):
    """`words`: distinct non-empty runs of word characters (`re.fullmatch(r"\\w+", word)`)."""
    super().__init__(extra_special_tokens)
    if isinstance(words, str):
      raise TypeError(f"words must be a sequence of strings, got the string {words!r}")
    words = tuple(words)
    for word in words:
      if not isinstance(word, str) or not re.fullmatch(r"\w+", word):
        raise ValueError(f"words: each must be a non-empty run of word characters, got {word!r}")
    duplicates = sorted({word for word in words if words.count(word) > 1})
    if duplicates:
      raise ValueError(f"words has duplicates: {duplicates}")
    self.words = words
    first_word_id = self._vocab_size
    self._word_to_id = {word: first_word_id + index for index, word in enumerate(words)}
    self._id_to_word = {token_id: word for word, token_id in self._word_to_id.items()}
    self._vocab_size = first_word_id + len(words)

  def __repr__(self) -> str:
    return (f"WordTokenizer({len(self.words)} words, extra_special_tokens={list(self.extra_special_tokens)}, "
            f"vocab_size={self.vocab_size})")

  @property
  def vocab_size(self) -> int:
    """259 + the number of extra special tokens + the number of words."""
    return self._vocab_size

  def _encode_plain(self, text: str) -> list[int]:
    ids: list[int] = []
    for piece in _WORD_PATTERN.findall(text):
      token_id = self._word_to_id.get(piece)
      ids.extend(self._byte_ids(piece) if token_id is None else [token_id])
    return ids

  def _id_bytes(self, token_id: int) -> bytes | None:
    word = self._id_to_word.get(token_id)
    return super()._id_bytes(token_id) if word is None else word.encode("utf-8")

  def token_to_id(self, token: str) -> int:
    """Id of a word, a special token's text, or a byte token written `<0xNN>`."""
    if token in self._word_to_id:
      return self._word_to_id[token]
    return super().token_to_id(token)

  def id_to_token(self, token_id: int) -> str:
    """Text of a word or special id, or `<0xNN>` for a byte id."""
    word = self._id_to_word.get(int(token_id))
    return super().id_to_token(token_id) if word is None else word


def _find_tokenizer_file(path: str | os.PathLike) -> str:
  """The tokenizer.json at `path`, or inside the directory `path`; FileNotFoundError otherwise."""
  path = os.fspath(path)
  candidate = os.path.join(path, TOKENIZER_FILE_NAME) if os.path.isdir(path) else path
  if not os.path.isfile(candidate):
    raise FileNotFoundError(f"no tokenizer file at {candidate!r}: pass a tokenizer.json or a directory holding one")
  return candidate


def read_tokenizer_file(path: str | os.PathLike):
  """A `tokenizers.Tokenizer` from a tokenizer.json (or a directory holding one). A file that is not JSON, or JSON
  the library rejects, is one ValueError line naming the file (the library's own error is a bare Exception); the
  file is parsed a second time only then, so a good file loads as fast as `Tokenizer.from_file`."""
  try:
    from tokenizers import Tokenizer as LibraryTokenizer
  except ImportError as error:
    raise ImportError("HFTokenizer needs the `tokenizers` library: pip install tokenizers") from error
  path = _find_tokenizer_file(path)
  try:
    return LibraryTokenizer.from_file(path)
  except Exception as error:  # noqa: BLE001 - the library raises bare Exceptions; say which file and why
    library_problem = " ".join(str(error).split()) or type(error).__name__
  checks.read_json(path)  # not JSON at all: say so
  raise ValueError(f"{path} is not a tokenizer.json the tokenizers library can load ({library_problem})")


def _pad_token_from_tokenizer_config(tokenizer_file: str) -> str | None:
  """`pad_token` of a tokenizer_config.json next to the tokenizer file, when there is one (string or dict form).
  A tokenizer_config.json that is not a JSON object is a one-line ValueError: ignoring it would silently pick
  another pad token."""
  config_file = os.path.join(os.path.dirname(tokenizer_file), TOKENIZER_CONFIG_FILE_NAME)
  if not os.path.isfile(config_file):
    return None
  config = checks.read_json(config_file)
  if not isinstance(config, Mapping):
    raise ValueError(f"{config_file} is not a JSON object (got {type(config).__name__})")
  pad_token = config.get("pad_token")
  if isinstance(pad_token, Mapping):
    pad_token = pad_token.get("content")
  return pad_token if isinstance(pad_token, str) and pad_token else None


class HFTokenizer(_SpecialIds):
  """A Hugging Face `tokenizer.json` (any model's) loaded with the `tokenizers` library.

  Reserved tokens: each of `end_of_step`, `end_of_episode` and `pad` is either the literal text of a token already
  in the vocabulary (e.g. `end_of_step="<|im_end|>"`; an unknown name is a one-line ValueError) or, when None, the
  stepjax default (`<|end_of_step|>`, `<|end_of_episode|>`), taken from the vocabulary if present and otherwise added
  as a special token at the end of the vocabulary. A None `pad` is looked up in order: the file's padding settings,
  `pad_token` of a tokenizer_config.json in the same directory, the stepjax default `<|pad|>` (added if absent).
  `extra_special_tokens` are added (when absent) as special tokens too. `end_of_step` and `end_of_episode` must differ;
  pad may share an id with either (e.g. Qwen's `<|endoftext|>`), since masks, not ids, mark padding.

  The file's own padding and truncation are switched off: `encode` returns every id, `pad_batch` does the padding.
  Added tokens raise `vocab_size` above the checkpoint's embedding size; the model must cover `vocab_size`.
  """

  def __init__(
      self,
      path: str | os.PathLike,
      *,
      end_of_step: str | None = None,
      end_of_episode: str | None = None,
      pad: str | None = None,
      extra_special_tokens: Sequence[str] = (),
  ):
    """`path`: a tokenizer.json or a directory holding one. See the class docstring for the other arguments."""
    self.path = _find_tokenizer_file(path)
    self._tokenizer = read_tokenizer_file(self.path)
    from tokenizers import AddedToken
    file_padding = self._tokenizer.padding
    self._tokenizer.no_padding()
    self._tokenizer.no_truncation()

    def existing_token_id(role: str, token: str) -> int:
      token_id = self._tokenizer.token_to_id(token)
      if token_id is None:
        raise ValueError(f"{role}={token!r} is not a token of {self.path}; pass a token in its vocabulary, or None to "
                         f"use the stepjax default")
      return token_id

    def token_id_adding_if_absent(token: str) -> int:
      token_id = self._tokenizer.token_to_id(token)
      if token_id is None:
        self._tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        token_id = self._tokenizer.token_to_id(token)
      return token_id

    if pad is None:
      pad = (file_padding or {}).get("pad_token") or _pad_token_from_tokenizer_config(self.path)
      if pad is not None and self._tokenizer.token_to_id(pad) is None:
        pad = None  # A stale pad name in the configuration: fall back to the stepjax default.
    reserved_roles = {
        END_OF_STEP: (end_of_step, END_OF_STEP_TOKEN),
        END_OF_EPISODE: (end_of_episode, END_OF_EPISODE_TOKEN),
        PAD: (pad, PAD_TOKEN),
    }
    reserved_ids: dict[str, int] = {}
    for role, (given_token, default_token) in reserved_roles.items():
      if given_token is None:
        reserved_ids[role] = token_id_adding_if_absent(default_token)
      else:
        reserved_ids[role] = existing_token_id(role, given_token)
    # The step boundary must be told apart from the episode end; pad may share an id (masks mark padding).
    if reserved_ids[END_OF_STEP] == reserved_ids[END_OF_EPISODE]:
      raise ValueError(f"end_of_step and end_of_episode must be different tokens, both map to id "
                       f"{reserved_ids[END_OF_STEP]} in {self.path}")
    self.extra_special_tokens = _check_extra_special_tokens(extra_special_tokens, ())
    for token in self.extra_special_tokens:
      token_id_adding_if_absent(token)

    self._special_ids = {
        token.content: token_id
        for token_id, token in sorted(self._tokenizer.get_added_tokens_decoder().items())
        if token.special
    }
    self._special_ids.update({token: self._tokenizer.token_to_id(token) for token in self.extra_special_tokens})
    self._special_ids.update(reserved_ids)
    self._vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1

  def __repr__(self) -> str:
    return (f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
            f"end_of_step_id={self.end_of_step_id}, eos_id={self.eos_id})")

  @property
  def library_tokenizer(self):
    """The underlying `tokenizers.Tokenizer` (with the added specials, padding and truncation off)."""
    return self._tokenizer

  @property
  def vocab_size(self) -> int:
    """Largest id in the vocabulary, added tokens included, plus one."""
    return self._vocab_size


  def encode(self, text: str, *, add_special: bool = False) -> list[int]:
    """Ids of `text`; `add_special` runs the file's post-processor (e.g. a BOS token)."""
    return self._tokenizer.encode(text, add_special_tokens=add_special).ids

  def encode_batch(self, texts: Sequence[str], *, add_special: bool = False) -> list[list[int]]:
    """`encode` of each text, in parallel inside the library."""
    return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special)]

  def decode(self, ids: IdsLike, *, skip_special: bool = False) -> str:
    """Text of `ids`. `skip_special` drops the file's special tokens and the three roles (even when a role is mapped
    to an ordinary token). Ids out of range decode to a visible placeholder instead of silently vanishing."""
    id_list = _ids_as_list(ids)
    if skip_special:
      role_ids = {self.pad_id, self.end_of_step_id, self.eos_id}
      id_list = [token_id for token_id in id_list if token_id not in role_ids]
    if all(0 <= token_id < self.vocab_size for token_id in id_list):
      return self._tokenizer.decode(id_list, skip_special_tokens=skip_special)
    pieces: list[str] = []
    known_run: list[int] = []
    for token_id in id_list:
      if 0 <= token_id < self.vocab_size:
        known_run.append(token_id)
        continue
      if known_run:
        pieces.append(self._tokenizer.decode(known_run, skip_special_tokens=skip_special))
        known_run = []
      pieces.append(unknown_id_placeholder(token_id))
    if known_run:
      pieces.append(self._tokenizer.decode(known_run, skip_special_tokens=skip_special))
    return "".join(pieces)

  def token_to_id(self, token: str) -> int:
    """Id of any token of the vocabulary, added tokens included."""
    token_id = self._tokenizer.token_to_id(token)
    if token_id is None:
      raise KeyError(f"{token!r} is not a token of {self.path}")
    return token_id

  def id_to_token(self, token_id: int) -> str:
    """Vocabulary entry of an id (in the model's own spelling, e.g. byte-level `Ġ` for a space)."""
    token = self._tokenizer.id_to_token(int(token_id))
    if token is None:
      raise KeyError(f"id {token_id} is not in the vocabulary of {self.path} (ids lie in [0, {self.vocab_size}))")
    return token


BYTE_SPEC = "byte"


def load_tokenizer(spec: str | os.PathLike, **options) -> ByteTokenizer | HFTokenizer:
  """`"byte"` → `ByteTokenizer(**options)`; a local tokenizer.json or a directory holding one →
  `HFTokenizer(spec, **options)`. Anything else is a ValueError (hub names are not downloaded)."""
  if isinstance(spec, str) and spec == BYTE_SPEC:
    return ByteTokenizer(**options)
  if isinstance(spec, (str, os.PathLike)) and os.path.exists(spec):
    return HFTokenizer(spec, **options)
  raise ValueError(f"load_tokenizer: spec={spec!r} is not allowed; use {BYTE_SPEC!r} or an existing local path to a "
                   f"tokenizer.json or a directory holding one (hub names are not downloaded)")


def encode_fragments(tokenizer: Tokenizer, fragments: Mapping[str, str]) -> dict[str, np.ndarray]:
  """Name → int32 id array of each text fragment, encoded once (no post-processing). Pure-JAX environments call
  this at construction time and build every observation from the arrays, never from text."""
  names = list(fragments)
  encoded = tokenizer.encode_batch([fragments[name] for name in names])
  return {name: np.asarray(ids, dtype=np.int32) for name, ids in zip(names, encoded)}


def pad_batch(
    sequences: Sequence[IdsLike], length: int, pad_id: int, side: str = "right"
) -> tuple[np.ndarray, np.ndarray]:
  """Ragged id sequences → (ids [N, length] int32, mask [N, length] bool), mask True on real tokens.

  `side="right"` puts each sequence at the start of its row (padding after); `side="left"` at the end (padding
  before, as for batched prefill). A sequence longer than `length` is a ValueError, never a silent truncation.
  """
  if side not in ("right", "left"):
    raise ValueError(f"pad_batch: side must be 'right' or 'left', got {side!r}")
  if length < 0:
    raise ValueError(f"pad_batch: length must be >= 0, got {length}")
  ids = np.full((len(sequences), length), pad_id, dtype=np.int32)
  mask = np.zeros((len(sequences), length), dtype=bool)
  for row, sequence in enumerate(sequences):
    sequence = np.asarray(sequence, dtype=np.int32).reshape(-1)
    if sequence.size > length:
      raise ValueError(f"pad_batch: sequence {row} has {sequence.size} tokens, longer than length={length}")
    start = 0 if side == "right" else length - sequence.size
    ids[row, start:start + sequence.size] = sequence
    mask[row, start:start + sequence.size] = True
  return ids, mask
