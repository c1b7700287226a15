"""TextWorldEnv on one small game generated offline by TextWorld itself (module fixture: generation takes seconds)."""

import json

import numpy as np
import pytest

pytest.importorskip("textworld")

from stepjax.envs import host  # pylint: disable=wrong-import-position
from stepjax.envs import textworld_env as tw  # pylint: disable=wrong-import-position

SEED = 7
GAME_SETTINGS = dict(world_size=3, nb_objects=5, quest_length=3)
NO_TOKENS = np.zeros((0,), np.int32)
# Jericho cannot list valid actions of generated games (TextWorld computes them itself); TextWorld silences this
# warning at import, pytest's own warning filters bring it back.
pytestmark = pytest.mark.filterwarnings("ignore:Unable to find valid actions")


@pytest.fixture(scope="module")
def game_file(tmp_path_factory):
  return tw.make_games(tmp_path_factory.mktemp("tw_games"), [SEED], **GAME_SETTINGS)[0]


@pytest.fixture(scope="module")
def game_data(game_file):
  with open(game_file[:-3] + ".json", encoding="utf-8") as handle:
    return json.load(handle)


def _play_expert(env, seed=0, limit=20):
  """Follows expert_command from reset to the end; returns (first observation, commands, steps)."""
  first = env.reset(seed)
  commands, steps = [], []
  while len(steps) < limit:
    command = env.expert_command()
    if command is None:
      break
    commands.append(command)
    steps.append(env.step(command, NO_TOKENS))
    if steps[-1].terminated or steps[-1].truncated:
      break
  return first, commands, steps


def test_reset_gives_goal_and_first_room_without_banner(game_file, game_data):
  env = tw.TextWorldEnv(game_file)
  text = env.reset(0)
  assert game_data["objective"] in text  # the goal, as TextWorld wrote it
  assert "-= " in text and text.endswith("\n> ")  # a room header, then the cue
  assert "$$" not in text and "\\" not in text  # no ASCII-art banner
  assert not any(line.rstrip().endswith(("=-0/1", "=-0/0")) for line in text.splitlines())  # no status line
  assert env.reset(1) == text  # one game: the game is deterministic
  env.close()


def test_following_the_expert_wins_with_the_walkthrough(game_file, game_data):
  env = tw.TextWorldEnv(game_file, max_steps=10)
  _, commands, steps = _play_expert(env)
  assert commands == game_data["metadata"]["walkthrough"]
  assert len(commands) == GAME_SETTINGS["quest_length"]
  last = steps[-1]
  assert last.terminated and not last.truncated and last.info["success"]
  assert not any(s.terminated or s.truncated or s.info["success"] for s in steps[:-1])
  assert all(s.info["parsed"] for s in steps)
  assert sum(s.reward for s in steps) == last.info["max_score"] == last.info["score"] >= 1
  assert "*** The End ***" in last.observation and not last.observation.endswith("> ")
  assert "RESTART" not in last.observation
  assert env.expert_command() is None
  after = env.step("look", NO_TOKENS)
  assert (after.observation, after.reward, after.terminated, after.info["parsed"]) == (
      tw.GAME_OVER_FEEDBACK, 0.0, True, False)
  # Without score_as_reward the winning step alone is worth 1.
  plain = tw.TextWorldEnv(game_file, score_as_reward=False)
  _, _, steps = _play_expert(plain)
  assert [s.reward for s in steps] == [0.0] * (len(steps) - 1) + [1.0]


def test_nonsense_and_meta_commands_are_not_parsed_and_change_nothing(game_file):
  env = tw.TextWorldEnv(game_file)
  env.reset(0)
  expert = env.expert_command()
  for command in ["xyzzy plugh", "  blorp \n the   sky ", "take", "restart", "quit", "tw-print max_score"]:
    result = env.step(command, NO_TOKENS)
    assert not result.info["parsed"], (command, result.observation)
    assert result.reward == 0.0 and not result.terminated and not result.truncated
    assert result.info["score"] == 0 and not result.info["success"]
  assert env.step("restart", NO_TOKENS).observation.startswith(tw.REFUSED_FEEDBACK)
  assert env.expert_command() == expert  # the game state did not move
  # An understood command that the world refuses still counts as parsed.
  assert tw.is_parser_error("That's not a verb I recognise.") and not tw.is_parser_error("You can't go that way.")


