# python simulations/growth_probe.py --out /tmp/growth_probe
# (re-run parts with --parts A|B|C|M; results accumulate in OUT/results.json and the tables between the
#  probe markers of docs/growth.md are rewritten from them; heatmaps go to docs/img/)
"""Growth probe: does developmental growth give SmolLM2-135M a head start worth its compute?

Centralised (no Flower), one seed, the built-in task suite. Parts:

A. Layer similarity on every view (stage 0, fresh LoRA): heatmaps, off-diagonal statistics, the groups
   each grouping mode makes at 4, 8 and 15 layers, and the time each view takes.
B. Submodels at init: eval loss of every construction (grouping/selection mode × view), a β / fusion
   sweep, the time to plan and build each stage (cold and from the disk cache), parameter counts.
C. Training: per capacity and construction, the submodel's eval loss after K LoRA steps, the full model's
   eval loss after knowledge transfer, then after F more full-model steps (best two per capacity), against
   a fresh full-model LoRA at the same training FLOPs; the LoRA view after a trained stage.
M. Peak training memory of a client holding only the submodel (one subprocess per capacity).

Single-threaded torch: on a shared 2-core machine one thread per process is faster than two.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from devft.data import generate_task_suite
from devft.growth import (
    GrowthSettings,
    build_submodel,
    group_layers,
    layer_similarity,
    make_plan,
    submodel_cache_dir,
    submodel_lora,
    transfer_lora,
)
from devft.growth.similarity import calibration_batch
from devft.models import LoraSettings, attach_lora, count_parameters, load_lora_state, load_model, lora_state
from devft.training import TrainSettings, eval_loss, train_lora

log = logging.getLogger("growth_probe")

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "growth.md"
IMG = REPO / "docs" / "img"
BEGIN, END = "<!-- growth-probe:begin -->", "<!-- growth-probe:end -->"

MODEL = "smollm2-135m"
CAPACITIES = (4, 8, 15)
VIEWS = ("flat", "module", "hidden", "cka", "update-cka")  # at stage 0 (B = 0) flat = flat-base, module = module-base
SPECTRAL = ("dglg", "dglg-ratiocut", "contiguous")
LORA = LoraSettings(r=8, alpha=16.0)
LR, BATCH = 1e-3, 8
SUB_STEPS, FULL_STEPS = 16, 4  # K and F
FRESH_CHECKPOINTS = (4, 8, 12, 16)
NUM_TRAIN, NUM_EVAL = 256, 30
# Constructions trained per capacity (the grid is cut at 8 and 15 to fit ~20 min on a shared machine).
TRAIN_GRID = {
    4: ("dglg", "contiguous", "even", "even/r-one", "random", "first", "spaced"),
    8: ("dglg", "even", "first", "spaced"),
    15: ("dglg", "first"),
}


class Probe:
    """Models, data and results shared by the parts."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.results_path = out / "results.json"
        self.results: dict = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.loaded = load_model(MODEL)
        self.base = self.loaded.model  # plain: similarity and submodels are built from it
        self.tok = self.loaded.tokenizer
        self.full = attach_lora(load_model(MODEL).model, LORA, seed=0)  # the full model with LoRA
        self.fresh = {k: v.clone() for k, v in lora_state(self.full).items()}
        self.train = generate_task_suite(NUM_TRAIN, seed=0)
        seen = {(e["instruction"], e["input"]) for e in self.train}
        self.eval = [e for e in generate_task_suite(3 * NUM_EVAL, seed=1) if (e["instruction"], e["input"]) not in seen]
        self.eval = self.eval[:NUM_EVAL]
        self.sims: dict[str, np.ndarray] = {}
        sims_path = out / "similarity_stage0.npz"
        if sims_path.exists():
            self.sims = dict(np.load(sims_path))

    def save(self) -> None:
        self.results_path.write_text(json.dumps(self.results, indent=1, sort_keys=True))

    def loss(self, model: torch.nn.Module) -> float:
        return round(eval_loss(model, self.tok, self.eval, batch_size=15, max_length=128), 4)

    def full_loss(self, state: dict) -> float:
        load_lora_state(self.full, state)
        return self.loss(self.full)

    def plan(self, construction: str, capacity: int, **overrides):
        """A stage-0 plan: ``mode`` or ``mode:view`` (view defaults to the best one found in part B)."""
        mode, _, view = construction.partition(":")
        view = view or self.results.get("best_view", "hidden")
        settings = GrowthSettings(grouping=mode, similarity=view, **overrides)
        return make_plan(self.base, 0, capacity, settings, self.sims.get(view))

    def submodel(self, plan, state: dict):
        peft_sub = attach_lora(build_submodel(self.base, plan, use_cache=False), LORA, seed=0)
        load_lora_state(peft_sub, submodel_lora(state, plan))
        return peft_sub


