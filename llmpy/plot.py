"""`llmpy plot`: train loss, val loss and HellaSwag accuracy from main.log files, as a PNG.

The counterpart of llm.c's dev/vislog.ipynb. It reads the training loop's main.log
(llm.c's line format: `s:%d trl:%.4f lr:%.6f norm:%.2f`, `s:%d tel:%.4f`, `s:%d eval:%.4f`),
overlays several runs, and draws OpenAI's GPT-2 results as dashed horizontal lines.

Restarts: a resumed run (-y 1) appends to main.log from its checkpoint step, so the steps in
the file go back. The records of the abandoned attempt from that step on are dropped (the
later record for a step wins), so a curve never zig-zags back in time.

matplotlib is an optional extra (`pip install llmpy[plot]`); only the Agg backend is used,
through a Figure object, so no display and no pyplot state are involved.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LlmpyError

# OpenAI GPT-2 results (../shared/LLMC_FACTS.md): val loss on FineWeb val and HellaSwag.
BASELINE_VAL_LOSS = {"124M": 3.4250, "1558M": 2.8313}
BASELINE_HELLASWAG = {"124M": 0.2945, "350M": 0.3752, "774M": 0.4320, "1558M": 0.4889}
SIZES = ("124M", "350M", "774M", "1558M")
# --model -> the GPT-2 size to compare with (the GPT-3 125M miniseries model is GPT-2 124M's
# peer; the HF names are the released GPT-2 checkpoints).
MODEL_SIZES = {"d12": "124M", "d24": "350M", "d36": "774M", "d48": "1558M",
               "gpt3:c768": "124M", "gpt2": "124M", "gpt2-medium": "350M",
               "gpt2-large": "774M", "gpt2-xl": "1558M",
               **{s: s for s in SIZES}}

LINE_RE = re.compile(r"^s:(\d+)\s+(trl|tel|eval):(\S+)")
EXAMPLE_LINES = "'s:0 trl:10.9876 lr:0.000600 norm:5.12', 's:250 tel:4.1234', 's:250 eval:0.2750'"


# ----------------------------------------------------------------------------------------
# parsing

@dataclass
class RunLog:
    """One run's records, each a step-sorted list of (step, value)."""
    path: Path
    label: str
    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    hellaswag: list[tuple[int, float]] = field(default_factory=list)
    restarts: list[int] = field(default_factory=list)   # steps a resumed run started from
    skipped_lines: int = 0                              # lines that are not records


KINDS = {"trl": "train", "tel": "val", "eval": "hellaswag"}


def resolve_log(path: str | Path) -> Path:
    """A main.log file, or a dir holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "main.log"
        if not p.is_file():
            raise LlmpyError(f"{path}: no main.log in this dir (expected the -o dir of "
                             f"`llmpy train`, or a main.log file)")
    elif not p.is_file():
        raise LlmpyError(f"{path}: no such file or dir (expected a main.log file or a dir "
                         f"holding one)")
    return p


def parse_log(path: str | Path, label: str | None = None) -> RunLog:
    """Read a main.log. When the step goes back (a resume from an earlier checkpoint), every
    record of the earlier attempt at that step or later is dropped."""
    p = resolve_log(path)
    records = {kind: {} for kind in KINDS.values()}    # kind -> {step: value}
    restarts, skipped, last_step = [], 0, -1
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LINE_RE.match(line.strip())
            if not m:
                skipped += bool(line.strip())
                continue
            step, kind, text = int(m.group(1)), KINDS[m.group(2)], m.group(3)
            try:
                value = float(text)
            except ValueError:
                skipped += 1
                continue
            if step < last_step:
                restarts.append(step)
                for rec in records.values():
                    for s in [s for s in rec if s >= step]:
                        del rec[s]
            last_step = step
            records[kind][step] = value
    if not any(records.values()):
        raise LlmpyError(f"{p}: no parseable lines (expected llm.c main.log lines like "
                         f"{EXAMPLE_LINES})")
    run = RunLog(path=p, label=label or default_label(p), restarts=restarts,
                 skipped_lines=skipped)
    for kind, rec in records.items():
        setattr(run, kind, sorted(rec.items()))
    return run


def default_label(log: Path) -> str:
    """The run's dir name (log124M/main.log -> log124M); a file's stem when it is not
    called main.log."""
    if log.name != "main.log":
        return log.stem
    return log.resolve().parent.name


def smooth(values: list[float], n: int) -> list[float]:
    """Centered mean over a window of n points (shrinking at the ends, so no lag and no
    shift); nan points stay nan and are left out of their neighbours' means."""
    finite = [v if math.isfinite(v) else 0.0 for v in values]
    ok = [1 if math.isfinite(v) else 0 for v in values]
    csum, ccount = [0.0], [0]
    for v, c in zip(finite, ok):
        csum.append(csum[-1] + v)
        ccount.append(ccount[-1] + c)
    half, out = n // 2, []
    for i, v in enumerate(values):
        lo, hi = max(0, i - half), min(len(values), i - half + n)
        count = ccount[hi] - ccount[lo]
        out.append((csum[hi] - csum[lo]) / count if math.isfinite(v) and count else math.nan)
    return out


