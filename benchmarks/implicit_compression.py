"""Finding (f): compression by implicit training dynamics, and the plugin on top of it.

The digits MLP 64-256-256-10 (ReLU) is trained with no explicit compression —
no regulariser, no factorised layer — while only the training dynamics that are
known to change spectra vary: the learning-rate / batch-size ratio, weight
decay, training length, and SGD (momentum 0.9, L2 weight decay) against AdamW
(decoupled weight decay). Every run's spectral and neuron compressibility
(stable rank, rank at 99 % energy, c_spec, c_neu, prunable share) and
robustness (PGD L∞ / L2, universal-perturbation fooling rate, certified K₂)
are measured; the script then asks

1. whether more implicitly compressible runs are less robust (Spearman over
   all runs, each compressibility measure against each robustness measure);
2. whether, at equal normalised margin (as in finding (b)), the less
   concentrated model is the more robust;
3. whether the plugin (σ₁², and σ₁² + tail energy at the run's own rank99)
   restores robustness on the most compressible / most concentrated dynamics
   without undoing their compression (≤ 1 point clean loss, ≥ 90 % of rank99
   and of the prunable share kept).

Run (not part of CI; 14 minutes measured on 2 CPU cores, one thread, shared with 2–6 other
processes — one 60-epoch run takes about 6 s on an idle core)::

    python benchmarks/implicit_compression.py --seeds 0 1 2

Results go to ``implicit_results.json`` (resumable: finished runs are kept)
and section (f) of ``FINDINGS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import statistics
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import robustcompress as rc  # noqa: E402

import _findings_common as C  # noqa: E402

PENALTY = 1e-2  # σ₁² strength (the library default)
TAIL = 1e-3  # tail-energy strength, as in finding (e)


@dataclasses.dataclass(frozen=True)
class Dyn:
    """One training recipe (no explicit compression unless a penalty is named)."""

    name: str
    family: str  # "AdamW" or "SGD"
    optimizer: str = "adamw"
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 1e-2
    epochs: int = 60
    penalty: float = 0.0
    tail: float = 0.0
    tail_k: tuple[int, ...] = ()

    @property
    def lr_over_b(self) -> float:
        return self.lr / self.batch_size


def grid(epochs_scale: float = 1.0) -> list[Dyn]:
    """The dynamics varied, one factor at a time around an AdamW and an SGD base recipe."""
    e = lambda n: max(1, round(n * epochs_scale))  # noqa: E731
    adam = dict(family="AdamW", optimizer="adamw", lr=1e-3, batch_size=64, weight_decay=1e-2, epochs=e(60))
    sgd = dict(family="SGD", optimizer="sgd", lr=0.05, batch_size=64, weight_decay=5e-4, epochs=e(60))
    out = [Dyn("AdamW (base)", **adam)]
    out += [Dyn(f"AdamW wd {wd:g}", **{**adam, "weight_decay": wd}) for wd in (0.0, 0.1, 0.5)]
    out += [Dyn(f"AdamW {n} ep", **{**adam, "epochs": e(n)}) for n in (20, 200)]
    out += [Dyn("AdamW lr 3e-4 B 256", **{**adam, "lr": 3e-4, "batch_size": 256}),
            Dyn("AdamW lr 3e-3 B 16", **{**adam, "lr": 3e-3, "batch_size": 16})]
    out += [Dyn("SGD (base)", **sgd)]
    out += [Dyn(f"SGD wd {wd:g}", **{**sgd, "weight_decay": wd}) for wd in (0.0, 2e-3, 5e-3)]
    out += [Dyn(f"SGD {n} ep", **{**sgd, "epochs": e(n)}) for n in (20, 200)]
    out += [Dyn("SGD lr 0.01 B 256", **{**sgd, "lr": 0.01, "batch_size": 256}),
            Dyn("SGD lr 0.2 B 64", **{**sgd, "lr": 0.2}),
            Dyn("SGD lr 0.1 B 16", **{**sgd, "lr": 0.1, "batch_size": 16})]
    return out


def build(seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return rc.MLP(64, (256, 256), 10)


def penalties_for(d: Dyn, seed: int):
    if not d.penalty:
        return None

    def make(model):
        state = rc.SpectralState(model, k=max(d.tail_k, default=1), seed=seed)
        terms = [rc.SpectralNormPenalty(state, strength=d.penalty, mode="square")]
        if d.tail:
            hidden = [n for n, _ in C.weight_layers(model)][:-1]
            terms += [rc.TailEnergyPenalty(state, k=k, strength=d.tail, layers=[n]) for n, k in zip(hidden, d.tail_k)]
        return terms
    return make


def run_one(d: Dyn, seed: int, quick: bool) -> dict:
    train, test = rc.digits(seed=seed)
    model = build(seed)
    t0 = time.perf_counter()
    try:
        C.train(model, train, epochs=d.epochs, batch_size=d.batch_size, seed=seed, optimizer=d.optimizer, lr=d.lr,
                weight_decay=d.weight_decay, penalties=penalties_for(d, seed))
    except FloatingPointError as err:
        return {"diverged": str(err), "seconds": time.perf_counter() - t0}
    row = C.measure(model, train, test, seed, pgd_steps=10 if quick else 40, uap_epochs=2 if quick else 5)
    row["seconds"] = time.perf_counter() - t0
    return row


# ----------------------------------------------------------------------------- analysis

# (key, label, reduce, sign): sign +1 when a larger value means *more* compressible.
COMPRESS = [
    ("stable_rank", "mean stable rank", lambda r: C.layer_mean(r, "stable_rank"), -1),
    ("rank99", "mean rank99", lambda r: C.layer_mean(r, "rank99"), -1),
    ("c_spec", "mean c_spec", lambda r: C.layer_mean(r, "c_spec"), +1),
    ("c_neu", "mean c_neu", lambda r: C.layer_mean(r, "c_neu"), +1),
    ("prunable", "prunable share", lambda r: r["prunable"], +1),
]
# sign +1 when a larger value means *more* robust.
ROBUST = [
    ("pgd_linf", "PGD L∞ ε=0.1", lambda r: r["pgd_linf"], +1),
    ("pgd_l2", "PGD L2 ε=0.5", lambda r: r["pgd_l2"], +1),
    ("uap", "UAP fooling rate", lambda r: r["uap"], -1),
    ("k2", "K₂", lambda r: r["k2"], -1),
]
COLS = [
    ("clean", lambda r: r["clean"], 3), ("PGD L∞ 0.05", lambda r: r["pgd_linf_005"], 3),
    ("PGD L∞ 0.1", lambda r: r["pgd_linf"], 3), ("PGD L2 0.5", lambda r: r["pgd_l2"], 3),
    ("UAP fool", lambda r: r["uap"], 3), ("K₂", lambda r: r["k2"], 1),
    ("stable rank", lambda r: C.layer_mean(r, "stable_rank"), 2), ("rank99", lambda r: C.layer_mean(r, "rank99"), 1),
    ("c_spec", lambda r: C.layer_mean(r, "c_spec"), 3), ("c_neu", lambda r: C.layer_mean(r, "c_neu"), 4),
    ("prunable", lambda r: r["prunable"], 3), ("½Σ log c_spec", lambda r: r["log_concentration"], 2),
    ("M/Π‖W‖_F", lambda r: r["norm_margin"], 5),
]


def ok_runs(results: dict, name: str) -> dict:
    return {s: r for s, r in results.get(name, {}).items() if "diverged" not in r}


def agg(results, name, fn):
    return C.mean_std(fn(r) for r in ok_runs(results, name).values())


def table(results, names) -> list[str]:
    out = ["| recipe | " + " | ".join(c[0] for c in COLS) + " |", "|---|" + "---|" * len(COLS)]
    for n in names:
        if ok_runs(results, n):
            out.append(f"| {n} | " + " | ".join(C.fmt(agg(results, n, fn), d) for _, fn, d in COLS) + " |")
    return out


def pick_targets(results: dict, names: list[str], how_many: int = 2) -> list[str]:
    """The recipes the plugin is tried on: the lowest mean rank99 and the highest mean c_spec (clean ≥ 0.95)."""
    cand = [n for n in names if ok_runs(results, n) and agg(results, n, lambda r: r["clean"])[0] >= 0.95]
    by_rank = sorted(cand, key=lambda n: agg(results, n, lambda r: C.layer_mean(r, "rank99"))[0])[:how_many]
    by_conc = sorted(cand, key=lambda n: -agg(results, n, lambda r: C.layer_mean(r, "c_spec"))[0])[:how_many]
    return list(dict.fromkeys(by_rank + by_conc))


def plugin_specs(results: dict, base: Dyn) -> list[Dyn]:
    runs = ok_runs(results, base.name)
    per_layer = [statistics.fmean(r["layers"][n]["rank99"] for r in runs.values()) for n in next(iter(runs.values()))["layers"]]
    k = tuple(max(1, round(v)) for v in per_layer)
    return [dataclasses.replace(base, name=f"{base.name} + σ₁²", penalty=PENALTY),
            dataclasses.replace(base, name=f"{base.name} + σ₁² + tail", penalty=PENALTY, tail=TAIL, tail_k=k)]


def report(results: dict, dyn: list[Dyn], plugin: list[tuple[str, list[Dyn]]], command: str, seconds: float,
           n_seeds: int) -> tuple[str, list[tuple[str, bool]]]:
    verdicts: list[tuple[str, bool]] = []
    names = [d.name for d in dyn]
    runs = [(n, s, r) for n in names for s, r in ok_runs(results, n).items()]
    diverged = [f"{n} seed {s}" for n in names for s, r in results.get(n, {}).items() if "diverged" in r]
    n = len(runs)
    crit = 1.96 / math.sqrt(max(n - 1, 1))
    out = ["## (f) Compression by implicit training dynamics", "",
           "Generated by `benchmarks/implicit_compression.py`; mean ± std over "
           f"{n_seeds} seeds (seed = split, initialisation, batch order, attack starts). Command:", "",
           "```", command, "```", "",
           "MLP 64-256-256-10 (ReLU), **no explicit compression**: no regulariser, no factorised layer. One factor at a "
           "time is varied around two base recipes — AdamW (lr 1e-3, batch 64, decoupled weight decay 1e-2, 60 "
           "epochs; the dense model of (a)) and SGD (momentum 0.9, lr 0.05, batch 64, L2 weight decay 5e-4, 60 "
           "epochs): weight decay, training length, learning rate / batch size. Measures as in (a)–(e) (PGD-40, "
           "UAP L∞ ε=0.1, certified K₂, prunable share at ≤ 1 point loss); stable rank = ‖W‖_F²/σ₁², rank99 and "
           "c_spec = σ₁²/‖W‖_F², c_neu = max_i‖w_i‖²/‖W‖_F², all means over the two hidden layers. "
           f"Total training + measuring time: {seconds / 60:.1f} min"
           + (f"; diverged (left out): {', '.join(diverged)}" if diverged else "") + ".", "",
           *table(results, names), ""]
    # 1. Spearman over runs
    out += [f"### More implicitly compressible ⇒ less robust? (Spearman over all {n} runs)", "",
            "Each cell is ρ(compressibility measure, robustness measure) over the runs; the paper's claim predicts a "
            "negative correlation between *compressibility* and *robustness*, which for each cell is the sign shown "
            f"in brackets. A cell counts as held when ρ has that sign and |ρ| > {crit:.2f} (two-sided 5 % level for "
            f"n = {n}).", "",
            "| compressibility (→ more compressible) | " + " | ".join(f"{lab}" for _, lab, _, _ in ROBUST) + " |",
            "|---|" + "---|" * len(ROBUST)]
    rho_tab: dict[tuple[str, str], float] = {}
    for ck, clab, cfn, csign in COMPRESS:
        cells = []
        for rk, rlab, rfn, rsign in ROBUST:
            xs = [cfn(r) for _, _, r in runs]
            ys = [rfn(r) for _, _, r in runs]
            rho = C.spearman(xs, ys)
            want = -csign * rsign  # sign of ρ(raw compress value, raw robust value) the claim predicts
            held = rho * want > 0 and abs(rho) > crit
            rho_tab[(ck, rk)] = rho
            cells.append(f"{rho:+.2f} ({'+' if want > 0 else '−'}) {'held' if held else '**did not hold**'}")
            if rk in ("pgd_linf", "uap"):
                verdicts.append((f"(f) more implicitly compressible ({clab}) ⇒ {'lower ' + rlab if rk == 'pgd_linf' else 'higher ' + rlab} "
                                 f"(Spearman ρ = {rho:+.2f}, n = {n})", held))
        out.append(f"| {clab} ({'higher' if csign > 0 else 'lower'}) | " + " | ".join(cells) + " |")
    # within each family
    fam_lines = []
    for fam in ("AdamW", "SGD"):
        sub = [(nm, s, r) for nm, s, r in runs if next(d for d in dyn if d.name == nm).family == fam]
        if len(sub) > 3:
            r1 = C.spearman([C.layer_mean(r, "rank99") for *_, r in sub], [r["pgd_linf"] for *_, r in sub])
            r2 = C.spearman([C.layer_mean(r, "c_spec") for *_, r in sub], [r["pgd_linf"] for *_, r in sub])
            r3 = C.spearman([C.layer_mean(r, "rank99") for *_, r in sub], [r["norm_margin"] for *_, r in sub])
            fam_lines.append(f"- {fam} recipes only ({len(sub)} runs): ρ(rank99, PGD L∞) = {r1:+.2f}, "
                             f"ρ(c_spec, PGD L∞) = {r2:+.2f}, ρ(rank99, normalised margin) = {r3:+.2f}.")
    rm = C.spearman([C.layer_mean(r, "rank99") for *_, r in runs], [r["norm_margin"] for *_, r in runs])
    rs = C.spearman([C.layer_mean(r, "rank99") for *_, r in runs], [r["log_scale"] for *_, r in runs])
    rml = C.spearman([r["norm_margin"] for *_, r in runs], [r["pgd_linf"] for *_, r in runs])
    held_any = [c for c, ok in verdicts if ok]
    out += ["", *fam_lines,
            f"- Scale: ρ(rank99, Σ log‖W‖_F) = {rs:+.2f}, ρ(rank99, normalised margin) = {rm:+.2f}, "
            f"ρ(normalised margin, PGD L∞) = {rml:+.2f} over all runs.", "",
            f"Reading: over all recipes, {len(held_any)} of the {len(verdicts)} PGD L∞ / UAP cells above held. "
            + (f"Across runs a lower rank99 goes with a larger scale-free margin (ρ = {rm:+.2f}), the scale effect "
               "seen with the regularisers of (b), so compressibility alone does not predict robustness across "
               "recipes; the like-for-like comparison below separates scale and concentration." if rm < 0 else
               "Compressibility alone does not predict robustness across these recipes; the like-for-like "
               "comparison below separates scale and concentration."), ""]
    # 2. equal normalised margin
    models = []
    for nm in names:
        if ok_runs(results, nm):
            models.append((nm, agg(results, nm, lambda r: r["norm_margin"])[0],
                           agg(results, nm, lambda r: r["log_concentration"])[0],
                           *agg(results, nm, lambda r: r["pgd_linf"])))
    models.sort(key=lambda m: m[1])
    agree, total = C.margin_agreement(models)
    held_margin = total > 0 and agree >= 0.75 * total
    verdicts.append((f"(f) at equal normalised margin the less concentrated recipe is the more robust "
                     f"({agree} of {total} pairs)", held_margin))
    out += ["### Like for like: at equal normalised margin", "",
            "Recipes sorted by the median normalised margin `M/Π_l‖W_l‖_F` (means over seeds), as in (b):", "",
            "| recipe | M/Π‖W‖_F | ½Σ log c_spec | mean rank99 | PGD L∞ ε=0.1 |", "|---|---|---|---|---|"]
    out += [f"| {nm} | {mg:.5f} | {cc:.2f} | {agg(results, nm, lambda r: C.layer_mean(r, 'rank99'))[0]:.1f} | "
            f"{m:.3f} ± {s:.3f} |" for nm, mg, cc, m, s in models]
    out += ["", f"Pairs within ±15 % normalised margin whose robust accuracy differs by more than 2 points: {total}; "
            f"in {agree} of them the more robust recipe has the smaller concentration term ½Σ log c_spec: "
            f"{C.yes(held_margin)}.", ""]
    # 3. plugin
    out += ["### The plugin on implicitly compressed models", "",
            f"Chosen from the table above by the script (clean ≥ 0.95): the two recipes with the lowest mean rank99 and "
            f"the two with the highest mean c_spec. Each is retrained (same recipe, seeds, data order) with "
            f"`SpectralNormPenalty(state, strength={PENALTY:g}, mode=\"square\")` on the hidden layers (\"+ σ₁²\", the "
            f"current `default_penalties`) and with that plus `TailEnergyPenalty(state, k=k_l, strength={TAIL:g})` per "
            "hidden layer, k_l = the recipe's own mean rank99 of that layer (\"+ σ₁² + tail\", as in (e)). Checks, "
            "paired by seed: PGD L∞ ε=0.1 gain > 0, ≤ 1 point clean loss, mean rank99 ≤ baseline / 0.9, prunable "
            "share ≥ 0.9 × baseline.", ""]
    pnames = [d.name for _, specs in plugin for d in specs]
    out += table(results, pnames) + [""]
    any_all = []
    for base, specs in plugin:
        for d in specs:
            if not ok_runs(results, d.name) or not ok_runs(results, base):
                continue
            b_runs, p_runs = ok_runs(results, base), ok_runs(results, d.name)
            common = [s for s in b_runs if s in p_runs]
            delta = lambda fn: C.mean_std(fn(p_runs[s]) - fn(b_runs[s]) for s in common)  # noqa: E731
            d_rob = delta(lambda r: r["pgd_linf"])
            d_l2 = delta(lambda r: r["pgd_l2"])
            d_uap = delta(lambda r: r["uap"])
            d_clean = delta(lambda r: r["clean"])
            k0 = agg(results, base, lambda r: C.layer_mean(r, "rank99"))[0]
            k1 = agg(results, d.name, lambda r: C.layer_mean(r, "rank99"))[0]
            p0 = agg(results, base, lambda r: r["prunable"])[0]
            p1 = agg(results, d.name, lambda r: r["prunable"])[0]
            checks = [d_rob[0] > 0, d_clean[0] >= -0.01, k1 <= k0 / 0.9, p1 >= 0.9 * p0]
            verdicts.append((f"(f) {d.name}: PGD L∞ {d_rob[0]:+.3f}, clean {d_clean[0]:+.3f}, rank99 {k0:.1f} → "
                             f"{k1:.1f}, prunable {p0:.3f} → {p1:.3f} (all four checks)", all(checks)))
            any_all.append((base, all(checks)))
            out.append(f"- **{d.name}** (paired): PGD L∞ ε=0.1 {C.fmt(d_rob)}, PGD L2 {C.fmt(d_l2)}, UAP fooling "
                       f"{C.fmt(d_uap)}, clean {C.fmt(d_clean)} (≤ 1 point loss: {C.yes(checks[1])}); mean rank99 "
                       f"{k0:.1f} → {k1:.1f} (kept: {C.yes(checks[2])}); prunable {p0:.3f} → {p1:.3f} (kept: "
                       f"{C.yes(checks[3])}); robustness raised: {C.yes(checks[0])}.")
    bases = list(dict.fromkeys(b for b, _ in any_all))
    if bases:
        every = all(any(ok for b2, ok in any_all if b2 == b) for b in bases)
        verdicts.append(("(f) every implicitly compressed recipe tried has a plugin variant passing all four checks",
                         every))
    summary = ["### Verdicts", "", "| claim | verdict |", "|---|---|"]
    summary += [f"| {c} | {'held' if ok else '**did not hold**'} |" for c, ok in verdicts]
    return "\n".join(out[:1] + [""] + summary + [""] + out[1:]), verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every recipe's epochs (smoke tests)")
    parser.add_argument("--quick", action="store_true", help="PGD-10 and 2 UAP epochs (smoke test)")
    parser.add_argument("--results", default=str(HERE / "implicit_results.json"))
    parser.add_argument("--markdown", default=str(HERE / "FINDINGS.md"))
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = pathlib.Path(args.results)
    results = C.load_matching(path, args.fresh, {"epochs_scale": args.epochs_scale, "quick": args.quick})
    if results is None:
        return 2
    dyn = grid(args.epochs_scale)

    def run_all(specs: list[Dyn]) -> None:
        todo = [(d, s) for d in specs for s in args.seeds if str(s) not in results.get(d.name, {})]
        t0 = time.perf_counter()
        for i, (d, s) in enumerate(todo, 1):
            row = run_one(d, s, args.quick)
            results.setdefault(d.name, {})[str(s)] = row
            C.save(path, results)
            msg = (f"clean {row['clean']:.3f} L∞ {row['pgd_linf']:.3f} rank99 {C.layer_mean(row, 'rank99'):.1f} "
                   f"c_spec {C.layer_mean(row, 'c_spec'):.3f}" if "diverged" not in row else row["diverged"])
            print(f"[{i}/{len(todo)} {time.perf_counter() - t0:5.0f}s] {d.name:28s} seed {s}: {msg}", flush=True)

    if not args.report_only:
        run_all(dyn)
    targets = pick_targets(results, [d.name for d in dyn])
    plugin = [(t, plugin_specs(results, next(d for d in dyn if d.name == t))) for t in targets]
    if not args.report_only:
        run_all([d for _, specs in plugin for d in specs])
    seconds = sum(r.get("seconds", 0.0) for k, v in results.items() if k != "_meta" for r in v.values())
    shown = ["python benchmarks/implicit_compression.py --seeds", *map(str, args.seeds)]
    if args.epochs_scale != 1.0:
        shown += ["--epochs-scale", f"{args.epochs_scale:g}"]
    if args.quick:
        shown.append("--quick")
    text, _ = report(results, dyn, plugin, " ".join(shown), seconds, len(args.seeds))
    C.replace_section(pathlib.Path(args.markdown), "f", text)
    print(f"wrote section (f) of {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
