"""Study: does DIITO's gain over standard distillation grow, hold or vanish with training length?

The DIITO study (study_diito.py) trains students for 200 steps, where a standard student given 1.5×
the steps (the same wall time) matches DIITO. This study trains 3-layer students from one teacher
at longer budgets: per budget B and seed, standard distillation for B steps, DIITO FULL for B steps,
and standard for B × R steps, R being the DIITO / standard time per step that
`benchmarks/distill_step.py` measures (1.51, docs/benchmarks.md) — the time-matched control.

Every piece reuses study_diito.py's (the same data, teacher recipe, CLI `train`/`eval` argument
lists) and is cached under --work; an interrupted study resumes (a killed student from its last
Trainer checkpoint), and several processes may share the cache. Budgets run in the order given.

    python benchmarks/study_diito_matched.py --report docs/results.md     # the study (~3 CPU hours, teacher included)
    python benchmarks/study_diito_matched.py --smoke --work /tmp/m        # toy size
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks import study_diito as sd
from benchmarks.studies import Busy, mean_std, paired, write_section

HEADING = "## DIITO at matched time (`benchmarks/study_diito_matched.py`)"
NAME = "study_diito_matched"
#: DIITO FULL / standard time per step, from benchmarks/distill_step.py (docs/benchmarks.md, full mode).
RATIO = 1.51
VARIANTS = ("standard", "full", sd.MATCHED)
LAYERS = 3


def budget_work(work: Path, steps: int) -> Path:
    """The cache of one budget's runs; it shares the study's data and teacher through links."""
    folder = work / f"steps{steps}"
    folder.mkdir(parents=True, exist_ok=True)
    for shared in ("data", "teacher"):
        link = folder / shared
        if not link.exists():
            link.symlink_to(Path("..") / shared)
    return folder


def rows_of(work: Path, budgets: list[int], seeds: list[int]) -> dict[int, dict]:
    """budget -> variant -> seed -> run result, for whatever has finished."""
    out = {}
    for b in budgets:
        rows = sd.collect(budget_work(work, b), list(VARIANTS), [LAYERS], seeds)
        out[b] = {v: runs for (v, _), runs in rows.items()}
    return out


def table(rows: dict[int, dict], sizes: dict[int, sd.Size], seeds: list[int]) -> str:
    lines = [("| budget | student | steps | seeds done | held-out MLM perplexity | Δ vs standard (same steps), paired "
              "| Δ FULL − time-matched, paired | teacher-student IIA | s / step | training minutes (mean) |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b, by_variant in rows.items():
        base, matched = by_variant.get("standard", {}), by_variant.get(sd.MATCHED, {})
        for v in VARIANTS:
            runs = by_variant.get(v, {})
            d_std = "—" if v == "standard" else mean_std(paired(runs, base, "perplexity"), "+.2f")
            d_m = mean_std(paired(runs, matched, "perplexity"), "+.2f") if v == "full" else "—"
            secs = [r["train_seconds"] for r in runs.values()]
            lines.append(
                f"| {b} | {sd.LABELS[v]} | {sd.steps_of(v, sizes[b])} | {len(runs)}/{len(seeds)} "
                f"| {mean_std([r['perplexity'] for r in runs.values()])} | {d_std} | {d_m} "
                f"| {mean_std([r['iia'] for r in runs.values()], '.3f')} "
                f"| {mean_std([r['seconds_per_step'] for r in runs.values() if r['seconds_per_step']])} "
                f"| {statistics.mean(secs) / 60:.1f} |" if secs else
                f"| {b} | {sd.LABELS[v]} | {sd.steps_of(v, sizes[b])} | 0/{len(seeds)} | — | — | — | — | — | — |")
    return "\n".join(lines)


def per_seed(rows: dict[int, dict]) -> str:
    lines = ["| budget | run | steps | perplexity | IIA |", "| --- | --- | --- | --- | --- |"]
    for b, by_variant in rows.items():
        for v, runs in by_variant.items():
            for s, r in sorted(runs.items()):
                lines.append(f"| {b} | {v} seed {s} | {r['steps']} | {r['perplexity']:.2f} | {r['iia']:.3f} |")
    return "\n".join(lines)


def plot(rows: dict[int, dict], teacher_ppl: float, path: Path) -> Path | None:
    """Perplexity against training steps (each run a dot, mean ± std per point), and the paired gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r for by in rows.values() for r in by.values()):
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"standard": "#777", "full": "#2a7", sd.MATCHED: "#36c"}
    for v in VARIANTS:
        pts = [(r["steps"], r["perplexity"]) for by in rows.values() for r in by.get(v, {}).values()]
        if not pts:
            continue
        left.scatter(*zip(*pts), s=14, alpha=0.5, color=colors[v])
        steps = sorted({x for x, _ in pts})
        means = [statistics.mean([y for x, y in pts if x == s]) for s in steps]
        stds = [statistics.stdev(ys) if len(ys := [y for x, y in pts if x == s]) > 1 else 0.0 for s in steps]
        left.errorbar(steps, means, yerr=stds, fmt="-o", capsize=4, color=colors[v], label=sd.LABELS[v])
    if teacher_ppl:
        left.axhline(teacher_ppl, color="k", ls="--", lw=1, label=f"teacher {teacher_ppl:.2f}")
    left.set_xlabel("student training steps")
    left.set_ylabel("held-out MLM perplexity (lower is better)")
    left.set_title(f"{LAYERS}-layer students: perplexity by training length", fontsize=10)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    budgets = sorted(rows)
    for other, label, color in (("standard", "FULL − standard (same steps)", "#777"),
                                (sd.MATCHED, "FULL − time-matched standard", "#36c")):
        d = [paired(rows[b].get("full", {}), rows[b].get(other, {}), "perplexity") for b in budgets]
        xs = [b for b, x in zip(budgets, d) if x]
        if xs:
            right.errorbar(xs, [statistics.mean(x) for x in d if x],
                           yerr=[statistics.stdev(x) if len(x) > 1 else 0.0 for x in d if x],
                           fmt="-o", capsize=4, color=color, label=label)
    right.axhline(0, color="k", lw=1)
    right.set_xlabel("budget (DIITO's steps)")
    right.set_ylabel("Δ perplexity, paired by seed (< 0: DIITO better)")
    right.set_title("DIITO's gain: same steps vs same time, mean ± std over seeds", fontsize=10)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def timing(work: Path) -> dict:
    """Wall clock from the data's preparation to the newest finished run; summed training seconds."""
    runs = list(work.glob("steps*/runs/*/result.json"))
    first = (work / "data" / "result.json").stat().st_mtime
    last = max([p.stat().st_mtime for p in runs] + [(work / "teacher" / "result.json").stat().st_mtime])
    train = sum(json.loads(p.read_text()).get("train_seconds", 0) for p in runs)
    return {"wall_minutes": (last - first) / 60, "student_train_minutes": train / 60}


