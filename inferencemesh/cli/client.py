"""`python -m inferencemesh client`: generate text with a model served by the swarm."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from inferencemesh.cli.logs import setup_logging


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "client",
        help="generate text through the swarm",
        description="Embed the prompt locally, run the blocks on a chain of workers found through the "
        "DHT, sample locally. Streams the text unless --json is given.",
    )
    parser.add_argument(
        "--bootstrap",
        action="append",
        required=True,
        metavar="ADDR",
        help="DHT bootstrap node, HOST:PORT or /ip4/IP/udp/PORT[/p2p/ID] (repeatable)",
    )
    parser.add_argument(
        "--model-path",
        required=True,
        metavar="DIR",
        help="HF model directory (the client reads only embeddings, final norm, LM head)",
    )
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default: 64")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1.0 = off (default)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="default: 1.0")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device of the embeddings and LM head: cpu (default), cuda or cuda:N",
    )
    parser.add_argument("--host", default="127.0.0.1", help="local address to bind (default: 127.0.0.1)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    from inferencemesh.client.model import DistributedModelForCausalLM
    from inferencemesh.compute.sampling import SamplingParams

    try:
        sampling = SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stream = None if args.json else lambda text: print(text, end="", flush=True)
    try:
        with DistributedModelForCausalLM.from_pretrained(
            args.model_path, args.bootstrap, device=args.device, host=args.host
        ) as model:
            result = model.generate(
                args.prompt,
                max_new_tokens=args.max_new_tokens,
                chat=args.chat,
                sampling=sampling,
                ignore_eos=args.ignore_eos,
                on_text=stream,
            )
    except Exception as exc:
        logging.getLogger("inferencemesh.client").debug("generation failed", exc_info=True)
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "prompt_token_ids": result.prompt_token_ids,
                    "token_ids": result.token_ids,
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "ttft_s": result.ttft_s,
                    "decode_tokens_per_s": result.decode_tokens_per_s,
                    "route": result.route,
                    "failovers": result.failovers,
                }
            )
        )
    else:
        print(
            f"\n[{len(result.token_ids)} tokens, first after {result.ttft_s * 1000:.0f} ms, "
            f"{result.decode_tokens_per_s:.1f} tok/s, {result.failovers} failovers]",
            file=sys.stderr,
        )
    return 0
