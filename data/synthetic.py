"""Synthetic tool-calling tasks in ToolBench's own format, over procedurally generated tools whose
functions really run (table lookups, arithmetic, unit conversion, string operations).

Why: the real ToolBench training file (2 GB) and real OPT weights are not available everywhere. With
this generator a tiny randomly initialised model can be trained and evaluated end to end on a CPU
in minutes, on tasks that still need the three skills ToolBench tests: pick the right function among
distractors, copy the right arguments from the query, and carry one call's observation into the next
call or into the final answer.

    python -m data.synthetic --out DIR [--train N] [--test M] [--seed S]    # from the repository root

writes DIR/train.json (ToolLLaMA rows, step-exploded like ToolBench's release) and
DIR/test/synthetic.json (test tasks; the evaluator names the subset after the file). Once the project is
installed (`pip install -e .`), `python data/synthetic.py ...` works from anywhere too.

A task is a StableToolBench-style query plus synthetic-only fields:

    {"query_id": int, "query": str, "api_list": [{category_name, tool_name, api_name, api_description,
     required_parameters: [{name, type, description, default}], optional_parameters: [], method: "GET",
     template_response: {}}, ...], "relevant APIs": [[tool_name, api_name], ...],
     "tool_descriptions": [[tool_name, description], ...],  # for slm.toolbench.system_prompt
     "answer": [str, ...],      # values the final answer must contain
     "task_type": "lookup" | "chain" | "arithmetic" | "string" | "conversion",
     "world": {"functions": {function_name: spec}, "tables": {tool_name: {entity: {field: value}}}},
     "solution": {"steps": [[thought, function_name, arguments], ...], "final_answer": str,
                  "finish_thought": str}}   # the gold trajectory, which `trajectory` replays

`world` holds everything `execute` needs, so a task file is self-contained. Function names are
ToolBench's (`slm.toolbench.functions_from_api_list`), so a model sees exactly what it would see on a
real query.

Train/test disjointness: every generated name (entity names, the word that makes a tool name, words
for string tasks) is assigned to a split by a hash of the name (`split_of`), and a split's generator
only keeps names of its own split. A name therefore can never appear in both splits, whatever the
seeds or sizes, and the test measures generalisation to unseen tools and entities, not memory.
"""

import argparse
import ast
import hashlib
import json
import math
import random
import re
from pathlib import Path

from slm import toolbench
from slm.tool_env import error_observation

SPLITS = ("train", "test")
TASK_TYPES = ("lookup", "chain", "arithmetic", "string", "conversion")
# Sampling weights of the task types: the multi-step types get more weight because they are harder.
TASK_WEIGHTS = (2, 3, 2, 1, 1)
CATEGORY = "Synthetic"
# Sampled sizes. Every function adds ~95 tokens to the system prompt (ToolBench's schema wrapper) on
# top of ~560 fixed tokens (instructions and Finish), so small counts keep prompts short for a tiny model.
TOOLS_PER_TASK = (2, 2, 2, 3)
FUNCTIONS_PER_TOOL = (2, 2, 3)

# ---------------------------------------------------------------------------------------------
# Vocabulary: domains with numeric fields, unit conversions, calculator and text operations
# ---------------------------------------------------------------------------------------------