def generated(rows, sizes, teacher: dict, info: dict, seeds, png: Path | None, command: str, work: Path) -> str:
    import os

    import torch

    clock = timing(work)
    size = next(iter(sizes.values()))
    done = sum(len(r) for by in rows.values() for r in by.values())
    expected = len(rows) * len(VARIANTS) * len(seeds)
    lines = ["Regenerate (resumes from the cache in `--work`; finished runs are reused):", "", "```", command, "```", "",
             (f"Hardware: {platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, torch "
              f"{torch.__version__}, {torch.get_num_threads()} torch thread(s) per process. Wall clock from the first "
              f"piece to the last finished one: {clock['wall_minutes']:.0f} min (students' training summed over "
              f"runs: {clock['student_train_minutes']:.0f} min). Runs finished: {done}/{expected}."), ""]
    if done < expected:
        lines += ["**Partial study**: the rows with fewer seeds than asked are still running or were not run.", ""]
    lines += [(f"Data and teacher: the DIITO study's recipe (WikiText-2 `test.txt`, {info.get('train_sentences')} "
               f"training sentences; the first {info.get('eval_sentences')} sentences of `valid.txt` held out), a "
               f"freshly trained BERT masked-LM teacher ({size.teacher_layers} layers, width {size.hidden}, "
               f"{size.teacher_steps} steps), held-out MLM perplexity "
               f"**{teacher.get('perplexity', float('nan')):.2f}**. Students: {LAYERS} layers from the teacher's "
               f"blocks, batch {size.batch_size}; standard = ce + mlm + cos (1/3 each), DIITO FULL = ce + mlm + cos "
               "+ diito (1/4 each); per seed the three share the initialisation and data order. Time-matched "
               f"control: standard for {size.matched_factor} × the budget's steps, the DIITO/standard time per "
               "step of `benchmarks/distill_step.py`. No SST-2 fine-tunes here."), "",
              table(rows, sizes, seeds), ""]
    if png is not None:
        lines += [f"![DIITO vs standard by training length]({png.name})", ""]
    lines += ["<details><summary>per seed</summary>", "", per_seed(rows), "", "</details>"]
    return "\n".join(lines)


