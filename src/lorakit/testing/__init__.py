"""Test helpers: diffusers pipelines and models with seeded random weights (models.py; SD3, Wan, LTX-Video and
HunyuanVideo in family_models.py), in-memory tokenizers
(tokenizers.py) and synthetic LoRA files in every format lorakit reads (loras.py)."""

from .models import *  # noqa: F401,F403  (the public names are models.__all__)
from .models import __all__  # noqa: F401