# field -> (unit or None, low, high, decimals). A unit names the conversion a chain task may apply.
DOMAINS = {
    "city": {"noun": "Cities", "about": "Facts about cities.", "fields": {
        "population": (None, 1000, 900000, 0), "elevation": ("m", 5, 3000, 0),
        "founding year": (None, 1100, 1990, 0)}},
    "mountain": {"noun": "Peaks", "about": "Data on mountains.", "fields": {
        "height": ("m", 800, 8800, 0), "prominence": ("m", 100, 4000, 0),
        "glacier count": (None, 0, 40, 0)}},
    "river": {"noun": "Rivers", "about": "River statistics.", "fields": {
        "length": ("km", 40, 6500, 0), "depth": ("m", 2, 60, 1),
        "bridge count": (None, 1, 300, 0)}},
    "product": {"noun": "Shop", "about": "Product catalog.", "fields": {
        "price": (None, 2, 900, 2), "weight": ("kg", 0.2, 60, 1), "stock": (None, 0, 5000, 0)}},
    "athlete": {"noun": "Athletes", "about": "Athlete profiles.", "fields": {
        "height": ("cm", 150, 215, 0), "weight": ("kg", 45, 140, 1), "age": (None, 17, 41, 0)}},
    "planet": {"noun": "Planets", "about": "Planet catalog.", "fields": {
        "radius": ("km", 900, 70000, 0), "temperature": ("C", -220, 460, 0),
        "moon count": (None, 0, 90, 0)}},
}

# api name -> (from unit, to word, factor, offset): result = value * factor + offset.
CONVERSIONS = {
    "meters to feet": ("m", "feet", 3.28084, 0.0),
    "kilometers to miles": ("km", "miles", 0.621371, 0.0),
    "centimeters to inches": ("cm", "inches", 0.393701, 0.0),
    "kilograms to pounds": ("kg", "pounds", 2.20462, 0.0),
    "celsius to fahrenheit": ("C", "fahrenheit", 1.8, 32.0),
}
UNIT_WORDS = {"m": "meters", "km": "kilometers", "cm": "centimeters", "kg": "kilograms",
              "C": "degrees Celsius"}

CALC_OPS = {"add numbers": "Add a and b.", "subtract numbers": "Subtract b from a.",
            "multiply numbers": "Multiply a by b."}
TEXT_OPS = {"reverse text": "Reverse a text.", "uppercase text": "Uppercase a text.",
            "count letters": "Count the letters of a text."}

# The utility tools, each named "<generated word> <suffix>".
UTILITY = {"units": ("Units", "Unit conversions.", CONVERSIONS),
           "calc": ("Calc", "A simple calculator.", CALC_OPS),
           "text": ("Text", "Text utilities.", TEXT_OPS)}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl",
           "kr", "pl", "st", "tr", "sh", "ch", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
_CODAS = ("", "", "", "n", "r", "l", "s", "x", "k", "m")


def split_of(name: str) -> str:
    """The split a generated name belongs to: a stable hash puts a quarter of all names in "test"."""
    digest = hashlib.blake2b(name.lower().encode(), digest_size=2).digest()
    return "test" if digest[0] < 64 else "train"


def _word(rng: random.Random, split: str, taken: set) -> str:
    """A new pronounceable capitalised word of `split`, not already in `taken` (which it joins)."""
    while True:
        n = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
        word = word.capitalize()
        if len(word) <= 10 and word not in taken and split_of(word) == split:
            taken.add(word)
            return word


def _number(x: float):
    """Round to 2 decimals; integral values become ints so that observations show 100, not 100.0."""
    x = round(float(x), 2)
    return int(x) if x.is_integer() else x


def canonical(value) -> str:
    """The canonical text of a number (str of `_number`: "1,234.50" -> "1234.5"), else the text itself."""
    number = _as_number(value)
    return str(value) if number is None else str(_number(number))


# ---------------------------------------------------------------------------------------------
# Tools: api_list entries plus the executable spec of each function
# ---------------------------------------------------------------------------------------------

def _api(tool_name: str, api_name: str, description: str, params: list) -> dict:
    """One StableToolBench api_list entry; `params` are (name, type, description) triples."""
    return {"category_name": CATEGORY, "tool_name": tool_name, "api_name": api_name,
            "api_description": description,
            "required_parameters": [{"name": n, "type": t, "description": d, "default": ""}
                                    for n, t, d in params],
            "optional_parameters": [], "method": "GET", "template_response": {}}


