"""The RoI predictor (the paper's RPN, the authors' "twig"): a few decoder blocks copied from the MLLM itself.

Given h^K, the hidden states after backbone layers 0..K−1 (frozen), it runs copies of layers K..K+T−2 as ordinary
decoder blocks, then (LLaVA) an extra RMSNorm initialised from the final norm, then only the input norm and the
q/k projections of the copy of layer K+T−1: the query is the last prompt token, the keys are the image tokens, and
the logit of image token j is the head-mean of q_h·k_h(j)/√d (docs/method.md §4.2). No softmax: these are BCE logits.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sdrpn_core.models.base import AdapterError, VLMAdapter
from sdrpn_core.models.decoder import layer_inputs, run_layers

RPN_WEIGHTS = "rpn.safetensors"
RPN_CONFIG = "rpn_config.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RPNConfig:
    """What an RPN checkpoint needs to be rebuilt on its base model."""

    K: int
    T: int
    family: str
    grid: tuple[int, int]
    twig_norm: bool = True  # LLaVA: an RMSNorm (from the final norm) before the head; Qwen: none
    rope_in_head: bool = False  # Qwen applies M-RoPE to the head's q and k; LLaVA does not
    preset: str = ""
    base_model: str = ""  # path or hub id the RPN was trained on
    base_model_fingerprint: str = ""
    base_model_dtype: str = ""  # the dtype the fingerprint was taken with (it is part of it)
    version: int = 1


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, L, d] at index [B, n] → [B, n, d]."""
    return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding with the models' rotate-half convention (cos/sin already broadcastable to x)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class RoIPredictor(nn.Module):
    def __init__(self, config: RPNConfig, twig_layers: list[nn.Module], twig_norm: nn.Module | None):
        super().__init__()
        self.config = config
        self.twig_layers = nn.ModuleList(twig_layers)
        self.twig_norm = twig_norm
        attn = twig_layers[-1].self_attn
        self.head_dim = attn.head_dim
        self.num_heads = attn.config.num_attention_heads
        self.num_kv_heads = attn.config.num_key_value_heads

    @classmethod
    def from_adapter(cls, adapter: VLMAdapter, K: int, T: int = 3, **config_fields) -> RoIPredictor:
        """Twig layer i is a deep copy of backbone layer K+i (the authors' `twig_init`)."""
        n = adapter.num_layers
        if K < 1 or T < 1 or n < K + T:
            raise AdapterError(f"RPN needs 1 <= K, 1 <= T, K+T <= {n} layers; got K={K}, T={T}")
        twig_norm = config_fields.pop("twig_norm", adapter.rpn_twig_norm)
        rope = config_fields.pop("rope_in_head", adapter.rpn_rope_in_head)
        config = RPNConfig(
            K=K, T=T, family=adapter.family, grid=adapter.grid, twig_norm=twig_norm, rope_in_head=rope, **config_fields
        )
        layers = [copy.deepcopy(adapter.decoder_layers[K + i]) for i in range(T)]
        norm = copy.deepcopy(adapter.final_norm) if twig_norm else None
        rpn = cls(config, layers, norm)
        return rpn.to(device=adapter.device, dtype=adapter.dtype)

    def forward(
        self,
        hidden_k: torch.Tensor,
        mask,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor,
        query_index: torch.Tensor,
        image_positions: torch.Tensor,
    ) -> torch.Tensor:
        """h^K [B, L, D] → RoI logits [B, n_img] (row-major over the grid)."""
        h = self.twig_hidden(hidden_k, mask, position_embeddings, position_ids)
        return self.head(h, position_embeddings, query_index[:, None], image_positions)[:, 0]

    def twig_hidden(self, hidden_k, mask, position_embeddings, position_ids) -> torch.Tensor:
        """Twig layers 0..T−2 as ordinary decoder blocks, then (LLaVA) the extra norm."""
        h = run_layers(self.twig_layers[:-1], hidden_k, mask, position_embeddings, position_ids)
        return self.twig_norm(h) if self.twig_norm is not None else h

    def head(
        self,
        h: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        query_rows: torch.Tensor,
        image_positions: torch.Tensor,
    ) -> torch.Tensor:
        """The last twig layer's input norm + q/k projections: [B, n_q, n_img] head-mean of q·k/√d for the
        `query_rows` [B, n_q] against the image tokens."""
        last = self.twig_layers[-1]
        q_in = last.input_layernorm(_rows(h, query_rows))
        k_in = last.input_layernorm(_rows(h, image_positions))
        q = last.self_attn.q_proj(q_in).view(h.shape[0], -1, self.num_heads, self.head_dim)
        k = last.self_attn.k_proj(k_in).view(h.shape[0], -1, self.num_kv_heads, self.head_dim)
        if self.config.rope_in_head:  # Qwen: M-RoPE at the true positions of the query rows and the image tokens
            cos, sin = position_embeddings
            q = _rotate(q, *(_rows(t, query_rows)[:, :, None] for t in (cos, sin)))
            k = _rotate(k, *(_rows(t, image_positions)[:, :, None] for t in (cos, sin)))
        k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=2)
        return torch.einsum("bqhd,bnhd->bqn", q, k) / (math.sqrt(self.head_dim) * self.num_heads)

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """rpn.safetensors (only the predictor) + rpn_config.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, folder / RPN_WEIGHTS, metadata={"format": "pt"})
        (folder / RPN_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, folder: str | Path, adapter: VLMAdapter, *, check_fingerprint: str | None = None) -> RoIPredictor:
        """Rebuild on `adapter` and load the saved weights (safetensors; no pickle)."""
        folder = Path(folder)
        cfg_path = folder / RPN_CONFIG
        if not cfg_path.exists():
            raise FileNotFoundError(f"no {RPN_CONFIG} in {folder}: not an sdrpn RPN checkpoint")
        raw = json.loads(cfg_path.read_text())
        raw["grid"] = tuple(raw["grid"])
        config = RPNConfig(**raw)
        if config.family != adapter.family or (adapter.rpn_fixed_grid and config.grid != adapter.grid):
            raise AdapterError(
                f"RPN in {folder} was trained for a {config.family} model with grid {config.grid}; "
                f"this model is {adapter.family} with grid {adapter.grid}"
            )
        if check_fingerprint and config.base_model_fingerprint and config.base_model_fingerprint != check_fingerprint:
            raise AdapterError(
                f"RPN in {folder} was trained on base model {config.base_model_fingerprint[:12]}, "
                f"not on this one ({check_fingerprint[:12]})"
            )
        fields = {k: v for k, v in asdict(config).items() if k not in ("K", "T", "family", "grid")}
        rpn = cls.from_adapter(adapter, config.K, config.T, **fields)
        rpn.load_state_dict(load_file(folder / RPN_WEIGHTS, device=str(adapter.device)), strict=True)
        return rpn

    @classmethod
    def from_authors_checkpoint(
        cls, model_folder: str | Path, adapter: VLMAdapter, K: int | None = None, T: int | None = None
    ) -> RoIPredictor:
        """The authors' released RPN from a "-filled" model folder (docs/method.md §4.1, §11): the
        `model.twig_layers.{i}.*` tensors of its safetensors shards, and `model.twig_norm.weight` where the family
        applies it. K and T default to the checkpoint's `config.json` (`twig_K`, `twig_T`); given, they must agree.
        Qwen's checkpoints carry a `twig_norm` too, which the authors' Qwen forward never applies: it is left out,
        as there. `twig_head.weight` (a copy of `lm_head` the loss never reaches) is not used either."""
        K, T = _twig_depth(Path(model_folder), K, T)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(Path(model_folder).glob("*.safetensors")):
            for key, value in load_file(shard).items():
                if key.startswith("model.twig_layers.") or key == "model.twig_norm.weight":
                    state[key.removeprefix("model.")] = value
        if not state:
            raise FileNotFoundError(f"no model.twig_layers.* weights in the safetensors of {model_folder}")
        if "twig_norm.weight" in state and not adapter.rpn_twig_norm:
            del state["twig_norm.weight"]
            log.info(
                "%s: twig_norm present but not applied by the %s RPN (as the authors' forward)",
                model_folder,
                adapter.family,
            )
        rpn = cls.from_adapter(adapter, K, T, base_model=str(model_folder))
        missing, unexpected = rpn.load_state_dict(state, strict=False)
        if unexpected or missing:
            raise AdapterError(
                f"authors' checkpoint in {model_folder} does not match K={K}, T={T} for {adapter.family}: missing "
                f"{missing[:4]}, unexpected {unexpected[:4]}"
            )
        return rpn


def _twig_depth(folder: Path, K: int | None, T: int | None) -> tuple[int, int]:
    """(K, T) from the released config.json's `twig_K` / `twig_T`, checked against the ones given."""
    config_path = folder / "config.json"
    saved = json.loads(config_path.read_text()) if config_path.exists() else {}
    out = []
    for name, given in (("twig_K", K), ("twig_T", T)):
        value = saved.get(name)
        if given is not None and value is not None and given != value:
            raise AdapterError(f"{config_path} says {name}={value}, not {given}")
        if given is None and value is None:
            raise AdapterError(f"{name} is not in {config_path}: pass K and T")
        out.append(given if given is not None else int(value))
    return out[0], out[1]


def partial_prefill(
    adapter: VLMAdapter,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    K: int,
    cache=None,
) -> tuple[torch.Tensor, object, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Backbone layers 0..K−1 over the input embeddings → (h^K, mask, rotary, position ids) for the RPN.
    `position_ids` is `adapter.position_ids(x)`: 1-D for LLaVA, M-RoPE for Qwen (a default would be wrong for one)."""
    attention_mask = attention_mask.to(embeds.device)
    padded = not bool(attention_mask.all())
    mask, pe = layer_inputs(adapter, embeds, position_ids, attention_mask if padded else None, cache)
    hidden = run_layers(adapter.decoder_layers[:K], embeds, mask, pe, position_ids, cache)
    return hidden, mask, pe, position_ids
