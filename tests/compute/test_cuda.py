"""Our engine on a CUDA GPU against transformers on the same GPU (skipped without one).

The same checks as the CPU parity tests, with kernels that differ from the CPU's (cuBLAS, and
transformers' SDPA attention against ours), so bounds come from measuring both implementations against
a float64 run of the model rather than from one machine's rounding."""

from __future__ import annotations

import pytest
import torch
from compute_models import SMOLLM2_SPLITS, chat_ids, worst_errors

from inferencemesh.compute.generation import LocalModel
from inferencemesh.compute.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
PROMPT = "What is the capital of France?"
STEPS = 16


def reference_on_gpu(model_dir, dtype: torch.dtype):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(DEVICE).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_logits_are_about_as_accurate_as_transformers_on_the_gpu(smollm2_dir, dtype) -> None:
    exact = reference_on_gpu(smollm2_dir, torch.float64)
    theirs = reference_on_gpu(smollm2_dir, dtype)
    local = LocalModel.load(smollm2_dir, dtype=dtype, device=DEVICE, splits=SMOLLM2_SPLITS, progress=False)
    ours_off, theirs_off = worst_errors(exact, theirs, local, PROMPT, STEPS)
    print(f"{dtype}: ours {ours_off:.3g}, transformers {theirs_off:.3g} off a float64 run")
    # Both implementations round alike in each dtype; a real fault (a wrong rope, mask or norm) puts
    # ours many times further off than transformers.
    assert ours_off <= 4 * theirs_off + 1e-4, (ours_off, theirs_off)


def test_gpu_greedy_tokens_match_transformers_on_the_gpu(smollm2_dir) -> None:
    reference = reference_on_gpu(smollm2_dir, torch.float32)
    local = LocalModel.load(smollm2_dir, device=DEVICE, splits=SMOLLM2_SPLITS, progress=False)
    prompt_ids = chat_ids(local, PROMPT)
    ours = local.generate(prompt_ids, max_new_tokens=STEPS, sampling=SamplingParams())
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([prompt_ids], device=DEVICE), max_new_tokens=STEPS, do_sample=False
        )
    theirs = out[0, len(prompt_ids) :].tolist()
    if theirs and theirs[-1] in local.tokenizer.eos_token_ids:
        theirs.pop()  # ours reports the tokens before end-of-sequence
    assert ours.token_ids == theirs


def test_gpu_batched_decode_matches_each_session_alone(smollm2_dir) -> None:
    """Several sessions' decode steps in one batch (what a worker's scheduler runs) give each session
    the logits it gets alone, up to the batch kernels' rounding."""
    local = LocalModel.load(smollm2_dir, device=DEVICE, splits=SMOLLM2_SPLITS, progress=False)
    prompts = [chat_ids(local, p) for p in (PROMPT, "Name three primary colors.", "What is 12 times 12?")]
    alone, batched = [], []
    for together in (False, True):
        sessions = [local.new_session(len(ids) + 8) for ids in prompts]
        tokens = [int(s.step(ids).argmax()) for s, ids in zip(sessions, prompts, strict=True)]
        for _ in range(4):
            if together:
                logits = local.decode_batch(sessions, tokens)
            else:
                logits = torch.stack([s.step([t]) for s, t in zip(sessions, tokens, strict=True)])
            (batched if together else alone).append(logits.cpu())
            tokens = [int(row.argmax()) for row in logits]
        for session in sessions:
            session.close()
    difference = max((a - b).abs().max().item() for a, b in zip(alone, batched, strict=True))
    print(f"batched against alone: {difference:.3g}")
    assert difference <= 1e-3
