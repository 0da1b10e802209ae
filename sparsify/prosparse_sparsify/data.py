"""Training text: plain-text or jsonl files (or directories of them), packed into fixed-length
sequences. Documents are shuffled with the seed before packing and the last sequences are held out for
evaluation, so held-out text shares at most one boundary sequence's document with training."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List, Sequence, Tuple

import torch


def _files(paths: Sequence[str]) -> List[Path]:
    out: List[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(sorted(q for q in path.rglob("*") if q.is_file()))
        elif path.is_file():
            out.append(path)
        else:
            raise ValueError(f"data file not found: {path}")
    return out


def read_documents(paths: Sequence[str], text_field: str = "text") -> List[str]:
    """One document per plain-text file; one per line of a .jsonl file (an object's
    ``text_field``, or a bare JSON string)."""
    if not paths:
        raise ValueError("no data given (--data FILE ...)")
    docs: List[str] = []
    for f in _files(paths):
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8", errors="replace") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{f}:{lineno}: not valid JSON ({e.msg})") from None
                    text = obj if isinstance(obj, str) else obj.get(text_field) if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f"{f}:{lineno}: no string field '{text_field}'")
                    if text.strip():
                        docs.append(text)
        else:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                docs.append(text)
    if not docs:
        raise ValueError(f"no text found in {', '.join(map(str, paths))} (empty data)")
    return docs


def tokenize(tokenizer, docs: Sequence[str]) -> List[List[int]]:
    """Each document's ids with the tokenizer's own special tokens (BOS for LLaMA) and an EOS
    after it, so packed sequences see document boundaries as the model did in pre-training."""
    eos = tokenizer.eos_token_id
    out = []
    for d in docs:
        ids = list(tokenizer(d)["input_ids"])
        if eos is not None:
            ids.append(eos)
        out.append(ids)
    return out


def pack(token_docs: Sequence[Sequence[int]], seq_len: int) -> torch.Tensor:
    """Concatenate and cut into [n, seq_len] (the ragged tail is dropped)."""
    if seq_len < 2:
        raise ValueError(f"sequence length must be >= 2, got {seq_len}")
    flat = [t for d in token_docs for t in d]
    n = len(flat) // seq_len
    if n == 0:
        raise ValueError(f"only {len(flat)} tokens of data: fewer than one sequence of {seq_len}")
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_blocks(tokenizer, paths: Sequence[str], seq_len: int, eval_fraction: float = 0.05,
                eval_paths: Sequence[str] | None = None, seed: int = 0,
                text_field: str = "text") -> Tuple[torch.Tensor, torch.Tensor]:
    """(train blocks, eval blocks), each [n, seq_len]."""
    docs = read_documents(paths, text_field)
    random.Random(seed).shuffle(docs)
    tok = tokenize(tokenizer, docs)
    if eval_paths:
        eval_tok = tokenize(tokenizer, read_documents(eval_paths, text_field))
        return pack(tok, seq_len), pack(eval_tok, seq_len)
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval fraction must be in (0, 1), got {eval_fraction}")
    blocks = pack(tok, seq_len)
    n_eval = max(1, int(round(eval_fraction * len(blocks))))
    if n_eval >= len(blocks):
        raise ValueError(f"only {len(blocks)} sequences of {seq_len} tokens: too few to hold "
                         f"{eval_fraction:.0%} out for evaluation (give more data or --eval-data)")
    # documents were shuffled before packing, so the tail is a random sample of documents
    return blocks[:-n_eval], blocks[-n_eval:]
