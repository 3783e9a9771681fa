"""What every bench record carries, and the collector's state around a timed run.

`provenance` is where and when a record was made. `frozen_gc` keeps the cyclic garbage
collector off the objects that exist when a run starts (a full collection over torch's
objects stalls the bench's own clocks by ~50-80 ms, which the token timeline would show as a
pause of the server) and gives the caller its collector back as it was, also when the run fails.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Iterator
from typing import Any


def provenance() -> dict[str, Any]:
    """Where and when a record was made."""
    import torch

    return {"torch_version": torch.__version__, "cpu_count": os.cpu_count(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Collect, freeze what is left into the permanent generation, and unfreeze on the way out."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def save_timeline_plot(fig: Any, ax: Any, path: str) -> None:
    """The common frame of a bench's tokens/s picture (axes, grid, legend), written to `path`."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    ax.set_xlabel("time since the load started (s)")
    ax.set_ylabel("tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