# ----------------------------------------------------------------------------------------
# baselines

def pick_baseline(choice: str, model: str | None, labels: list[str]) -> str | None:
    """--baseline SIZE|none|auto. auto: by --model when given, else by a size named in every
    run's label (log_gpt2_124M -> 124M, as the scripts/ name their dirs), else none."""
    if choice == "none":
        return None
    if choice in SIZES:
        return choice
    if model:
        if model not in MODEL_SIZES:
            raise LlmpyError(f"--model: expected one of {', '.join(MODEL_SIZES)}, got {model!r}")
        return MODEL_SIZES[model]
    found = {s for s in SIZES for lab in labels if re.search(rf"(?<!\d){s}", lab)}
    if len(found) == 1 and all(next(iter(found)) in lab for lab in labels):
        return found.pop()
    return None


# ----------------------------------------------------------------------------------------
# drawing

def _import_matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LlmpyError("plotting needs matplotlib, which is not installed: "
                         "pip install llmpy[plot]  (or: pip install matplotlib)") from None
    return matplotlib, Figure, FigureCanvasAgg


def _loss_ylim(curves: list[list[tuple[int, float]]]) -> tuple[float, float] | None:
    """Every finite value of every curve, the first steps included (the fall from ln(V) ~
    10.8 is part of the story; `--ylim LO HI` zooms in on the rest)."""
    values = [v for curve in curves for _, v in curve if math.isfinite(v)]
    if not values:
        return None
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) or 0.05
    return lo - pad, hi + pad


