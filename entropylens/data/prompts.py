"""Prompt sources: built-in synthetic sets, local files (JSONL/JSON/Parquet/CSV/text, verl format) and
Hugging Face datasets, plus chat-template rendering.

Every source becomes a list of `Prompt`s: either plain text or chat messages, with a reference answer
when one is known (the BuPO trainer rewards against it).

Built-in sets (`arith`, `word`, `mixed`, `digits`) are generated from a seed by `entropylens.data.tasks`, with a
train/test split by problem. Files keep their row order (`seed` does not touch them) and support `split="train"|"test"`
only through a top-level `split` column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entropylens.errors import UserError
from entropylens.data.tasks import BUILTIN_SETS, builtin_items


@dataclass
class Prompt:
    """One prompt: plain `text`, or chat `messages` (which then take precedence), plus its answer."""

    text: str | None  # plain-text prompt (used when messages is None)
    messages: list[dict] | None  # chat messages [{"role": ..., "content": ...}], e.g. from verl files
    answer: str | None  # reference answer when known
    source: str  # e.g. "builtin:arith", "file:math500.parquet"

    def __post_init__(self) -> None:
        if self.text is None and self.messages is None:
            raise ValueError("Prompt needs text or messages")


SPLITS = ("all", "train", "test")


# Column names tried in order; the first present wins.
_TEXT_COLUMNS = ("prompt", "question", "problem", "text", "input")
_ANSWER_COLUMNS = ("answer", "final_answer", "ground_truth", "reward_model.ground_truth", "solution")


def load_prompts(source: str, limit: int | None = None, seed: int = 0, split: str = "all") -> list[Prompt]:
    """Load prompts from a built-in set name, a file path, or `hf:<dataset id>[:config][:split]`.

    `limit` keeps the first N prompts (after the split); `seed` drives the built-in generators only.
    """
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be a positive number of prompts, got {limit}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if source in BUILTIN_SETS:
        prompts = [Prompt(text=t, messages=None, answer=a, source=f"builtin:{source}")
                   for t, a, _ in builtin_items(source, seed, split)]
    elif source.startswith("hf:"):
        prompts = _load_hf(source[3:], split, limit)
    elif Path(source).suffix.lower() in _READERS:
        prompts = _load_file(Path(source), split, limit)
    elif Path(source).suffix:
        raise UserError(
            f"unknown prompt file type {Path(source).suffix!r} ({source}); use one of "
            f"{', '.join(sorted(_READERS))}, a built-in set ({', '.join(BUILTIN_SETS)}) or hf:<dataset id>"
        )
    else:
        raise UserError(
            f"unknown built-in prompt set {source!r}; valid names: {', '.join(BUILTIN_SETS)} "
            "(or give a .jsonl/.json/.parquet/.csv/.txt file or hf:<dataset id>)"
        )
    prompts = prompts[:limit]
    if not prompts:
        raise UserError(f"prompt source {source!r} (split {split!r}) holds no prompts; pick another one")
    return prompts


def prompts_sha256(prompts: list[Prompt]) -> str:
    """Hash of the prompts' content (text, messages, answer), recorded in the run manifest."""
    content = [[p.text, p.messages, p.answer] for p in prompts]
    blob = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def render(prompt: Prompt, tokenizer: Any, enable_thinking: bool = False, system: str | None = None) -> str:
    """The exact text fed to the model.

    With a chat template: the template with the generation prompt appended; `enable_thinking` is
    passed to templates that read it (Qwen3's thinking switch). The result already holds the
    template's special tokens, so tokenize it with `add_special_tokens=False`. Without a template
    (or `tokenizer=None`): plain text prompts as they are, chat messages as "role: content" lines
    ending with "assistant:". `system` replaces the prompt's own system message, if any.
    """
    messages = _chat_messages(prompt, system)
    template = getattr(tokenizer, "chat_template", None)
    takes_thinking = bool(template) and "enable_thinking" in str(template)
    if enable_thinking and not takes_thinking:
        raise UserError("this tokenizer's chat template has no thinking mode (enable_thinking); turn it off")
    if template:
        kwargs = {"enable_thinking": enable_thinking} if takes_thinking else {}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    if prompt.messages is None and system is None:
        return prompt.text
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"


def _chat_messages(prompt: Prompt, system: str | None) -> list[dict]:
    if prompt.messages is None:
        messages = [{"role": "user", "content": prompt.text}]
    else:
        messages = list(prompt.messages)
    if system is not None:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
    return messages


# ---------------------------------------------------------------------------------------------------
# Files


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path} is not valid UTF-8 (line {line}, byte {e.start}); save as UTF-8") from None


def _read_json(path: Path) -> tuple[list[str], list[dict]]:
    """A JSON array of objects, or JSON lines (one object per line) — `.json` files come in both."""
    text = _decode(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
        except RecursionError:
            raise UserError(f"{path} nests JSON too deeply to be a prompt file") from None
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg})") from None
                except RecursionError:
                    raise UserError(f"{path} line {lineno} nests JSON too deeply to be a prompt") from None
    for where, row in numbered:
        if not isinstance(row, dict):
            raise UserError(f"{path} row {where} is a {type(row).__name__}; each row must be a JSON object")
    rows = [row for _, row in numbered]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return columns, rows


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""))
    try:
        rows = [{k: (v if v != "" else None) for k, v in row.items()} for row in reader]
    except csv.Error as e:  # e.g. a field over csv.field_size_limit()
        raise UserError(f"{path} line {reader.line_num} is not valid CSV ({e})") from None
    return list(reader.fieldnames or []), rows


