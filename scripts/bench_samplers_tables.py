"""Markdown tables of scripts/bench_samplers.py's results (rows as in benchmarks/samplers.json)."""
from __future__ import annotations

from fdistill.samplers.recommend import RECOMMENDED_SOLVERS


def accuracy_tables(rows: list[dict]) -> str:
    """Per teacher and schedule: every method's median L2 error per budget (and digits FD where measured)."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    budgets = sorted({row["budget"] for row in rows})
    index = {(r["teacher"], r["schedule"], r["budget"], r["method"]): r for r in rows}
    lines = []
    for teacher, kind in dict.fromkeys((row["teacher"], row["schedule"]) for row in rows):
        present = [m for m in methods if (teacher, kind, budgets[0], m) in index]     # e.g. no DC rows (--no-dc)
        with_fd = "digits_fd" in index[(teacher, kind, budgets[0], present[0])]
        lines += [f"\n#### {teacher}, {kind} sigmas: median L2 error{' / digits FD' if with_fd else ''} (NFE budget; "
                  "actual NFE in brackets when lower)\n",
                  "| method | " + " | ".join(f"NFE {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for method in present:
            group = [index[(teacher, kind, b, method)] for b in budgets]
            best = [min(index[(teacher, kind, b, m)]["median_error"] for m in present) for b in budgets]
            cells = [(f"**{r['median_error']:.2e}**" if r["median_error"] == low else f"{r['median_error']:.2e}")
                     + (f" / {r['digits_fd']:.2f}" if with_fd else "")
                     + ("" if r["nfe"] == r["budget"] else f" ({r['nfe']})") for r, low in zip(group, best)]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(summary: list[dict]) -> str:
    lines = ["\n#### Best fdistill method vs best Diffusers method (median L2 error; ratio = Diffusers / fdistill)\n",
             "| teacher | schedule | NFE | fdistill best | error | Diffusers best | error | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s['teacher']} | {s['schedule']} | {s['budget']} | {s['fdistill']} | {s['fdistill_error']:.2e} | "
              f"{s['diffusers']} | {s['diffusers_error']:.2e} | {s['ratio']:.2f} |" for s in summary]
    return "\n".join(lines)


def v3_goal_table(goal: list[dict]) -> str:
    met, calibrated_met = (sum(g[key] for g in goal) for key in ("meets_goal", "calibrated_meets_goal"))
    lines = [f"\n#### DPM-Solver-v3 + EMS vs Diffusers' best on the mixtures and digits, NFE 5-10 (goal: >= 20 % lower "
             f"error; met in {met} of {len(goal)} with the defaults, {calibrated_met} calibrated)\n",
             "| teacher | schedule | NFE | v3 + EMS | ahead by | calibrated (variant) | ahead by | Diffusers best "
             "| error |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {g['teacher']} | {g['schedule']} | {g['budget']} | {g['v3_error']:.2e} | {100 * g['ahead']:.0f} % | "
              f"{g['calibrated_error']:.2e} ({g['variant']}) | {100 * g['calibrated_ahead']:.0f} % | "
              f"{g['diffusers']} | {g['diffusers_error']:.2e} |" for g in goal]
    return "\n".join(lines)


def recommendation_table(best: dict[int, dict]) -> str:
    lines = ["\n#### Best `--solver` per NFE budget (geometric mean of median error over the teachers and schedules)\n",
             "| NFE | best | geometric-mean error | runner-up | `fdistill sample` default |", "|---|---|---|---|---|"]
    lines += [f"| {budget} | {b['solver']} | {b['geometric_mean_error']:.2e} | {b['runner_up']} | "
              f"{RECOMMENDED_SOLVERS.get(budget, '')} |" for budget, b in best.items()]
    return "\n".join(lines)


def dc_table(rows: list[dict]) -> str:
    """DC-Solver (searched ratios and CPR) against its base, UniPC bh2 (order 3), per setting."""
    index = {(r["teacher"], r["schedule"], r["budget"], r["method"]): r["median_error"] for r in rows}
    keys = list(dict.fromkeys((r["teacher"], r["schedule"], r["budget"]) for r in rows
                              if r["method"] == "dc_solver searched"))
    lines = ["\n#### DC-Solver vs its base UniPC bh2 (median L2 error; ratios searched per setting on 16 other starts; "
             "CPR fitted on the searches at NFE 5, 8, 10, 20)\n",
             "| teacher | schedule | NFE | unipc_bh2 | dc_solver searched | dc_solver CPR |", "|---|---|---|---|---|---|"]
    lines += [f"| {t} | {k} | {b} | {index[(t, k, b, 'unipc_bh2')]:.2e} | {index[(t, k, b, 'dc_solver searched')]:.2e} | "
              f"{index[(t, k, b, 'dc_solver CPR')]:.2e} |" for t, k, b in keys]
    return "\n".join(lines)