def plot_runs(runs: list[RunLog], out: str | Path, *, smooth_n: int = 0,
              baseline: str | None = None, title: str | None = None,
              ylim: tuple[float, float] | None = None) -> Path:
    """Draw the panels (train loss; val loss if any run has it; HellaSwag if any run has it)
    and write the image. Returns the output path."""
    _, Figure, FigureCanvasAgg = _import_matplotlib()
    from matplotlib.ticker import MaxNLocator
    has_val = any(r.val for r in runs)
    has_hs = any(r.hellaswag for r in runs)
    panels = ["train"] + (["val"] if has_val else []) + (["hellaswag"] if has_hs else [])
    fig = Figure(figsize=(5.6 * len(panels), 4.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = dict(zip(panels, fig.subplots(1, len(panels), squeeze=False, sharex=True)[0]))
    colors = [f"C{i}" for i in range(10)]

    train_drawn = []
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        ax = axes["train"]
        if run.train:
            steps, losses = zip(*run.train)
            if smooth_n > 1:
                ax.plot(steps, losses, color=color, alpha=0.25, lw=0.8)
                shown = smooth(list(losses), smooth_n)
            else:
                shown = list(losses)
            ax.plot(steps, shown, color=color, lw=1.4, label=run.label)
            train_drawn.append(run.train)
            for s in run.restarts:
                ax.axvline(s, color=color, alpha=0.35, lw=0.8, ls=":")
        if run.val:
            steps, losses = zip(*run.val)
            axes["val"].plot(steps, losses, color=color, lw=1.4, marker="o", ms=2.5,
                             label=f"{run.label} (min {_best(losses, min):.4f})")
        if run.hellaswag:
            steps, accs = zip(*run.hellaswag)
            axes["hellaswag"].plot(steps, accs, color=color, lw=1.4, marker="o", ms=2.5,
                                   label=f"{run.label} (max {_best(accs, max):.4f})")

    ax = axes["train"]
    ax.set_title("train loss" + (f" (mean of {smooth_n} steps)" if smooth_n > 1 else ""))
    ax.set_ylabel("loss")
    lim = ylim or _loss_ylim(train_drawn + [r.val for r in runs])
    if lim:
        ax.set_ylim(*lim)
    if has_val:
        axes["val"].set_title("val loss")
        axes["val"].set_ylabel("loss")
        if lim:
            axes["val"].set_ylim(*lim)
        if baseline in BASELINE_VAL_LOSS:
            v = BASELINE_VAL_LOSS[baseline]
            axes["val"].axhline(v, color="0.35", ls="--", lw=1.1,
                                label=f"OpenAI GPT-2 {baseline} ({v:.4f})")
            if lim and not lim[0] <= v <= lim[1]:
                axes["val"].set_ylim(min(lim[0], v - 0.05), max(lim[1], v + 0.05))
    if has_hs:
        ax = axes["hellaswag"]
        ax.set_title("HellaSwag accuracy")
        ax.set_ylabel("accuracy")
        ax.axhline(0.25, color="0.7", ls=":", lw=1.0, label="chance (0.25)")
        if baseline in BASELINE_HELLASWAG:
            v = BASELINE_HELLASWAG[baseline]
            ax.axhline(v, color="0.35", ls="--", lw=1.1,
                       label=f"OpenAI GPT-2 {baseline} ({v:.4f})")
    for ax in axes.values():
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
        ax.xaxis.set_major_formatter(_step_formatter())
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _best(values, pick) -> float:
    return pick((v for v in values if math.isfinite(v)), default=math.nan)


def _step_formatter():
    from matplotlib.ticker import FuncFormatter
    return FuncFormatter(lambda x, _: f"{x / 1000:g}k" if abs(x) >= 1000 else f"{x:g}")


def summary_line(run: RunLog) -> str:
    parts = [f"{run.label}: {run.path}"]
    if run.train:
        parts.append(f"{len(run.train)} train steps (last {run.train[-1][0]}, "
                     f"loss {run.train[-1][1]:.4f})")
    val = [r for r in run.val if math.isfinite(r[1])]
    if val:
        step, best = min(val, key=lambda r: r[1])
        parts.append(f"min val {best:.4f} @ {step}")
    hs = [r for r in run.hellaswag if math.isfinite(r[1])]
    if hs:
        step, best = max(hs, key=lambda r: r[1])
        parts.append(f"max HellaSwag {best:.4f} @ {step}")
    if run.restarts:
        parts.append(f"{len(run.restarts)} restart(s) at {', '.join(map(str, run.restarts))}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------------------
# command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 through the CLI
        raise LlmpyError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llmpy plot", description="Plot train/val loss and HellaSwag accuracy "
                "from main.log files (several runs overlaid).")
    p.add_argument("logs", nargs="+", metavar="LOGDIR_OR_FILE",
                   help="a run's output dir (its main.log) or a main.log file")
    p.add_argument("-o", "--out", default="plot.png", help="output image (.png, .svg, .pdf)")
    p.add_argument("--labels", default=None,
                   help="comma-separated legend names, one per run (default: dir names)")
    p.add_argument("--smooth", type=int, default=0, metavar="N",
                   help="show train loss as a centered mean of N steps (raw curve faint)")
    p.add_argument("--baseline", default="auto", choices=["auto", "none", *SIZES],
                   help="OpenAI GPT-2 results to draw; auto: by --model, else by a size in "
                        "the run names (log_gpt2_124M), else none")
    p.add_argument("--model", default=None,
                   help="the runs' model (d12, d24, d36, d48, gpt3:c768) for --baseline auto")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--ylim", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="loss axis range (default: every value, the first steps included)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.smooth < 0:
        raise LlmpyError(f"--smooth: expected a window of N >= 0 steps, got {args.smooth}")
    labels = [None] * len(args.logs)
    if args.labels is not None:
        labels = [s.strip() for s in args.labels.split(",")]
        if len(labels) != len(args.logs):
            raise LlmpyError(f"--labels: expected {len(args.logs)} names (one per run), got "
                             f"{len(labels)}: {args.labels!r}")
    runs = [parse_log(path, label) for path, label in zip(args.logs, labels)]
    if args.labels is None:
        _disambiguate(runs)
    baseline = pick_baseline(args.baseline, args.model, [r.label for r in runs])
    out = plot_runs(runs, args.out, smooth_n=args.smooth, baseline=baseline,
                    title=args.title, ylim=tuple(args.ylim) if args.ylim else None)
    for run in runs:
        print(summary_line(run))
    lim = tuple(args.ylim) if args.ylim else _loss_ylim([r.train for r in runs] +
                                                        [r.val for r in runs])
    if lim:
        print(f"loss axis: {lim[0]:.2f} .. {lim[1]:.2f}" + (" (--ylim)" if args.ylim else
                                                             " (every step; --ylim LO HI zooms)"))
    print(f"wrote {out}" + (f" (baseline: OpenAI GPT-2 {baseline})" if baseline else ""))
    return 0


def _disambiguate(runs: list[RunLog]) -> None:
    """Runs from dirs with the same name get their parent's name too (a/out, b/out)."""
    seen = {}
    for r in runs:
        seen.setdefault(r.label, []).append(r)
    for same in seen.values():
        if len(same) > 1:
            for r in same:
                parent = r.path.resolve().parent
                r.label = f"{parent.parent.name}/{r.label}" if r.path.name == "main.log" \
                    else f"{parent.name}/{r.label}"
