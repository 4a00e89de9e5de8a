"""Model card and Hub upload."""

from __future__ import annotations

from pathlib import Path


def write_model_card(folder: Path, model) -> None:
    """Placeholder card; replaced by the full card writer."""
    qc = model.quant_config.to_hf_dict()
    (folder / "README.md").write_text(f"---\nlibrary_name: transformers\ntags: [awq, awqlib, 4-bit]\n---\n# AWQ {qc}\n")


def push_to_hub(model, repo_id, **kwargs):
    raise NotImplementedError
