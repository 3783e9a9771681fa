"""The `eep` console script as a user runs it: real subprocesses, a private cache directory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EEP = [sys.executable, "-m", "eep"]


def _run(args: list[str], cache: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EEP_CACHE_DIR": str(cache)}
    return subprocess.run(EEP + args, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_help_lists_commands(cache: Path) -> None:
    out = _run(["--help"], cache)
    assert out.returncode == 0
    for command in ("generate", "model", "bench"):
        assert command in out.stdout


def test_generate_creates_default_model_and_is_deterministic(cache: Path) -> None:
    args = ["generate", "--prompt", "Expert parallelism", "--max-tokens", "12"]
    first = _run(args, cache)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip(), "no text generated"
    assert (cache / "models" / "eep-tiny-qwen3_moe-v1" / "config.json").exists()
    assert "loading" in first.stderr  # the progress bar / log of the load
    second = _run(args, cache)
    assert second.stdout == first.stdout  # greedy: same text on the reused model


def test_generate_expert_parallel_matches_single_process(cache: Path) -> None:
    args = ["generate", "--prompt", "Expert parallelism", "--prompt", "x", "--max-tokens", "8", "--dtype", "float32"]
    single = _run(args, cache)
    ep = _run(args + ["--ep-size", "4", "--ep-num-redundant-experts", "8"], cache)
    assert ep.returncode == 0, ep.stderr
    assert ep.stdout == single.stdout and len(ep.stdout.splitlines()) == 2


def test_seeded_sampling_is_reproducible(cache: Path) -> None:
    args = ["generate", "--prompt", "Hello", "--max-tokens", "16", "--temperature", "1.0", "--seed", "7"]
    a, b = _run(args, cache), _run(args, cache)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout


def test_model_init_deepseek(cache: Path, tmp_path: Path) -> None:
    out = _run(["model", "init", "--arch", "deepseek_v3", "--out", str(tmp_path / "ds")], cache)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "ds" / "model.safetensors").exists()
    gen = _run(["generate", "--model-path", str(tmp_path / "ds"), "--prompt", "MLA", "--max-tokens", "4"], cache)
    assert gen.returncode == 0, gen.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["generate", "--model-path", "/nonexistent/eep-model", "--prompt", "x"], "/nonexistent/eep-model"),
        (["generate", "--prompt", "x", "--max-tokens", "0"], "max_tokens"),
        (["generate", "--prompt", "x", "--top-p", "0"], "top_p"),
    ],
)
def test_bad_input_is_a_clear_error_not_a_traceback(cache: Path, args: list[str], fragment: str) -> None:
    out = _run(args, cache)
    assert out.returncode == 2
    assert fragment in out.stderr and "Traceback" not in out.stderr


def test_sigterm_inside_exec_of_a_string_still_exits_130(tmp_path: Path) -> None:
    # SIGTERM lands while code built by exec() runs (as when a lazy import builds a dataclass):
    # a plain KeyboardInterrupt there makes CPython 3.11 exit by SIGINT (-2) whatever main returned
    # (run with -m as `python -m eep` is: a script file reaches its exit by another path)
    (tmp_path / "prog.py").write_text(textwrap.dedent("""
        import argparse
        import eep.cli as cli

        def command(args):
            exec("import os, signal\\nos.kill(os.getpid(), signal.SIGTERM)\\nfor _ in range(10**7): pass")
            return 0

        argparse.ArgumentParser.parse_args = lambda self, argv=None: argparse.Namespace(verbose=False, func=command)
        raise SystemExit(cli.main([]))
    """))
    out = subprocess.run([sys.executable, "-m", "prog"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 130, out.stderr
    assert "eep: interrupted" in out.stderr
