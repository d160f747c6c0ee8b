"""A GenEval scoring server for the `geneval_http` reward: the shapes world's or the real detector's.

    python -m tpgrpo.rewards.geneval_server --port 8765 [--host 127.0.0.1]        # shapes world
    python -m tpgrpo.rewards.geneval_server --scorer geneval [--device cuda:1] \
        [--detector facebook/mask2former-swin-small-coco-instance] [--clip openai/clip-vit-large-patch14]

It speaks the protocol of `tpgrpo.rewards.geneval_http` (JSON and base64 PNG, no pickle): a
``POST`` of {"images", "prompts", "metadata"} (metadata: GenEval records, of the shapes world
for ``--scorer shapes``, of GenEval's COCO objects and colours for ``--scorer geneval``) gets
{"scores": <scorer>, "strict": <scorer>/strict, "details": {name: [value or null]}}, the
entries of `ShapesReward` or `tpgrpo.rewards.geneval_detector.GenEvalReward`. A bad request
gets HTTP 400 (413 when larger than ``--max-mib``), a scoring failure HTTP 500, each with
{"error": message}. Requests are scored one at a time.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from tpgrpo.errors import UserInputError
from tpgrpo.rewards.base import Reward
from tpgrpo.rewards.geneval_http import decode_png
from tpgrpo.rewards.shapes import ShapesReward
from tpgrpo.rewards.shapes import validate_record

SCORERS = ("shapes", "geneval")


class BadRequest(ValueError):
    """The request does not follow the protocol; the message says how."""


def _images(request: Mapping) -> torch.Tensor:
    """The request's PNG images as (B, 3, H, W) float in [0, 1]; `BadRequest` when they cannot be."""
    arrays = []
    for i, text in enumerate(request["images"]):
        try:
            arrays.append(decode_png(text))
        except ValueError as error:
            raise BadRequest(f"image {i}: {error}") from None
    if len({array.shape for array in arrays}) > 1:
        raise BadRequest("all images of a request must have the same size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def answer(request: object, reward: Reward, validate: Callable[[Mapping], object] | None = None) -> dict:
    """The response to a decoded request: {"scores", "strict", "details"}; `BadRequest` for a bad one.

    ``validate`` checks each metadata record, raising ValueError (default: the shapes world's
    `validate_record`).
    """
    if not isinstance(request, dict):
        raise BadRequest("the request must be a JSON object with images, prompts and metadata")
    lists = {key: request.get(key) for key in ("images", "prompts", "metadata")}
    if not all(isinstance(value, list) for value in lists.values()) or len({len(v) for v in lists.values()}) != 1:
        raise BadRequest("images, prompts and metadata must be lists of the same length")
    if not lists["images"]:
        return {"scores": [], "strict": [], "details": {}}
    check, world = (validate_record, " of the shapes world") if validate is None else (validate, "")
    for i, record in enumerate(lists["metadata"]):
        try:
            check(record)
        except (ValueError, TypeError, AttributeError, KeyError) as error:
            raise BadRequest(f"metadata {i} is not a GenEval record{world}: {error}") from None
    scores = reward(_images(request), [str(p) for p in lists["prompts"]], lists["metadata"])
    name = reward.name
    details = {
        key.split("/", 1)[1]: values
        for key, values in scores.items()
        if key.startswith(f"{name}/") and key != f"{name}/strict"
    }
    return {
        "scores": scores[name].tolist(),
        "strict": scores[f"{name}/strict"].tolist(),
        "details": {key: [None if math.isnan(v) else v for v in values.tolist()] for key, values in details.items()},
    }


class ScoringHandler(BaseHTTPRequestHandler):
    """POST: score the request with ``server.reward`` (see `answer`); other methods get HTTP 501."""

    server: ScoringServer

    def _send(self, status: int, body: Mapping) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send(411, {"error": "a Content-Length header is required"})
            return
        if length > self.server.max_bytes:
            self._send(413, {"error": f"the request is larger than {self.server.max_bytes} bytes"})
            return
        try:
            request = json.loads(self.rfile.read(length))
        except ValueError as error:
            self._send(400, {"error": f"the request is not JSON: {error}"})
            return
        try:
            with self.server.lock:
                body = answer(request, self.server.reward, self.server.validate)
            self._send(200, body)
        except BadRequest as error:
            self._send(400, {"error": str(error)})
        except Exception as error:  # the scorer failed: tell the client, keep serving
            self._send(500, {"error": f"{type(error).__name__}: {error}"})


class ScoringServer(ThreadingHTTPServer):
    """A threaded HTTP server on (host, port) scoring with ``reward``; requests up to ``max_bytes``.

    ``reward`` defaults to `ShapesReward`; ``validate`` checks each metadata record (raising
    ValueError), by default against the shapes world. Requests are scored one at a time (a
    lock), so a model-backed reward never runs twice at once. Port 0 picks a free port (see
    ``server_address``). Call ``serve_forever`` to serve.
    """

    daemon_threads = True

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8765,
        max_bytes: int = 256 * 2**20,
        reward: Reward | None = None,
        validate: Callable[[Mapping], object] | None = None,
    ):
        super().__init__((host, port), ScoringHandler)
        self.reward = reward if reward is not None else ShapesReward()
        self.validate, self.max_bytes, self.lock = validate, max_bytes, threading.Lock()


