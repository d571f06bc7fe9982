"""The client's share of the model: token embeddings, final norm and LM head (tied or separate)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from inferencemesh.compute.blocks import pack_weight, rms_norm
from inferencemesh.compute.config import ModelConfig
from inferencemesh.compute.errors import InvalidModelDirectory
from inferencemesh.compute.weights import WeightFiles

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


class ClientHead:
    """Embedding lookup, final RMS norm and LM head.

    The LM head is laid out by ``pack_weight`` for a fast matmul. A tied model holds one
    ``[vocab, hidden]`` tensor for both uses (an embedding lookup gathers rows in any layout).
    """

    def __init__(
        self, config: ModelConfig, embed: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor
    ) -> None:
        expected = (config.vocab_size, config.hidden_size)
        for name, tensor in ((EMBED, embed), (LM_HEAD, lm_head)):
            if tuple(tensor.shape) != expected:
                raise InvalidModelDirectory(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")
        if tuple(norm.shape) != (config.hidden_size,):
            raise InvalidModelDirectory(f"{FINAL_NORM} has shape {tuple(norm.shape)}")
        self.config = config
        self.embed_weight = embed
        self.norm_weight = norm
        self.lm_head_weight = lm_head

    @classmethod
    def load(
        cls, model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> ClientHead:
        """Reads only the embedding, final norm and (when not tied) LM head tensors."""
        config = ModelConfig.load(model_dir)
        files = WeightFiles(model_dir)
        norm = files.load(FINAL_NORM, dtype, device)
        # Some tied checkpoints still store lm_head.weight; a tied model must use the embedding.
        if config.tie_word_embeddings:
            embed = lm_head = pack_weight(files.load(EMBED, dtype, device))
        else:
            embed, lm_head = files.load(EMBED, dtype, device), pack_weight(files.load(LM_HEAD, dtype, device))
        files.close()
        return cls(config, embed, norm, lm_head)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight.device

    def nbytes(self) -> int:
        """Bytes held (a tied embedding counted once)."""
        tensors = {id(t): t for t in (self.embed_weight, self.norm_weight, self.lm_head_weight)}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor | list[int]) -> torch.Tensor:
        """``[T]`` token ids -> ``[T, hidden_size]`` hidden states."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"token ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        return F.embedding(ids, self.embed_weight)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden_size]`` final hidden states -> ``[N, vocab_size]`` float32 logits."""
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        normed = rms_norm(hidden, self.norm_weight, self.config.rms_norm_eps)
        return F.linear(normed, self.lm_head_weight).float()
