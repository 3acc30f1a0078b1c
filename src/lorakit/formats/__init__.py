"""LoRA file formats: key grammar (keys.py), building deltas from tensors (build.py), writers (write.py)."""

from .keys import ModuleKeys, ParsedKeys, parse_keys, split_namespace

__all__ = ["ModuleKeys", "ParsedKeys", "parse_keys", "split_namespace"]
