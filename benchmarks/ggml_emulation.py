"""What llama.cpp computes from a GGUF that bfx.export_gguf wrote, re-done in torch (for check_export --emulate).

A Llama forward (fp32, teacher-forced, causal) over a converted model's integer codes, with each linear computed
as llama.cpp's CPU backend computes a tensor of its ggml type:

- Q8_0 (the int8 layers): the weight is ``code * fp16(step)`` (the block scale ``d`` is fp16), and the input is
  quantized the way ggml's ``quantize_row_q8_0`` does, by blocks of 32 values:
  ``q = round(x * 127 / max|x|)`` (half to even), dequantized with ``fp16(max|x| / 127)``;
- F16 (float layers, the embedding; ``float_type``): weight and input rounded to fp16;
- attention with llama.cpp's default F16 KV cache (``kv_type``): Q, K, V and the softmax rounded to fp16.

``activation="per_token"`` instead quantizes each input as a converted bitlab_fx layer does (one int8 multiplier
``127 / max|x|`` per token, fp32 steps): the same forward computing what the converted model computes, so the
two differ only in the activation rounding. Llama-family models with int8 or float layers only (no TQ2_0).
"""
from __future__ import annotations

import math

import torch

from bitlab_fx.export.weights import converted_layers, layer_weight


def q8_0_blocks(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """``x`` rounded as ggml's Q8_0 activation blocks hold it (the last dimension a multiple of ``block``)."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse) * (amax / 127).half().float()).reshape(x.shape)


def per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded as a converted bitlab_fx layer's dynamic per-token int8 input quantizer rounds it."""
    multiplier = 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return torch.clamp(torch.round(x * multiplier), -128, 127) / multiplier


class LlamaEmulation:
    """The forward of a converted Hugging Face Llama as llama.cpp (or, for checking, bitlab_fx) rounds it."""

    def __init__(self, converted: torch.nn.Module, activation: str = "q8_0", float_type: str = "F16",
                 kv_type: str = "F16"):
        if activation not in ("q8_0", "per_token"):
            raise ValueError(f"activation {activation!r}: 'q8_0' (llama.cpp) or 'per_token' (bitlab_fx)")
        self.cfg, self.state, self.activation = converted.config, converted.state_dict(), activation
        rounding = {"F16": torch.float16, "F32": torch.float32}
        self.float_rounding = rounding[float_type] if activation == "q8_0" else torch.float32
        self.kv_rounding = rounding[kv_type] if activation == "q8_0" else torch.float32
        self.weights = {}
        for container in converted_layers(converted).values():
            layer = layer_weight(container)
            if layer.weight_format != "int8":
                raise SystemExit(f"--emulate: {layer.name} is {layer.weight_format}; the emulation covers int8 layers")
            steps = layer.steps.half().float() if activation == "q8_0" else layer.steps  # Q8_0's d is fp16
            self.weights[layer.name] = (layer.codes.float() * steps.repeat_interleave(layer.group, 1),
                                        layer.weight_format if container.act != "none" else "weight-only")

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in self.weights:  # a float layer (F16 in the file); a tied head reads the embedding
            weight = self.state.get(name + ".weight", self.state["model.embed_tokens.weight"]).float()
            rounding = self.float_rounding  # llama.cpp rounds an F16 tensor's input to fp16 too
            return x.to(rounding).float() @ weight.to(rounding).float().T
        weight, kind = self.weights[name]
        if self.activation == "q8_0":
            return q8_0_blocks(x) @ weight.T  # llama.cpp quantizes every Q8_0 layer's input, weight-only or not
        return (x if kind == "weight-only" else per_token_int8(x)) @ weight.T

    def rms_norm(self, x: torch.Tensor, key: str) -> torch.Tensor:
        return self.state[key].float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps))

    def attention(self, prefix: str, x: torch.Tensor, rope: tuple) -> torch.Tensor:
        heads, kv_heads = self.cfg.num_attention_heads, self.cfg.num_key_value_heads
        head_dim, tokens = self.cfg.hidden_size // heads, x.shape[0]
        cos, sin = rope
        rotate = lambda t: torch.cat([-t[..., head_dim // 2:], t[..., :head_dim // 2]], -1)
        q, k, v = (self.linear(prefix + name, x).reshape(tokens, n, head_dim).transpose(0, 1)
                   for name, n in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)))
        q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
        cache = self.kv_rounding  # an F16 cache: K and V stored in fp16, and Q and the softmax meet them in fp16
        q, k, v = (t.to(cache).float() for t in (q, k, v))
        k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
        mask = torch.full((tokens, tokens), float("-inf")).triu(1)
        out = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim) + mask, -1).to(cache).float() @ v
        return self.linear(prefix + "o_proj", out.transpose(0, 1).reshape(tokens, heads * head_dim))

    def _rope(self, tokens: int) -> tuple:
        cfg = self.cfg
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {})["rope_theta"]
        inverse = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.arange(tokens).float()[:, None] * inverse[None]
        angles = torch.cat([angles, angles], -1)
        return angles.cos(), angles.sin()

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[len(ids), vocab]`` of the token ids ``ids`` (1-D), teacher-forced."""
        h = self.state["model.embed_tokens.weight"][ids].float()
        h = h.to(self.float_rounding).float()  # token_embd as the file holds it
        rope = self._rope(ids.shape[0])
        for i in range(self.cfg.num_hidden_layers):
            prefix = f"model.layers.{i}."
            h = h + self.attention(prefix + "self_attn.", self.rms_norm(h, prefix + "input_layernorm.weight"), rope)
            x = self.rms_norm(h, prefix + "post_attention_layernorm.weight")
            gated = torch.nn.functional.silu(self.linear(prefix + "mlp.gate_proj", x)) * self.linear(prefix + "mlp.up_proj", x)
            h = h + self.linear(prefix + "mlp.down_proj", gated)
        return self.linear("lm_head", self.rms_norm(h, "model.norm.weight"))
