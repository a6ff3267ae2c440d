"""The ReAct loop: episodes that decode one step per round, call a tool or Finish, until they end.

    episodes = [Episode(subset, query_id, query_text, functions, history, env, relevant), ...]
    run_episodes(episodes, decoder, max_steps=10, desc="G1_instruction", workers=8)
    episodes[0].outcome, episodes[0].steps, episodes[0].final_answer

`decoder` is anything with `prompt(history) -> tokens` (ValueError when the history cannot be
fitted), `decoder(prompts) -> outputs` (one batched generation) and `text(output) -> (text,
stopped at </s>)`; evaluate.py's Decoder wraps slm.generate, the tests script it. A tool call is
answered by the episode's `ToolEnv` (slm/tool_env.py); the calls of one round run on `workers`
threads, so episodes served by an HTTP tool server do not wait on each other.

An episode ends with one outcome: finished, empty_answer, gave_up, step_budget, malformed_step (the
step does not parse), runaway (no </s> within the step's token limit), context_full (the history
cannot be fitted). Unlike ToolBench's runner, a malformed step ends the episode instead of being sent
back as an error observation. Finish without a return_type / final_answer gets ToolBench's error
observation (rapidapi.py's `_step`, byte for byte) and the episode goes on.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from . import toolbench
from .tool_env import ToolEnv, argument_problems
from .toolbench import FINISH

FINISH_NO_RETURN_TYPE = '{error:"must have "return_type""}'
FINISH_NO_ANSWER = '{error:"must have "final_answer""}'
FINISH_BAD_RETURN_TYPE = '{error:""return_type" is not a valid choice"}'


@dataclass
class Episode:
    """One query being solved: its conversation so far, its tools, and what happened at each step."""

    subset: str
    query_id: str
    query: str
    functions: list[dict]           # declared functions, Finish last (also written to predictions)
    history: list[dict]             # system, user, then assistant / function turns
    env: ToolEnv
    relevant: list[str]             # function names of the query's `relevant APIs`
    task: dict | None = None        # synthetic task, scored by data/synthetic.py
    steps: list[dict] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    final_answer: str | None = None
    finish_arguments: str = ""      # the ending Finish call's arguments, as ToolEval's final_answer
    outcome: str | None = None      # None while running
    detail: str = ""

    def end(self, outcome: str, detail: str = "") -> None:
        self.outcome, self.detail = outcome, detail


def take_step(episode: Episode, text: str, stopped: bool, max_steps: int) -> None:
    """Apply one generated assistant step: parse it, answer the call or end the episode."""
    step = {"text": text}
    episode.steps.append(step)
    if not stopped:
        step["status"] = "runaway"
        return episode.end("runaway", f"no </s> within the step's token limit; text ends {text[-80:]!r}")
    try:
        parsed = toolbench.parse_step(text)
    except toolbench.ParseError as err:
        step["status"] = "malformed"
        return episode.end("malformed_step", str(err))
    if not all(isinstance(key, str) for key in parsed.action_input):
        # ast.literal_eval (ToolBench's fallback) accepts {1: 2}; no JSON object has such keys.
        step["status"] = "malformed"
        return episode.end("malformed_step", f"action input of {parsed.action!r} has non-string keys")
    step.update(thought=parsed.thought, action=parsed.action, arguments=parsed.action_input)
    episode.history.append({"from": "assistant", "value": text})

    if parsed.action == FINISH:
        observation = finish(episode, parsed.action_input)
        step["status"] = "finish" if observation is None else "finish_error"
    else:
        # A tool server receives the arguments as written (its cache is keyed on them), not as parsed.
        written = text.partition(toolbench.ACTION_INPUT)[2].strip()
        result = episode.env.call(parsed.action, parsed.action_input, written)
        step["status"], step["outcome"], observation = result.status, result.outcome, result.observation
        if result.status != "undeclared":
            problems = argument_problems(episode.env.functions[parsed.action], parsed.action_input)
            step["arguments_valid"] = not problems
    if observation is not None:
        step["observation"] = observation
        episode.history.append({"from": "function", "value": observation})
    if episode.outcome is None and len(episode.steps) >= max_steps:
        episode.end("step_budget", f"no Finish within {max_steps} steps")


def finish(episode: Episode, arguments: dict) -> str | None:
    """ToolBench's Finish semantics: None when the episode ended, else the error observation to send."""
    return_type = arguments.get("return_type")
    if return_type is None:
        return FINISH_NO_RETURN_TYPE
    if return_type not in ("give_answer", "give_up_and_restart"):
        return FINISH_BAD_RETURN_TYPE
    if return_type == "give_answer" and "final_answer" not in arguments:
        return FINISH_NO_ANSWER
    episode.finish_arguments = json.dumps(arguments, ensure_ascii=False, indent=2, default=repr)
    if return_type == "give_up_and_restart":
        episode.end("gave_up")
        return None
    answer = arguments["final_answer"]
    episode.final_answer = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False, default=repr)
    episode.end("finished" if episode.final_answer.strip() else "empty_answer",
                "" if episode.final_answer.strip() else "Finish gave an empty final_answer")
    return None


def run_episodes(episodes: list[Episode], decoder, max_steps: int, desc: str, workers: int = 1) -> None:
    """Run every episode to its end; each round decodes the next step of all running episodes at once."""
    bar = tqdm(total=len(episodes), desc=desc, unit="query", dynamic_ncols=True)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    running = list(episodes)
    round_ = 0
    while running:
        round_ += 1
        prompts, active = [], []
        for episode in running:
            try:
                prompt = decoder.prompt(episode.history)
            except ValueError as err:
                episode.end("context_full", str(err))
                continue
            episode.prompt_tokens.append(len(prompt))
            prompts.append(prompt)
            active.append(episode)
        steps = [(episode, *decoder.text(tokens), max_steps) for episode, tokens in zip(active, decoder(prompts))]
        if pool is None:
            for args in steps:
                take_step(*args)
        else:   # each step touches only its own episode; list() waits and re-raises any error
            list(pool.map(lambda args: take_step(*args), steps))
        still = [e for e in running if e.outcome is None]
        bar.update(len(running) - len(still))
        bar.set_postfix(step=round_, running=len(still))
        running = still
    if pool is not None:
        pool.shutdown()
    bar.close()
