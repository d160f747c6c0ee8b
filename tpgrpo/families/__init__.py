"""Model families: one file each, one `FlowModel` subclass per diffusers pipeline (see `base.py`).

Adding a family: a file here with a `FlowModel` subclass decorated by `register_family` (its
pipeline class, LoRA targets and published checkpoints for the memory tables), its name in
`loading.FAMILY_MODULES`, a config, and a tiny stand-in in the test helpers.
"""
from tpgrpo.families.base import (
    ATTENTION_PROJECTIONS,
    FAMILIES,
    FlowModel,
    ModelLoadError,
    PromptEmbeds,
    Resolution,
    guided_velocity,
    linear_sigmas,
    pack_2x2,
    register_family,
    text_tokenizer,
    unpack_2x2,
)
from tpgrpo.families.flux import FluxModel
from tpgrpo.families.flux2 import Flux2DevModel, Flux2Model
from tpgrpo.families.loading import FAMILY_MODULES, PIPELINE_FAMILIES, load_flow_model
from tpgrpo.families.qwenimage import QwenImageModel
from tpgrpo.families.sd3 import SD3Model
from tpgrpo.families.zimage import ZImageModel

__all__ = [
    "ATTENTION_PROJECTIONS", "FAMILIES", "FAMILY_MODULES", "PIPELINE_FAMILIES", "Flux2DevModel", "Flux2Model", "FlowModel", "FluxModel",
    "ModelLoadError", "PromptEmbeds", "QwenImageModel", "Resolution", "SD3Model", "ZImageModel", "guided_velocity",
    "linear_sigmas", "load_flow_model", "pack_2x2", "register_family", "text_tokenizer", "unpack_2x2",
]
