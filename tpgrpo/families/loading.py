"""Loading a supported pipeline, from a folder or the hub, as its family's `FlowModel`."""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from tpgrpo.families.base import FAMILIES, FlowModel, ModelLoadError
FAMILY_MODULES = ("sd3", "flux", "qwenimage", "flux2", "zimage")  # each registers its classes on import
for _module in FAMILY_MODULES:
    importlib.import_module(f"tpgrpo.families.{_module}")
# listed (and matched) in the order above, whatever order the modules were first imported in
_ORDER = {f"tpgrpo.families.{module}": i for i, module in enumerate(FAMILY_MODULES)}
_registered = sorted(FAMILIES.items(), key=lambda item: _ORDER.get(item[1].__module__, len(_ORDER)))
FAMILIES.clear()
FAMILIES.update(_registered)
PIPELINE_FAMILIES = FAMILIES  # diffusers pipeline class name -> FlowModel subclass

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def load_flow_model(
    pretrained_path: str | os.PathLike,
    family: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    max_sequence_length: int | None = None,
    offload_text_encoders: bool = False,
    decode_batch_size: int = 16,
    local_files_only: bool = False,
) -> FlowModel:
    """Load a supported pipeline (`PIPELINE_FAMILIES`) from a local folder or a hub id as a frozen `FlowModel`.

    ``pretrained_path``: a folder written by ``save_pretrained`` (with model_index.json), or
    a hub id such as ``stabilityai/stable-diffusion-3.5-medium`` / ``black-forest-labs/FLUX.1-dev``
    (downloaded once into the Hugging Face cache). ``family``: "auto" (from model_index.json)
    or a family name ("sd3", "flux", "qwenimage", "flux2", "flux2-dev", "zimage"). ``dtype``: of every component. ``local_files_only``: never use the
    network (hub ids must then be cached). The remaining arguments go to `FlowModel`.
    Components missing from the folder (no T5, no image encoder) are loaded as None.
    """
    families = {cls.family for cls in PIPELINE_FAMILIES.values()}
    if family != "auto" and family not in families:
        raise ModelLoadError(f"unknown model family {family!r}; use 'auto', {', '.join(map(repr, sorted(families)))}")
    folder = _resolve_folder(str(pretrained_path), local_files_only)
    model_class = _model_class(folder, family)
    pipeline_class = model_class.pipeline_class
    index = json.loads((folder / "model_index.json").read_text())
    absent = {name: None for name in _component_names(pipeline_class) if _is_absent(index.get(name))}
    try:
        pipe = pipeline_class.from_pretrained(folder, dtype=dtype, **absent)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the pipeline in {folder}: {error}") from error
    if device is not None:
        pipe.to(device)
    return model_class(
        pipe,
        max_sequence_length=max_sequence_length,
        offload_text_encoders=offload_text_encoders,
        decode_batch_size=decode_batch_size,
    )


def _resolve_folder(path: str, local_files_only: bool) -> Path:
    """The local folder of ``path``: itself if it exists, else the hub snapshot of the id."""
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ModelLoadError(f"model path {path} is a file; pass the pipeline folder (with model_index.json)")
        return folder
    if not _HUB_ID.match(path):
        raise ModelLoadError(f"model path {path} does not exist (and is not a hub id like owner/name)")
    try:
        return Path(DiffusionPipeline.download(path, local_files_only=local_files_only))
    except Exception as error:  # the hub raises OSError, HTTP and connection errors alike
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelLoadError(
            f"could not download {path!r} from the Hugging Face hub ({reason}); check the id, your access "
            f"(gated models need `hf auth login`), your network or HF_HUB_OFFLINE, or pass a local folder"
        ) from error


def _model_class(folder: Path, family: str) -> type[FlowModel]:
    """The `FlowModel` subclass for the pipeline in ``folder``, checked against ``family``."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        class_name = json.loads(index_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ModelLoadError(f"{index_file} is not a valid model index: {error}") from error
    if class_name not in PIPELINE_FAMILIES:
        raise ModelLoadError(
            f"unsupported pipeline class {class_name!r} in {index_file}; supported: {', '.join(PIPELINE_FAMILIES)}"
        )
    model_class = PIPELINE_FAMILIES[class_name]
    if family not in ("auto", model_class.family):
        raise ModelLoadError(f"{folder} holds a {class_name} ({model_class.family}), but family={family!r} was asked")
    return model_class


def _component_names(pipeline_class: type[DiffusionPipeline]) -> list[str]:
    """Names of the components ``pipeline_class.__init__`` takes."""
    return [name for name in inspect.signature(pipeline_class.__init__).parameters if name != "self"]


def _is_absent(entry: object) -> bool:
    """True for a model_index.json entry of a component that was saved as None (or is missing)."""
    return entry is None or (isinstance(entry, list) and all(part is None for part in entry))