def main(argv=None, log=print) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(sd.DATA), help="folder holding wikitext-2/ and sst-2/")
    ap.add_argument("--work", default="outputs/study_diito_matched", help="cache of every finished piece")
    ap.add_argument("--budgets", type=int, nargs="+", default=None,
                    help="DIITO's steps per point (default 600; e.g. 600 200 adds the 200-step point on the same teacher)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ratio", type=float, default=RATIO, help="time-matched steps / budget")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="toy size on a synthetic corpus (seconds)")
    ap.add_argument("--report", help="results markdown to put the study's section in (e.g. docs/results.md)")
    ap.add_argument("--plot", help="plot PNG (default: study_diito_matched.png next to --report)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from cached results")
    a = ap.parse_args(argv)
    base = replace(sd.SMOKE if a.smoke else sd.Size(), matched_factor=a.ratio)
    budgets = a.budgets or ([4, 2] if a.smoke else [600])
    sizes = {b: replace(base, student_steps=b) for b in budgets}
    data, work = Path(a.data), Path(a.work)
    need = [data / "wikitext-2" / "test.txt", data / "wikitext-2" / "valid.txt", data / "sst-2" / "train.tsv"]
    if not a.smoke and not (work / "data" / "result.json").is_file() and not all(p.is_file() for p in need):
        missing = [str(p) for p in need if not p.is_file()]
        log(f"skipped: the study's data is not there ({', '.join(missing)}); see ../shared/data/README.md")
        return {"skipped": True, "missing": missing}
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    work.mkdir(parents=True, exist_ok=True)
    saved, shape = work / "size.json", {k: v for k, v in asdict(base).items() if k != "student_steps"}
    if saved.is_file() and json.loads(saved.read_text()) != shape:
        log(f"error: {work} holds a study of another size ({saved}); use another --work or the same options")
        return {"error": "size mismatch"}
    saved.write_text(json.dumps(shape, indent=2))
    start, ran, reused, busy = time.time(), [], [], []
    info = sd.prepare_data(work, data, base, a.smoke)
    if not a.report_only:
        sd.build_teacher(work, base, log)
        for b in budgets:
            for s in a.seeds:
                for v in VARIANTS:
                    name = f"{b}:{v}-L{LAYERS}-s{s}"
                    try:
                        _, was = sd.run_student(budget_work(work, b), sizes[b], v, LAYERS, s, log)
                    except Busy:
                        busy.append(name)
                        continue
                    (reused if was else ran).append(name)
    teacher = json.loads((work / "teacher" / "result.json").read_text()) \
        if (work / "teacher" / "result.json").is_file() else {}
    rows = rows_of(work, budgets, a.seeds)
    result = {"teacher": teacher, "data": info, "ratio": a.ratio, "ran": ran, "reused": reused, "busy": busy,
              "seconds": round(time.time() - start, 1),
              "rows": {str(b): {v: runs for v, runs in by.items()} for b, by in rows.items()}}
    (work / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    if a.report:
        png = Path(a.plot) if a.plot else Path(a.report).parent / "study_diito_matched.png"
        png = plot(rows, teacher.get("perplexity", 0.0), png) or png
        shown = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--report-only"]
        command = "python benchmarks/study_diito_matched.py " + shlex.join(shown)
        text = generated(rows, sizes, teacher, info, a.seeds, png if png.is_file() else None, command, work)
        write_section(Path(a.report), HEADING, text, NAME)
        result["plot"] = str(png)
    log(f"done in {result['seconds']:.0f}s: ran {len(ran)}, reused {len(reused)}, busy {len(busy)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
