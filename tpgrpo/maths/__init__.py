"""The maths of TP-GRPO as pure tensor functions: stochastic steps and log-probs (`sde`), rollouts with
branches (`rollout`), credit, advantages and the policy loss (`credit`)."""
