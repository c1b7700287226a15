"""Tests of stepjax.tokenizers: the byte-level default, the Hugging Face wrapper (against a small BPE trained here,
the `tokenizers` library itself and, when installed, `transformers`), `encode_fragments`, `pad_batch`,
`load_tokenizer`."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepjax.tokenizers import (
    END_OF_EPISODE_TOKEN,
    END_OF_STEP_TOKEN,
    PAD_TOKEN,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    WordTokenizer,
    encode_fragments,
    load_tokenizer,
    pad_batch,
    unknown_id_placeholder,
)

tokenizers_library = pytest.importorskip("tokenizers")

AGENT_TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
TRAINING_SENTENCES = [
    "The agent reads an observation and acts in steps.",
    "You are in a kitchen. There is a fridge here. Open the fridge.",
    "The environment answers with the next observation; the reward is sparse and late.",
    "go north. take the key. unlock the door with the key. héllo wörld 🙂",
]
TINY_MODEL_VOCAB_SIZE = 512


WORDS = ("search", "answer", "Zorva", "Kalin", "city", "of")


# ----------------------------------------------------------------------------------------------------------------------
# ByteTokenizer


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=64))
def test_byte_round_trip_on_random_unicode(text):
  tokenizer = ByteTokenizer(extra_special_tokens=AGENT_TAGS)
  ids = tokenizer.encode(text)
  assert all(0 <= token_id < tokenizer.vocab_size for token_id in ids)
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(np.asarray(ids, dtype=np.int32)) == text


def test_byte_ids_are_utf8_bytes_after_the_reserved_specials():
  tokenizer = ByteTokenizer()
  assert tokenizer.encode("A") == [ord("A") + ByteTokenizer.BYTE_OFFSET]
  assert tokenizer.encode("é") == [byte + ByteTokenizer.BYTE_OFFSET for byte in "é".encode("utf-8")]
  assert tokenizer.encode("") == []
  assert tokenizer.encode("go", add_special=True) == tokenizer.encode("go")
  assert (tokenizer.pad_id, tokenizer.end_of_step_id, tokenizer.eos_id) == (0, 1, 2)
  assert tokenizer.vocab_size == 259


def test_byte_special_ids_are_distinct_and_fit_the_tiny_preset():
  tokenizer = ByteTokenizer(extra_special_tokens=AGENT_TAGS)
  special_ids = tokenizer.special_ids
  assert len(set(special_ids.values())) == len(special_ids) == 3 + len(AGENT_TAGS)
  assert len({tokenizer.pad_id, tokenizer.eos_id, tokenizer.end_of_step_id}) == 3
  assert all(0 <= token_id < tokenizer.vocab_size for token_id in special_ids.values())
  assert tokenizer.vocab_size <= TINY_MODEL_VOCAB_SIZE
  assert special_ids["pad"] == tokenizer.pad_id and special_ids["end_of_episode"] == tokenizer.eos_id
  assert isinstance(tokenizer, Tokenizer)


def test_byte_specials_encode_to_single_ids_and_decode_back():
  tokenizer = ByteTokenizer(extra_special_tokens=AGENT_TAGS)
  for text in (PAD_TOKEN, END_OF_STEP_TOKEN, END_OF_EPISODE_TOKEN, *AGENT_TAGS):
    ids = tokenizer.encode(text)
    assert len(ids) == 1 and tokenizer.token_to_id(text) == ids[0] and tokenizer.id_to_token(ids[0]) == text
    assert tokenizer.decode(ids) == text
  text = f"<think>look</think><tool_call>go north</tool_call>{END_OF_STEP_TOKEN}"
  ids = tokenizer.encode(text)
  assert ids[0] == tokenizer.special_ids["<think>"] and ids[-1] == tokenizer.end_of_step_id
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(ids, skip_special=True) == "lookgo north"
  # Extras keep the byte ids in place: bytes never move when extras are configured.
  assert tokenizer.encode("go") == ByteTokenizer().encode("go")


def test_byte_longest_special_wins_over_its_prefix():
  tokenizer = ByteTokenizer(extra_special_tokens=("<tool>", "<tool_call>"))
  assert tokenizer.encode("<tool_call>") == [tokenizer.special_ids["<tool_call>"]]
  assert tokenizer.encode("<tool>") == [tokenizer.special_ids["<tool>"]]


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), max_size=48))
def test_byte_decode_never_raises_on_random_ids(ids):
  tokenizer = ByteTokenizer(extra_special_tokens=AGENT_TAGS)
  assert isinstance(tokenizer.decode(np.asarray(ids, dtype=np.int64)), str)
  assert isinstance(tokenizer.decode(ids, skip_special=True), str)


def test_byte_decode_shows_invalid_utf8_and_unknown_ids():
  tokenizer = ByteTokenizer()
  lone_continuation_byte = 0x80 + ByteTokenizer.BYTE_OFFSET
  assert tokenizer.decode([lone_continuation_byte]) == "\ufffd"
  assert tokenizer.decode([tokenizer.vocab_size, -1]) == unknown_id_placeholder(259) + unknown_id_placeholder(-1)
  # A special id between the bytes of one character splits it: both halves become replacement characters.
  first_byte, second_byte = tokenizer.encode("é")
  assert tokenizer.decode([first_byte, tokenizer.pad_id, second_byte], skip_special=True) == "\ufffd\ufffd"


def test_byte_token_lookup_and_its_errors():
  tokenizer = ByteTokenizer()
  assert tokenizer.id_to_token(ord("A") + 3) == "<0x41>" and tokenizer.token_to_id("<0x41>") == ord("A") + 3
  with pytest.raises(KeyError, match="no token"):
    tokenizer.token_to_id("<think>")
  with pytest.raises(KeyError, match="no id 259"):
    tokenizer.id_to_token(259)


@pytest.mark.parametrize(
    "extras, message",
    [(("<a>", "<a>"), "duplicates"), ((END_OF_STEP_TOKEN,), "clash"), (("",), "non-empty"), ("<a>", "sequence")],
)
def test_byte_rejects_bad_extra_special_tokens(extras, message):
  with pytest.raises((ValueError, TypeError), match=message):
    ByteTokenizer(extra_special_tokens=extras)


# ----------------------------------------------------------------------------------------------------------------------
# HFTokenizer, against a small byte-level BPE trained here


def train_bpe(special_tokens, padding_token=None):
  """A small byte-level BPE (as GPT-2 / Qwen use) trained on the sentences above."""
  from tokenizers import Tokenizer as LibraryTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers

  library_tokenizer = LibraryTokenizer(models.BPE())
  library_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  library_tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=400, special_tokens=list(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  library_tokenizer.train_from_iterator(TRAINING_SENTENCES * 4, trainer=trainer)
  if padding_token is not None:
    library_tokenizer.enable_padding(pad_id=library_tokenizer.token_to_id(padding_token), pad_token=padding_token)
  return library_tokenizer


@pytest.fixture(scope="module")
def chat_bpe_dir(tmp_path_factory):
  """Directory with a tokenizer.json that has `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` and no pad."""
  directory = tmp_path_factory.mktemp("chat_bpe")
  train_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).save(str(directory / "tokenizer.json"))
  return directory


@pytest.fixture(scope="module")
def padded_bpe_file(tmp_path_factory):
  """A tokenizer.json whose padding settings name `<pad>`."""
  path = tmp_path_factory.mktemp("padded_bpe") / "tokenizer.json"
  train_bpe(["<unk>", "<pad>"], padding_token="<pad>").save(str(path))
  return path


def library_tokenizer_from(path):
  return tokenizers_library.Tokenizer.from_file(str(path))


def test_hf_encode_matches_the_library_and_round_trips(chat_bpe_dir):
  tokenizer = HFTokenizer(chat_bpe_dir)
  reference = library_tokenizer_from(chat_bpe_dir / "tokenizer.json")
  texts = [*TRAINING_SENTENCES, "unseen words: xylophone, ßœ∑, 🙂🙂", "", "  leading and trailing  "]
  for text in texts:
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text
  assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]
  assert isinstance(tokenizer, Tokenizer)


@settings(max_examples=25, deadline=None)
@given(text=st.text(max_size=48))
def test_hf_round_trip_on_random_unicode(chat_bpe_dir, text):
  tokenizer = HFTokenizer(chat_bpe_dir)
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_hf_adds_missing_specials_at_the_end_of_the_vocabulary(chat_bpe_dir):
  reference = library_tokenizer_from(chat_bpe_dir / "tokenizer.json")
  file_vocab_size = reference.get_vocab_size(with_added_tokens=True)
  tokenizer = HFTokenizer(chat_bpe_dir, extra_special_tokens=AGENT_TAGS)
  added_ids = {tokenizer.end_of_step_id, tokenizer.eos_id, tokenizer.pad_id} | {
      tokenizer.special_ids[tag] for tag in AGENT_TAGS}
  assert added_ids == set(range(file_vocab_size, file_vocab_size + 3 + len(AGENT_TAGS)))
  assert tokenizer.vocab_size == file_vocab_size + 3 + len(AGENT_TAGS)
  assert tokenizer.id_to_token(tokenizer.end_of_step_id) == END_OF_STEP_TOKEN
  assert tokenizer.token_to_id(PAD_TOKEN) == tokenizer.pad_id
  text = f"<think>open the fridge</think>{END_OF_STEP_TOKEN}"
  ids = tokenizer.encode(text)
  assert ids[0] == tokenizer.special_ids["<think>"] and ids[-1] == tokenizer.end_of_step_id
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(ids, skip_special=True) == "open the fridge"
  # The file's own special tokens are listed too.
  assert tokenizer.special_ids["<|im_end|>"] == reference.token_to_id("<|im_end|>")


def test_hf_maps_specials_to_existing_tokens_without_adding_any(chat_bpe_dir):
  reference = library_tokenizer_from(chat_bpe_dir / "tokenizer.json")
  tokenizer = HFTokenizer(
      chat_bpe_dir / "tokenizer.json", end_of_step="<|im_end|>", end_of_episode="<|endoftext|>", pad="<|endoftext|>")
  assert tokenizer.end_of_step_id == reference.token_to_id("<|im_end|>")
  assert tokenizer.eos_id == tokenizer.pad_id == reference.token_to_id("<|endoftext|>")
  assert tokenizer.vocab_size == reference.get_vocab_size(with_added_tokens=True)
  ids = tokenizer.encode("go north<|im_end|>")
  assert ids[-1] == tokenizer.end_of_step_id
  assert tokenizer.decode(ids, skip_special=True) == "go north"


def test_hf_takes_pad_from_the_file_padding_or_the_tokenizer_config(padded_bpe_file, chat_bpe_dir, tmp_path):
  tokenizer = HFTokenizer(padded_bpe_file)
  assert tokenizer.pad_id == library_tokenizer_from(padded_bpe_file).token_to_id("<pad>")
  # The file's padding is switched off: encode_batch returns ragged ids.
  short_ids, long_ids = tokenizer.encode_batch(["go", "go north now"])
  assert short_ids == tokenizer.encode("go") and len(short_ids) < len(long_ids)
  assert tokenizer.pad_id not in short_ids

  (tmp_path / "tokenizer.json").write_bytes((chat_bpe_dir / "tokenizer.json").read_bytes())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "<|endoftext|>"}}))
  assert HFTokenizer(tmp_path).pad_id == library_tokenizer_from(tmp_path / "tokenizer.json").token_to_id(
      "<|endoftext|>")


def test_hf_decode_shows_ids_out_of_range(chat_bpe_dir):
  tokenizer = HFTokenizer(chat_bpe_dir)
  ids = tokenizer.encode("go north")
  decoded = tokenizer.decode([*ids, tokenizer.vocab_size, -5])
  assert decoded == "go north" + unknown_id_placeholder(tokenizer.vocab_size) + unknown_id_placeholder(-5)


def test_hf_errors_are_one_clear_line(chat_bpe_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer file"):
    HFTokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="no tokenizer file"):
    HFTokenizer(tmp_path / "missing.json")
  with pytest.raises(ValueError, match=r"end_of_step='<\|eot\|>' is not a token"):
    HFTokenizer(chat_bpe_dir, end_of_step="<|eot|>")
  with pytest.raises(ValueError, match="must be different"):
    HFTokenizer(chat_bpe_dir, end_of_step="<|im_end|>", end_of_episode="<|im_end|>")
  with pytest.raises(KeyError, match="not a token"):
    HFTokenizer(chat_bpe_dir).token_to_id("<|nope|>")


def test_hf_matches_transformers_fast_tokenizer(chat_bpe_dir):
  transformers = pytest.importorskip("transformers")
  tokenizer_file = str(chat_bpe_dir / "tokenizer.json")
  reference = transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_file)
  tokenizer = HFTokenizer(tokenizer_file, end_of_step="<|im_end|>")
  for text in [*TRAINING_SENTENCES, "<|im_start|>user\ngo north<|im_end|>"]:
    assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------------------------------------------------------
# encode_fragments, pad_batch, load_tokenizer


def test_encode_fragments_gives_int32_arrays_equal_to_encode():
  tokenizer = ByteTokenizer()
  fragments = {"prompt": "You are in a kitchen.", "empty": "", "win": "You win!"}
  encoded = encode_fragments(tokenizer, fragments)
  assert list(encoded) == list(fragments)
  for name, text in fragments.items():
    assert encoded[name].dtype == np.int32 and encoded[name].tolist() == tokenizer.encode(text)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch_places_tokens_on_the_requested_side(side):
  sequences = [[5, 6, 7], [], np.asarray([8], dtype=np.int64), [9, 10, 11, 12]]
  ids, mask = pad_batch(sequences, length=4, pad_id=0, side=side)
  assert ids.shape == mask.shape == (4, 4) and ids.dtype == np.int32 and mask.dtype == bool
  for row, sequence in enumerate(sequences):
    sequence = list(np.asarray(sequence).tolist())
    assert ids[row][mask[row]].tolist() == sequence
    assert (ids[row][~mask[row]] == 0).all()
    expected_mask = [True] * len(sequence) + [False] * (4 - len(sequence))
    assert mask[row].tolist() == (expected_mask if side == "right" else expected_mask[::-1])


def test_pad_batch_errors_and_empty_batch():
  with pytest.raises(ValueError, match="sequence 1 has 3 tokens, longer than length=2"):
    pad_batch([[1], [1, 2, 3]], length=2, pad_id=0)
  with pytest.raises(ValueError, match="side must be 'right' or 'left'"):
    pad_batch([[1]], length=2, pad_id=0, side="middle")
  ids, mask = pad_batch([], length=3, pad_id=7)
  assert ids.shape == mask.shape == (0, 3)


def test_load_tokenizer_byte_path_and_errors(chat_bpe_dir, tmp_path):
  assert isinstance(load_tokenizer("byte"), ByteTokenizer)
  assert load_tokenizer("byte", extra_special_tokens=AGENT_TAGS).special_ids["<think>"] == 259
  assert isinstance(load_tokenizer(chat_bpe_dir), HFTokenizer)
  assert isinstance(load_tokenizer(str(chat_bpe_dir / "tokenizer.json"), end_of_step="<|im_end|>"), HFTokenizer)
  for spec in ("bytes", "Qwen/Qwen3-0.6B", str(tmp_path / "missing.json"), 3):
    with pytest.raises(ValueError, match=r"load_tokenizer: spec=.* is not allowed; use 'byte' or an existing"):
      load_tokenizer(spec)
  with pytest.raises(FileNotFoundError, match="no tokenizer file"):
    load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# WordTokenizer


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(WORDS + (" ", ": ", ".\n", "Zorvas", END_OF_STEP_TOKEN, "<think>")),
                          st.text(max_size=6)), max_size=12).map("".join))
def test_word_round_trip_on_random_text(text):
  tok = WordTokenizer(WORDS, extra_special_tokens=("<think>",))
  assert tok.decode(tok.encode(text)) == text


def test_word_ids_follow_the_byte_layout_and_words_are_whole_tokens():
  byte_tok, tok = ByteTokenizer(("<think>",)), WordTokenizer(WORDS, extra_special_tokens=("<think>",))
  assert isinstance(tok, Tokenizer)
  first_word = 259 + 1
  assert tok.vocab_size == first_word + len(WORDS)
  assert [tok.token_to_id(w) for w in WORDS] == list(range(first_word, first_word + len(WORDS)))
  assert tok.special_ids == byte_tok.special_ids
  space, colon = byte_tok.encode(" ")[0], byte_tok.encode(":")[0]
  zorva, kalin, search = (tok.token_to_id(w) for w in ("Zorva", "Kalin", "search"))
  # The same name is the same id after a space, after a colon, at the start: what a small model copies.
  assert tok.encode("Zorva: city Kalin") == [zorva, colon, space, tok.token_to_id("city"), space, kalin]
  assert tok.encode("search Zorva<|end_of_step|>") == [search, space, zorva, 1]
  # Unknown words (and words that merely contain a known one) fall back to bytes.
  assert tok.encode("Zorvas") == byte_tok.encode("Zorvas")
  assert tok.encode("héllo <think>") == byte_tok.encode("héllo <think>")
  assert [tok.id_to_token(i) for i in tok.encode("of Kalin")] == ["of", "<0x20>", "Kalin"]
  assert tok.decode([zorva, 999, 1], skip_special=True) == "Zorva" + unknown_id_placeholder(999)


@pytest.mark.parametrize("words, message", [
    (("ok", "ok"), r"words has duplicates: \['ok'\]"),
    (("two words",), r"words: each must be a non-empty run of word characters, got 'two words'"),
    (("",), r"words: each must be a non-empty run"),
])
def test_word_rejects_bad_vocabularies(words, message):
  with pytest.raises(ValueError, match=message):
    WordTokenizer(words)
  with pytest.raises(TypeError, match="words must be a sequence of strings"):
    WordTokenizer("search")
