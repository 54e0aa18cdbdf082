"""The serving layer's lifecycle diagram (docs/serving_states.png), drawn from the table below.

The states and transitions are data here, so the picture and docs/SERVING.md change together:
edit TRANSITIONS, run `.venv/bin/python docs/diagrams/serving_states.py`, commit both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUTPUT = Path(__file__).resolve().parents[1] / "serving_states.png"

#: State -> (x, y, colour, one-line meaning).
STATES = {
    "EVICTED": (0.0, 2.0, "#d9e8f5", "not in memory;\nloads on its next request"),
    "LOADING": (5.0, 2.0, "#fff2cc", "sessions opening\n(one load at a time)"),
    "READY": (10.0, 2.0, "#d5ecd4", "loaded and serving"),
    "UNAVAILABLE": (5.0, -1.6, "#f6d5d5", "will not load until\nsomeone acts"),
}

#: (from, to, label, label position, arc). A positive arc bends the arrow to its right.
TRANSITIONS = [
    ("EVICTED", "LOADING", "a request, the start,\nor an explicit load", (2.5, 2.75), -0.25),
    ("LOADING", "EVICTED", "no room in the budget:\n503 + Retry-After", (2.5, 1.2), -0.25),
    ("LOADING", "READY", "opened", (7.5, 2.25), 0.0),
    ("READY", "EVICTED", "evicted for room (least recently used, idle)  ·  idle past its keep-alive  ·  keep_alive 0", (5.0, 4.25), 0.45),
    ("LOADING", "UNAVAILABLE", "failed to load", (5.85, 0.25), 0.0),
    ("READY", "UNAVAILABLE", "undeploy · V2 unload ·\nremoved from the repository", (8.9, -0.05), -0.15),
    ("UNAVAILABLE", "EVICTED", "deploy · V2 load ·\nnew version published", (1.1, -0.05), -0.15),
]
#: Not a transition: what happens while READY.
READY_NOTE = "a new version loads beside it\nand then replaces it"

BOX_W, BOX_H = 2.6, 1.0


def _box(ax: plt.Axes, name: str) -> FancyBboxPatch:
    x, y, colour, meaning = STATES[name]
    box = FancyBboxPatch(
        (x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H, boxstyle="round,pad=0.05", facecolor=colour, edgecolor="#333333", zorder=2
    )
    ax.add_patch(box)
    ax.text(x, y + 0.2, name, ha="center", va="center", fontsize=12, fontweight="bold", zorder=3)
    ax.text(x, y - 0.2, meaning, ha="center", va="center", fontsize=7.5, zorder=3)
    return box


def render(output: Path = OUTPUT) -> Path:
    figure, ax = plt.subplots(figsize=(12, 6.4))
    boxes = {name: _box(ax, name) for name in STATES}
    for source, target, label, (label_x, label_y), arc in TRANSITIONS:
        ax.add_patch(
            FancyArrowPatch(
                STATES[source][:2], STATES[target][:2], patchA=boxes[source], patchB=boxes[target],
                connectionstyle=f"arc3,rad={arc}", arrowstyle="-|>", mutation_scale=16, color="#333333", zorder=1,
            )
        )
        ax.text(label_x, label_y, label, ha="center", va="center", fontsize=8.5, zorder=4,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.9, "pad": 1.5})
    x, y, *_ = STATES["READY"]
    ax.text(x + 0.7, y + 1.0, READY_NOTE, ha="center", va="center", fontsize=8, style="italic")
    ax.set_xlim(-1.7, 11.7)
    ax.set_ylim(-2.4, 4.7)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("A model's lifecycle in the serving layer (appliance/serving/states.py)", fontsize=11)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


if __name__ == "__main__":
    print(render(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT))
