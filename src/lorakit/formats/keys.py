"""Key grammar of LoRA files: split every key into (namespace, module key, field) from the key text alone.

A file is a flat ``{module_key}{suffix}`` map. The suffix names the field (``down``, ``up``, ``alpha``, ...) and the
format family; the module key is either a dotted diffusers path (PEFT, diffusers, legacy diffusers) or a kohya
underscore name (``lora_unet_...``, ``lora_te1_...``). Where the keys go in a model is decided later (targets.py).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from ..algorithms import INCOMPLETE, name_of

# (suffix, field, format). Longest suffixes first: ".lora_A.default.weight" before ".lora_A.weight".
SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_A.default.weight", "down", "peft"),
    (".lora_B.default.weight", "up", "peft"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".lora_B.bias", "lora_bias", "peft"),
    (".ia3_l.default", "ia3_l", "peft"),  # PEFT (IA)^3 vectors (get_peft_model_state_dict drops the adapter name)
    (".ia3_l", "ia3_l", "peft"),  # LoraConfig(lora_bias=True): scaled like the weight delta
    (".lora_linear_layer.down.weight", "down", "diffusers_legacy"),
    (".lora_linear_layer.up.weight", "up", "diffusers_legacy"),
    (".lora.down.weight", "down", "diffusers"),
    (".lora.up.weight", "up", "diffusers"),
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    (".lora_mid.weight", "mid", "kohya"),
    (".lokr_w1_a", "w1_a", "lycoris"),
    (".lokr_w1_b", "w1_b", "lycoris"),
    (".lokr_w2_a", "w2_a", "lycoris"),
    (".lokr_w2_b", "w2_b", "lycoris"),
    (".lokr_w1", "w1", "lycoris"),
    (".lokr_w2", "w2", "lycoris"),
    (".lokr_t2", "t2", "lycoris"),
    (".hada_w1_a", "hada_w1_a", "lycoris"),
    (".hada_w1_b", "hada_w1_b", "lycoris"),
    (".hada_w2_a", "hada_w2_a", "lycoris"),
    (".hada_w2_b", "hada_w2_b", "lycoris"),
    (".hada_t1", "hada_t1", "lycoris"),
    (".hada_t2", "hada_t2", "lycoris"),
    (".a1.weight", "a1", "lycoris"),  # GLoRA
    (".a2.weight", "a2", "lycoris"),
    (".b1.weight", "b1", "lycoris"),
    (".b2.weight", "b2", "lycoris"),
    (".bm.weight", "bm", "lycoris"),
    (".oft_blocks", "oft_blocks", "lycoris"),
    (".oft_diag", "oft_diag", "lycoris"),
    (".rescale", "rescale", "lycoris"),
    (".diff_b", "diff_b", "lycoris"),
    (".diff", "diff", "lycoris"),
    (".w_norm", "w_norm", "lycoris"),
    (".b_norm", "b_norm", "lycoris"),
    (".on_input", "on_input", "lycoris"),
    (".dora_scale", "dora_scale", ""),  # beside any algorithm: the algorithm's keys name the format
    (".lora_magnitude_vector.default.weight", "magnitude", "peft"),
    (".lora_magnitude_vector.weight", "magnitude", "peft"),
    (".lora_magnitude_vector", "magnitude", "peft"),
    (".alpha", "alpha", ""),
    (".weight", "ia3", "lycoris"),  # IA3, kohya names only (see _split_key): last, every longer suffix first
)
GENERIC_SUFFIXES = {".weight"}  # only after a kohya module key (no dot), where nothing else ends that way

# Old diffusers attention processors: "<attn>.processor.to_q_lora.down.weight" targets "<attn>.to_q".
_PROCESSOR = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|"
                        r"to_add_out)_lora\.(?P<field>down|up)\.weight$")
# XLabs Flux processors: "double_blocks.0.processor.qkv_lora1.down.weight" (fused qkv; mapped in keymaps.py).
_XLABS = re.compile(r"^(?P<module>.*(?:double|single)_blocks\.\d+\.processor\.(?:qkv|proj)_lora\d?)\."
                    r"(?P<field>down|up)\.weight$")

# Namespaces: which component of a pipeline a key belongs to. None = the model being loaded into / the denoiser.
DOTTED_NAMESPACES = ("unet", "transformer", "transformer_2", "text_encoder", "text_encoder_2", "text_encoder_3",
                     "prior")
KOHYA_PREFIXES: tuple[tuple[str, str], ...] = (  # longest first: lora_te1_ before lora_te_
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("oft_unet_", "unet"),  # kohya networks/oft.py
    ("lora_transformer_", "transformer"),  # OneTrainer
    ("lycoris_", "transformer"),  # SimpleTuner LyCORIS
)


def _is_embedding(key: str) -> bool:
    """Textual-inversion tensors some LoRA files carry (``<s1>``, ``emb_params``, ``bundle_emb.*``, bare ``clip_l``)."""
    return key.startswith(("<", "emb_params", "bundle_emb.")) or key in ("clip_l", "clip_g")


@dataclass
class ModuleKeys:
    """The keys of one targeted module as the file spells them."""

    namespace: str | None
    key: str
    style: str  # "dotted" or "kohya"
    fields: dict[str, str] = field(default_factory=dict)
    formats: set[str] = field(default_factory=set)

    @property
    def algorithm(self) -> str:
        """``lora``, ``lokr``, ``loha+dora``, ... (the table in lorakit.algorithms), or ``incomplete``."""
        return name_of(set(self.fields))

    @property
    def display(self) -> str:
        return f"{self.namespace}.{self.key}" if self.namespace and self.style == "dotted" else self.key


@dataclass
class ParsedKeys:
    """Every key of a file, sorted into modules, embeddings and keys no reader understood."""

    modules: list[ModuleKeys]
    unused: list[str]
    embeddings: list[str]
    format_counts: Counter

    @property
    def format(self) -> str:
        if not self.format_counts:
            return "unknown"
        return self.format_counts.most_common(1)[0][0]


def split_namespace(module_key: str) -> tuple[str | None, str, str]:
    """Return (namespace, key within namespace, style) for a module key."""
    for prefix, namespace in KOHYA_PREFIXES:
        if module_key.startswith(prefix) and "." not in module_key:
            return namespace, module_key[len(prefix):], "kohya"
    key = module_key.removeprefix("base_model.model.")
    head, _, rest = key.partition(".")
    if head in DOTTED_NAMESPACES and rest:
        return head, rest, "dotted"
    return None, key, "dotted"


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(module key, field, format) of a file key, or None if no suffix rule knows it."""
    m = _PROCESSOR.match(key)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['attn']}.{proj}", m["field"], "diffusers_legacy"
    m = _XLABS.match(key)
    if m:
        return m["module"], m["field"], "xlabs"
    for suffix, fld, fmt in SUFFIXES:
        if key.endswith(suffix):
            if suffix in GENERIC_SUFFIXES and "." in key[: -len(suffix)]:
                continue
            return key[: -len(suffix)], fld, fmt
    return None


