"""Workload traces for `kvshelf advise` and `kvshelf bench`: JSON lines, checked before any model loads.

A line is {"prompt": text} | {"tokens": [ids]} | {"documents": [texts], "question": text}, each with an
optional "node": N (which instance served it, for traces of several nodes).
"""

from __future__ import annotations

import json
from pathlib import Path

from kvshelf.advice.advise import Request
from kvshelf.errors import KVShelfError


def read_items(path: str) -> list[dict]:
    """The trace's lines, each checked for a known shape; a KVShelfError naming the line otherwise."""
    file = Path(path)
    if not file.is_file():
        raise KVShelfError(f"trace file {path!r} does not exist")
    items = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as err:
            raise KVShelfError(f"{path}:{n}: not JSON: {err}") from None
        if not isinstance(item, dict):
            raise KVShelfError(f"{path}:{n}: expected a JSON object, got {type(item).__name__}")
        if "documents" in item:
            docs = item["documents"]
            if not isinstance(docs, list) or not docs or not all(isinstance(d, str) for d in docs):
                raise KVShelfError(f"{path}:{n}: 'documents' must be a non-empty list of strings")
            if not isinstance(item.get("question", ""), str):
                raise KVShelfError(f"{path}:{n}: 'question' must be a string")
        elif "tokens" in item:
            tokens = item["tokens"]
            if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
                raise KVShelfError(f"{path}:{n}: 'tokens' must be a non-empty list of integers")
        elif "prompt" in item:
            if not isinstance(item["prompt"], str) or not item["prompt"]:
                raise KVShelfError(f"{path}:{n}: 'prompt' must be a non-empty string")
        else:
            raise KVShelfError(f"{path}:{n}: expected a 'prompt', 'tokens' or 'documents' field")
        node = item.get("node", 0)
        if not isinstance(node, int) or isinstance(node, bool) or node < 0:
            raise KVShelfError(f"{path}:{n}: 'node' must be a non-negative integer, got {node!r}")
        items.append(item)
    if not items:
        raise KVShelfError(f"{path} holds no requests")
    return items


def tokenize(items: list[dict], tokenizer, separator: str) -> tuple[list[Request], list]:
    """Requests for the analysis, and what to send the model for each (text, or token ids)."""
    requests, texts = [], []
    for item in items:
        node = item.get("node", 0)
        if "documents" in item:
            chunks = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in item["documents"]]
            text = separator.join(item["documents"]) + separator + item.get("question", "")
            requests.append(Request(tokenizer(text)["input_ids"], chunks=chunks, node=node))
            texts.append(text)
        elif "tokens" in item:
            requests.append(Request([int(t) for t in item["tokens"]], node=node))
            texts.append(item["tokens"])
        else:
            requests.append(Request(tokenizer(item["prompt"])["input_ids"], node=node))
            texts.append(item["prompt"])
    return requests, texts
