"""The project's embedded default world: a tiny SD3-architecture model and a shapes task.

- `components`: builds the tiny pipeline offline (random weights) and loads the shipped one.
- `scenes`: synthetic shape scenes and prompts in GenEval's metadata format.
- `pretrain` / `evaluate`: how the shipped model in ``tpgrpo/tiny/model`` was made and scored.
"""
from tpgrpo.tiny.components import (
    DEFAULT_MODEL_DIR,
    MAX_SEQUENCE_LENGTH,
    build_pipeline,
    build_tokenizer,
    load_pipeline,
)

__all__ = ["DEFAULT_MODEL_DIR", "MAX_SEQUENCE_LENGTH", "build_pipeline", "build_tokenizer", "load_pipeline"]
