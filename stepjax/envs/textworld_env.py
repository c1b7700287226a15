"""TextWorld games as host environments: generated offline with TextWorld's own generator, played with its
Inform 7 / Z-machine interpreter (through Jericho), no network access at any point.

    files = make_games("/tmp/tw_games", seeds=range(8), world_size=3, nb_objects=5, quest_length=3)
    env = TextWorldEnv(files[0], admissible_commands=True, max_steps=50)
    text = env.reset(seed=0)          # goal + first room, banner removed, ends with the "> " cue
    step = env.step("go east", tokens)
    env.expert_command()              # next command of the winning policy from the current state

Observations are cleaned interpreter output: TextWorld's ASCII-art banner, the Z-machine status line
("-= Room =-0/3"), the interpreter's own ">" prompt and Inform's end-of-game RESTART/RESTORE/QUIT question are
removed and blank lines collapsed; an observation of a running episode then ends with "Admissible: ...\n" (when
requested) and the cue "> ". Example first observation:

    Hey, thanks for coming over to the TextWorld today, there is something I need you to do for me. Your first
    objective is to attempt to head east. Then, retrieve the TextWorld style key from the floor of the attic. ...

    -= Scullery =-
    This is going to sound unbelievable, but you've just entered a scullery. The room is well lit.
    ...
    >

Actions: `step` receives the decoded text of the model's tokens without special tokens (the loop decodes with
`skip_special=True`); the env collapses whitespace and keeps the line's first command only, so one step is one
command. Inform runs "a. b" and "a then b" as several commands in one turn, which TextWorld's state tracking misreads
(it reads the score of the first one: a game won by "go south. take key. unlock box with key" scored 0, and the
expert's and the admissible commands went stale), and a meta command after the separator ("look. quit") would reach
the interpreter. Interpreter meta commands (quit, restart, save, restore, undo, TextWorld's `tw-...` debug commands,
...) are refused without reaching the game: they would leave the interpreter waiting for a yes/no answer, reveal
hidden state or desynchronise TextWorld's quest tracking. They count as a step with the feedback "That's not a verb I
recognise." and parsed=False.

"parsed" heuristic: an action is parsed unless the game's answer starts with one of Inform 7's parser errors
(`PARSER_ERRORS`: "That's not a verb I recognise.", "I didn't understand ...", "You can't see any such thing.",
"What do you want to ...?", "Which do you mean ...?", "I beg your pardon?", ...). A command the parser understood
but the world refuses ("You can't go that way.", "That's locked.") counts as parsed.

TextWorld version specifics (1.7): `GameOptions.seeds` (an int seeds the map / objects / quest / grammar rngs),
`textworld.generator.make_game` + `compile_game` (bundled Inform 7 compiler, .z8 next to its .json), `textworld.start`
with `EnvInfos(admissible_commands, policy_commands, score, max_score, won, lost)`; `policy_commands` is the winning
policy from the current state (TextWorld's state tracking), `won` is read from "*** The End ***".
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any, Sequence

import numpy as np

from stepjax.envs.host import HostStep

# Beginnings of Inform 7's parser error messages (6M62 English library), lower-cased; an answer starting with one of
# them means the parser did not turn the command into an action.
PARSER_ERRORS = (
    "that's not a verb i recognise",
    "i didn't understand",
    "i only understood you as far as",
    "you can't see any such thing",
    "you seem to have said too little",
    "you can't use multiple objects with that verb",
    "you can only use multiple objects once on a line",
    "you must name something more substantial",
    "you excepted something not included anyway",
    "you can only do that to something animate",
    "that noun did not make sense in this context",
    "i beg your pardon",
    "please give one of the answers above",
    "please answer yes or no",
    "what do you want to",
    "who do you want to",
    "which do you mean",
    "whom do you want to",
)

# Commands refused before they reach the interpreter (first word, lower-cased); plus anything starting with "tw-".
META_COMMANDS = frozenset({
    "quit", "q", "restart", "restore", "save", "undo", "oops", "o", "script", "unscript", "transcript", "notranscript",
    "print_state", "restrict", "enable", "disable",
})
REFUSED_FEEDBACK = "That's not a verb I recognise."
GAME_OVER_FEEDBACK = "The game is over."
CUE = "> "
ADMISSIBLE_PREFIX = "Admissible: "

_STATUS_LINE = re.compile(r"\s*-= [^\n]*=-\s*-?\d+/\d+\s*$")  # the Z-machine status bar Jericho appends
_END_QUESTION = re.compile(r"^\s*Would you like to RESTART.*$", re.MULTILINE)
_CENTRED = re.compile(r"^[ \t]{8,}", re.MULTILINE)  # Inform centres "*** The End ***"
_BLANK_RUNS = re.compile(r"\n{3,}")


# Modules a process-isolated TextWorld worker needs: imported once by the forkserver the workers are forked from
# (`HostEnvPool(..., preload=PRELOAD)`), so that a worker starts in milliseconds instead of importing TextWorld.
PRELOAD = (__name__, "textworld")

_TEXTWORLD_LOCK = threading.Lock()

def _textworld():
  try:
    import textworld  # pylint: disable=import-outside-toplevel  -- a 5 s import, only when TextWorld is used
  except ImportError as error:
    raise ImportError("stepjax.envs.textworld_env needs the `textworld` package (pip install textworld)") from error
  return textworld


def make_games(out_dir: str | os.PathLike, seeds: Sequence[int], *, world_size: int = 3, nb_objects: int = 5,
               quest_length: int = 3, quest_breadth: int = 1, theme: str = "house",
               overwrite: bool = False) -> list[str]:
  """Generates and compiles one TextWorld game per seed into `out_dir`; returns the .z8 paths in the order of seeds.

  world_size: number of rooms; nb_objects: number of objects (quest objects plus distractors); quest_length: number
  of commands of the winning walkthrough; quest_breadth: sub-quests per quest (1 = linear); theme: TextWorld's text
  grammar theme. Deterministic: the seed fixes the map, objects, quest and text rngs, so the same seed and settings
  give the same game. A game already in `out_dir` is reused unless `overwrite` (the file name is TextWorld's game id,
  which encodes the settings and seeds).
  """
  textworld = _textworld()
  from textworld.generator import compile_game, make_game  # pylint: disable=import-outside-toplevel

  for name, value in (("world_size", world_size), ("nb_objects", nb_objects), ("quest_length", quest_length),
                      ("quest_breadth", quest_breadth)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"make_games: {name} must be an int >= 1, got {value!r}")
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for seed in seeds:
    options = textworld.GameOptions()
    options.seeds = int(seed)
    options.nb_rooms = world_size
    options.nb_objects = nb_objects
    options.quest_length = quest_length
    options.quest_breadth = quest_breadth
    options.grammar.theme = theme
    options.force_recompile = overwrite
    # Z-machine only: it is the format TextWorld's Inform 7 wrapper (and its state tracking) plays.
    game_file = os.path.join(out_dir, options.uuid + ".z8")
    options.path = game_file
    if overwrite or not (os.path.isfile(game_file) and os.path.isfile(game_file[:-3] + ".json")):
      game_file = compile_game(make_game(options), options)
    paths.append(game_file)
  return paths


def clean_feedback(text: str) -> str:
  """Interpreter output -> readable text: no banner, status line, prompt or end-of-game question; blank lines
  collapsed."""
  text = _STATUS_LINE.sub("", text).rstrip()
  if text.endswith(">"):
    text = text[:-1]
  text = _END_QUESTION.sub("", text)
  text = _CENTRED.sub("", text)
  lines = [line.rstrip() for line in text.split("\n")]
  # The banner is the leading run of lines without a letter or digit (ASCII art made of _ | \ / $ > and spaces).
  while lines and not any(char.isalnum() for char in lines[0]):
    lines.pop(0)
  return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


def is_parser_error(feedback: str) -> bool:
  """Whether cleaned feedback is one of Inform 7's parser errors (see `PARSER_ERRORS`)."""
  return feedback.strip().lower().startswith(PARSER_ERRORS)