def test_admissible_commands_are_listed_and_hold_the_experts_command(game_file):
  env = tw.TextWorldEnv(game_file, admissible_commands=True)
  text = env.reset(0)
  listed = text.split(tw.ADMISSIBLE_PREFIX)[1].split("\n")[0].split(", ")
  assert env.expert_command() in listed and "look" in listed
  while True:
    command = env.expert_command()
    assert command in env.admissible()
    result = env.step(command, NO_TOKENS)
    if result.terminated:
      break
    assert command not in ("", None)
    assert result.info["admissible_commands"]
    assert (tw.ADMISSIBLE_PREFIX + ", ".join(result.info["admissible_commands"]) + "\n> ") in result.observation
  assert result.info["success"] and tw.ADMISSIBLE_PREFIX not in result.observation
  # Not requested: neither in the text nor in info.
  env = tw.TextWorldEnv(game_file)
  assert tw.ADMISSIBLE_PREFIX not in env.reset(0)
  assert "admissible_commands" not in env.step("look", NO_TOKENS).info


def test_max_steps_truncates(game_file):
  env = tw.TextWorldEnv(game_file, max_steps=2)
  env.reset(0)
  first = env.step("look", NO_TOKENS)
  assert not first.truncated and first.observation.endswith("\n> ")
  second = env.step("look", NO_TOKENS)
  assert second.truncated and not second.terminated and not second.info["success"]
  assert not second.observation.endswith("> ")  # no cue after the end
  assert env.step("look", NO_TOKENS).observation == tw.GAME_OVER_FEEDBACK
  env.reset(0)  # a reset starts a fresh budget
  assert not env.step("look", NO_TOKENS).truncated


def test_same_seed_same_game(game_file, tmp_path):
  again = tw.make_games(tmp_path, [SEED], **GAME_SETTINGS)[0]
  assert again != game_file and again.rsplit("/", 1)[1] == game_file.rsplit("/", 1)[1]
  with open(game_file[:-3] + ".json", encoding="utf-8") as a, open(again[:-3] + ".json", encoding="utf-8") as b:
    assert json.load(a) == json.load(b)
  runs = [_play_expert(tw.TextWorldEnv(path)) for path in (game_file, again)]
  assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
  assert [s.observation for s in runs[0][2]] == [s.observation for s in runs[1][2]]
  # A second call reuses the compiled game instead of generating it again.
  assert tw.make_games(tmp_path, [SEED], **GAME_SETTINGS) == [again]


def test_textworld_envs_play_concurrently_in_a_host_pool(game_file):
  envs = [tw.TextWorldEnv(game_file) for _ in range(3)]
  with host.HostEnvPool(envs) as pool:
    pool.reset([0, 1, 2])
    outcomes = [None] * len(envs)
    for _ in range(10):
      actions = [None if outcome else (env.expert_command(), NO_TOKENS) for env, outcome in zip(envs, outcomes)]
      if all(action is None for action in actions):
        break
      for i, result in enumerate(pool.step(actions)):
        if result is not None and (result.terminated or result.truncated):
          outcomes[i] = result
  assert all(outcome.info["success"] for outcome in outcomes)


def test_clean_feedback_removes_interpreter_furniture():
  raw = ("\n\n   ____ \n  |  \\ $$ \n   \\$$ >$$\n\nWelcome! Do the thing.\n\n-= Hall =-\nA hall.\n\n\n\n"
         ">                                  -= Hall =-0/1")
  assert tw.clean_feedback(raw) == "Welcome! Do the thing.\n\n-= Hall =-\nA hall."
  ended = ("\nYou win.\n\n                *** The End ***\n\nWould you like to RESTART, RESTORE a saved game, QUIT or "
           "UNDO the last command?\n>                      -= Hall =-1/4")
  assert tw.clean_feedback(ended) == "You win.\n\n*** The End ***"
  assert tw.normalise_command("  go \n east ") == "go east"
  with pytest.raises(ValueError, match="must be a TextWorld .z8 game"):
    tw.TextWorldEnv(__file__)


class _Recording:
  """A HostEnv that records every observation its TextWorldEnv printed."""

  def __init__(self, env):
    self.env, self.printed = env, []

  def reset(self, seed):
    self.printed = [self.env.reset(seed)]
    return self.printed[0]

  def step(self, action_text, action_tokens):
    result = self.env.step(action_text, action_tokens)
    self.printed.append(result.observation)
    return result


