"""The compute engine: model specs, span-only weight loading, blocks on torch, KV cache, sampling.

No networking and no transformers at run time; see docs/compute.md for the API.
"""

from inferencemesh.compute.config import ModelConfig, RopeConfig
from inferencemesh.compute.dtypes import DTYPES, parse_dtype
from inferencemesh.compute.errors import (
    CacheFull,
    CacheOverflow,
    ComputeError,
    DuplicateSession,
    InvalidModelDirectory,
    InvalidSpan,
    ModelPreparationError,
    UnknownSession,
    UnsupportedModel,
)
from inferencemesh.compute.generation import (
    GenerationResult,
    LocalModel,
    LocalSession,
    TextStream,
    TokenLoop,
    generate,
)
from inferencemesh.compute.head import ClientHead
from inferencemesh.compute.identity import model_id
from inferencemesh.compute.kv_cache import KVCacheManager, SessionCache
from inferencemesh.compute.sampling import Sampler, SamplingParams
from inferencemesh.compute.span import Span, format_block_range, parse_block_range
from inferencemesh.compute.tokenizer import ChatTemplateError, Tokenizer

__all__ = [
    "DTYPES",
    "CacheFull",
    "CacheOverflow",
    "ChatTemplateError",
    "ClientHead",
    "ComputeError",
    "DuplicateSession",
    "GenerationResult",
    "InvalidModelDirectory",
    "InvalidSpan",
    "KVCacheManager",
    "LocalModel",
    "LocalSession",
    "ModelConfig",
    "ModelPreparationError",
    "RopeConfig",
    "Sampler",
    "SamplingParams",
    "SessionCache",
    "Span",
    "TextStream",
    "TokenLoop",
    "Tokenizer",
    "UnknownSession",
    "UnsupportedModel",
    "format_block_range",
    "generate",
    "model_id",
    "parse_block_range",
    "parse_dtype",
]