class _Tool:
    """A tool being built: its name and description, its api_list entries and their specs."""

    def __init__(self, name: str, description: str):
        self.name, self.description = name, description
        self.apis, self.specs = [], []

    def add(self, api_name: str, description: str, params: list, spec: dict):
        self.apis.append(_api(self.name, api_name, description, params))
        self.specs.append(spec)


def _lookup_tool(rng, split, taken, kind, needed_fields, entities) -> tuple:
    """A lookup tool over a generated table of `entities`, with 2-3 fields (the needed ones first)."""
    domain = DOMAINS[kind]
    tool = _Tool(f"{_word(rng, split, taken)} {domain['noun']}", domain["about"])
    others = [f for f in domain["fields"] if f not in needed_fields]
    fields = list(needed_fields) + rng.sample(others, rng.choice(FUNCTIONS_PER_TOOL) - len(needed_fields))
    rng.shuffle(fields)
    table = {}
    for entity in entities:
        row = {}
        for field in domain["fields"]:
            _, low, high, decimals = domain["fields"][field]
            value = rng.uniform(low, high) if decimals else rng.randint(low, high)
            row[field] = _number(round(value, decimals))
        table[entity] = row
    for field in fields:
        unit = domain["fields"][field][0]
        unit_note = f" in {unit}" if unit else ""
        tool.add(f"{kind} {field}", f"The {field} of a {kind}{unit_note}.",
                 [(kind, "STRING", "")],
                 {"op": "lookup", "table": tool.name, "field": field, "param": kind})
    return tool, table


def _utility_tool(rng, split, taken, kind, needed_ops) -> _Tool:
    """A units/calc/text tool with 2-3 operations, the needed ones included."""
    suffix, about, ops = UTILITY[kind]
    tool = _Tool(f"{_word(rng, split, taken)} {suffix}", about)
    others = [op for op in ops if op not in needed_ops]
    names = list(needed_ops) + rng.sample(others, rng.choice(FUNCTIONS_PER_TOOL) - len(needed_ops))
    rng.shuffle(names)
    for name in names:
        if kind == "units":
            unit, to_word, factor, offset = ops[name]
            # Descriptions never contain the API name: ToolBench would replace it by the function name.
            tool.add(name, f"Convert a value from {UNIT_WORDS[unit]} into {to_word}.",
                     [("value", "NUMBER", "")],
                     {"op": "convert", "factor": factor, "offset": offset, "out": to_word})
        elif kind == "calc":
            tool.add(name, ops[name], [("a", "NUMBER", ""), ("b", "NUMBER", "")],
                     {"op": name.split()[0], "out": "result"})
        else:
            tool.add(name, ops[name], [("text", "STRING", "")], {"op": name.split()[0], "out": "result"})
    return tool


# ---------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------

def _ok(result: dict) -> str:
    """ToolBench's observation of a success; the response is text, the str() of a dict as in real rows."""
    return json.dumps({"error": "", "response": str(result)})


