"""GenEval (Ghosh et al., 2023) as a reward: an instance-segmentation detector, CLIP colours, GenEval's rules.

Per image, as GenEval's ``evaluate_images.py``:

1. Detection: a Mask2Former trained on COCO instances (GenEval: Swin-S via mmdet; here by default
   the transformers checkpoint of the same family and size, ``facebook/mask2former-swin-small-coco-instance``),
   run at GenEval's test-time size: the shorter edge resized to 800 and the longer edge to at most
   1333, keeping the aspect ratio (a 512 px image is seen at 800 × 800), padded to a multiple of 32
   (`GENEVAL_DETECTOR_SIZE`; ``detector_size: null`` keeps the size the checkpoint's processor sets).
   Instances scoring above ``threshold`` (``counting_threshold`` for records tagged ``counting``)
   are kept, at most ``max_per_class`` per class, most confident first; the detector's class
   names are mapped onto GenEval's 80 object names (`GENEVAL_OBJECTS`, `map_labels`). A box is
   the extent of its mask.
2. Colours: for the classes a clause asks a colour of, each detection's box crop, with the
   pixels outside its mask set to grey #999 (`masked_crop`), is classified zero-shot by CLIP
   (default ``openai/clip-vit-large-patch14``, GenEval's ViT-L/14) among GenEval's ten `COLORS`,
   against the per-colour mean of the unit text embeddings of `COLOR_TEMPLATES` (`color_classifier`).
3. Verdict: `tpgrpo.rewards.geneval.judge` on the detections.

What still differs from GenEval's ``evaluate_images.py``: the weights are the transformers port's,
not mmdet's own checkpoint of the same model; transformers' ``post_process_instance_segmentation``
upsamples the mask logits to a fixed 384 × 384, scores and thresholds the masks there and enlarges
the binary masks to the image size by nearest neighbour, where mmdet thresholds logits upsampled
bilinearly to the image size (both keep the top 100 query-class pairs and score them by class
probability times mean mask probability), so scores, masks and the boxes taken from them differ
slightly; the image is resized with PIL's bilinear filter where mmdet uses OpenCV's; the colour
CLIP is transformers' ViT-L/14 with its processor where GenEval uses open_clip's. Thresholds,
the per-class cap, boxes as mask extents, colour crops and the rules (`tpgrpo.rewards.geneval.judge`)
are GenEval's.

The reward returns ``geneval`` (judge's dense score), ``geneval/strict``, ``geneval/correct``
and ``geneval/<tag>`` for each of GenEval's six tags (``correct`` for records of that tag, NaN
for the others). `tpgrpo.rewards.geneval.geneval_overall` turns per-tag means into GenEval's summary number.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, Mask2FormerForUniversalSegmentation

from tpgrpo.images import to_uint8
from tpgrpo.rewards.base import RewardConfigError, register_reward
from tpgrpo.rewards.clip_models import FrozenModelReward, _projected, freeze, load_pretrained
from tpgrpo.rewards.geneval import POSITION_THRESHOLD, TAGS, geneval_summary, judge, validate_record

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"

# GenEval's evaluation/object_names.txt: COCO's 80 thing classes in COCO's order, with
# "computer mouse", "tv remote" and "computer keyboard" for COCO's "mouse", "remote", "keyboard".
GENEVAL_OBJECTS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {object}", "a photo of a {c}-colored {object}", "a photo of a {c} object",
)
GREY = (153, 153, 153)  # GenEval's background #999 outside an object's mask
# GenEval's mmdet test pipeline: Resize(scale=(1333, 800), keep_ratio=True)
GENEVAL_DETECTOR_SIZE: dict[str, int] = {"shortest_edge": 800, "longest_edge": 1333}

# Other spellings of the COCO classes (COCO's own, Pascal VOC's, and a few common variants),
# after `_normalise`, mapped to GenEval's names.
LABEL_ALIASES: dict[str, str] = {
    "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
    "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "pottedplant": "potted plant",
    "diningtable": "dining table", "tvmonitor": "tv", "tv monitor": "tv", "television": "tv",
    "hair dryer": "hair drier", "cellphone": "cell phone", "mobile phone": "cell phone",
    "doughnut": "donut", "hotdog": "hot dog", "teddybear": "teddy bear", "wineglass": "wine glass",
}


def _normalise(label: str) -> str:
    """Lower case, ``_`` and ``-`` as spaces, single spaces: "Potted_Plant" -> "potted plant"."""
    return " ".join(re.sub(r"[_\-]", " ", str(label).lower()).split())


def map_labels(id2label: Mapping[int, str]) -> dict[int, str]:
    """A detector's ``id2label`` -> {class id: GenEval object name}; `RewardConfigError` when it cannot be mapped.

    Each label is normalised (`_normalise`) and taken as is when it is one of `GENEVAL_OBJECTS`,
    else through `LABEL_ALIASES`. Every label must map, to a distinct name, and all 80 names
    must be covered (a COCO instance-segmentation detector).
    """
    mapped: dict[int, str] = {}
    unknown = []
    for index, label in id2label.items():
        name = _normalise(label)
        name = name if name in GENEVAL_OBJECTS else LABEL_ALIASES.get(name)
        if name is None:
            unknown.append(str(label))
        else:
            mapped[int(index)] = name
    if unknown:
        shown = ", ".join(repr(label) for label in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise RewardConfigError(
            f"geneval: {len(unknown)} of the detector's {len(id2label)} class labels are not COCO objects "
            f"GenEval knows ({shown}); use a detector trained on COCO instances"
        )
    names = list(mapped.values())
    repeated = sorted({name for name in names if names.count(name) > 1})
    missing = [name for name in GENEVAL_OBJECTS if name not in names]
    if repeated or missing:
        problem = f"several labels map to {repeated[0]!r}" if repeated else f"no label for {missing[0]!r}"
        raise RewardConfigError(
            f"geneval: the detector's class labels do not map one to one onto GenEval's 80 objects ({problem})"
        )
    return mapped


def validate_geneval_record(record: object) -> Mapping:
    """A GenEval record whose classes are GenEval's objects and colours GenEval's colours; else ValueError."""
    validate_record(record)
    for kind in ("include", "exclude"):
        for i, clause in enumerate(record.get(kind, [])):
            if clause["class"] not in GENEVAL_OBJECTS:
                raise ValueError(f"{kind}[{i}] has class {clause['class']!r}, not one of GenEval's 80 objects")
            if clause.get("color") is not None and clause["color"] not in COLORS:
                raise ValueError(f"{kind}[{i}] has colour {clause['color']!r}; known: {', '.join(COLORS)}")
    return record


@dataclass(frozen=True)
class Detection:
    """One kept instance: its confidence, box [x0, y0, x1, y1] (pixels, x1/y1 exclusive) and mask (H, W) bool."""

    score: float
    box: tuple[int, int, int, int]
    mask: np.ndarray


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The box [x0, y0, x1, y1] of a non-empty (H, W) mask, x1 and y1 one past its last column and row."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("an empty mask has no box")
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


def select_detections(
    segments: Sequence[Mapping], masks: np.ndarray, names: Mapping[int, str], threshold: float, max_per_class: int
) -> dict[str, list[Detection]]:
    """GenEval's choice of detections of one image: {GenEval name: [Detection, ...] most confident first}.

    ``segments`` are ``post_process_instance_segmentation``'s ``segments_info`` ({"label_id",
    "score"}), ``masks`` the matching (N, H, W) binary masks, ``names`` maps label ids to GenEval
    names. Kept: score > ``threshold``, non-empty mask, the ``max_per_class`` most confident of
    each class (ties keep their order). Classes without detections are absent.
    """
    if len(segments) != len(masks):
        raise ValueError(f"{len(segments)} segments but {len(masks)} masks")
    order = sorted(range(len(segments)), key=lambda k: -float(segments[k]["score"]))
    kept: dict[str, list[Detection]] = {}
    for k in order:
        score, name = float(segments[k]["score"]), names[int(segments[k]["label_id"])]
        mask = np.asarray(masks[k]).astype(bool)
        if score <= threshold or not mask.any() or len(kept.get(name, [])) >= max_per_class:
            continue
        kept.setdefault(name, []).append(Detection(score, mask_box(mask), mask))
    return kept


def masked_crop(image: np.ndarray, mask: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """GenEval's colour crop: (H, W, 3) uint8 ``image`` with pixels outside ``mask`` grey #999, cut to ``box``."""
    x0, y0, x1, y1 = (int(v) for v in box)
    out = np.where(np.asarray(mask, dtype=bool)[..., None], image, np.array(GREY, dtype=np.uint8))
    return np.ascontiguousarray(out[y0:y1, x0:x1])


