"""Training algorithms, one file each, selected by ``model.algorithm`` (`ALGORITHMS`).

Adding one: a `FlowAlgorithm` subclass with ``collect``, ``trained_units`` and ``loss``, decorated
with `register_algorithm`, in a module imported here.
"""
from tpgrpo.algorithms.base import (
    ALGORITHMS,
    AlgorithmEntry,
    Batch,
    FlowAlgorithm,
    LossCall,
    PhaseTimer,
    StepPlan,
    build_algorithm,
    plan_update,
    register_algorithm,
    seed_for,
    transition_pairs,
)
from tpgrpo.algorithms.grpo import GRPO, RolloutBatch
from tpgrpo.algorithms.nft import DiffusionNFT, NFTBatch

__all__ = [
    "ALGORITHMS", "AlgorithmEntry", "Batch", "DiffusionNFT", "FlowAlgorithm", "GRPO", "LossCall", "NFTBatch", "PhaseTimer",
    "RolloutBatch", "StepPlan", "build_algorithm", "plan_update", "register_algorithm", "seed_for", "transition_pairs",
]