# ------------------------------------------------------------------------------------------------ part A


def part_a(p: Probe) -> None:
    calib = calibration_batch(p.tok)
    stats, groups, timing = {}, {}, {}
    for view in VIEWS:
        start = time.perf_counter()
        sim = layer_similarity(p.base, view, lora=p.fresh, lora_scale=LORA.scale, calibration=calib)
        timing[view] = round(time.perf_counter() - start, 2)
        p.sims[view] = sim
        off = sim[~np.eye(len(sim), dtype=bool)]
        adjacent = np.diag(sim, 1)
        stats[view] = {"min": round(float(off.min()), 4), "max": round(float(off.max()), 4),
                       "mean": round(float(off.mean()), 4), "adjacent_mean": round(float(adjacent.mean()), 4)}  # fmt: skip
        _heatmap(sim, view, f"{view} (stage 0)", IMG / f"growth_similarity_{view}.png")
        for mode in SPECTRAL:
            for cap in CAPACITIES:
                groups[f"{mode}:{view}:{cap}"] = [list(g) for g in group_layers(30, cap, mode, sim, seed=0)]
        log.info("A: %s in %.1fs, off-diagonal %s", view, timing[view], stats[view])
    np.savez(p.out / "similarity_stage0.npz", **p.sims)
    p.results["A"] = {"stats": stats, "groups": groups, "time_s": timing,
                      "calibration_tokens": int(calib["attention_mask"].sum())}  # fmt: skip
    p.save()


def _heatmap(sim: np.ndarray, view: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=90)
    off = sim[~np.eye(len(sim), dtype=bool)]
    image = ax.imshow(sim, cmap="viridis", vmin=float(off.min()), vmax=float(off.max()))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ part B


def part_b(p: Probe) -> None:
    res: dict = {"full_no_lora": p.full_loss(p.fresh)}
    init: dict[str, float] = {}
    for cap in (4, 8):
        for view in VIEWS:
            init[f"dglg:{view}:{cap}"] = _init_loss(p, f"dglg:{view}", cap)
    best = min(VIEWS, key=lambda v: sum(init[f"dglg:{v}:{c}"] for c in (4, 8)))
    p.results["best_view"] = best
    log.info("B: best view %s", best)
    for cap in CAPACITIES:
        names = [f"dglg-ratiocut:{best}", f"contiguous:{best}", "even", "random", "first", "spaced"]
        if cap == 15:
            names = [f"dglg:{best}", *names]
        for name in names:
            init[f"{name}:{cap}"] = _init_loss(p, name, cap)
    res["init"] = init
    sweep = {}
    for fusion, beta in (("r-one", 0.0), ("dblf", 0.05), ("dblf", 0.1), ("dblf", 0.2), ("sum", 0.0)):
        for name in (f"dglg:{best}", "even"):
            plan = p.plan(name, 8, fusion=fusion, beta=beta)
            sweep[f"{name}:{fusion}:{beta}"] = _eval_plan(p, plan)
    res["fusion_sweep_8"] = sweep
    # time to plan (similarity + grouping) and build each stage, cold and from the disk cache
    timing = {}
    for cap in CAPACITIES:
        start = time.perf_counter()
        sim = layer_similarity(p.base, best, lora=p.fresh, lora_scale=LORA.scale, tokenizer=p.tok)
        plan = make_plan(p.base, 0, cap, GrowthSettings(similarity=best), sim)
        plan_s = time.perf_counter() - start
        shutil.rmtree(submodel_cache_dir(plan), ignore_errors=True)
        start = time.perf_counter()
        sub = build_submodel(p.base, plan)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        sub = build_submodel(p.base, plan)
        warm_s = time.perf_counter() - start
        shutil.rmtree(submodel_cache_dir(plan), ignore_errors=True)
        start = time.perf_counter()
        sub_lora = submodel_lora(p.fresh, plan)
        lora_s = time.perf_counter() - start
        own = sum(t.numel() for layer in sub.model.layers for t in layer.parameters())
        timing[cap] = {"plan_s": round(plan_s, 2), "build_cold_s": round(cold_s, 2), "build_cached_s": round(warm_s, 2),
                       "fuse_lora_s": round(lora_s, 3), "layer_params": own,
                       "total_params": sum(t.numel() for t in sub.parameters()),
                       "lora_params": count_parameters(sub_lora)}  # fmt: skip
        del sub
    timing[30] = {"layer_params": sum(t.numel() for layer in p.base.model.layers for t in layer.parameters()),
                  "total_params": sum(t.numel() for t in p.base.parameters()),
                  "lora_params": count_parameters(p.fresh)}  # fmt: skip
    res["stage_cost"] = timing
    p.results["B"] = res
    p.save()


