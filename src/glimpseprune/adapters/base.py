"""What a VLM family adapter provides: where the visual tokens are, how positions and rotary tables are built, and
access to the decoder's layers. Adapters are stateless: everything about one request lives in ``Encoded``."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..contracts import Encoded, grid_groups  # noqa: F401  (re-exported: the adapters fill it)


@contextlib.contextmanager
def capture_outputs(modules: dict[int, nn.Module], transform=None) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output of each module while the block runs (forward hooks, removed on exit), instead of asking
    the vision tower for every block's hidden states: only the tapped tensors stay alive, reduced by
    ``transform(key, output)`` (e.g. pooling, a projection) as soon as they are made.

    The hooks sit on modules that other threads may be running at the same time (one model serving two requests,
    the demo's streaming thread): each records only the forwards of the thread that opened the block."""
    out: dict[int, torch.Tensor] = {}
    owner = threading.get_ident()

    def hook(key):
        def fn(_mod, _args, output):
            if threading.get_ident() != owner:  # another request's forward through the same module
                return
            t = output[0] if isinstance(output, tuple) else output
            out[key] = transform(key, t) if transform is not None else t
        return fn

    handles = []
    try:  # registered inside: an interrupt between two registrations leaves no hook behind
        for k, m in modules.items():
            handles.append(m.register_forward_hook(hook(k)))
        yield out
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class ModelDims:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    vision_width: int
    vision_depth: int
    # the text model's RMSNorm epsilon, where the adapter reports it (the glimpse norm uses it); not an identity
    rms_norm_eps: float | None = field(default=None, compare=False)


class Adapter:
    """Base class; one subclass per ``model_type``. Methods take the model explicitly and keep no state."""

    model_types: tuple[str, ...] = ()

    def dims(self, model: nn.Module) -> ModelDims:
        raise NotImplementedError

    def text_config(self, model: nn.Module):
        raise NotImplementedError

    def layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def encode(self, model: nn.Module, inputs: dict, taps: tuple[int, ...] = (), tap_fn=None) -> Encoded:
        """Embed a batch; ``taps``: vision-tower layers whose features (per visual token, raster order) fill
        ``vision_feats``, each passed through ``tap_fn(position in taps, features)`` when given."""
        raise NotImplementedError

    def rotary(self, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor):
        """(cos, sin), each (B, L, head_dim), for positions (P, B, L)."""
        raise NotImplementedError

    def decode_positions(self, next_pos: torch.Tensor) -> torch.Tensor:
        """Position ids (P, B, 1) of a decode step whose tokens sit at next_pos (B,)."""
        raise NotImplementedError

    def box_masks(self, model: nn.Module, processor, inputs: dict, boxes: list, sizes: list) -> list:
        """Per image, a (h, w) bool numpy mask of the visual tokens covered by its pixel xyxy ``boxes``
        (on the original ``(width, height)`` in ``sizes``), following the family's image preprocessing."""
        raise NotImplementedError

    def token_view(self, model: nn.Module, processor, image):
        """The PIL image as the visual-token grid sees it (resized / padded / cropped), for overlays."""
        raise NotImplementedError

    def embed_tokens(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return model.get_input_embeddings()(ids)

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: hidden (B, L, H) -> (B, L, V)."""
        raise NotImplementedError

    def query_logits(
        self, model: nn.Module, layer_idx: int, hidden_in: torch.Tensor, rope, keys: torch.Tensor
    ) -> torch.Tensor:
        """Scaled q.k logits of ONE query per sample against every cached key of a layer.

        hidden_in: (B, 1, H), the layer's input at the query position; rope: (cos, sin) each (B, 1, head_dim);
        keys: (B, kv_heads, L, head_dim) after RoPE. Returns (B, heads, L). Works for Qwen2/Llama-style attention;
        families whose attention transforms q before RoPE (Qwen3's q_norm) override ``query_heads``.
        """
        layer = self.layers(model)[layer_idx]
        attn = layer.self_attn
        B = hidden_in.shape[0]
        hd = keys.shape[-1]
        q = self.query_heads(attn, layer.input_layernorm(hidden_in), hd)  # (B, h, 1, hd)
        cos, sin = rope
        q1, q2 = q.chunk(2, dim=-1)
        q = q * cos[:, None] + torch.cat([-q2, q1], dim=-1) * sin[:, None]
        h, kvh = q.shape[1], keys.shape[1]
        scale = getattr(attn, "scaling", hd**-0.5)
        # GQA without repeating the keys: query heads h = kvh * g, head j reads kv head j // g (transformers' layout)
        q = q.view(B, kvh, h // kvh, hd)  # (B, kvh, g, hd)
        return (q @ keys.transpose(-1, -2)).reshape(B, h, -1) * scale  # (B, h, L)

    def query_heads(self, attn: nn.Module, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        """Queries (B, heads, q, head_dim) before RoPE of the attention module ``attn`` for its normed input x
        (B, q, H): ``q_proj`` split into heads (Qwen2 / Llama)."""
        return attn.q_proj(x).view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)