def color_prompts(name: str) -> list[str]:
    """The texts of the colour classifier of object ``name``: colour-major, `COLOR_TEMPLATES` within a colour."""
    return [template.format(c=color, object=name) for color in COLORS for template in COLOR_TEMPLATES]


def color_classifier(text_embeddings: torch.Tensor) -> torch.Tensor:
    """(colours, templates, D) text embeddings -> (colours, D): per colour the unit mean of the unit embeddings."""
    unit = torch.nn.functional.normalize(text_embeddings.float(), dim=-1)
    return torch.nn.functional.normalize(unit.mean(dim=1), dim=-1)


def classify_colors(image_embeddings: torch.Tensor, classifier: torch.Tensor) -> list[str]:
    """The colour of each of (N, D) image embeddings: argmax of the cosine with each row of ``classifier`` (C, D)."""
    image_embeddings = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)
    return [COLORS[int(k)] for k in (image_embeddings @ classifier.float().T).argmax(dim=-1)]


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@register_reward("geneval")
class GenEvalReward(FrozenModelReward):
    """GenEval with a Mask2Former detector and CLIP colours (see the module docstring).

    Options: ``detector`` (folder or hub id of a Mask2Former COCO instance-segmentation model
    and its image processor), ``clip`` (folder or hub id of a CLIP model and its processor),
    ``threshold`` (detection confidence, GenEval 0.3), ``counting_threshold`` (for ``counting``
    records, GenEval 0.9), ``max_per_class`` (GenEval 16), ``position_threshold`` (GenEval
    0.1), ``detector_size`` (the detector's input size, ``{shortest_edge, longest_edge}``;
    default GenEval's 800 / 1333; null: the size the detector's processor sets),
    ``device`` (where the models run, e.g. "cuda:1"; default: the images' device),
    ``dtype`` ("float32", "float16" or "bfloat16"), ``detector_batch_size`` (images per detector
    call; default: the whole batch), ``clip_batch_size`` (crops per CLIP call).
    """

    def __init__(
        self,
        detector: str | os.PathLike = DEFAULT_DETECTOR,
        clip: str | os.PathLike = DEFAULT_CLIP,
        threshold: float = 0.3,
        counting_threshold: float = 0.9,
        max_per_class: int = 16,
        position_threshold: float = POSITION_THRESHOLD,
        detector_size: Mapping[str, int] | None = GENEVAL_DETECTOR_SIZE,
        device: str | None = None,
        dtype: str = "float32",
        detector_batch_size: int | None = None,
        clip_batch_size: int = 64,
    ):
        super().__init__()
        if not (0 <= threshold < 1 and 0 <= counting_threshold < 1):
            raise RewardConfigError(
                f"geneval: threshold and counting_threshold must be in [0, 1), got {threshold} and {counting_threshold}"
            )
        if max_per_class < 1 or clip_batch_size < 1 or (detector_batch_size is not None and detector_batch_size < 1):
            raise RewardConfigError(
                "geneval: max_per_class, clip_batch_size and detector_batch_size must be >= 1, got "
                f"{max_per_class}, {clip_batch_size} and {detector_batch_size}"
            )
        if not position_threshold >= 0:
            raise RewardConfigError(f"geneval: position_threshold must be >= 0, got {position_threshold}")
        if detector_size is not None:
            edges = dict(detector_size)
            if set(edges) != {"shortest_edge", "longest_edge"} or not all(
                isinstance(v, int) and v >= 1 for v in edges.values()
            ) or edges["shortest_edge"] > edges["longest_edge"]:
                raise RewardConfigError(
                    "geneval: detector_size must be {shortest_edge: int, longest_edge: int} with "
                    f"1 <= shortest_edge <= longest_edge, or null for the processor's size; got {detector_size}"
                )
            detector_size = edges
        self.detector_size = detector_size
        if dtype not in DTYPES:
            raise RewardConfigError(f"geneval: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        try:
            self.model_device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise RewardConfigError(f"geneval: device {device!r} is not a torch device ({error})") from None
        self.threshold, self.counting_threshold = float(threshold), float(counting_threshold)
        self.max_per_class, self.position_threshold = int(max_per_class), float(position_threshold)
        self.detector_batch_size, self.clip_batch_size = detector_batch_size, int(clip_batch_size)
        self.detector_processor = load_pretrained(
            AutoImageProcessor.from_pretrained, detector, "GenEval detector's image processor"
        )
        self.detector = freeze(
            load_pretrained(Mask2FormerForUniversalSegmentation.from_pretrained, detector, "GenEval detector")
        ).to(DTYPES[dtype])
        self.names = map_labels(self.detector.config.id2label)
        self.clip_processor = load_pretrained(CLIPProcessor.from_pretrained, clip, "GenEval CLIP processor")
        self.clip = freeze(load_pretrained(CLIPModel.from_pretrained, clip, "GenEval CLIP model")).to(DTYPES[dtype])
        self._classifiers: dict[str, torch.Tensor] = {}  # object name -> (colours, D), cached
        if self.model_device is not None:
            self.to(self.model_device)

    # ------------------------------------------------------------------------------ model parts
    def _place(self, images: torch.Tensor) -> torch.device:
        """Put the models on the configured device (default: the images'); returns that device."""
        target = self.model_device if self.model_device is not None else images.device
        parameter = next(self.parameters())
        if parameter.device != target:
            self.to(target)
        return next(self.parameters()).device

    def detect(self, arrays: np.ndarray, thresholds: Sequence[float]) -> list[dict[str, list[Detection]]]:
        """The detections of (B, H, W, 3) uint8 images, image b with confidence threshold ``thresholds[b]``."""
        parameter = next(self.detector.parameters())
        step = self.detector_batch_size or len(arrays)
        height, width = arrays.shape[1:3]
        found: list[dict[str, list[Detection]]] = []
        for start in range(0, len(arrays), step):
            chunk = [Image.fromarray(array) for array in arrays[start : start + step]]
            resize = {} if self.detector_size is None else {"size": self.detector_size}
            inputs = self.detector_processor(images=chunk, return_tensors="pt", **resize)
            outputs = self.detector(
                pixel_values=inputs["pixel_values"].to(parameter.device, parameter.dtype),
                pixel_mask=inputs["pixel_mask"].to(parameter.device),
            )
            outputs.class_queries_logits = outputs.class_queries_logits.float()
            outputs.masks_queries_logits = outputs.masks_queries_logits.float()
            results = self.detector_processor.post_process_instance_segmentation(
                outputs,
                threshold=min(thresholds[start : start + step]),
                target_sizes=[(height, width)] * len(chunk),
                return_binary_maps=True,
            )
            for offset, result in enumerate(results):
                segments = result["segments_info"]
                masks = result["segmentation"].bool().cpu().numpy() if segments else np.zeros((0, height, width), bool)
                threshold = thresholds[start + offset]
                found.append(select_detections(segments, masks, self.names, threshold, self.max_per_class))
        return found

    def _classifier(self, name: str) -> torch.Tensor:
        """The (colours, D) colour classifier of object ``name`` on the CLIP model's device (cached)."""
        device = next(self.clip.parameters()).device
        cached = self._classifiers.get(name)
        if cached is None or cached.device != device:
            tokens = self.clip_processor(
                text=color_prompts(name), padding=True, truncation=True,
                max_length=self.clip.config.text_config.max_position_embeddings, return_tensors="pt",
            )
            features = _projected(self.clip.get_text_features(**{k: v.to(device) for k, v in tokens.items()}))
            cached = color_classifier(features.float().reshape(len(COLORS), len(COLOR_TEMPLATES), -1))
            self._classifiers[name] = cached
        return cached

    def colors(self, crops: Sequence[np.ndarray], names: Sequence[str]) -> list[str]:
        """The GenEval colour of each crop (uint8 (h, w, 3)), crop i showing an object ``names[i]``."""
        parameter = next(self.clip.parameters())
        out: list[str] = []
        for start in range(0, len(crops), self.clip_batch_size):
            chunk = [Image.fromarray(crop) for crop in crops[start : start + self.clip_batch_size]]
            pixels = self.clip_processor(images=chunk, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(parameter.device, parameter.dtype)
            features = _projected(self.clip.get_image_features(pixel_values=pixels))
            for feature, name in zip(features, names[start : start + self.clip_batch_size]):
                out += classify_colors(feature[None], self._classifier(name))
        return out

    # ---------------------------------------------------------------------------------- scoring
    def objects(self, images: torch.Tensor, metadata: Sequence[Mapping]) -> list[dict[str, list[dict]]]:
        """`judge`'s ``objects`` for each image: detections with boxes and (where a clause asks) colours."""
        arrays = to_uint8(images)
        thresholds = [self.counting_threshold if r.get("tag") == "counting" else self.threshold for r in metadata]
        detections = self.detect(arrays, thresholds)
        crops, crop_names, where = [], [], []
        for b, (found, record) in enumerate(zip(detections, metadata)):
            coloured = {c["class"] for c in [*record["include"], *record.get("exclude", [])] if c.get("color")}
            for name in sorted(coloured & set(found)):
                for k, detection in enumerate(found[name]):
                    crops.append(masked_crop(arrays[b], detection.mask, detection.box))
                    crop_names.append(name)
                    where.append((b, name, k))
        colors = dict(zip(where, self.colors(crops, crop_names))) if crops else {}
        return [
            {
                name: [{"box": list(d.box), "color": colors.get((b, name, k))} for k, d in enumerate(found)]
                for name, found in image.items()
            }
            for b, image in enumerate(detections)
        ]

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]
    ) -> dict[str, torch.Tensor]:
        """{"geneval", "geneval/strict", "geneval/correct", "geneval/<tag>" for the six tags}: each (B,)."""
        for i, record in enumerate(metadata):
            try:
                validate_geneval_record(record)
            except ValueError as error:
                raise ValueError(f"geneval: metadata {i} is not a GenEval record: {error}") from None
        self._place(images)
        judgements = [
            judge(record, objects, self.position_threshold)
            for record, objects in zip(metadata, self.objects(images, metadata))
        ]
        column = lambda values: torch.tensor(values, dtype=torch.float32, device=images.device)  # noqa: E731
        out = {
            self.name: column([j.score for j in judgements]),
            f"{self.name}/strict": column([float(j.strict) for j in judgements]),
            f"{self.name}/correct": column([float(j.correct) for j in judgements]),
        }
        for tag in TAGS:
            out[f"{self.name}/{tag}"] = column(
                [float(j.correct) if r.get("tag") == tag else math.nan for j, r in zip(judgements, metadata)]
            )
        return out

    def summarise(self, means: Mapping[str, float]) -> dict[str, float]:
        """GenEval's overall score, ``<name>/overall`` (`tpgrpo.rewards.geneval.geneval_summary`)."""
        return geneval_summary(self.name, means)
