#!/usr/bin/env python3
"""The GPU lock: our stack resolved by pip against vLLM 0.9.1's own requirement set, for the vllm/vllm-openai:v0.9.1
image (Python 3.12, Linux x86_64). The image's torch, vllm, xformers, flashinfer, triton and CUDA libraries are the
image's; the lock pins everything else, exactly.

    python overlays/stack/gpu_lock.py write    # resolve gpu-requirements.txt + vllm==0.9.1 -> gpu-stack.lock
    python overlays/stack/gpu_lock.py check    # re-resolve gpu-stack.lock + the image pins (dry run); exit 1 on a
                                               # conflict or when the resolution adds or changes a package

Both are `pip install --dry-run --report` with --python-version 3.12 and manylinux platforms, so they run on any
machine with PyPI access and install nothing. sdist-only packages (deepspeed, timeout-decorator) cannot be resolved
that way; install.sh installs them pinned with --no-deps and their runtime needs are in gpu-requirements.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

STACK = Path(__file__).resolve().parent
REQUIREMENTS = STACK / "gpu-requirements.txt"
LOCK = STACK / "gpu-stack.lock"
# What vllm/vllm-openai:v0.9.1 brings and install.sh never touches (vLLM 0.9.1 pins torch 2.7.0 and xformers 0.0.30).
IMAGE_PINS = ["vllm==0.9.1", "torch==2.7.0", "torchvision==0.22.0", "torchaudio==2.7.0", "xformers==0.0.30"]
IMAGE_OWNED = re.compile(r"^(torch|torchvision|torchaudio|vllm|xformers|triton|flashinfer.*|nvidia-(?!ml-py$).*|setuptools|pip)$")
PLATFORMS = ["manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_12_x86_64",
             "manylinux2010_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve(requirement_args: list[str]) -> dict[str, str]:
    """{canonical name: version} of everything pip would install for these requirements on the image's Python."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--target", str(Path(tmp) / "target"), "--report", str(report),
               "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        env = {**os.environ, "PIP_CONSTRAINT": ""}  # resolve against the registry alone, no local caps
        proc = subprocess.run(cmd + requirement_args, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR") or "conflict" in l.lower()]
            raise SystemExit("gpu_lock: pip could not resolve: " + " | ".join(errors[-6:] or [proc.stderr[-500:]]))
        items = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def read_lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def write() -> int:
    resolved = resolve(["-r", str(REQUIREMENTS), *IMAGE_PINS])
    lines = [f"{name}=={version}" for name, version in sorted(resolved.items()) if not IMAGE_OWNED.match(name)]
    header = ["# GPU lock (Python 3.12, Linux x86_64) for the vllm/vllm-openai:v0.9.1 image: gpu-requirements.txt",
              "# resolved by pip together with " + " ".join(IMAGE_PINS) + ".",
              "# The image's torch, vllm, xformers, flashinfer, triton and nvidia-* packages are not in it: install.sh",
              "# keeps them. Regenerate: python overlays/stack/gpu_lock.py write; CI re-resolves it (tests/test_gpu_lock.py)."]
    tmp = LOCK.with_suffix(".tmp")
    tmp.write_text("\n".join(header + lines) + "\n")
    os.replace(tmp, LOCK)
    print(f"gpu_lock: {len(lines)} pins written to {LOCK}")
    return 0


def check() -> tuple[dict[str, str], dict[str, str]]:
    """(lock, resolution of lock + image pins). The caller compares them."""
    lock = read_lock()
    return lock, resolve(["-r", str(LOCK), *IMAGE_PINS])


def drift(lock: dict[str, str], resolved: dict[str, str]) -> list[str]:
    """Packages the resolution adds or changes beyond the lock, image-owned ones aside."""
    out = []
    for name, version in sorted(resolved.items()):
        if IMAGE_OWNED.match(name):
            continue
        if lock.get(name) != version:
            out.append(f"{name}: lock {lock.get(name, 'missing')}, resolved {version}")
    return out + [f"{name}: in the lock, not resolved" for name in sorted(set(lock) - set(resolved))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["write", "check"])
    args = p.parse_args()
    if args.action == "write":
        return write()
    lock, resolved = check()
    problems = drift(lock, resolved)
    for line in problems:
        print(f"gpu_lock: {line}")
    print(f"gpu_lock: {len(lock)} pins {'resolve' if not problems else 'DO NOT resolve'} with {' '.join(IMAGE_PINS)}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
