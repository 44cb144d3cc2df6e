"""What a checkpoint's config.json says about the network, read as Hugging Face's config classes read it.

`ModelConfig.from_hf` refuses what model.py does not implement (another model_type, activation or
RoPE type) with an error naming the file; `sliding_window_of` says which layers attend within a
sliding window; `TARGETS` names the sets of a layer's matrices that an expert adapts. No torch here:
params.py counts parameters from configs alone. model.py builds the network from a ModelConfig.
"""

from dataclasses import dataclass, fields

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # Llama-3: {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama: bias on q, k, v and o
    qkv_bias: bool = False  # Qwen2: bias on q, k and v only
    mlp_bias: bool = False
    sliding_window: int = None  # Mistral, Qwen2: a query sees only the last sliding_window positions
    layer_types: list = None  # Qwen2: "sliding_attention" or "full_attention" per layer; None: all sliding
    model_type: str = "llama"

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types lists {len(self.layer_types)} layers, "
                             f"num_hidden_layers={self.num_hidden_layers}")

    def window(self, layer):
        """The sliding window of layer `layer`, or None where it attends to the whole context."""
        if self.sliding_window is None or (self.layer_types and self.layer_types[layer] != "sliding_attention"):
            return None
        return self.sliding_window

    def windows(self):
        """The distinct windows of the layers (None: whole context), one attention mask each."""
        return {self.window(i) for i in range(self.num_hidden_layers)}

    @classmethod
    def from_hf(cls, cfg: dict, source="config.json"):
        """Reads a Hugging Face config.json dict; refuses what this file does not implement."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported; "
                             f"this implementation covers {', '.join(SUPPORTED)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (expected silu)")
        # Newer files put rope_theta and the scaling inside "rope_parameters"; older ones write
        # rope_theta at the top level and the scaling as "rope_scaling".
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = cfg.get("rope_theta", rope.pop("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (expected default or llama3)")
        window, layer_types = sliding_window_of(cfg)
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in known}
        kwargs.update(rope_theta=theta, rope_scaling=rope if rope_type == "llama3" else None,
                      head_dim=cfg.get("head_dim") or 0, qkv_bias=model_type == "qwen2",
                      sliding_window=window, layer_types=layer_types)
        return cls(**kwargs)


def sliding_window_of(cfg):
    """(sliding_window, layer_types) of a config.json dict, read as Hugging Face's config classes read it.

    Llama has no sliding window (a `sliding_window` key in its config is ignored). Mistral attends
    within `sliding_window` in every layer when it is set (v0.1: 4096; v0.2 on: null). Qwen2 only
    with `use_sliding_window: true` (false when absent), and then only in the layers from
    `max_window_layers` (default 28) on, unless `layer_types` names each layer's kind.
    """
    window = cfg.get("sliding_window")
    if cfg.get("model_type") == "llama" or window is None:
        return None, None
    if cfg.get("model_type") == "qwen2":
        if not cfg.get("use_sliding_window", False):
            return None, None
        n, first = cfg["num_hidden_layers"], cfg.get("max_window_layers", 28)
        types = cfg.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        return window, list(types)
    return window, None


# Sets of a decoder layer's matrices, by their Hugging Face keys (the module names below), that an
# expert adapts (svf.py, lora.py) and params.py counts. The official code targets the MLP only; the
# paper's ablation (Table 4) finds MLP + attention best. "qv" is where the paper's LoRA baseline goes
# (lora.py), and where SVF's 0.16M "attention" parameters of Table 4 fit (params.py).
TARGETS = {"mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
           "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
           "qv": ("self_attn.q_proj", "self_attn.v_proj")}
TARGETS["all"] = TARGETS["attn"] + TARGETS["mlp"]