def _as_number(value):
    """A JSON number or numeric string as a float; None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value) if isinstance(value, (int, float)) else float(str(value).replace(",", ""))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _api_entry(task: dict, function_name: str):
    """The api_list entry behind `function_name`, or None."""
    names = [f["name"] for f in toolbench.functions_from_api_list(task["api_list"])[:-1]]
    return task["api_list"][names.index(function_name)] if function_name in names else None


def execute(task: dict, function_name: str, arguments: dict) -> str:
    """Run `function_name` with `arguments` against task["world"]; returns the observation string.

    Success: json.dumps({"error": "", "response": "{'<field>': value}"}); any failure (unknown
    function, Finish, arguments not a dict, missing/unexpected/mistyped argument, unknown entity)
    gives json.dumps({"error": "<message>", "response": ""}). Deterministic.
    """
    spec = task["world"]["functions"].get(function_name)
    if spec is None:
        # ToolBench's wording (rapidapi.py), which slm/tool_env.py uses too.
        return error_observation(f"No such function name: {function_name}")
    if not isinstance(arguments, dict):
        return error_observation(f"Action Input must be a JSON object, got {type(arguments).__name__}.")
    params = _api_entry(task, function_name)["required_parameters"]
    expected = {p["name"]: p["type"] for p in params}
    unexpected = sorted(set(arguments) - set(expected))
    if unexpected:
        return error_observation(f"Unexpected parameter(s) {unexpected} for {function_name}; "
                      f"expected {sorted(expected)}.")
    values = {}
    for name, kind in expected.items():
        if name not in arguments:
            return error_observation(f"Missing required parameter {name!r} for {function_name}.")
        value = arguments[name]
        if kind == "NUMBER":
            value = _as_number(value)
            if value is None:
                return error_observation(f"Parameter {name!r} must be a number, got {arguments[name]!r}.")
        elif not isinstance(value, str) or not value.strip():
            return error_observation(f"Parameter {name!r} must be a non-empty string, got {value!r}.")
        values[name] = value

    op = spec["op"]
    if op == "lookup":
        table = task["world"]["tables"][spec["table"]]
        by_name = {entity.lower(): row for entity, row in table.items()}
        row = by_name.get(values[spec["param"]].strip().lower())
        if row is None:
            return error_observation(f"No {spec['param']} named {values[spec['param']]!r} was found.")
        return _ok({spec["field"]: row[spec["field"]]})
    if op == "convert":
        return _ok({spec["out"]: _number(values["value"] * spec["factor"] + spec["offset"])})
    if op in ("add", "subtract", "multiply"):
        a, b = values["a"], values["b"]
        result = {"add": a + b, "subtract": a - b, "multiply": a * b}[op]
        return _ok({spec["out"]: _number(result)})
    text = values["text"]
    result = {"reverse": text[::-1], "uppercase": text.upper(),
              "count": sum(c.isalpha() for c in text)}[op]
    return _ok({spec["out"]: result})


# ---------------------------------------------------------------------------------------------
# Task generation
# ---------------------------------------------------------------------------------------------

PLURALS = {"city": "cities", "mountain": "mountains", "river": "rivers", "product": "products",
           "athlete": "athletes", "planet": "planets"}
LOOKUP_QUERIES = ("What is the {field} of the {kind} {e}?", "Tell me the {field} of the {kind} {e}.",
                  "I need the {field} of the {kind} {e}.")
CONVERT_QUERIES = ("What is the {field} of the {kind} {e} in {to}?",
                   "Give me the {field} of the {kind} {e} in {to}.")
PRICE_QUERIES = ("How much do {q} units of the product {e} cost?",
                 "What is the price of {q} units of the product {e}?")
ADD_QUERIES = ("What is the total {field} of the {kinds} {a} and {b}?",
               "Add up the {field} of the {kinds} {a} and {b}.")
SUBTRACT_QUERIES = ("How much greater is the {field} of the {kind} {a} than of {b}?",
                    "What is the {field} of the {kind} {a} minus that of {b}?")
TEXT_QUERIES = {"reverse text": ("Reverse the text '{w}'.", "What is '{w}' written backwards?"),
                "uppercase text": ("Write '{w}' in capital letters.", "Uppercase the text '{w}'."),
                "count letters": ("How many letters are in '{w}'?", "Count the letters of '{w}'.")}
CONVERSION_QUERIES = ("Convert {v} {unit} to {to}.", "How many {to} is {v} {unit}?")

LOOKUP_THOUGHTS = ("I need the {field} of {e}.", "Let me look up the {field} of {e}.",
                   "First, get the {field} of {e}.")
NEXT_LOOKUP_THOUGHTS = ("Now get the {field} of {e}.", "Next, the {field} of {e}.")
FIRST_USE_THOUGHTS = ("I will {verb} {x}.", "Let me {verb} {x}.")
USE_THOUGHTS = ("Now {verb} {x}.", "Next I {verb} {x}.")
FINISH_THOUGHTS = ("I have the answer.", "Now I can answer.", "That answers the question.")


class _Builder:
    """One task under construction: its tools, world tables and the gold calls, run as they are added."""

    def __init__(self, rng: random.Random, split: str):
        self.rng, self.split = rng, split
        self.taken = set()         # names used in this task, so no two things share a name
        self.tools, self.tables = [], {}
        self.kinds = set()         # domain and utility kinds present (a task has one tool per kind)

    def word(self) -> str:
        return _word(self.rng, self.split, self.taken)

    def say(self, templates: tuple, **fields) -> str:
        """One of `templates`, filled in: queries, thoughts and answers vary a little."""
        return self.rng.choice(templates).format(**fields)

    def lookup_tool(self, kind: str, fields: list, entities: list) -> _Tool:
        tool, table = _lookup_tool(self.rng, self.split, self.taken, kind, fields, entities)
        self.tools.append(tool)
        self.tables[tool.name] = table
        self.kinds.add(kind)
        return tool

    def utility_tool(self, kind: str, ops: list) -> _Tool:
        tool = _utility_tool(self.rng, self.split, self.taken, kind, ops)
        self.tools.append(tool)
        self.kinds.add(kind)
        return tool

    def add_distractors(self):
        """Distractor tools of other kinds until the task has its 2-4 tools."""
        total = max(len(self.tools), self.rng.choice(TOOLS_PER_TASK))
        while len(self.tools) < total:
            kind = self.rng.choice(sorted((set(DOMAINS) | set(UTILITY)) - self.kinds))
            if kind in DOMAINS:
                entities = [self.word() for _ in range(self.rng.randint(2, 3))]
                self.lookup_tool(kind, [], entities)
            else:
                self.utility_tool(kind, [])

    def finalize(self, query_id: int, task_type: str, query: str) -> dict:
        """Shuffle the tools into an api_list and build the world; calls can run from here on."""
        self.rng.shuffle(self.tools)
        api_list = [api for tool in self.tools for api in tool.apis]
        specs = [spec for tool in self.tools for spec in tool.specs]
        functions = toolbench.functions_from_api_list(api_list)[:-1]
        self.function_name = {(api["tool_name"], api["api_name"]): f["name"]
                              for api, f in zip(api_list, functions)}
        self.task = {
            "query_id": query_id, "query": query, "api_list": api_list, "relevant APIs": [],
            "tool_descriptions": [[tool.name, tool.description] for tool in self.tools],
            "answer": [], "task_type": task_type,
            "world": {"functions": {f["name"]: spec for f, spec in zip(functions, specs)},
                      "tables": self.tables},
            "solution": {"steps": [], "final_answer": ""},
        }
        return self.task

    def call(self, thought: str, tool: _Tool, api_name: str, arguments: dict):
        """Record a gold call, run it, and return the value of its response (to use in later steps)."""
        name = self.function_name[(tool.name, api_name)]
        observation = json.loads(execute(self.task, name, arguments))
        if observation["error"]:
            raise RuntimeError(f"generator bug: gold call {name}({arguments}) failed: "
                               f"{observation['error']}")
        if [tool.name, api_name] not in self.task["relevant APIs"]:
            self.task["relevant APIs"].append([tool.name, api_name])
        self.task["solution"]["steps"].append([thought, name, arguments])
        return next(iter(ast.literal_eval(observation["response"]).values()))

    def finish(self, final_answer: str, *values):
        self.task["answer"] = [canonical(v) for v in values]
        self.task["solution"]["final_answer"] = final_answer
        self.task["solution"]["finish_thought"] = self.rng.choice(FINISH_THOUGHTS)
        return self.task


def _unit_text(unit) -> str:
    return f" {unit}" if unit else ""


def _lookup(b: _Builder, query_id: int) -> dict:
    kind = b.rng.choice(sorted(DOMAINS))
    field = b.rng.choice(sorted(DOMAINS[kind]["fields"]))
    entities = [b.word() for _ in range(b.rng.randint(2, 4))]
    e = b.rng.choice(entities)
    tool = b.lookup_tool(kind, [field], entities)
    b.add_distractors()
    b.finalize(query_id, "lookup", b.say(LOOKUP_QUERIES, field=field, kind=kind, e=e))
    value = b.call(b.say(LOOKUP_THOUGHTS, field=field, e=e), tool, f"{kind} {field}", {kind: e})
    unit = DOMAINS[kind]["fields"][field][0]
    return b.finish(f"The {field} of {e} is {value}{_unit_text(unit)}.", value)


def _chain(b: _Builder, query_id: int) -> dict:
    """Lookup, then a second call on the looked-up value: a unit conversion or a price times a quantity."""
    entities = [b.word() for _ in range(b.rng.randint(2, 4))]
    e = b.rng.choice(entities)
    if b.rng.random() < 0.25:
        q = b.rng.randint(2, 12)
        shop = b.lookup_tool("product", ["price"], entities)
        calc = b.utility_tool("calc", ["multiply numbers"])
        b.add_distractors()
        b.finalize(query_id, "chain", b.say(PRICE_QUERIES, q=q, e=e))
        price = b.call(b.say(LOOKUP_THOUGHTS, field="price", e=e), shop, "product price",
                       {"product": e})
        total = b.call(b.say(USE_THOUGHTS, verb="multiply", x=f"{price} by {q}"), calc,
                       "multiply numbers", {"a": price, "b": q})
        return b.finish(f"{q} units of {e} cost {total}.", total)
    pairs = [(kind, field) for kind in sorted(DOMAINS) for field, spec in DOMAINS[kind]["fields"].items()
             if spec[0]]
    kind, field = b.rng.choice(pairs)
    unit = DOMAINS[kind]["fields"][field][0]
    conversion = next(name for name, spec in CONVERSIONS.items() if spec[0] == unit)
    to = CONVERSIONS[conversion][1]
    table = b.lookup_tool(kind, [field], entities)
    units = b.utility_tool("units", [conversion])
    b.add_distractors()
    b.finalize(query_id, "chain", b.say(CONVERT_QUERIES, field=field, kind=kind, e=e, to=to))
    value = b.call(b.say(LOOKUP_THOUGHTS, field=field, e=e), table, f"{kind} {field}", {kind: e})
    converted = b.call(b.say(USE_THOUGHTS, verb="convert", x=f"{value} {unit} to {to}"), units,
                       conversion, {"value": value})
    return b.finish(f"The {field} of {e} is {converted} {to}.", converted)


def _arithmetic(b: _Builder, query_id: int) -> dict:
    """Two lookups combined by the calculator: a sum, or a difference (larger minus smaller)."""
    kind = b.rng.choice(sorted(DOMAINS))
    field = b.rng.choice(sorted(DOMAINS[kind]["fields"]))
    op = "add numbers" if "year" not in field and b.rng.random() < 0.5 else "subtract numbers"
    entities = [b.word() for _ in range(b.rng.randint(2, 4))]
    x, y = b.rng.sample(entities, 2)
    table = b.lookup_tool(kind, [field], entities)
    calc = b.utility_tool("calc", [op])
    if op == "subtract numbers" and b.tables[table.name][x][field] < b.tables[table.name][y][field]:
        x, y = y, x   # ask for the larger minus the smaller, so the question reads naturally
    b.add_distractors()
    templates = ADD_QUERIES if op == "add numbers" else SUBTRACT_QUERIES
    b.finalize(query_id, "arithmetic", b.rng.choice(templates).format(
        field=field, kind=kind, kinds=PLURALS[kind], a=x, b=y))
    a = b.call(b.say(LOOKUP_THOUGHTS, field=field, e=x), table, f"{kind} {field}", {kind: x})
    c = b.call(b.say(NEXT_LOOKUP_THOUGHTS, field=field, e=y), table, f"{kind} {field}", {kind: y})
    verb = op.split()[0]
    result = b.call(b.say(USE_THOUGHTS, verb=verb, x=f"{a} and {c}"), calc, op, {"a": a, "b": c})
    unit = DOMAINS[kind]["fields"][field][0]
    what = "total" if op == "add numbers" else "difference"
    return b.finish(f"The {what} is {result}{_unit_text(unit)}.", result)


def _string(b: _Builder, query_id: int) -> dict:
    op = b.rng.choice(sorted(TEXT_OPS))
    w = b.word()
    text = b.utility_tool("text", [op])
    b.add_distractors()
    b.finalize(query_id, "string", b.say(TEXT_QUERIES[op], w=w))
    verb = {"reverse text": "reverse", "uppercase text": "uppercase",
            "count letters": "count the letters of"}[op]
    result = b.call(b.say(FIRST_USE_THOUGHTS, verb=verb, x=f"'{w}'"), text, op, {"text": w})
    answer = {"reverse text": f"'{w}' reversed is '{result}'.", "uppercase text": f"In capitals: {result}.",
              "count letters": f"'{w}' has {result} letters."}[op]
    return b.finish(answer, result)


def _conversion(b: _Builder, query_id: int) -> dict:
    conversion = b.rng.choice(sorted(CONVERSIONS))
    unit, to, _, _ = CONVERSIONS[conversion]
    v = _number(round(b.rng.uniform(1, 500), b.rng.choice((0, 1))))
    units = b.utility_tool("units", [conversion])
    b.add_distractors()
    b.finalize(query_id, "conversion", b.say(CONVERSION_QUERIES, v=v, unit=UNIT_WORDS[unit], to=to))
    result = b.call(b.say(FIRST_USE_THOUGHTS, verb="convert", x=f"{v} {unit} to {to}"), units,
                    conversion, {"value": v})
    return b.finish(f"{v} {UNIT_WORDS[unit]} is {result} {to}.", result)


_GENERATORS = {"lookup": _lookup, "chain": _chain, "arithmetic": _arithmetic, "string": _string,
               "conversion": _conversion}


def make_tasks(split: str, n: int, seed: int) -> list[dict]:
    """`n` tasks of `split` ("train" or "test"); the seed fixes everything.

    The tasks of (split, n, seed) are a prefix of those of (split, n + k, seed). Names are drawn only
    from the split's half of the hash partition (`split_of`), so train and test never share a tool,
    entity or word.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"slm-synthetic:{split}:{seed}")
    tasks = []
    for query_id in range(n):
        task_type = rng.choices(TASK_TYPES, TASK_WEIGHTS)[0]
        tasks.append(_GENERATORS[task_type](_Builder(rng, split), query_id))
    return tasks