MAX_COMMAND_CHARS = 120


# Where Inform's parser starts the next command of a line: a full stop, or the word "then" (any case; the Z-machine
# splits words at spaces and at its separators . , and ").
_NEXT_COMMAND = re.compile(r'\.|(?<![^\s,"])then(?![^\s.,"])', re.IGNORECASE)


def normalise_command(action_text: str) -> str:
  """One command the interpreter can take: printable ASCII only, cut before the line's second command (a full stop
  or the word "then": see the module docstring), whitespace (newlines included) collapsed to single spaces, ends
  stripped, at most MAX_COMMAND_CHARS characters.

  The Z-machine reads ASCII commands into a small buffer, and Jericho's interpreter crashes the whole process on some
  non-ASCII / control-character input (an untrained model's actions are exactly that), so nothing else reaches it.
  """
  # Backslash starts a dumb-frotz interpreter command ("\\q"...), never a game command.
  printable = "".join(ch if " " <= ch <= "~" and ch != "\\" else " " for ch in action_text)
  first = _NEXT_COMMAND.split(printable, maxsplit=1)[0]
  return " ".join(first.split())[:MAX_COMMAND_CHARS].strip()


def is_meta_command(command: str) -> bool:
  words = command.lower().split()
  return bool(words) and (words[0] in META_COMMANDS or words[0].startswith("tw-"))


