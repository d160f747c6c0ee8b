"""Pretrain the tiny shapes text-to-image model from scratch on CPU.

    python -m tpgrpo.tiny.pretrain --out tpgrpo/tiny/model --minutes 51

(the shipped model: ``--minutes 45 --vae-from`` an earlier model's VAE; see its model card)

Stages, all within the ``--minutes`` wall-clock budget:

1. VAE (``--vae-minutes``): a small `AutoencoderKL` on rendered 32x32 scenes, MSE + small KL;
   then ``shift_factor``/``scaling_factor`` from the statistics of its latents.
2. Encode a pool of scenes to latent distributions, and every prompt once with the frozen random
   CLIP text encoders (``max_sequence_length=MAX_SEQUENCE_LENGTH``).
3. Transformer: rectified-flow matching (x_t = (1 - s) x0 + s noise, target noise - x0,
   logit-normal s), the empty prompt in place of the text 10% of the time (for CFG), AdamW with
   warm-up and a cosine decay over the remaining wall-clock time, an EMA of the weights.

Scenes come from every record of `tpgrpo.tiny.scenes` except the held-out test prompts, and the
pipeline is saved with `components.save_pipeline` (transformer and VAE in half precision, text
encoders in float32, so that the plain diffusers load samples) with the EMA transformer weights,
plus ``pretrain.json`` (arguments and training statistics). One thread is the default: on a
2-core machine shared with other work, two OpenMP threads stall each other (measured 3x slower).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from tpgrpo.tiny import scenes
from tpgrpo.tiny.components import MAX_SEQUENCE_LENGTH, build_pipeline, save_pipeline

# Share of each tag among the pretraining scenes.
TAG_WEIGHTS: dict[str, float] = {
    "single_object": 0.05, "two_object": 0.1, "colors": 0.1, "counting": 0.2, "color_attr": 0.25, "position": 0.3,
}


def training_records(held_out_prompts: set[str]) -> dict[str, list[dict]]:
    """All records of the shapes world by tag, minus those whose prompt is held out."""
    return {tag: [r for r in recs if r["prompt"] not in held_out_prompts] for tag, recs in scenes.all_records().items()}


def sample_records(pool: Mapping[str, Sequence[dict]], n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` records: a tag drawn by TAG_WEIGHTS, then a record of that tag uniformly."""
    tags = list(TAG_WEIGHTS)
    p = np.array([TAG_WEIGHTS[t] for t in tags])
    picks = rng.choice(len(tags), size=n, p=p / p.sum())
    return [pool[tags[t]][int(rng.integers(len(pool[tags[t]])))] for t in picks]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def cosine_lr(base: float, progress: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to 10% of ``base``."""
    if progress < warmup:
        return base * max(progress / warmup, 0.01)
    q = min((progress - warmup) / (1 - warmup), 1.0)
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * q)))


def train_vae(vae, pool, rng, seconds: float, batch: int, lr: float, kl_weight: float) -> dict:
    """Fit the VAE on fresh scenes for ``seconds``; returns {"steps", "loss", "psnr"} (last 50 steps)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    start, step, mses = time.time(), 0, []
    bar = tqdm(total=int(seconds), desc="vae", unit="s")
    while (elapsed := time.time() - start) < seconds:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, elapsed / seconds, 0.05)
        x = to_tensor(scenes.render_batch(sample_records(pool, batch, rng), rng))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = mse + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        mses.append(mse.item())
        bar.update(int(time.time() - start) - bar.n)
        bar.set_postfix(mse=f"{np.mean(mses[-50:]):.4f}", step=step)
    bar.close()
    vae.eval()
    mse = float(np.mean(mses[-50:]))
    return {"steps": step, "mse": mse, "psnr_db": 10 * math.log10(4.0 / mse)}