def _eval_plan(p: Probe, plan) -> float:
    peft_sub = p.submodel(plan, p.fresh)
    value = p.loss(peft_sub)
    del peft_sub
    gc.collect()
    return value


def _init_loss(p: Probe, name: str, cap: int) -> float:
    value = _eval_plan(p, p.plan(name, cap))
    log.info("B: init %s @%d = %.3f", name, cap, value)
    return value


# ------------------------------------------------------------------------------------------------ part C


def part_c(p: Probe) -> None:
    settings = TrainSettings(lr=LR, max_steps=SUB_STEPS, batch_size=BATCH, seed=0)
    runs: dict = p.results.get("C", {}).get("runs", {})
    states: dict[str, dict] = {}
    for cap, constructions in TRAIN_GRID.items():
        for construction in constructions:
            mode, _, fusion = construction.partition("/")  # "even/r-one": even groups, anchors only
            name = f"{mode}:{p.results['best_view']}" if mode in SPECTRAL else mode
            key = f"{name}/{fusion}:{cap}" if fusion else f"{name}:{cap}"
            plan = p.plan(name, cap, fusion=fusion) if fusion else p.plan(name, cap)
            peft_sub = p.submodel(plan, p.fresh)
            result = train_lora(peft_sub, p.tok, p.train, settings)
            sub_loss = p.loss(peft_sub)
            state = transfer_lora(p.fresh, lora_state(peft_sub), plan)
            states[key] = state
            run = {"groups": [list(g) for g in plan.groups], "sub_after": sub_loss, "full_after_transfer": p.full_loss(state),
                   "sub_train_flops": result.flops, "sub_train_s": round(result.wall_s, 1),
                   "sub_train_loss": round(result.loss, 4)}  # fmt: skip
            if construction in ("dglg", "even"):  # the other transfer rule, and the views the next stage would group on
                run["full_after_anchor_transfer"] = p.full_loss(transfer_lora(p.fresh, lora_state(peft_sub), plan, "anchor"))
                if cap == 4 and construction == "dglg":
                    _next_stage_views(p, state)
            runs[key] = run
            log.info("C: %s sub %.3f -> full %.3f (%.0fs)", key, sub_loss, run["full_after_transfer"], result.wall_s)
            del peft_sub
            gc.collect()
            p.results["C"] = {"runs": runs}
            p.save()
        best2 = sorted((k for k in runs if k.endswith(f":{cap}") and k in states), key=lambda k: runs[k]["full_after_transfer"])[:2]
        for key in best2:
            result = train_lora(_loaded(p, states[key]), p.tok, p.train, TrainSettings(lr=LR, max_steps=FULL_STEPS, batch_size=BATCH, seed=0))
            runs[key]["full_after_continue"] = p.loss(p.full)
            runs[key]["full_continue_flops"] = result.flops
            runs[key]["full_continue_s"] = round(result.wall_s, 1)
            log.info("C: %s after %d full steps %.3f", key, FULL_STEPS, runs[key]["full_after_continue"])
            p.save()
    p.results["C"]["fresh"] = _fresh_curve(p)
    p.save()


