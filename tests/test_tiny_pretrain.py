"""The pretraining script's options that change what it builds: phrase tokens and a reused VAE."""
import json

import torch

from tpgrpo.tiny import load_pipeline
from tpgrpo.tiny.pretrain import main


def test_pretrain_reuses_a_saved_vae_and_saves_phrase_tokens(tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    main([
        "--out", str(out), "--minutes", "0.55", "--pool", "16", "--batch", "4", "--layers", "1",
        "--phrase-tokens", "--vae-from", str(tiny_model_dir),
    ])
    info = json.loads((out / "pretrain.json").read_text())
    assert info["vae"] == {"from": str(tiny_model_dir)} and info["transformer"]["steps"] >= 1

    made, source = load_pipeline(out), load_pipeline(tiny_model_dir)
    key = "encoder.conv_in.weight"
    # saved in half precision: equal to the source VAE up to float16 rounding
    assert torch.allclose(made.vae.state_dict()[key], source.vae.state_dict()[key], atol=1e-3, rtol=1e-3)
    assert made.vae.config.scaling_factor != source.vae.config.scaling_factor  # recomputed from its latents
    tokens = made.tokenizer.convert_ids_to_tokens(made.tokenizer("a photo of two red circles").input_ids)
    assert tokens[-2] == "red_circles"
    assert made.text_encoder.config.vocab_size == len(made.tokenizer)
