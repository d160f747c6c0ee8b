"""A reference GenEval-style scoring server for the `geneval_http` reward, scoring with `shapes`.

    python -m tpgrpo.rewards.geneval_server --port 8765 [--host 127.0.0.1]

It speaks the protocol of `tpgrpo.rewards.geneval_http` (JSON and base64 PNG, no pickle): a
``POST`` of {"images", "prompts", "metadata"} (metadata: the shapes world's GenEval records)
gets {"scores": shapes, "strict": shapes/strict, "details": {check: [value or null]}}. A bad
request gets HTTP 400 (413 when larger than ``--max-mib``), a scoring failure HTTP 500, each
with {"error": message}. A real GenEval server (object detector) would answer the same way.
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from tpgrpo.rewards.geneval_http import decode_png
from tpgrpo.rewards.shapes import ShapesReward
from tpgrpo.tiny.scenes import validate_record


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


def answer(request: object, reward: ShapesReward) -> dict:
    """The response to a decoded request: {"scores", "strict", "details"}; `BadRequest` for a bad one."""
    if not isinstance(request, dict):
        raise BadRequest("the request must be a JSON object with images, prompts and metadata")
    lists = {key: request.get(key) for key in ("images", "prompts", "metadata")}
    if not all(isinstance(value, list) for value in lists.values()) or len({len(v) for v in lists.values()}) != 1:
        raise BadRequest("images, prompts and metadata must be lists of the same length")
    if not lists["images"]:
        return {"scores": [], "strict": [], "details": {}}
    for i, record in enumerate(lists["metadata"]):
        try:
            validate_record(record)
        except (ValueError, TypeError, AttributeError, KeyError) as error:
            raise BadRequest(f"metadata {i} is not a GenEval record of the shapes world: {error}") from None
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
            self._send(200, answer(request, self.server.reward))
        except BadRequest as error:
            self._send(400, {"error": str(error)})
        except Exception as error:  # the scorer failed: tell the client, keep serving
            self._send(500, {"error": f"{type(error).__name__}: {error}"})


class ScoringServer(ThreadingHTTPServer):
    """A threaded HTTP server on (host, port) scoring with `ShapesReward`; requests up to ``max_bytes``.

    Port 0 picks a free port (see ``server_address``). Call ``serve_forever`` to serve.
    """

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 8765, max_bytes: int = 256 * 2**20):
        super().__init__((host, port), ScoringHandler)
        self.reward, self.max_bytes = ShapesReward(), max_bytes


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: serve until interrupted."""
    parser = argparse.ArgumentParser(description="Reference GenEval-style scoring server (shapes reward, JSON + PNG).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--max-mib", type=float, default=256, help="largest request, MiB (default: %(default)s)")
    args = parser.parse_args(argv)
    server = ScoringServer(args.host, args.port, int(args.max_mib * 2**20))
    host, port = server.server_address[:2]
    print(f"GenEval-style server (shapes reward) on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
