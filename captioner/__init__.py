"""captioner: image captioning with CNN or ViT encoders and a Transformer decoder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from captioner.api import Captioner

__all__ = ["Captioner", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import captioner` (and so `captioner --help`) must not pay for importing torch.
    if name == "Captioner":
        from captioner.api import Captioner

        return Captioner
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
