"""TurningPoint-GRPO for flow-matching text-to-image models, in PyTorch Lightning."""
import logging


class _DropTorchvisionFallback(logging.Filter):
    """transformers' note that an image processor falls back to its PIL version without torchvision.

    The PIL versions serve this project; the note is logged when diffusers' pipelines are imported,
    i.e. at every start of every entry point. Other records of that logger pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


TORCHVISION_FILTER = _DropTorchvisionFallback()
# Installed when the package is imported, before any of its modules loads diffusers (transformers
# logs the note once, at that import).
logging.getLogger("transformers.utils.import_utils").addFilter(TORCHVISION_FILTER)