def build_scorer(scorer: str, **options) -> tuple[Reward, Callable[[Mapping], object] | None]:
    """The reward and record check of a scorer name: "shapes" (no options) or "geneval" (`GenEvalReward`'s options)."""
    if scorer == "shapes":
        return ShapesReward(), None
    if scorer == "geneval":
        from tpgrpo.rewards.geneval_detector import GenEvalReward, validate_geneval_record

        return GenEvalReward(**options), validate_geneval_record
    raise ValueError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: serve until interrupted."""
    from tpgrpo.rewards.geneval_detector import DEFAULT_CLIP, DEFAULT_DETECTOR  # the defaults, for --help

    parser = argparse.ArgumentParser(description="GenEval scoring server (JSON + PNG) for the geneval_http reward.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--max-mib", type=float, default=256, help="largest request, MiB (default: %(default)s)")
    parser.add_argument("--scorer", choices=SCORERS, default="shapes",
                        help="shapes: the shapes world's pixel detector; geneval: Mask2Former + CLIP "
                        "(default: %(default)s)")
    group = parser.add_argument_group("geneval scorer")
    group.add_argument("--detector", default=DEFAULT_DETECTOR,
                       help="Mask2Former folder or hub id (default: %(default)s)")
    group.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP folder or hub id (default: %(default)s)")
    group.add_argument("--device", default=None,
                       help="where the models run, e.g. cuda:1 (default: cuda if available, else cpu)")
    group.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                       help="model weights' type (default: %(default)s)")
    group.add_argument("--threshold", type=float, default=0.3, help="detection confidence (default: %(default)s)")
    group.add_argument("--counting-threshold", type=float, default=0.9,
                       help="detection confidence for counting records (default: %(default)s)")
    group.add_argument("--max-per-class", type=int, default=16, help="detections kept per class (default: %(default)s)")
    group.add_argument("--clip-batch-size", type=int, default=64, help="crops per CLIP call (default: %(default)s)")
    args = parser.parse_args(argv)
    options = {}
    if args.scorer == "geneval":
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        options = dict(
            detector=args.detector, clip=args.clip, device=device, dtype=args.dtype, threshold=args.threshold,
            counting_threshold=args.counting_threshold, max_per_class=args.max_per_class,
            clip_batch_size=args.clip_batch_size,
        )
    try:
        reward, validate = build_scorer(args.scorer, **options)
    except UserInputError as error:
        sys.exit(f"error: {error}")
    server = ScoringServer(args.host, args.port, int(args.max_mib * 2**20), reward, validate)
    host, port = server.server_address[:2]
    print(f"GenEval-style server ({args.scorer} scorer) on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