def parse_keys(keys: list[str] | tuple[str, ...]) -> ParsedKeys:
    """Sort a file's keys into modules; nothing is loaded.

    Example:
        >>> p = parse_keys(["lora_unet_conv_in.lora_down.weight", "lora_unet_conv_in.lora_up.weight"])
        >>> p.format, p.modules[0].namespace, p.modules[0].key
        ('kohya', 'unet', 'conv_in')
    """
    modules: dict[str, ModuleKeys] = {}
    unused: list[str] = []
    embeddings: list[str] = []
    counts: Counter = Counter()
    for key in keys:
        if _is_embedding(key):
            embeddings.append(key)
            continue
        split = _split_key(key)
        if split is None:
            unused.append(key)
            continue
        module_key, fld, fmt = split
        entry = modules.get(module_key)
        if entry is None:
            namespace, inner, style = split_namespace(module_key)
            entry = modules[module_key] = ModuleKeys(namespace, inner, style)
        if fld in entry.fields:
            unused.append(key)  # the same field spelled twice: keep the first, report the other
            continue
        entry.fields[fld] = key
        if fmt:
            entry.formats.add(fmt)
            counts[fmt] += 1
    # A module with only an alpha (or only one factor) is not loadable: report its keys as unused.
    complete = []
    for entry in modules.values():
        if entry.algorithm == INCOMPLETE:
            unused.extend(entry.fields.values())
        else:
            complete.append(entry)
    return ParsedKeys(complete, unused, embeddings, counts)
