"""Sampling with the FlowModel pieces, to compare against each family's diffusers pipeline."""


def euler_sample(model, noise, prompts, num_steps, guidance, resolution):
    """Deterministic Euler sampling from ``noise``, decoded to images."""
    cond = model.encode(prompts)
    sigmas = model.sigmas(num_steps, resolution).tolist()
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + model.velocity(x, sigma, cond, guidance) * (sigma_next - sigma)
    return model.decode(x)
