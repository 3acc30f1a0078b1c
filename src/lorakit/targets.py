"""Where a file's module keys go in a model: every spelling files use, mapped onto the model's real module paths.

Spellings handled: dotted diffusers paths, kohya underscore names (built from the model's own ``named_modules()``
as kohya does, so no underscore guessing), LDM names for UNets (``input_blocks_4_1_...``), and CLIP text encoders
with or without the ``text_model.`` level (transformers 5 flattened ``CLIPTextModel``; files keep the old names).
"""

from __future__ import annotations

import torch.nn as nn

from .families import is_text_encoder, is_unet, unet_ldm_names
from .formats.keys import ModuleKeys

SUPPORTED_TYPES = (nn.Linear, nn.Conv2d)


class ModuleIndex:
    """Lookup of one component's modules by every spelling LoRA files use."""

    def __init__(self, model: nn.Module):
        self.modules: dict[str, nn.Module] = dict(model.named_modules())
        self.dotted: dict[str, str] = {}
        self.kohya: dict[str, str | None] = {}
        text = is_text_encoder(model)
        for name in self.modules:
            if not name:
                continue
            for alias in self._aliases(name, text):
                self._add(alias, name)
        if is_unet(model):
            for name, ldm in unet_ldm_names(model).items():
                self._add(ldm, name)

    @staticmethod
    def _aliases(name: str, text: bool) -> list[str]:
        if not text:
            return [name]
        if name.startswith("text_model."):
            return [name, name[len("text_model."):]]
        return [name, "text_model." + name]

    def _add(self, alias: str, name: str) -> None:
        self.dotted.setdefault(alias, name)
        under = alias.replace(".", "_")
        if under in self.kohya and self.kohya[under] != name:
            self.kohya[under] = None  # two modules share this underscore spelling: refuse to guess
        else:
            self.kohya[under] = name

    def resolve(self, entry: ModuleKeys) -> str | None:
        """The real module path for a file's module key, or None when nothing matches."""
        if entry.style == "kohya":
            return self.kohya.get(entry.key)
        return self.dotted.get(entry.key)
