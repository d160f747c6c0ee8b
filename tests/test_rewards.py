"""The rewards of issue 6: PickScore, CLIP score, aesthetic, JPEG, OCR, GenEval over HTTP, weighting.

CLIP-based rewards load a tiny random CLIP (built here, saved with save_pretrained) instead of
the real checkpoints; the GenEval client talks to the reference server and to fake servers on
localhost; Tesseract tests are skipped when the program is absent.
"""
import contextlib
import http.server
import importlib.util
import io
import json
import math
import shutil
import socket
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPProcessor

from tests.helpers import tiny_models
from tpgrpo.errors import UserInputError
from tpgrpo.images import to_uint8
from tpgrpo.rewards import REWARDS, build_reward
from tpgrpo.rewards.aesthetic import AestheticScore, aesthetic_head, convert_head
from tpgrpo.rewards.base import RewardConfigError
from tpgrpo.rewards.clip_models import ModelLoadError
from tpgrpo.rewards.clipscore import ClipScore
from tpgrpo.rewards.geneval_http import GenEvalHttpReward, GenEvalServerError, decode_png, encode_png
from tpgrpo.rewards.geneval_server import ScoringServer
from tpgrpo.rewards.jpeg import JpegCompressibility, JpegIncompressibility
from tpgrpo.rewards.ocr import OcrReward, levenshtein, quoted_text, text_similarity
from tpgrpo.rewards.pickscore import PickScore
from tpgrpo.rewards.shapes import ShapesReward
from tpgrpo.tiny import scenes

