"""How sinkfree's `LLMConfig` fields and parameter names map to HF Llama / Qwen2 / Qwen3 ones.

Parameter names map by prefix, so a parameter the HF classes lack keeps its leaf name under the HF
module it lives in. These are the documented HF names of the retrofit parameters (export writes them,
import reads them back; `transformers` ignores them with an "unused weights" warning):

    model.layers.{i}.self_attn.gate_proj.weight           output gate (attn_gate: headwise/elementwise)
    model.layers.{i}.self_attn.sinks                      learnable sink logits, (n_head,) fp32 (gpt-oss name)
    model.layers.{i}.{input,post_attention}_layernorm.*   GatedNorm / PreAffine extras (residual_sink)
    model.norm.*                                          the same for the final norm

and config.json carries a `"sinkfree": {"arch": {...}}` block with every `LLMConfig` field, so the
switches survive the trip. Both layouts use half-split (`rotate_half`) RoPE, so q/k load unpermuted.
"""
from __future__ import annotations

import re
from typing import Any

from sinkfree.checkpoints.io import CheckpointError

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
FAMILY_ARCHITECTURE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}

# (sinkfree prefix regex, HF prefix); a match keeps the rest of the name unchanged.
_PREFIXES = [
    (r"embed\.", "model.embed_tokens."),
    (r"norm\.", "model.norm."),
    (r"lm_head\.", "lm_head."),
    (r"layers\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
]
# Leaf renames applied after the prefix map: (sinkfree leaf, HF leaf) inside the attention module.
_LEAF_RENAMES = [("sink", "sinks")]
# Keys some HF checkpoints carry that hold no weights we need (old Llama exports saved the RoPE table).
IGNORED_HF_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _hf_prefix_regex(hf: str) -> str:
    return re.escape(hf).replace(re.escape(r"\1"), r"(\d+)")


def to_hf_key(name: str) -> str:
    """sinkfree parameter name -> HF name (`layers.3.attn.q_proj.weight` -> `model.layers.3.self_attn.q_proj.weight`)."""
    for ours, hf in _PREFIXES:
        m = re.match(ours, name)
        if m:
            rest = name[m.end():]
            if hf.endswith("self_attn."):
                rest = dict(_LEAF_RENAMES).get(rest, rest)
            return m.expand(hf) + rest
    raise CheckpointError(f"parameter {name!r} has no HF name (unknown module)")


def from_hf_key(name: str) -> str | None:
    """HF name -> sinkfree name, or None for a name outside the Llama layout."""
    for ours, hf in _PREFIXES:
        m = re.match(_hf_prefix_regex(hf), name)
        if m:
            rest = name[m.end():]
            if hf.endswith("self_attn."):
                rest = {h: o for o, h in _LEAF_RENAMES}.get(rest, rest)
            prefix = ours.replace(r"(\d+)", m.group(1) if m.groups() else "").replace("\\.", ".")
            return prefix + rest
    return None


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) from either v4 (`rope_theta` + `rope_scaling`) or v5 (`rope_parameters`)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError("partial_rotary_factor != 1 is not supported")
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        keys = ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
        return theta, {"type": "llama3", **{k: scaling[k] for k in keys}}
    if kind == "yarn":
        out = {"type": "yarn", "factor": float(scaling["factor"]), "original_max_position_embeddings": int(
            scaling.get("original_max_position_embeddings") or hf["max_position_embeddings"])}
        optional = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")
        return theta, {**out, **{k: scaling[k] for k in optional if scaling.get(k) is not None}}
    raise CheckpointError(f"rope type {kind!r} is not supported (supported: default, linear, llama3, yarn)")


def family_of(hf: dict) -> str:
    """'llama' | 'qwen2' | 'qwen3' from config.json's `architectures` (or `model_type`); anything else is an error."""
    archs = hf.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[a]
    if not archs and hf.get("model_type") in FAMILY_ARCHITECTURE:
        return hf["model_type"]
    raise CheckpointError(
        f"unsupported architecture {archs or hf.get('model_type')!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")


def arch_from_hf_config(hf: dict) -> dict[str, Any]:
    """`LLMConfig` fields (a dict) for an HF config.json dict; unsupported variants are clear errors."""
    family = family_of(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu / SwiGLU)")
    if hf.get("mlp_bias"):
        raise CheckpointError("mlp_bias=true is not supported")
    if family != "qwen2" and hf.get("attention_bias"):
        raise CheckpointError(f"{family} with attention_bias=true (bias on o_proj too) is not supported")
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        raise CheckpointError("sliding-window attention is not supported")
    n_head = int(hf["num_attention_heads"])
    theta, scaling = _rope_from_hf(hf)
    arch = {
        "vocab_size": int(hf["vocab_size"]),
        "n_layer": int(hf["num_hidden_layers"]),
        "n_embd": int(hf["hidden_size"]),
        "n_head": n_head,
        "n_kv_head": int(hf.get("num_key_value_heads") or n_head),
        "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // n_head),
        "intermediate_size": int(hf["intermediate_size"]),
        "block_size": int(hf.get("max_position_embeddings") or 2048),
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attn_bias": family == "qwen2",
        "qk_norm": family == "qwen3",
    }
    # A sinkfree export adds its switches; the HF fields above stay authoritative for what they describe.
    extra = (hf.get("sinkfree") or {}).get("arch") or {}
    arch.update({k: v for k, v in extra.items() if k not in arch})
    return arch


def _rope_to_hf(arch: dict) -> dict:
    scaling = arch.get("rope_scaling")
    params = {"rope_type": "default", "rope_theta": float(arch["rope_theta"])}
    if scaling:
        params.update({k: v for k, v in scaling.items() if k != "type"}, rope_type=scaling["type"])
    return {"rope_parameters": params}


def hf_config_from_arch(arch: dict, base: dict | None = None) -> dict:
    """An HF config.json dict for `LLMConfig` fields; `base` (the imported config.json) keeps ids and extras."""
    if arch.get("attn_bias") and arch.get("qk_norm"):
        raise CheckpointError("no HF class has q/k/v biases together with q/k norms (attn_bias + qk_norm)")
    family = "qwen3" if arch.get("qk_norm") else "qwen2" if arch.get("attn_bias") else "llama"
    head_dim = arch.get("head_dim") or arch["n_embd"] // arch["n_head"]
    hf = {k: v for k, v in (base or {}).items()
          if k not in ("rope_scaling", "rope_theta", "rope_parameters", "sinkfree", "attention_bias")}
    hf.update({
        "architectures": [FAMILY_ARCHITECTURE[family]],
        "model_type": family,
        "vocab_size": arch["vocab_size"],
        "hidden_size": arch["n_embd"],
        "num_hidden_layers": arch["n_layer"],
        "num_attention_heads": arch["n_head"],
        "num_key_value_heads": arch.get("n_kv_head") or arch["n_head"],
        "head_dim": head_dim,
        "intermediate_size": arch["intermediate_size"],
        "max_position_embeddings": arch["block_size"],
        "rms_norm_eps": arch["rms_norm_eps"],
        "tie_word_embeddings": bool(arch["tie_embeddings"]),
        "hidden_act": "silu",
        **_rope_to_hf(arch),
    })
    if family == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    if family == "qwen3":
        hf.update(attention_bias=False)
    if family != "llama":
        hf.setdefault("use_sliding_window", False)
        hf["layer_types"] = ["full_attention"] * arch["n_layer"]
    hf["sinkfree"] = {"arch": dict(arch)}
    return hf