class TextWorldEnv:
  """A TextWorld game (or several) as a `HostEnv`.

  game_file: a compiled .z8 game (its .json next to it), or a sequence of them: `reset(seed)` then plays
  `game_files[seed % len(game_files)]` (the games themselves are deterministic).
  admissible_commands: list the admissible commands in `info["admissible_commands"]` and at the end of every
  observation of a running episode ("Admissible: cmd1, cmd2, ...").
  max_steps: the episode is truncated after this many steps (unless that step ends the game).
  score_as_reward: reward = score increase of the step; else 1.0 on the winning step, 0 otherwise.

  info of each step: "success" (won), "parsed" (see the module docstring), "score", "max_score", and
  "admissible_commands" when requested. Stepping an ended episode returns "The game is over." with no reward.
  """

  def __init__(self, game_file: str | os.PathLike | Sequence[str | os.PathLike], *, admissible_commands: bool = False,
               max_steps: int = 50, score_as_reward: bool = True):
    files = [game_file] if isinstance(game_file, (str, os.PathLike)) else list(game_file)
    if not files:
      raise ValueError("TextWorldEnv: game_file must name at least one game")
    self.game_files = [os.fspath(path) for path in files]
    for path in self.game_files:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"TextWorldEnv: no game file {path!r}")
      if not path.endswith(".z8") or not os.path.isfile(path[:-3] + ".json"):
        raise ValueError(f"TextWorldEnv: {path!r} must be a TextWorld .z8 game with its .json next to it "
                         f"(make_games writes both)")
    if not isinstance(max_steps, int) or max_steps < 1:
      raise ValueError(f"TextWorldEnv: max_steps must be an int >= 1, got {max_steps!r}")
    self.admissible_commands = admissible_commands
    self.max_steps = max_steps
    self.score_as_reward = score_as_reward
    textworld = _textworld()
    # policy_commands is always requested: it drives expert_command and costs one plan per step on small games.
    self._request_infos = textworld.EnvInfos(admissible_commands=admissible_commands, policy_commands=True,
                                             score=True, max_score=True, won=True, lost=True)
    self._env = None
    self.game_file: str | None = None
    self._game_state: Any = None
    self._num_steps = 0
    self._done = False

  # ---- HostEnv ----

  def reset(self, seed: int) -> str:
    """Starts the game chosen by `seed`; returns the goal and the first room description."""
    game_file = self.game_files[int(seed) % len(self.game_files)]
    # Loading a game parses its logic with TextWorld's grammar parser (tatsu), which is not thread-safe, and the
    # interpreter (Jericho's libfrotz) crashed the process when several games stepped at once from a thread pool:
    # every call into TextWorld takes one process-wide lock. Games answer in milliseconds, so little is lost; a
    # process-isolated pool (HostEnvPool(isolation="process")) gives every env a process, and so a lock, of its own.
    with _TEXTWORLD_LOCK:
      if self._env is None or game_file != self.game_file:
        self.close()
        self._env = _textworld().start(game_file, self._request_infos)
        self.game_file = game_file
      self._game_state = self._env.reset()
    self._num_steps = 0
    self._done = False
    return self._observation(clean_feedback(self._game_state.feedback))

  def step(self, action_text: str, action_tokens: np.ndarray | None = None) -> HostStep:
    """Sends the first command of `action_text` (no special tokens; `normalise_command`). `action_tokens` unused."""
    del action_tokens  # a text environment reads text
    if self._game_state is None:
      raise RuntimeError("TextWorldEnv.step called before reset")
    if self._done:
      ended_by_game = self._won or self._lost
      return HostStep(GAME_OVER_FEEDBACK, 0.0, terminated=ended_by_game, truncated=not ended_by_game,
                      info=self._info(parsed=False))
    command = normalise_command(action_text)
    previous_score = self.score
    if is_meta_command(command):
      feedback, parsed = REFUSED_FEEDBACK, False
    else:
      with _TEXTWORLD_LOCK:
        self._game_state, _, _ = self._env.step(command)
      feedback = clean_feedback(self._game_state.feedback)
      parsed = not is_parser_error(feedback)
    self._num_steps += 1
    won, lost = self._won, self._lost
    terminated = won or lost
    truncated = not terminated and self._num_steps >= self.max_steps
    self._done = terminated or truncated
    if self.score_as_reward:
      reward = float(self.score - previous_score)
    else:
      reward = 1.0 if won else 0.0
    return HostStep(self._observation(feedback), reward, terminated=terminated, truncated=truncated,
                    info=self._info(parsed=parsed))

  def close(self) -> None:
    """Stops the interpreter (reset starts it again)."""
    if self._env is not None:
      self._env.close()
      self._env = None
      self.game_file = None
      self._game_state = None

  # ---- game facts ----

  @property
  def score(self) -> int:
    return int(self._game_state["score"] or 0)

  @property
  def max_score(self) -> int:
    return int(self._game_state["max_score"])

  @property
  def _won(self) -> bool:
    return bool(self._game_state["won"])

  @property
  def _lost(self) -> bool:
    return bool(self._game_state["lost"])

  def admissible(self) -> list[str]:
    """The commands TextWorld deems admissible in the current state (sorted); needs `admissible_commands=True`."""
    if not self.admissible_commands:
      raise ValueError("TextWorldEnv.admissible: construct the env with admissible_commands=True")
    return list(self._game_state["admissible_commands"] or [])

  def expert_command(self) -> str | None:
    """Next command of the winning policy from the current state (TextWorld's own planner on its quest tracking);
    None once the game is won or lost, or when no winning policy exists (a truncated episode still has one)."""
    if self._game_state is None or self._won or self._lost:
      return None
    policy = self._game_state["policy_commands"] or []
    return policy[0] if policy else None

  def _observation(self, feedback: str) -> str:
    if self._won or self._lost or (self._num_steps >= self.max_steps):
      return feedback  # no cue: nothing follows an ended episode
    if self.admissible_commands:
      feedback += "\n" + ADMISSIBLE_PREFIX + ", ".join(self.admissible()) + "\n"
    else:
      feedback += "\n"
    return feedback + CUE

  def _info(self, parsed: bool) -> dict:
    info = {"success": self._won, "parsed": parsed, "score": self.score, "max_score": self.max_score}
    if self.admissible_commands:
      info["admissible_commands"] = self.admissible()
    return info
