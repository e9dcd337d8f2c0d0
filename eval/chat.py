"""Chat with a Qwen-Merge checkpoint about an image, in the terminal (like `xtuner chat`).

    python -m eval.chat --model CKPT_DIR --image cat.jpg [--backend hf|vllm] [--greedy] [--no-thinking]

Type a message and end it with an empty line (double enter). EXIT leaves, RESET forgets the conversation (the
image is attached again to the next message). The reply streams as it is generated, thought included; later turns
see only the answers of earlier ones (the chat template drops thoughts from history).
"""
from __future__ import annotations

import argparse
import os
import sys

from .generation import CheckpointError, SamplingSettings, describe, load_backend, load_image

INPUT_PROMPT = "double enter to end input (EXIT: exit chat, RESET: reset history) >>> "
PROMPT_BEGIN, PROMPT_END = "----- prompt -----", "----- end of prompt -----"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.chat", description=__doc__.split("\n\n")[0],
                                     epilog="Sampling defaults come from the checkpoint: Qwen-Merge uses Qwen3's "
                                            "thinking settings (temperature 0.6, top_p 0.95, top_k 20).")
    parser.add_argument("--model", required=True, help="checkpoint directory (Qwen-Merge or stock Qwen2/2.5-VL)")
    parser.add_argument("--image", help="image file or URL attached to the first message (optional)")
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="transformers or vLLM (default: hf)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--no-thinking", action="store_true", help="ask the model to answer without thinking")
    parser.add_argument("--max-new-tokens", type=int, default=8192, help="per reply (default: 8192)")
    parser.add_argument("--answer-budget", type=int, default=1024,
                        help="tokens for the answer when a thought runs out of budget (0: none; default: 1024)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, help="top-k sampling (0: off)")
    parser.add_argument("--seed", type=int, help="sampling seed (each reply uses it)")
    parser.add_argument("--min-pixels", type=int, help="smallest image area in pixels (default: the processor's)")
    parser.add_argument("--max-pixels", type=int, help="largest image area in pixels (default: the processor's)")
    parser.add_argument("--dtype", default="auto", help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--max-model-len", type=int, help="vLLM: context length (default: the model's)")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM: no CUDA graphs / compilation")
    parser.add_argument("--show-prompt", action="store_true", help="print each rendered prompt before the reply")
    return parser.parse_args(argv)


def read_message() -> str | None:
    """Lines up to an empty line; None at end of input."""
    print(INPUT_PROMPT, end="", flush=True)
    lines = []
    while True:
        try:
            line = input()
        except EOFError:
            return "\n".join(lines) if lines else None
        if line.strip() == "" and lines:
            return "\n".join(lines)
        if line.strip():
            lines.append(line)


def stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat(args: argparse.Namespace) -> int:
    image = load_image(args.image, args.min_pixels, args.max_pixels) if args.image else None
    options = {"dtype": args.dtype}
    if args.backend == "vllm":
        options.update(max_model_len=args.max_model_len, enforce_eager=args.enforce_eager)
    backend = load_backend(args.model, args.backend, **options)
    settings = SamplingSettings.for_checkpoint(
        backend.info, greedy=True if args.greedy else None, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    print(f"Log: {backend.info.model_type} checkpoint on {args.backend}; {describe(settings)}", flush=True)

    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    while True:
        text = read_message()
        if text is None or text.strip() == "EXIT":
            print("Log: Exit!")
            return 0
        if text.strip() == "RESET":
            history = []
            print("Log: History responses have been removed!")
            continue
        attach = image is not None and not history
        content = ([{"type": "image"}] if attach else []) + [{"type": "text", "text": text}]
        history.append({"role": "user", "content": content})
        prompt = backend.render(system + history, enable_thinking=not args.no_thinking)
        if args.show_prompt:
            print(f"{PROMPT_BEGIN}\n{prompt}\n{PROMPT_END}", flush=True)
        reply = backend.reply(prompt, [image] if image is not None else [], settings, args.answer_budget,
                              on_text=stream_to_stdout)
        print("\n", flush=True)
        history.append({"role": "assistant", "content": reply.text})


def quiet_libraries() -> None:
    """Keep library warnings out of the conversation (TRANSFORMERS_VERBOSITY / VLLM_LOGGING_LEVEL override this)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        from transformers.utils import logging as transformers_logging
        transformers_logging.set_verbosity_error()


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    try:
        return chat(args)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nLog: Exit!")
        return 130


if __name__ == "__main__":  # vLLM's V1 engine starts processes that re-import this module
    sys.exit(main())