@torch.no_grad()
def encode_pool(vae, records: Sequence[dict], rng, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent distributions of one random scene per record: (mean, std), each (N, C, h, w)."""
    means, stds = [], []
    for i in tqdm(range(0, len(records), batch), desc="encode"):
        dist = vae.encode(to_tensor(scenes.render_batch(records[i : i + batch], rng))).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text conditioning of each prompt: (embeds (N, L, D), pooled (N, P))."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        list(prompts), None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    return embeds, pooled


def train_transformer(
    transformer, latents, text, seconds: float, batch: int, lr: float, drop: float, ema_decay: float, seed: int
) -> tuple[dict, dict]:
    """Flow-matching training for ``seconds``; returns (EMA state dict, stats).

    ``latents`` = (mean, std, prompt index) of the normalised pool, ``text`` = (embeds, pooled)
    with the empty prompt last.
    """
    mean, std, prompt_idx = latents
    embeds, pooled = text
    empty = len(embeds) - 1
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in transformer.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    transformer.train()
    start, step, losses = time.time(), 0, []
    bar = tqdm(total=int(seconds), desc="transformer", unit="s")
    while (elapsed := time.time() - start) < seconds:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, elapsed / seconds, 0.03)
        idx = torch.randint(len(mean), (batch,), generator=gen)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        cond = torch.where(torch.rand(batch, generator=gen) < drop, empty, prompt_idx[idx])
        sigma = torch.sigmoid(torch.randn(batch, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = transformer(xt, embeds[cond], pooled[cond], sigma * 1000).sample
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
        bar.update(int(time.time() - start) - bar.n)
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", step=step)
    bar.close()
    names = [n for n, p in transformer.named_parameters() if p.requires_grad]
    state = {**transformer.state_dict(), **dict(zip(names, ema))}
    return state, {"steps": step, "loss": float(np.mean(losses[-200:])), "seconds": time.time() - start}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("tpgrpo/tiny/model"))
    parser.add_argument("--minutes", type=float, default=51.0, help="total wall-clock budget")
    parser.add_argument("--vae-minutes", type=float, default=6.0)
    parser.add_argument("--test-prompts", type=Path, default=Path("data/shapes/test.jsonl"))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=48)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--pool", type=int, default=20000, help="scenes encoded for the transformer stage")
    parser.add_argument("--drop", type=float, default=0.1, help="empty-prompt rate, for CFG")
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    parser.add_argument(
        "--phrase-tokens", action=argparse.BooleanOptionalAction, default=True,
        help="one token per colour-shape phrase (tpgrpo.tiny.components.build_tokenizer); see the model card",
    )
    parser.add_argument(
        "--vae-from", type=Path, default=None,
        help="reuse the VAE of a saved tiny pipeline (skips stage 1; the VAE does not depend on the text)",
    )
    args = parser.parse_args(argv)

    begin = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    held_out = {r["prompt"] for r in scenes.read_jsonl(args.test_prompts)}
    pool = training_records(held_out)
    pipe = build_pipeline(
        args.seed, num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim,
        phrase_tokens=args.phrase_tokens,
    )
    if args.vae_from is None:
        vae_stats = train_vae(pipe.vae, pool, rng, 60 * args.vae_minutes, args.vae_batch, args.vae_lr, args.kl_weight)
    else:
        pipe.vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", torch_dtype=torch.float32).eval()
        vae_stats = {"from": str(args.vae_from)}
    records = sample_records(pool, args.pool, rng)
    mean, std = encode_pool(pipe.vae, records, rng)
    shift, scale = mean.mean().item(), 1.0 / mean.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    prompts = sorted({r["prompt"] for r in records})
    index = {p: i for i, p in enumerate(prompts)}
    text = encode_prompts(pipe, [*prompts, ""])
    latents = ((mean - shift) * scale, std * scale, torch.tensor([index[r["prompt"]] for r in records]))

    seconds = 60 * args.minutes - (time.time() - begin) - 30  # leave time to save
    state, tf_stats = train_transformer(
        pipe.transformer, latents, text, seconds, args.batch, args.lr, args.drop, args.ema, args.seed
    )
    pipe.transformer.load_state_dict(state)
    pipe.transformer.eval()
    save_pipeline(pipe, args.out)
    info = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "vae": vae_stats,
        "latent_shift_factor": shift,
        "latent_scaling_factor": scale,
        "training_prompts": len(prompts),
        "transformer": tf_stats,
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "vae_parameters": sum(p.numel() for p in pipe.vae.parameters()),
        "total_minutes": (time.time() - begin) / 60,
    }
    (args.out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