PROMPTS = ["a photo of a cat", "a red circle", "a sign that says hello", "two blue squares"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_images(count=4, height=40, width=48, seed=0):
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ tiny CLIP models
def save_tiny_clip(path, projection_dim=768, seed=0):
    """A random 1-layer CLIP (32x32 images, word-level tokenizer) and its CLIPProcessor in ``path``."""
    return tiny_models.save_tiny_clip(path, " ".join(PROMPTS).split() + ["dog", "says"], projection_dim, seed)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    """A random aesthetic head saved as the released checkpoint's keys (layers.<i>.weight/bias)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("aesthetic") / "head.safetensors"
    save_file({f"layers.{key}": value for key, value in aesthetic_head().state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def pickscore(clip_dir):
    return PickScore(model=clip_dir, processor=clip_dir)


@pytest.fixture(scope="module")
def clipscore(clip_dir):
    return ClipScore(model=clip_dir)


@pytest.fixture(scope="module")
def aesthetic(clip_dir, head_file):
    return AestheticScore(head=head_file, clip_model=clip_dir)


def test_all_rewards_are_registered():
    build_reward({"shapes": 1.0})  # imports the built-in rewards
    names = {"pickscore", "clipscore", "aesthetic", "ocr", "geneval_http", "jpeg_compressibility", "shapes"}
    assert names <= set(REWARDS)


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "aesthetic"])
def test_clip_rewards_batch_shape_determinism_and_no_gradients(name, request):
    reward = request.getfixturevalue(name)
    images = random_images()
    first = reward(images, PROMPTS)
    assert set(first) == {name}
    assert first[name].shape == (4,) and first[name].dtype == torch.float32 and torch.isfinite(first[name]).all()
    assert first[name].device == images.device and not first[name].requires_grad
    assert torch.equal(reward(images, PROMPTS)[name], first[name])
    singles = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1])[name] for i in range(4)])
    assert torch.allclose(singles, first[name], atol=1e-5)
    assert not any(p.requires_grad for p in reward.parameters())
    reward.train()  # as LightningModule.train() does: the reward models stay in eval mode
    assert not any(module.training for module in reward.modules())


def test_pickscore_over_26_and_clipscore_over_30_are_the_models_logits(pickscore, clipscore, clip_dir):
    images = random_images()
    scores = pickscore(images, PROMPTS)["pickscore"]
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    pictures = [Image.fromarray(a) for a in to_uint8(images)]
    with torch.no_grad():
        logits = model(**processor(text=PROMPTS, images=pictures, padding=True, return_tensors="pt")).logits_per_image
    assert torch.allclose(scores, logits.diag() / 26, atol=1e-5)
    # the same model as a CLIP score: Flow-GRPO's logit / 30; with scale 1 the plain logit
    assert torch.allclose(clipscore(images, PROMPTS)["clipscore"], logits.diag() / 30, atol=1e-5)
    assert torch.allclose(ClipScore(model=clip_dir, scale=1)(images, PROMPTS)["clipscore"], logits.diag(), atol=1e-4)
    assert (scores.abs() <= model.logit_scale.exp() / 26 + 1e-6).all()


def test_text_image_scores_depend_on_the_prompt(pickscore, clipscore):
    image = random_images(1).expand(4, -1, -1, -1)
    assert len(set(pickscore(image, PROMPTS)["pickscore"].tolist())) == 4
    scores = clipscore(image, PROMPTS)["clipscore"]
    assert len(set(scores.tolist())) == 4
    with pytest.raises(RewardConfigError, match="clipscore: scale must be > 0"):
        ClipScore(model="unused", scale=0)


def test_aesthetic_ignores_the_prompt_and_depends_on_the_image(aesthetic):
    images = random_images()
    scores = aesthetic(images, PROMPTS)["aesthetic"]
    assert torch.equal(aesthetic(images, PROMPTS[::-1])["aesthetic"], scores)
    assert len(set(scores.tolist())) == 4


def test_models_are_loaded_once(clip_dir, monkeypatch):
    calls = []
    original = CLIPModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(counting))
    reward = build_reward({"pickscore": 1.0}, {"pickscore": {"model": clip_dir, "processor": clip_dir}})
    for _ in range(3):
        reward(random_images(2), PROMPTS[:2])
    assert calls == [clip_dir]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_clip_reward_follows_the_images_to_the_gpu(clip_dir):
    reward = PickScore(model=clip_dir, processor=clip_dir)
    scores = reward(random_images(2).cuda(), PROMPTS[:2])["pickscore"]
    assert scores.is_cuda and next(reward.parameters()).is_cuda


def test_model_load_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load the PickScore processor from '/no/such/folder'") as caught:
        PickScore(model="/no/such/folder", processor="/no/such/folder")
    assert isinstance(caught.value, UserInputError) and "\n" not in str(caught.value)
    with pytest.raises(ModelLoadError, match="CLIP score model"):
        ClipScore(model=tmp_path)  # an empty folder


def test_aesthetic_head_must_be_safetensors_with_the_right_weights(tmp_path, clip_dir, head_file):
    with pytest.raises(RewardConfigError, match="set rewards.aesthetic.head"):
        AestheticScore(clip_model=clip_dir)
    with pytest.raises(RewardConfigError, match="must be a .safetensors file"):
        AestheticScore(head=tmp_path / "head.pth", clip_model=clip_dir)
    with pytest.raises(RewardConfigError, match="does not exist"):
        AestheticScore(head=tmp_path / "missing.safetensors", clip_model=clip_dir)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"layers.0.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(RewardConfigError, match="does not hold the aesthetic head"):
        AestheticScore(head=wrong, clip_model=clip_dir)
    small_clip = save_tiny_clip(tmp_path / "clip16", projection_dim=16)
    with pytest.raises(RewardConfigError, match="in 16 dimensions, the head needs 768"):
        AestheticScore(head=head_file, clip_model=small_clip)


def test_convert_head_from_pth_without_unpickling_code(tmp_path, clip_dir):
    torch.manual_seed(1)
    state = {f"layers.{key}": value for key, value in aesthetic_head().state_dict().items()}
    torch.save(state, tmp_path / "head.pth")
    convert_head(tmp_path / "head.pth", tmp_path / "head.safetensors")
    reward = AestheticScore(head=tmp_path / "head.safetensors", clip_model=clip_dir)
    loaded = reward.head.state_dict()
    assert all(torch.equal(loaded[key.removeprefix("layers.")], value) for key, value in state.items())


# ------------------------------------------------------------------------------------------ JPEG
def test_jpeg_noise_is_less_compressible_than_flat_images():
    flat = torch.full((2, 3, 64, 64), 0.5)
    noise = random_images(2, 64, 64)
    images = torch.cat([flat, noise])
    sizes = JpegIncompressibility()(images, ["x"] * 4)["jpeg_incompressibility"]
    assert sizes.shape == (4,) and sizes[2:].min() > 4 * sizes[:2].max()
    # Flow-GRPO's scales: incompressibility in kB, compressibility -kB/500
    assert torch.allclose(JpegCompressibility()(images, ["x"] * 4)["jpeg_compressibility"], -sizes / 500)
    assert torch.allclose(JpegCompressibility(kilobytes_per_unit=1)(images, ["x"] * 4)["jpeg_compressibility"], -sizes)
    encoded = io.BytesIO()
    Image.fromarray((noise[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(encoded, "JPEG", quality=95)
    assert sizes[2].item() == pytest.approx(encoded.tell() / 1000)
    with pytest.raises(RewardConfigError, match="jpeg_compressibility: quality must be in"):
        JpegCompressibility(quality=0)
    with pytest.raises(RewardConfigError, match="kilobytes_per_unit > 0, got 95 and 0"):
        JpegCompressibility(kilobytes_per_unit=0)  # not the default in disguise


# ------------------------------------------------------------------------------------------- OCR
def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == levenshtein("lawn", "flaw") == 2
    assert levenshtein("same", "same") == 0


def test_quoted_text_and_similarity():
    assert quoted_text('a neon sign that says "Open Late" on a wall') == "Open Late"
    assert quoted_text('"A" and "B"') == "A B"
    assert quoted_text("no quotes here") == "no quotes here"
    assert text_similarity("OPEN LATE", "Open Late") == 1.0  # case and spaces do not count
    assert text_similarity("Sale! open late tonight", "openlate") == 1.0  # extra text costs nothing
    assert text_similarity("opem late", "open late") == pytest.approx(1 - 1 / 8)
    assert text_similarity("", "hello") == 0.0
    assert text_similarity("a completely different and much longer text", "hello") == 0.0  # capped
    assert text_similarity("anything", "") == 1.0


def test_ocr_reward_with_a_fake_recognizer():
    def recognise(picture):  # bright images "show" HELLO, dark ones HELP
        return "HELLO\n" if np.asarray(picture).mean() > 127 else "HELP"

    reward = OcrReward(recognizer=recognise, workers=2)
    images = torch.cat([torch.ones(2, 3, 16, 16), torch.zeros(2, 3, 16, 16)])
    prompts = ['a sign "hello"', 'a sign "hellp"', 'a sign "hello"', "no quotes"]
    out = reward(images, prompts)
    expected = [1.0, 0.8, 1 - 2 / 5, 0.0]
    assert out["ocr"].tolist() == pytest.approx(expected) and out["ocr"].dtype == torch.float32
    assert out["ocr/exact"].tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(RewardConfigError, match="workers must be >= 1"):
        OcrReward(recognizer=recognise, workers=0)


def test_ocr_without_pytesseract_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytesseract", None)
    with pytest.raises(RewardConfigError, match=r"pytesseract is missing; install with `pip install -e \.\[ocr\]`"):
        OcrReward(engine="tesseract")


def test_ocr_without_the_tesseract_program_names_the_install_command(monkeypatch):
    pytesseract = pytest.importorskip("pytesseract", reason="pytesseract is not installed (pip install -e .[ocr])")
    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", "/no/such/tesseract")
    with pytest.raises(RewardConfigError, match="tesseract program is missing.*apt-get install tesseract-ocr"):
        OcrReward(engine="tesseract")


requires_tesseract = pytest.mark.skipif(
    shutil.which("tesseract") is None or importlib.util.find_spec("pytesseract") is None,
    reason="needs the tesseract program and pytesseract (make install-ocr)",
)


def render_text(text, width=320, height=96):
    """Black ``text`` on white, (1, 3, height, width) in [0, 1]."""
    picture = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(picture).text((16, 20), text, fill="black", font=ImageFont.load_default(size=48))
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)[None].float() / 255


@requires_tesseract
def test_tesseract_reads_a_rendered_word():
    images = torch.cat([render_text("HELLO"), torch.ones(1, 3, 96, 320)])
    scores = OcrReward(engine="tesseract")(images, ['a sign that says "hello"'] * 2)["ocr"]
    assert scores[0] >= 0.8 and scores[1] == 0.0


@requires_tesseract
def test_tesseract_language_must_be_installed():
    with pytest.raises(RewardConfigError, match="tesseract has no 'xx' language data"):
        OcrReward(engine="tesseract", lang="eng+xx")


# -------------------------------------------------------------------------------- GenEval (HTTP)
def shapes_batch(count=3, size=32, seed=0):
    """Rendered shapes scenes (count, 3, size, size), their prompts and GenEval records."""
    records = [r for group in scenes.all_records().values() for r in group[:1]][:count]
    images = torch.from_numpy(scenes.render_batch(records, np.random.default_rng(seed), size=size))
    return images.permute(0, 3, 1, 2).float() / 255, [r["prompt"] for r in records], records


@pytest.fixture(scope="module")
def server_url():
    server = ScoringServer("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_png_round_trip():
    array = to_uint8(random_images(1))[0]
    assert np.array_equal(decode_png(encode_png(array)), array)
    with pytest.raises(ValueError, match="not a base64 PNG"):
        decode_png("bm90IGFuIGltYWdl")


def test_client_against_the_reference_server_matches_the_shapes_reward(server_url):
    images, prompts, records = shapes_batch(count=5)
    remote = GenEvalHttpReward(url=server_url, batch_size=2)(images, prompts, records)  # three requests
    local = ShapesReward()(images, prompts, records)
    assert remote["geneval_http"].shape == (5,)
    assert torch.equal(remote["geneval_http"], local["shapes"])
    assert torch.equal(remote["geneval_http/strict"], local["shapes/strict"])
    for check in ("count", "color", "binding", "position"):
        assert torch.equal(remote[f"geneval_http/{check}"].isnan(), local[f"shapes/{check}"].isnan())
        assert torch.equal(remote[f"geneval_http/{check}"].nan_to_num(), local[f"shapes/{check}"].nan_to_num())


def test_reference_server_rejects_bad_requests(server_url):
    images, prompts, records = shapes_batch(count=1)
    reward = GenEvalHttpReward(url=server_url, tries=3, backoff=0.01)
    with pytest.raises(GenEvalServerError, match=r"HTTP 400 .*attempt 1 of 3.*metadata 0 is not a GenEval record"):
        reward(images, prompts, [{"include": [{"class": "hexagon", "count": 1}]}])


@contextlib.contextmanager
def fake_server(answers):
    """A server answering each POST with the next (status, body bytes) of ``answers``; yields (url, hits)."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            status, body = answers[min(len(hits), len(answers) - 1)]
            hits.append(status)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def call(url, count=2, **options):
    images, prompts, records = shapes_batch(count)
    return GenEvalHttpReward(url=url, backoff=0.01, **options)(images, prompts, records)


def test_client_retries_server_errors_then_succeeds():
    good = json.dumps({"scores": [0.5, 1.0], "strict": [0, 1], "details": {"count": [1, None]}}).encode()
    with fake_server([(500, b"busy"), (503, b"busy"), (200, good)]) as (url, hits):
        out = call(url, tries=3)
    assert hits == [500, 503, 200]
    assert out["geneval_http"].tolist() == [0.5, 1.0] and out["geneval_http/strict"].tolist() == [0.0, 1.0]
    assert out["geneval_http/count"][0] == 1.0 and math.isnan(out["geneval_http/count"][1])


def test_client_gives_up_after_bounded_tries_on_http_500():
    with fake_server([(500, b"internal error: detector crashed")]) as (url, hits):
        with pytest.raises(GenEvalServerError, match=r"HTTP 500 .*attempt 3 of 3\): internal error: detector crashed"):
            call(url, tries=3)
    assert hits == [500, 500, 500]


def test_client_does_not_retry_client_errors():
    with fake_server([(404, b"no such endpoint")]) as (url, hits):
        with pytest.raises(GenEvalServerError, match="HTTP 404"):
            call(url, tries=3)
    assert hits == [404]


@pytest.mark.parametrize(
    "body, message",
    [
        (b"<html>garbage</html>", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[1, 2]", "expected a JSON object with 'scores'"),
        (b'{"scores": [1.0]}', "1 scores for 2 images"),
        (b'{"scores": [1.0, "high"]}', "scores of image 1 is 'high', not a number"),
        (b'{"scores": [1.0, NaN]}', "non-finite scores nan for image 1"),
        (b'{"scores": [1.0, 2.0], "strict": [1, Infinity]}', "non-finite strict inf for image 1"),
        (b'{"scores": [1.0, 2.0], "details": {"count": [1]}}', "1 details 'count' for 2 images"),
    ],
)
def test_client_rejects_malformed_answers(body, message):
    with fake_server([(200, body)]) as (url, hits):
        with pytest.raises(GenEvalServerError, match=f"the GenEval server at {url} sent .*{message}"):
            call(url, tries=3)
    assert hits == [200]  # a malformed answer is not retried


def test_client_reports_a_server_that_is_down():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    message = f"could not reach the GenEval server at {url} after 2 tries: .*refused"
    with pytest.raises(GenEvalServerError, match=message):
        call(url, tries=2)


def test_client_timeout_bounds_the_time_spent_on_a_hanging_server():
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts connections, never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(GenEvalServerError, match="after 2 tries: .*timed out"):
            call(url, tries=2, timeout=0.3)
        assert time.monotonic() - start < 10.0  # two 0.3 s timeouts and a backoff, not the default 60 s


@pytest.mark.parametrize(
    "options, message",
    [
        ({"url": "ftp://host/x"}, "url must be http"),
        ({"url": "localhost:8765"}, "url must be http"),
        ({"tries": 0}, "tries >= 1"),
        ({"timeout": 0}, "timeout > 0"),
    ],
)
def test_client_options_are_checked(options, message):
    with pytest.raises(RewardConfigError, match=message):
        GenEvalHttpReward(**options)


# ------------------------------------------------------------------------------------ weighting
def test_weighted_sum_of_rewards_keeps_every_component():
    images, prompts, records = shapes_batch(count=3)
    out = build_reward({"jpeg_compressibility": 1.0, "shapes": 0.5})(images, prompts, records)
    assert {"reward", "jpeg_compressibility", "shapes", "shapes/strict"} <= set(out)
    assert torch.allclose(out["reward"], out["jpeg_compressibility"] + 0.5 * out["shapes"])
    assert torch.equal(out["shapes"], ShapesReward()(images, prompts, records)["shapes"])


def test_a_weighted_reward_holds_each_reward_with_its_weight():
    from tpgrpo.rewards import RewardSpec

    built = build_reward([RewardSpec("shapes", 2.0), RewardSpec("jpeg_compressibility", -0.5, {"quality": 90})])
    assert [(name, term.weight) for name, term in built.terms.items()] == [("shapes", 2.0), ("jpeg_compressibility", -0.5)]
    assert built.rewards["jpeg_compressibility"].quality == 90
    images, prompts = random_images(2), PROMPTS[:2]
    records = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": p} for p in prompts]
    out = built(images, prompts, records)
    torch.testing.assert_close(out["reward"], 2.0 * out["shapes"] - 0.5 * out["jpeg_compressibility"])
    with pytest.raises(ValueError, match="options go inside the RewardSpecs"):
        build_reward([RewardSpec("shapes", 1.0)], {"shapes": {}})
