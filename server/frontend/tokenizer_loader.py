"""Load only a model's tokenizer (the router process needs no weights).

Resolves a model reference the way `server.models.loader.load_model` does: None is the
embedded default GGUF, a file is a GGUF, a folder is a Hugging Face model folder, and
`random:PRESET` (random weights, for benchmarks) borrows the embedded model's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from server.models.embedded import embedded_model_path
from server.models.tokenizer import Tokenizer


def load_tokenizer(model: str | None) -> Tokenizer:
    random_model = model is not None and model.startswith("random:")
    path = embedded_model_path() if model is None or random_model else Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(path)!r} does not exist (expected a GGUF file or a folder)"
        )
    if path.is_file():
        return Tokenizer.from_gguf(path)
    return Tokenizer.from_hf_folder(path)
