"""One warning per run for prompts longer than a text encoder reads.

The diffusers pipelines truncate such prompts and log a warning at every encode call (and
transformers adds its own once per tokenizer); over a run that repeats for every batch. `PromptLengthCheck`
counts each distinct prompt's tokens once, warns once per run (naming the prompt, its length and
the limit), and silences those repeated log lines while the pipeline encodes.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from lightning.pytorch.utilities import rank_zero_warn

from tpgrpo.families import text_tokenizer

# messages of diffusers' encode_prompt helpers and of transformers' tokenizers about truncation
_TRUNCATION_MESSAGES = ("input was truncated because", "Token indices sequence length is longer than")
_TOKENIZER_LOGGER = "transformers.tokenization_utils_base"


class _DropTruncationMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(text in message for text in _TRUNCATION_MESSAGES)


class PromptLengthCheck:
    """Checks prompts against the token limits of a pipeline's tokenizers.

    The tokenizers named in ``sequence_tokenizers`` (`FlowModel.sequence_tokenizers`: SD3's and
    FLUX.1's T5, the Qwen or Mistral tokenizers of Qwen-Image, FLUX.2 and Z-Image) read
    ``max_sequence_length`` tokens (what the pipeline passes); the others (CLIP)
    ``tokenizer.model_max_length``. Prompts are counted bare: the chat template these families wrap
    them in (FLUX.2 [dev]'s with a system message) takes some tokens more. Use as a
    context around encoding: ``with check(prompts): flow.encode(prompts)``.
    """

    def __init__(
        self,
        pipe,
        max_sequence_length: int | None,
        sequence_tokenizers: Sequence[str],
        max_cached: int = 1_000_000,
    ):
        self.tokenizers = []
        self.sequence_tokenizers = tuple(sequence_tokenizers)
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            tokenizer = text_tokenizer(getattr(pipe, name, None))
            if tokenizer is None or any(tokenizer is t for _, t, _ in self.tokenizers):
                continue
            by_sequence = name in self.sequence_tokenizers and max_sequence_length
            limit = max_sequence_length if by_sequence else tokenizer.model_max_length
            if limit and limit < 10**8:  # an unset model_max_length is a huge number
                self.tokenizers.append((name, tokenizer, int(limit)))
        self._loggers = [logging.getLogger(type(pipe).__module__), logging.getLogger(_TOKENIZER_LOGGER)]
        self._filter = _DropTruncationMessages()
        self._checked: set[str] = set()
        self.max_cached = max_cached
        self.warned = False

    def check(self, prompts: Sequence[str]) -> None:
        """Count the tokens of prompts not seen before; warn (once per run) if any is too long."""
        if self.warned:
            return  # nothing more to report
        for prompt in dict.fromkeys(prompts):
            if prompt in self._checked:
                continue
            if len(self._checked) < self.max_cached:
                self._checked.add(prompt)
            for name, tokenizer, limit in self.tokenizers:
                length = len(tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
                if length > limit:
                    self._warn(prompt, name, tokenizer, length, limit)
                    return

    def _warn(self, prompt: str, name: str, tokenizer, length: int, limit: int) -> None:
        self.warned = True
        short = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        fix = "shorten it or raise model.max_sequence_length" if name in self.sequence_tokenizers else "shorten it"
        rank_zero_warn(
            f"prompt {short!r} has {length} tokens but the text encoder's {name} reads at most {limit}; "
            f"it is truncated ({fix}; further long prompts are truncated without a warning)"
        )

    @contextmanager
    def __call__(self, prompts: Sequence[str]) -> Iterator[None]:
        self.check(prompts)
        for logger in self._loggers:
            logger.addFilter(self._filter)
        try:
            yield
        finally:
            for logger in self._loggers:
                logger.removeFilter(self._filter)
