"""Client of a remote GenEval-style scoring server, over a safe protocol: JSON and PNG, never pickle.

Protocol: one ``POST`` (``Content-Type: application/json``) per chunk of at most ``batch_size``
images, one entry per image in every list:

    request   {"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [object, ...]}
    response  {"scores": [number, ...],
               "strict": [number, ...],                  (optional)
               "details": {name: [number or null, ...]}} (optional)

The reward returns ``"geneval_http"`` (the scores, which must be finite), ``"geneval_http/strict"``
and ``"geneval_http/<name>"`` per detail (null -> NaN). `tpgrpo.rewards.geneval_server` is a
reference server.

Failures: connection errors, timeouts and HTTP 5xx answers are retried, ``tries`` attempts in
all, waiting ``backoff``, 2·``backoff``, 4·``backoff``... seconds between them; other HTTP errors
and malformed answers fail at once. ``timeout`` bounds each socket operation (connecting, each
read), so a server that hangs costs at most about tries × timeout + the backoff waits. Every
failure raises a one-line `GenEvalServerError` naming the server.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tpgrpo.images import to_uint8
from tpgrpo.rewards.base import Reward, RewardConfigError, register_reward
from tpgrpo.rewards.geneval import geneval_summary


class GenEvalServerError(RuntimeError):
    """The GenEval server could not be reached, answered with an error, or sent an unusable answer."""


def encode_png(array: np.ndarray) -> str:
    """(H, W, 3) uint8 image -> base64 text of its PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    """Base64 text of a PNG file -> (H, W, 3) uint8 image; ValueError when it is not one."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as picture:
            if picture.format != "PNG":
                raise ValueError(f"expected a PNG image, got {picture.format}")
            return np.asarray(picture.convert("RGB"))
    except (binascii.Error, UnidentifiedImageError, OSError, TypeError) as error:
        raise ValueError(f"not a base64 PNG image ({error})") from None


def _snippet(data: bytes, limit: int = 200) -> str:
    """The start of a response body as one line of text, for error messages."""
    text = " ".join(data.decode("utf-8", errors="replace").split())
    return text[:limit] + ("..." if len(text) > limit else "")


def post_json(url: str, payload: Mapping, timeout: float, tries: int, backoff: float) -> object:
    """POST ``payload`` as JSON to ``url`` and return the decoded JSON answer (retries: module docstring)."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode("utf-8"), headers={"Content-Type": "application/json"}, method="POST"
    )
    for attempt in range(1, tries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
            break
        except urllib.error.HTTPError as error:
            if error.code < 500 or attempt == tries:
                raise GenEvalServerError(
                    f"the GenEval server at {url} answered HTTP {error.code} {error.reason} "
                    f"(attempt {attempt} of {tries}): {_snippet(error.read())}"
                ) from None
        except (urllib.error.URLError, OSError) as error:  # refused, reset, timed out
            if attempt == tries:
                reason = getattr(error, "reason", None) or error
                raise GenEvalServerError(
                    f"could not reach the GenEval server at {url} after {tries} tries: {reason}"
                ) from None
        except http.client.HTTPException as error:
            raise GenEvalServerError(f"the GenEval server at {url} sent a malformed HTTP answer: {error!r}") from None
        time.sleep(backoff * 2 ** (attempt - 1))
    try:
        return json.loads(body)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise GenEvalServerError(
            f"the GenEval server at {url} sent an answer that is not JSON ({error}): {_snippet(body)}"
        ) from None


def _numbers(values: object, count: int, what: str, allow_null: bool = False) -> list[float]:
    """``values`` as ``count`` floats (null -> NaN where allowed); ValueError describing the problem."""
    if not isinstance(values, list):
        raise ValueError(f"{what} is {type(values).__name__}, not a list")
    if len(values) != count:
        raise ValueError(f"{len(values)} {what} for {count} images")
    numbers = []
    for i, value in enumerate(values):
        if value is None and allow_null:
            numbers.append(math.nan)
        elif isinstance(value, (int, float)):  # bool included: true/false count as 1/0
            numbers.append(float(value))
        else:
            raise ValueError(f"{what} of image {i} is {value!r}, not a number")
    return numbers


def parse_answer(answer: object, count: int) -> dict[str, list[float]]:
    """The server's answer for ``count`` images -> {"scores": [...], "strict": [...], "<detail>": [...]}.

    Raises ValueError describing the first problem: not an object, a missing or wrong-length list,
    a non-number, or a non-finite score or strict score.
    """
    if not isinstance(answer, dict) or "scores" not in answer:
        raise ValueError(f"expected a JSON object with 'scores', got {_snippet(json.dumps(answer).encode(), 80)}")
    out = {"scores": _numbers(answer["scores"], count, "scores")}
    if answer.get("strict") is not None:
        out["strict"] = _numbers(answer["strict"], count, "strict scores")
    for key in ("scores", "strict"):
        bad = [i for i, value in enumerate(out.get(key, [])) if not math.isfinite(value)]
        if bad:
            raise ValueError(f"non-finite {key} {out[key][bad[0]]} for image {bad[0]}")
    details = answer.get("details") or {}
    if not isinstance(details, dict):
        raise ValueError(f"details is {type(details).__name__}, not an object")
    for name, values in details.items():
        if name in ("scores", "strict"):
            raise ValueError(f"detail name {name!r} is reserved")
        out[name] = _numbers(values, count, f"details {name!r}", allow_null=True)
    return out


@register_reward("geneval_http")
class GenEvalHttpReward(Reward):
    """Scores from a remote GenEval-style server (protocol and failures: module docstring).

    Options: ``url`` (http or https), ``timeout`` (seconds per socket operation), ``tries``
    (attempts per request), ``backoff`` (first wait between attempts, seconds, doubling),
    ``batch_size`` (images per request).
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8765",
        timeout: float = 60.0,
        tries: int = 3,
        backoff: float = 1.0,
        batch_size: int = 64,
    ):
        super().__init__()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RewardConfigError(f"geneval_http: url must be http://host:port/..., got {url!r}")
        if timeout <= 0 or tries < 1 or backoff < 0 or batch_size < 1:
            raise RewardConfigError(
                "geneval_http: need timeout > 0, tries >= 1, backoff >= 0 and batch_size >= 1, got "
                f"timeout={timeout}, tries={tries}, backoff={backoff}, batch_size={batch_size}"
            )
        self.url, self.timeout, self.tries, self.backoff = url, float(timeout), int(tries), float(backoff)
        self.batch_size = int(batch_size)

    def _request(
        self, arrays: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping]
    ) -> dict[str, list[float]]:
        """One request for a chunk of (N, H, W, 3) uint8 images -> `parse_answer`'s columns."""
        payload = {
            "images": [encode_png(array) for array in arrays],
            "prompts": list(prompts),
            "metadata": [dict(record) for record in metadata],
        }
        answer = post_json(self.url, payload, self.timeout, self.tries, self.backoff)
        try:
            return parse_answer(answer, len(arrays))
        except ValueError as error:
            raise GenEvalServerError(f"the GenEval server at {self.url} sent a malformed answer: {error}") from None

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]
    ) -> dict[str, torch.Tensor]:
        """{"geneval_http": (B,), "geneval_http/strict": (B,), "geneval_http/<detail>": (B,)} for images (B, 3, H, W).

        A column some chunk's answer lacks is NaN for that chunk's images.
        """
        arrays = to_uint8(images)
        columns: dict[str, list[float]] = {}
        for start in range(0, len(arrays), self.batch_size):
            stop = start + self.batch_size
            for key, values in self._request(arrays[start:stop], prompts[start:stop], metadata[start:stop]).items():
                columns.setdefault(key, [math.nan] * start).extend(values)
            for values in columns.values():
                values.extend([math.nan] * (min(stop, len(arrays)) - len(values)))
        names = {key: self.name if key == "scores" else f"{self.name}/{key}" for key in columns}
        return {names[key]: torch.tensor(v, dtype=torch.float32, device=images.device) for key, v in columns.items()}

    def summarise(self, means: Mapping[str, float]) -> dict[str, float]:
        """GenEval's overall score, ``<name>/overall`` (`tpgrpo.rewards.geneval.geneval_summary`)."""
        return geneval_summary(self.name, means)
