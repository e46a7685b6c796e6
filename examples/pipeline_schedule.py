"""Draw the pipeline schedules of ``spmd.parallel.pipeline``: stages x time, each cell a forward
(blue) or backward (orange) of one microbatch, the bubble left blank and shaded.

    python examples/pipeline_schedule.py [out.png]
"""
import sys

import matplotlib

matplotlib.use("Agg")                   # files only: no window
import matplotlib.pyplot as plt         # noqa: E402
import numpy as np                      # noqa: E402

from spmd.parallel import pipeline      # noqa: E402

STAGES, MICROBATCHES = 4, 8


def draw(ax, kind):
    forward, backward = pipeline.schedule(STAGES, MICROBATCHES, kind)
    fraction = pipeline.bubble_fraction(forward, backward)
    ax.set_facecolor("0.85")                                   # the bubble: shaded
    for table, color in ((forward, "tab:blue"), (backward, "tab:orange")):
        for stage, unit in zip(*np.nonzero(table >= 0)):
            ax.add_patch(plt.Rectangle((unit, stage), 1, 1, color=color, ec="white"))
            ax.text(unit + 0.5, stage + 0.5, str(table[stage, unit]), ha="center",
                    va="center", fontsize=7, color="white")
    ax.set(xlim=(0, forward.shape[1]), ylim=(STAGES, 0), ylabel="stage",
           xlabel="time (one forward or backward of a stage on a microbatch)",
           xticks=range(0, forward.shape[1] + 1, 2), yticks=np.arange(STAGES) + 0.5,
           yticklabels=range(STAGES),
           title=f"{kind}: p={STAGES}, m={MICROBATCHES}, bubble {fraction:.0%}")
    return fraction


def main(path="pipeline_schedule.png"):
    fig, axes = plt.subplots(2, 1, figsize=(10, 4.5), constrained_layout=True)
    fractions = {kind: draw(ax, kind) for ax, kind in zip(axes, ("gpipe", "1f1b"))}
    fig.savefig(path, dpi=100)
    plt.close(fig)
    for kind, fraction in fractions.items():
        print(f"{kind}: bubble fraction {fraction:.3f}")
    print(f"wrote {path}")
    return fractions


if __name__ == "__main__":
    main(*sys.argv[1:])
