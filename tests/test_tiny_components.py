"""The tiny SD3-architecture pipeline: tokenizer, random build, sampling, save/load round trip."""
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tpgrpo.tiny import MAX_SEQUENCE_LENGTH, build_pipeline, build_tokenizer, load_pipeline


def test_tokenizer_wraps_lowercases_and_maps_unknown_words():
    tok = build_tokenizer(max_length=8)
    ids = tok("A photo of TWO red circles!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a", "photo", "of", "two", "red", "circles"]
    assert tok("a zebra").input_ids[2] == tok.unk_token_id
    padded = tok(["a red square"], padding="max_length", max_length=8, truncation=True).input_ids[0]
    assert len(padded) == 8 and padded[-1] == tok.pad_token_id


def test_phrase_tokens_merge_each_colour_with_the_following_shape(tmp_path):
    tok = build_tokenizer(phrase_tokens=True)
    words = lambda text: tok.convert_ids_to_tokens(tok(text).input_ids[1:-1])  # noqa: E731
    assert words("a Blue square to the left of a green  triangle.") == [
        "a", "blue_square", "to", "the", "left", "of", "a", "green_triangle"
    ]
    assert words("three green circles") == ["three", "green_circles"]
    assert words("two circles and a red") == ["two", "circles", "and", "a", "red"]  # no shape after "red"
    assert words("a reddish circle") == ["a", tok.unk_token, "circle"]  # whole words only
    plain = build_tokenizer()
    assert len(tok) == len(plain) + 10 * 3 * 2  # colours x shapes x (singular, plural)
    tok.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert again("a photo of four cyan squares").input_ids == tok("a photo of four cyan squares").input_ids


def test_tokenizer_rejects_multiword_entries():
    with pytest.raises(ValueError, match="single"):
        build_tokenizer(["red", "two words"])


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(seed=0, num_layers=2)


def test_pipeline_samples_images_in_range(pipe):
    out = pipe(
        ["a photo of two red circles", "a blue square to the left of a green triangle"],
        num_inference_steps=2,
        guidance_scale=4.5,
        output_type="pt",
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(0),
    )
    images = out.images
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1 and torch.isfinite(images).all()


def test_encode_prompt_shapes(pipe):
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        ["a red circle"], None, None, do_classifier_free_guidance=True, max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    assert embeds.shape == (1, pipe.tokenizer.model_max_length + MAX_SEQUENCE_LENGTH, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)
    assert neg.shape == embeds.shape and neg_pooled.shape == pooled.shape


def test_build_is_seeded(pipe):
    other = build_pipeline(seed=0, num_layers=2)
    different = build_pipeline(seed=1, num_layers=2)
    key = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(pipe.transformer.state_dict()[key], other.transformer.state_dict()[key])
    assert not torch.equal(pipe.transformer.state_dict()[key], different.transformer.state_dict()[key])


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path)
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None
    torch.manual_seed(0)
    latents = torch.randn(2, 8, 8, 8)
    text = torch.randn(2, 17, pipe.transformer.config.joint_attention_dim)
    pooled = torch.randn(2, pipe.transformer.config.pooled_projection_dim)
    t = torch.tensor([500.0, 250.0])
    with torch.no_grad():
        a = pipe.transformer(latents, text, pooled, t).sample
        b = loaded.transformer(latents, text, pooled, t).sample
    assert torch.equal(a, b)
    assert loaded.tokenizer("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids
    with torch.no_grad():
        ids = pipe.tokenizer(["a red circle"], return_tensors="pt").input_ids
        assert torch.equal(pipe.text_encoder(ids).text_embeds, loaded.text_encoder(ids).text_embeds)


def test_load_pipeline_rejects_non_pipeline_folder(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(tmp_path)


def test_shipped_model_is_small_loads_and_draws_shapes():
    from tpgrpo.rewards.shapes import ShapesReward
    from tpgrpo.tiny import DEFAULT_MODEL_DIR
    from tpgrpo.tiny.scenes import read_jsonl

    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file())
    assert size < 25 * 2**20
    pipe = load_pipeline(DEFAULT_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    records = [r for r in read_jsonl("data/shapes/train.jsonl") if r["tag"] == "colors"][:6]
    images = pipe(
        [r["prompt"] for r in records],
        num_inference_steps=10,
        guidance_scale=4.5,
        output_type="pt",
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=[torch.Generator().manual_seed(i) for i in range(len(records))],
    ).images
    assert images.shape == (6, 3, 32, 32)
    scores = ShapesReward()(images, [r["prompt"] for r in records], records)
    # measured: 2 of 6 pass and no clutter; a random pipeline passes none, extra ~0.3
    assert scores["shapes/strict"].sum() >= 1 and scores["shapes/extra"].mean() > 0.8
