"""Draw the pipeline schedules of ``spmd.parallel.pipeline``: stages x time, each cell a forward
(blue) or backward (orange) of one microbatch, the bubble left blank and shaded. In the
interleaved schedule a cell is one chunk (half a stage here): the darker shade is the second.

    python examples/pipeline_schedule.py [out.png]
"""
import argparse

import matplotlib

matplotlib.use("Agg")                   # files only: no window
import matplotlib.pyplot as plt         # noqa: E402
import numpy as np                      # noqa: E402

from spmd.parallel import pipeline      # noqa: E402

STAGES, MICROBATCHES, CHUNKS = 4, 8, 2
KINDS = ("gpipe", "1f1b", "interleaved")


def draw(ax, kind):
    chunks = CHUNKS if kind == "interleaved" else 1
    forward, backward = pipeline.schedule(STAGES, MICROBATCHES, kind, chunks=chunks)
    fraction = pipeline.bubble_fraction(forward, backward)
    width = 1 / chunks                                         # a unit is one chunk
    if chunks > 1:
        shades = pipeline.schedule_chunks(STAGES, MICROBATCHES, chunks)
    else:
        shades = (np.zeros_like(forward), np.zeros_like(backward))
    ax.set_facecolor("0.85")                                   # the bubble: shaded
    colors = (("tab:blue", "navy"), ("tab:orange", "saddlebrown"))
    for table, shade, color in zip((forward, backward), shades, colors):
        for stage, unit in zip(*np.nonzero(table >= 0)):
            ax.add_patch(plt.Rectangle((unit * width, stage), width, 1,
                                       color=color[shade[stage, unit] % 2], ec="white"))
            ax.text((unit + 0.5) * width, stage + 0.5, str(table[stage, unit]), ha="center",
                    va="center", fontsize=7 if chunks == 1 else 5, color="white")
    span = forward.shape[1] * width
    title = f"{kind}: p={STAGES}, m={MICROBATCHES}" + (f", v={chunks}" if chunks > 1 else "")
    ax.set(xlim=(0, span), ylim=(STAGES, 0), ylabel="stage",
           xlabel="time (one forward or backward of a stage on a microbatch)",
           xticks=range(0, int(span) + 1, 2), yticks=np.arange(STAGES) + 0.5,
           yticklabels=range(STAGES), title=f"{title}, bubble {fraction:.0%}")
    return fraction


def main(path="pipeline_schedule.png"):
    fig, axes = plt.subplots(len(KINDS), 1, figsize=(10, 6.5), sharex=True,
                             constrained_layout=True)
    fractions = {kind: draw(ax, kind) for ax, kind in zip(axes, KINDS)}
    fig.savefig(path, dpi=100)
    plt.close(fig)
    for kind, fraction in fractions.items():
        print(f"{kind}: bubble fraction {fraction:.3f}")
    print(f"wrote {path}")
    return fractions


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="pipeline_schedule.png", help="the PNG to write")
    main(parser.parse_args().out)
