"""Perplexity, by the project's convention: the text tokenised as one string (no BOS),
consecutive non-overlapping windows of ``seqlen`` tokens, exp(mean window NLL)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm


def load_eval_tokens(tokenizer, text_or_path: str, ) -> torch.Tensor:
    p = Path(text_or_path)
    text = p.read_text(encoding="utf-8") if len(text_or_path) < 4096 and p.is_file() else text_or_path
    text = text.replace("\r\n", "\n")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int = 1024, windows: int | None = None,
               device: str | torch.device | None = None, progress: bool = True) -> float:
    if seqlen < 2 or (windows is not None and windows < 1):
        raise ValueError(f"seqlen={seqlen} must be at least 2 and windows={windows} at least 1 (or None: all)")
    n = tokens.numel() // seqlen
    if windows is not None:
        n = min(n, windows)
    if n == 0:
        raise ValueError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    nll = 0.0
    for i in tqdm(range(n), desc="perplexity", disable=not progress):
        ids = tokens[i * seqlen:(i + 1) * seqlen].view(1, -1).to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        nll += loss.item()
    return math.exp(nll / n)