def test_host_rollout_on_textworld_keeps_what_the_game_printed(game_file):
  import jax

  from stepjax import rollout
  from stepjax.models import transformer
  from stepjax.tokenizers import ByteTokenizer

  tok = ByteTokenizer()
  config = transformer.get_config("tiny", dtype="float32", vocab_size=tok.vocab_size, num_layers=1, hidden_size=64,
                                  intermediate_size=128, head_dim=16)
  model = transformer.Transformer(config)
  params = transformer.init_params(config, jax.random.key(0))
  rollout_config = rollout.RolloutConfig(num_tasks=2, max_steps=3, max_len=1600, max_action_len=8, max_obs_len=768,
                                         stop_ids=(tok.end_of_step_id, tok.eos_id), pad_id=tok.pad_id)
  envs = [_Recording(tw.TextWorldEnv(game_file, max_steps=10)) for _ in range(2)]
  with host.HostEnvPool(envs) as pool:
    batch, info = rollout.make_host_rollout(model, rollout_config, tok)(params, pool, [0, 1], jax.random.key(1))
  batch = jax.tree_util.tree_map(np.asarray, batch).validate()
  assert not np.asarray(info.obs_overflow).any()
  for row, env in enumerate(envs):
    steps = int(batch.step_mask[row].sum())
    assert steps == min(3, len(env.printed) - 1)
    bounds = [0] + [int(x) for pair in zip(batch.step_start[row, :steps],
                                           batch.step_start[row, :steps] + batch.step_len[row, :steps]) for x in pair]
    bounds.append(int(batch.seq_len[row]))
    observations = [tok.decode(batch.tokens[row, a:b]) for a, b in zip(bounds[::2], bounds[1::2])]
    assert observations == env.printed[:steps + 1]
    # The model's own tokens stay exactly as generated (no round trip through text).
    for t in range(steps):
      start, n = batch.step_start[row, t], batch.step_len[row, t]
      assert batch.action_mask[row, start:start + n].all()


def test_garbage_commands_never_reach_the_interpreter_raw(game_file):
  """An untrained model's actions (random bytes, control characters, backslashes) once crashed the interpreter."""
  env = tw.TextWorldEnv(game_file, max_steps=100)
  env.reset(0)
  rng = np.random.default_rng(0)
  for _ in range(40):
    text = bytes(rng.integers(0, 256, int(rng.integers(1, 300))).tolist()).decode("utf-8", errors="replace")
    result = env.step(text + "\\q\n\x00", NO_TOKENS)
    assert isinstance(result.observation, str) and result.reward == 0.0
  assert tw.normalise_command("  go\teast\n\\q \x07") == "go east q"
  assert len(tw.normalise_command("x" * 500)) == tw.MAX_COMMAND_CHARS
  env.close()


def test_one_command_per_step_keeps_textworld_tracking_in_sync(game_file, game_data):
  """Inform runs "a. b" / "a then b" as several commands in one turn; TextWorld's tracking then read the first one's
  score only (a chained walkthrough won with score 0) and a meta command after the separator reached the game."""
  assert tw.normalise_command("go east. quit") == "go east"
  assert tw.normalise_command("look THEN take key") == tw.normalise_command("look then") == "look"
  assert tw.normalise_command("go south.") == "go south" and tw.normalise_command(". go south") == ""
  assert tw.normalise_command("go souththen athens, then x") == "go souththen athens,"
  walkthrough = game_data["metadata"]["walkthrough"]
  assert all(tw.normalise_command(command) == command for command in walkthrough)
  env = tw.TextWorldEnv(game_file, max_steps=10)
  env.reset(0)
  steps = [env.step(". ".join(walkthrough), NO_TOKENS)]  # only the first command is played
  assert not steps[0].terminated and not steps[0].info["success"]
  while (command := env.expert_command()) is not None and len(steps) < 10:
    steps.append(env.step(command, NO_TOKENS))
  assert len(steps) == len(walkthrough) and steps[-1].terminated and steps[-1].info["success"]
  assert sum(s.reward for s in steps) == steps[-1].info["score"] == steps[-1].info["max_score"] >= 1
  env.reset(0)
  assert "<" not in env.step("look. quit", NO_TOKENS).observation  # quit never reached the interpreter
  steps = [env.step(command, NO_TOKENS) for command in walkthrough]
  assert steps[-1].info["success"] and sum(s.reward for s in steps) == steps[-1].info["max_score"] >= 1
  env.close()
