"""The client's share of the model: token embeddings, final norm and LM head (tied or separate)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from inferencemesh.compute.blocks import rms_norm
from inferencemesh.compute.config import ModelConfig
from inferencemesh.compute.devices import resolve_device
from inferencemesh.compute.errors import InvalidModelDirectory
from inferencemesh.compute.hugepages import place_in_huge_pages
from inferencemesh.compute.linear import Projection
from inferencemesh.compute.weights import WeightFiles

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


class ClientHead:
    """Embedding lookup, final RMS norm and LM head.

    A tied model holds the ``[vocab, hidden]`` matrix once, inside the LM head projection, and looks
    embeddings up as its rows; an untied model keeps a separate embedding table.
    """

    def __init__(
        self, config: ModelConfig, embed: torch.Tensor | None, norm: torch.Tensor, lm_head: Projection
    ) -> None:
        vocab, hidden = config.vocab_size, config.hidden_size
        if (lm_head.out_features, lm_head.in_features) != (vocab, hidden):
            raise InvalidModelDirectory(f"LM head maps {lm_head.in_features} -> {lm_head.out_features}")
        if embed is not None and tuple(embed.shape) != (vocab, hidden):
            raise InvalidModelDirectory(f"{EMBED} has shape {tuple(embed.shape)}, expected {(vocab, hidden)}")
        if tuple(norm.shape) != (hidden,):
            raise InvalidModelDirectory(f"{FINAL_NORM} has shape {tuple(norm.shape)}")
        self.config = config
        self.embed_weight = embed  # None when tied to the LM head
        self.norm_weight = norm
        self.lm_head = lm_head

    @classmethod
    def load(
        cls, model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> ClientHead:
        """Reads only the embedding, final norm and (when not tied) LM head tensors."""
        device = resolve_device(device)
        config = ModelConfig.load(model_dir)
        files = WeightFiles(model_dir)
        norm = files.load(FINAL_NORM, dtype, device)
        # Some tied checkpoints still store lm_head.weight; a tied model must use the embedding.
        if config.tie_word_embeddings:
            embed, lm_head = None, Projection(files.load(EMBED, dtype, device))
        else:
            embed, lm_head = files.load(EMBED, dtype, device), Projection(files.load(LM_HEAD, dtype, device))
        files.close()
        place_in_huge_pages([lm_head])  # the client's big matmul streams it every token
        return cls(config, embed, norm, lm_head)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.device

    def nbytes(self) -> int:
        """Bytes held by the head's weights."""
        extra = [self.norm_weight] + ([self.embed_weight] if self.embed_weight is not None else [])
        return self.lm_head.nbytes() + sum(t.numel() * t.element_size() for t in extra)

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor | list[int]) -> torch.Tensor:
        """``[T]`` token ids -> ``[T, hidden_size]`` hidden states."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"token ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        if self.embed_weight is None:
            return self.lm_head.rows(ids)
        return F.embedding(ids, self.embed_weight)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden_size]`` final hidden states -> ``[N, vocab_size]`` float32 logits."""
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        normed = rms_norm(hidden, self.norm_weight, self.config.rms_norm_eps)
        return self.lm_head(normed).float()