# ---------------------------------------------------------------------------------------------
# Trajectories and scoring
# ---------------------------------------------------------------------------------------------

def _assistant(thought: str, name: str, arguments: dict) -> dict:
    # json.dumps(indent=2) is how ChatGPT's arguments appear in ToolBench rows ("{}" when empty).
    value = toolbench.assistant_value(thought, name, json.dumps(arguments, indent=2))
    return {"from": "assistant", "value": value}


def trajectory(task: dict) -> dict:
    """The task's gold solution as one ToolLLaMA row, observations produced by `execute`.

    {"id": "Step N: <query>", "conversations": [system, user, assistant, function, ..., assistant
    (Finish)], "source": "synthetic/<task_type>"}; N is the index of the last message, as in
    ToolBench's release.
    """
    functions = toolbench.functions_from_api_list(task["api_list"])
    system = toolbench.system_prompt(functions, task["tool_descriptions"])
    conversations = toolbench.opening(system, task["query"])
    for thought, name, arguments in task["solution"]["steps"]:
        conversations.append(_assistant(thought, name, arguments))
        conversations.append({"from": "function", "value": execute(task, name, arguments)})
    finish = {"return_type": "give_answer", "final_answer": task["solution"]["final_answer"]}
    conversations.append(_assistant(task["solution"]["finish_thought"], toolbench.FINISH, finish))
    return {"id": f"Step {len(conversations) - 1}: {task['query']}", "conversations": conversations,
            "source": f"synthetic/{task['task_type']}"}


