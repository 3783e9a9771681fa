"""`eep bench steady` serves one request set through both data planes and reports consistent figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from eep.model.default_model import init_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("m") / "qwen3_moe", "qwen3_moe")


def test_bench_steady_both_backends_writes_consistent_json(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "steady.json"
    cmd = [
        sys.executable, "-m", "eep", "bench", "steady", "--model-path", str(model_dir), "--ep-size", "2",
        "--ep-backend", "both", "--num-requests", "6", "--prompt-len", "9", "--output-len", "7",
        "--dtype", "float32", "--json", str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result == json.loads(done.stdout)  # printed and written alike
    assert result["outputs_identical"] is True  # shm and gloo serve the same greedy tokens
    for backend in ("shm", "gloo"):
        stats = result[backend]
        assert stats["decode_steps"] == 7 - 1  # the first token comes from the prefill step
        for key in ("decode_tokens_per_s", "step_ms_median", "step_ms_p99", "exchange_ms_median",
                    "exchange_critical_ms_median"):
            assert math.isfinite(stats[key]) and stats[key] > 0, (backend, key)
        assert stats["step_ms_p99"] >= stats["step_ms_median"]
        assert stats["exchange_critical_ms_median"] <= stats["exchange_ms_median"] < stats["step_ms_p99"]
    shm, gloo = result["shm"], result["gloo"]
    assert result["throughput_ratio"] == pytest.approx(shm["decode_tokens_per_s"] / gloo["decode_tokens_per_s"])
    assert result["exchange_speedup"] == pytest.approx(
        gloo["exchange_critical_ms_median"] / shm["exchange_critical_ms_median"]
    )


def test_bench_steady_one_backend_has_no_ratios(model_dir: Path) -> None:
    from eep.bench.steady import run_steady_bench

    result = run_steady_bench(
        str(model_dir), ep_size=2, backends=("shm",), num_requests=2, prompt_len=4, output_len=3, dtype="float32"
    )
    assert result["exchange_speedup"] is None and result["throughput_ratio"] is None
    assert "gloo" not in result and result["shm"]["decode_steps"] == 2