def _loaded(p: Probe, state: dict):
    load_lora_state(p.full, state)
    return p.full


def _fresh_curve(p: Probe) -> dict:
    curve = {0: p.full_loss(p.fresh)}
    eval_s = []

    def on_step(step: int, _loss: float) -> None:
        if step + 1 in FRESH_CHECKPOINTS:
            start = time.perf_counter()
            curve[step + 1] = p.loss(p.full)
            p.full.train()
            eval_s.append(time.perf_counter() - start)
            log.info("C: fresh full LoRA after %d steps %.3f", step + 1, curve[step + 1])

    load_lora_state(p.full, p.fresh)
    steps = max(FRESH_CHECKPOINTS)
    result = train_lora(p.full, p.tok, p.train, TrainSettings(lr=LR, max_steps=steps, batch_size=BATCH, seed=0), on_step=on_step)
    return {"loss": curve, "flops_per_step": result.flops / steps, "train_s_per_step": round((result.wall_s - sum(eval_s)) / steps, 2)}


def _next_stage_views(p: Probe, state: dict) -> None:
    """After a trained 4-layer stage: the LoRA view and the LoRA-aware best view, and their 8-group plans."""
    out = {}
    for view in ("lora", p.results["best_view"], "flat"):
        sim = layer_similarity(p.base, view, lora=state, lora_scale=LORA.scale, tokenizer=p.tok)
        _heatmap(sim, view, f"{view} (stage 1, after the 4-layer stage)", IMG / f"growth_similarity_stage1_{view}.png")
        off = sim[~np.eye(len(sim), dtype=bool)]
        out[view] = {"min": round(float(off.min()), 4), "max": round(float(off.max()), 4), "mean": round(float(off.mean()), 4),
                     "dglg_8": [list(g) for g in group_layers(30, 8, "dglg", sim)]}  # fmt: skip
    p.results["A_stage1"] = out


# ------------------------------------------------------------------------------------------------ part M


def part_m(p: Probe | None) -> None:
    memory = {}
    for cap in (*CAPACITIES, 30):
        cmd = [sys.executable, __file__, "--memory-child", str(cap)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"memory child {cap} failed: {proc.stderr[-2000:]}")
        memory[cap] = json.loads(line[-1])
        log.info("M: %d layers %s", cap, memory[cap])
    assert p is not None
    p.results["M"] = memory
    p.save()


def memory_child(cap: int) -> None:
    """A client's process: load the base model, build the submodel, drop the base, train 2 steps.

    RSS counts the pages of the memory-mapped base checkpoint that were read, so "ready" is after the
    base is gone (submodel copied, base released) for submodels, and after loading for the full model.
    """
    from devft.metrics.memory import current_rss_mb

    torch.set_num_threads(1)
    start_rss = current_rss_mb()
    loaded = load_model(MODEL)
    tok = loaded.tokenizer
    loaded_rss = current_rss_mb()
    if cap < 30:
        plan = make_plan(loaded.model, 0, cap, GrowthSettings(grouping="even"))
        # The submodel shares embeddings and head with the base, whose weights transformers maps from the
        # safetensors file: copy it so nothing refers to the base any more, then drop the base.
        model = copy.deepcopy(build_submodel(loaded.model, plan, use_cache=False))
        loaded = None
        gc.collect()
    else:
        model = loaded.model
    peft_model = attach_lora(model, LORA)
    ready_rss = current_rss_mb()
    result = train_lora(peft_model, tok, generate_task_suite(64, seed=0), TrainSettings(lr=LR, max_steps=2, batch_size=BATCH))
    print(json.dumps({"rss_start_mb": round(start_rss), "rss_base_loaded_mb": round(loaded_rss),
                      "rss_ready_mb": round(ready_rss), "peak_train_rss_mb": round(result.peak_rss_mb),
                      "step_s": round(result.wall_s / 2, 2), "flops_per_step": result.flops / 2}))  # fmt: skip


# ------------------------------------------------------------------------------------------------ report