def explode(row: dict) -> list[dict]:
    """One row per assistant step, each ending at that step (the form of ToolBench's released file)."""
    rows = []
    for i, message in enumerate(row["conversations"]):
        if message["from"] == "assistant":
            rows.append({"id": f"Step {i}: {toolbench.query_of(row)}",
                         "conversations": row["conversations"][:i + 1],
                         "source": row["source"]})
    return rows


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def score(task: dict, calls: list, final_answer) -> dict:
    """Judge one episode offline.

    calls: the tool calls made before Finish, in order, as (function_name: str, arguments: dict,
    observation: str) tuples; arguments is whatever the model's Action Input parsed to (a non-dict
    makes the call invalid). Validity is decided by re-running `execute`, not by the observation.
    final_answer: the Finish call's final_answer text, or None when the episode gave no answer.

    Returns {"pass": bool, "answer_ok": bool, "calls_ok": bool, "missing": [values not found],
    "invalid_calls": [[index, function_name, error]], "reasons": [str]}. The answer passes when it
    contains every value of task["answer"]: numbers compare by canonical form (`canonical`, so
    "1,234.50" matches "1234.5") against the numbers written in the answer, other values must appear
    verbatim (case-sensitive).
    """
    invalid = []
    for i, (name, arguments, _) in enumerate(calls):
        error = json.loads(execute(task, name, arguments))["error"]
        if error:
            invalid.append([i, name, error])
    text = final_answer if isinstance(final_answer, str) else ""
    numbers = {canonical(m) for m in _NUMBER.findall(text)}
    missing = []
    for value in task["answer"]:
        is_number = _as_number(value) is not None
        if not (value in numbers if is_number else value in text):
            missing.append(value)
    reasons = [f"call {i} ({name}) is invalid: {error}" for i, name, error in invalid]
    if final_answer is None:
        reasons.append("no final answer was given")
    reasons += [f"final answer lacks {value!r}" for value in missing]
    answer_ok = final_answer is not None and not missing
    return {"pass": answer_ok and not invalid, "answer_ok": answer_ok, "calls_ok": not invalid,
            "missing": missing, "invalid_calls": invalid, "reasons": reasons}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    """The command line (see the module docstring); prints the counts it wrote."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--train", type=int, default=5000, help="number of training tasks (default 5000)")
    parser.add_argument("--test", type=int, default=200, help="number of test tasks (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both splits (default 0)")
    parser.add_argument("--collapsed", action="store_true",
                        help="write one row per trajectory instead of one per assistant step")
    args = parser.parse_args(argv)

    train = [trajectory(task) for task in make_tasks("train", args.train, args.seed)]
    rows = train if args.collapsed else [step for row in train for step in explode(row)]
    test = make_tasks("test", args.test, args.seed)
    (args.out / "test").mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(json.dumps(rows, ensure_ascii=False))
    (args.out / "test" / "synthetic.json").write_text(json.dumps(test, ensure_ascii=False, indent=1))
    mix = {t: sum(row["source"] == f"synthetic/{t}" for row in train) for t in TASK_TYPES}
    print(f"wrote {len(rows)} rows from {len(train)} train tasks {mix} to {args.out / 'train.json'}; "
          f"{len(test)} test tasks to {args.out / 'test' / 'synthetic.json'}")


if __name__ == "__main__":
    main()
