"""`python -m eval.chat` driven in a pseudo-terminal like a user would: an image question, a follow-up, RESET, EXIT."""
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from eval.chat import INPUT_PROMPT, PROMPT_BEGIN, PROMPT_END

REPO = Path(__file__).resolve().parent.parent
QUESTION, FOLLOW_UP = "What is in the image?", "What colour is it?"


def ask(child: pexpect.spawn, text: str) -> tuple[str, str]:
    """Type a message and the closing empty line; return (rendered prompt, streamed reply)."""
    child.sendline(text)
    child.sendline("")
    child.expect_exact(PROMPT_BEGIN)
    child.expect_exact(PROMPT_END)
    prompt = child.before.replace("\r\n", "\n").strip("\n")
    child.expect_exact(INPUT_PROMPT)
    return prompt, child.before.replace("\r\n", "\n").strip()


def exit_chat(child: pexpect.spawn) -> None:
    """EXIT, then the empty line that ends the input; the chat says goodbye and the process ends."""
    child.sendline("EXIT")
    child.sendline("")
    child.expect_exact("Log: Exit!")
    child.expect(pexpect.EOF)


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def test_chat_about_an_image_with_follow_up_reset_and_exit(backend, tiny_merged, sample_images, venv_env):
    extra = ["--max-model-len", "2048", "--enforce-eager"] if backend == "vllm" else []
    env = {**venv_env, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
    args = ["-m", "eval.chat", "--model", str(tiny_merged), "--image", str(sample_images[0]), "--backend", backend,
            "--greedy", "--max-new-tokens", "8", "--show-prompt", *extra]
    child = pexpect.spawn(sys.executable, args, env=env, cwd=str(REPO), encoding="utf-8", echo=False, timeout=600)
    child.delayafterterminate = 2  # a loaded engine can take more than pexpect's default 0.1 s to die
    try:
        child.expect_exact(INPUT_PROMPT)
        assert f"qwen2_5_vl_merge checkpoint on {backend}; greedy" in child.before

        first_prompt, first_reply = ask(child, QUESTION)
        assert first_prompt.count("<|image_pad|>") == 1 and QUESTION in first_prompt and first_reply

        follow_prompt, follow_reply = ask(child, FOLLOW_UP)
        assert follow_prompt.count("<|image_pad|>") == 1  # the image stays attached to the first turn only
        history_end = follow_prompt.index(first_reply) + len(first_reply)
        assert follow_prompt.index(QUESTION) < history_end < follow_prompt.index(FOLLOW_UP)
        assert follow_reply

        child.sendline("RESET")
        child.sendline("")
        child.expect_exact("Log: History responses have been removed!")
        child.expect_exact(INPUT_PROMPT)
        reset_prompt, reset_reply = ask(child, QUESTION)
        assert (reset_prompt, reset_reply) == (first_prompt, first_reply)  # nothing left of the history; greedy

        exit_chat(child)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_chat_rejects_a_missing_image_in_one_line(tiny_merged, venv_env, tmp_path):
    missing = tmp_path / "nope.png"
    done = subprocess.run([sys.executable, "-m", "eval.chat", "--model", str(tiny_merged), "--image", str(missing)],
                          check=False, env=venv_env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: image not found: {missing}"