def _fmt_groups(groups: list[list[int]]) -> str:
    parts = []
    for g in groups:
        contiguous = g == list(range(g[0], g[-1] + 1))
        parts.append(f"{g[0]}–{g[-1]}" if contiguous and len(g) > 1 else ("{" + ",".join(map(str, g)) + "}" if len(g) > 1 else str(g[0])))
    return " ".join(parts)


def _order(key: str) -> int:
    """Position of a run's construction in its capacity's row of TRAIN_GRID (table order)."""
    name, cap = key.rsplit(":", 1)
    mode, _, fusion = name.partition("/")
    construction = mode.split(":")[0] + (f"/{fusion}" if fusion else "")
    grid = TRAIN_GRID.get(int(cap), ())
    return grid.index(construction) if construction in grid else len(grid)


def _sizes(groups: list[list[int]]) -> str:
    return "/".join(str(len(g)) for g in groups)


def render(results: dict) -> str:
    lines: list[str] = []
    add = lines.append
    a, b, c, m = (results.get(k) for k in ("A", "B", "C", "M"))
    if a:
        add("### Similarity views (stage 0, fresh LoRA: B = 0, so flat = flat-base and module = module-base)\n")
        add(f"Calibration batch for functional views: the 16 built-in texts, {a['calibration_tokens']} tokens.\n")
        add("| view | off-diag min | max | mean | adjacent-layer mean | time s | heatmap |")
        add("|---|---|---|---|---|---|---|")
        for view, s in a["stats"].items():
            add(f"| {view} | {s['min']} | {s['max']} | {s['mean']} | {s['adjacent_mean']} | {a['time_s'][view]} | "
                f"![{view}](img/growth_similarity_{view}.png) |")  # fmt: skip
        add("\nGroup sizes per view and mode (groups ordered by anchor):\n")
        add("| view | mode | 4 | 8 | 15 |")
        add("|---|---|---|---|---|")
        for view in a["stats"]:
            for mode in SPECTRAL:
                add(f"| {view} | {mode} | " + " | ".join(_sizes(a["groups"][f"{mode}:{view}:{cap}"]) for cap in CAPACITIES) + " |")
        best = results.get("best_view")
        if best:
            add(f"\nGroups of dglg on `{best}` (the best view, see below):\n")
            for cap in CAPACITIES:
                add(f"- {cap}: {_fmt_groups(a['groups'][f'dglg:{best}:{cap}'])}")
    if results.get("A_stage1"):
        add("\n### After a trained 4-layer stage (dglg, copy transfer): views for planning stage 2\n")
        add("| view | off-diag min | max | mean | dglg groups at 8 |")
        add("|---|---|---|---|---|")
        for view, s in results["A_stage1"].items():
            add(f"| {view} | {s['min']} | {s['max']} | {s['mean']} | {_fmt_groups(s['dglg_8'])} |")
    if b:
        add(f"\n### Submodels at init (eval loss on {NUM_EVAL} held-out task examples; ln 49152 = 10.80)\n")
        add(f"Full model, no LoRA: **{b['full_no_lora']}**.\n")
        names = sorted({k.rsplit(':', 1)[0] for k in b["init"]})
        add("| construction | 4 | 8 | 15 |")
        add("|---|---|---|---|")
        for name in names:
            add(f"| {name} | " + " | ".join(str(b["init"].get(f"{name}:{cap}", "—")) for cap in CAPACITIES) + " |")
        add("\nFusion sweep at 8 layers (eval loss at init):\n")
        add("| grouping | fusion | β | loss |")
        add("|---|---|---|---|")
        for key, value in b["fusion_sweep_8"].items():
            name, fusion, beta = key.rsplit(":", 2)
            add(f"| {name} | {fusion} | {beta} | {value} |")
        add("\nCost of each stage (plan = similarity + grouping; build = fuse base layers; one thread):\n")
        add("| layers | plan s | build s (cold) | build s (cached) | fuse LoRA s | decoder-layer params | total params | LoRA params |")
        add("|---|---|---|---|---|---|---|---|")
        for cap, s in sorted(b["stage_cost"].items(), key=lambda kv: int(kv[0])):
            add(f"| {cap} | {s.get('plan_s', '—')} | {s.get('build_cold_s', '—')} | {s.get('build_cached_s', '—')} | "
                f"{s.get('fuse_lora_s', '—')} | {s['layer_params'] / 1e6:.1f} M | {s['total_params'] / 1e6:.1f} M | "
                f"{s['lora_params'] / 1e6:.2f} M |")  # fmt: skip
    if m:
        add("\n### Client memory (a fresh process per row: load the base, build the submodel, drop the base, train 2 steps)\n")
        add("RSS includes ~630 MB of imported libraries. The base checkpoint is memory-mapped, so RSS counts only the "
            "pages read: the full model's 'ready' row has not read its weights yet; its training peak has.\n")  # fmt: skip
        add("| layers | RSS base loaded MB | RSS ready to train MB | peak RSS training MB | s / step | GFLOP / step |")
        add("|---|---|---|---|---|---|")
        for cap, s in sorted(m.items(), key=lambda kv: int(kv[0])):
            add(f"| {cap} | {s['rss_base_loaded_mb']} | {s['rss_ready_mb']} | {s['peak_train_rss_mb']} | {s['step_s']} | "
                f"{s['flops_per_step'] / 1e9:.0f} |")  # fmt: skip
    if c and "fresh" in c:
        fresh = {int(k): v for k, v in c["fresh"]["loss"].items()}
        per_step = c["fresh"]["flops_per_step"]
        steps = sorted(fresh)
        add(f"\n### Training: K = {SUB_STEPS} submodel steps, transfer, F = {FULL_STEPS} full-model steps (lr {LR}, batch {BATCH})\n")
        add("Fresh full-model LoRA: " + ", ".join(f"{s} steps {fresh[s]}" for s in steps)
            + f" ({c['fresh']['train_s_per_step']} s/step).\n")  # fmt: skip
        add("`equal-FLOPs fresh` is the fresh full-model LoRA's loss (interpolated) after the same training FLOPs "
            "as submodel + continuation steps.\n")  # fmt: skip
        add("| construction | layers | groups | sub after K | full after transfer | anchor-only transfer | full after +F | "
            "equal-FLOPs fresh | full-step equivalents |")  # fmt: skip
        add("|---|---|---|---|---|---|---|---|---|")
        for key, r in sorted(c["runs"].items(), key=lambda kv: (int(kv[0].rsplit(":", 1)[1]), _order(kv[0]))):
            name, cap = key.rsplit(":", 1)
            total = r["sub_train_flops"] + r.get("full_continue_flops", FULL_STEPS * per_step)
            equiv = total / per_step
            fresh_at = float(np.interp(equiv, steps, [fresh[s] for s in steps]))
            add(f"| {name} | {cap} | {_sizes(r['groups'])} | {r['sub_after']} | {r['full_after_transfer']} | "
                f"{r.get('full_after_anchor_transfer', '—')} | {r.get('full_after_continue', '—')} | {fresh_at:.4f} | {equiv:.1f} |")  # fmt: skip
    return "\n".join(lines)


def write_doc(results: dict) -> None:
    block = f"{BEGIN}\n<!-- generated by simulations/growth_probe.py: do not edit by hand -->\n\n{render(results)}\n\n{END}"
    text = DOC.read_text() if DOC.exists() else f"# Developmental growth on SmolLM2-135M\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    DOC.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/growth_probe"))
    parser.add_argument("--parts", default="ABCM", help="which parts to run (letters of A, B, C, M)")
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--render-only", action="store_true", help="rewrite docs/growth.md from OUT/results.json")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("devft.growth", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        write_doc(json.loads((args.out / "results.json").read_text()))
        return
    p = Probe(args.out)
    start = time.perf_counter()
    for part, fn in (("A", part_a), ("B", part_b), ("C", part_c), ("M", part_m)):
        if part in args.parts:
            t0 = time.perf_counter()
            fn(p)
            p.results.setdefault("wall_s", {})[part] = round(time.perf_counter() - t0)
            p.save()
            write_doc(p.results)
            log.info("part %s done in %.0fs", part, time.perf_counter() - t0)
    log.info("probe done in %.0fs", time.perf_counter() - start)


if __name__ == "__main__":
    main()
