"""What `pip install` gives: the package's data in the wheel, the console commands, and the notebook
app's launch command named by the README."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The command lines of the README's first code block."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_the_wheel_carries_presets_demo_model_tokenizers_and_images(tmp_path):
    # built from a copy: a build/ folder left in the checkout would hand the wheel stale files
    source = tmp_path / "source"
    shutil.copytree(ROOT / "magma_ipu", source / "magma_ipu", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("magma_ipu/configs/demo.yml", "magma_ipu/configs/magma_v1_500.yml",
                 "magma_ipu/assets/demo/mp_rank_00_model_states.pt", "magma_ipu/assets/demo/tokenizer.json",
                 "magma_ipu/assets/gpt2/tokenizer.json", "magma_ipu/assets/gpt2/LICENSE",
                 "magma_ipu/assets/demo_images/scene_1.png", "magma_ipu/model/gptj.py", "magma_ipu/demo/scenes.py",
                 "magma_ipu/benchmark/cli.py"):
        assert name in names, name
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)


@pytest.mark.parametrize("command", ["magma", "magma-benchmark"])
def test_console_commands_are_installed(command):
    assert shutil.which(command), f"{command} is not on PATH: pip install -e . installs it"
    out = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith(f"usage: {command}"), out.stderr


def test_the_readme_installs_the_app_and_its_launch_command_exists():
    install, _tests = readme_commands()[:2]
    assert '-e ".[app]"' in install and "run_inference.py" in install
    launch = next(line for line in readme_commands() if "magma_interactive.ipynb" in line)
    program = launch.split()[0]
    assert shutil.which(program), f"{program} (the README's app command) is not installed"
    out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