def _read_parquet(path: Path) -> tuple[list[str], list[dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        columns = table.column_names
        used = [c for c in columns if c in {*_TEXT_COLUMNS, *_ANSWER_COLUMNS, "reward_model", "split"}]
        return columns, table.select(used).to_pylist()  # plain lists/dicts, never numpy arrays
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read {path} as Parquet ({first}); check the file") from None


def _read_txt(path: Path) -> tuple[list[str], list[dict]]:
    return ["text"], [{"text": line.strip()} for line in _decode(path).splitlines() if line.strip()]


_READERS = {
    ".jsonl": _read_json,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}


def _load_file(path: Path, split: str, limit: int | None) -> list[Prompt]:
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist; check the path")
    columns, rows = _READERS[path.suffix.lower()](path)
    numbered = list(enumerate(rows, 1))
    if split != "all":
        if "split" not in columns:
            raise UserError(f"{path} has no 'split' column, so split={split!r} is undefined; use split='all'")
        numbered = [(i, row) for i, row in numbered if row.get("split") == split]
    return _to_prompts(numbered[:limit], columns, f"file:{path.name}", str(path))


def _load_hf(spec: str, split: str, limit: int | None) -> list[Prompt]:
    """`hf:<id>[:split]` or `hf:<id>:<config>:<split>`; the hub split defaults to `split`, else train."""
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"bad Hugging Face source 'hf:{spec}'; write hf:<dataset id>[:config][:split]")
    repo = parts[0]
    config = parts[1] if len(parts) == 3 else None
    hub_split = parts[-1] if len(parts) > 1 else None
    if hub_split and split != "all" and hub_split != split:
        raise UserError(f"'hf:{spec}' names split {hub_split!r} but split={split!r} was asked; give only one")
    hub_split = hub_split or (split if split != "all" else "train")
    try:
        import datasets
    except ImportError:
        raise UserError("hf: prompt sources need the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(repo, config, split=hub_split)
    except ConnectionError as e:
        raise UserError(
            f"cannot load Hugging Face dataset {repo!r}: no hub is reachable ({str(e).splitlines()[0]}); "
            "download it where there is network and pass the .parquet/.jsonl file instead"
        ) from None
    except (FileNotFoundError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load Hugging Face dataset {repo!r} split {hub_split!r}: {first}") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return _to_prompts(list(enumerate(ds.to_list(), 1)), list(ds.column_names), f"hf:{spec}", f"hf:{spec}")


# ---------------------------------------------------------------------------------------------------
# Rows -> prompts


def _to_prompts(
    numbered: list[tuple[int, dict]], columns: list[str], source: str, where: str
) -> list[Prompt]:
    """Pick the text and answer columns, then validate and convert each (row number, row)."""
    if not numbered:
        return []  # load_prompts reports the empty set
    text_col = next((c for c in _TEXT_COLUMNS if c in columns), None)
    if text_col is None:
        raise UserError(
            f"{where} has no prompt column; found columns {columns}, expected one of {list(_TEXT_COLUMNS)}"
        )
    has_rm = "reward_model" in columns and any(
        isinstance(rm := row.get("reward_model"), dict) and "ground_truth" in rm for _, row in numbered
    )
    present = [*columns, "reward_model.ground_truth"] if has_rm else columns
    answer_col = next((c for c in _ANSWER_COLUMNS if c in present), None)
    prompts = []
    for i, row in numbered:
        value = row.get(text_col)
        text, messages = None, None
        if value is None or (isinstance(value, str) and not value.strip()):
            raise UserError(f"{where} row {i}: the prompt in column {text_col!r} is empty; fill it in")
        if isinstance(value, str):
            text = value
        elif isinstance(value, list):
            messages = _messages(value, f"{where} row {i}")
        else:
            raise UserError(
                f"{where} row {i}: column {text_col!r} holds {type(value).__name__}, "
                "expected a string or a list of chat messages"
            )
        if answer_col == "reward_model.ground_truth":
            raw = (row.get("reward_model") or {}).get("ground_truth")
        else:
            raw = row.get(answer_col) if answer_col else None
        answer = _answer(raw, f"{where} row {i}")
        prompts.append(Prompt(text=text, messages=messages, answer=answer, source=source))
    return prompts


def _messages(value: list, where: str) -> list[dict]:
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise UserError(f"{where}: chat messages need string 'role' and 'content' fields, got {m!r}")
    if not any(m["content"].strip() for m in value):
        raise UserError(f"{where}: the chat prompt is empty; fill it in or remove the row")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(raw: Any, where: str) -> str | None:
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return None
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))  # integer answers stored as floats (e.g. by pandas with missing values)
    if isinstance(raw, (str, int, float)):
        return str(raw)
    raise UserError(f"{where}: the answer is a {type(raw).__name__}; it must be a string or a number")
